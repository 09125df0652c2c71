"""pixelcnn-kernels: fused Triton and CUDA kernels for PixelCNN-family models.

Ops (each a ``torch.library`` custom op with autograd and a fake implementation,
running on the ``reference``, ``triton`` or ``cuda`` backend, see
:mod:`pixelcnn_kernels.backend`), their ``nn`` modules, drop-in models and tools.
"""

__version__ = "0.1.0"

from pixelcnn_kernels.backend import BackendUnavailableError, available_backends, use_backend

# --- gates (issue 4) ---
# --- end gates ---

# --- dmol (issue 3) ---
# --- end dmol ---

# --- masked_conv (issue 5) ---
# --- end masked_conv ---

# --- models and tools (issue 6) ---
# --- end models and tools ---
