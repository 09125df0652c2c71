"""The public ops as ``torch.library`` custom ops (validation, backend dispatch, fake, autograd).

Each op is one ``torch.library.custom_op`` whose body picks the backend (reference,
Triton or CUDA) when it runs, not ``torch.library.triton_op``: one schema, fake and
autograd serve all three backends, and ``use_backend`` keeps working inside a
compiled model (a ``triton_op`` is traced into Triton launches when compiled, which
fixes the Triton backend at compile time and leaves the CUDA one out).
:mod:`~pixelcnn_kernels.ops.registration` defines them, and calls them without
torch.library's dispatch where nothing intercepts the call (plain eager code).
"""
