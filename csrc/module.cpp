// The Python module object of the extension. Importing pixelcnn_kernels._C loads
// this shared library, whose static TORCH_LIBRARY_FRAGMENT blocks (one per op
// family, in *_ops.cpp) register the CUDA ops as torch.ops.pixelcnn_kernels_cuda.*.
// The module itself exposes nothing: every op is reached through the dispatcher.
#include <Python.h>

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "pixelcnn-kernels CUDA ops", -1, nullptr};
  return PyModule_Create(&module_def);
}
