"""Pure-PyTorch reference implementations: the source of truth for every test and benchmark.

They run on any device and in float64, and are written for clarity, not speed:
``gates``, ``dmol``, ``masked_conv`` and ``layers`` (the PixelCNN layers built
from the reference ops).
"""
