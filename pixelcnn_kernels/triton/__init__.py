"""Triton kernels, one module per op family (kernels, then launchers).

Import these modules lazily (inside the backend dispatch), after
``TRITON_INTERPRET`` has its final value: ``triton.jit`` reads it when a kernel
is defined.
"""
