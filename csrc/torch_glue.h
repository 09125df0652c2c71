// Helpers for the *_ops.cpp glue files: torch tensors in, raw pointers and
// DType out. Only the glue files include torch headers; the .cu files do not.
#pragma once

#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <optional>

#include "cuda_utils.h"

// The ops register as torch.ops.pixelcnn_kernels_cuda.* for CUDA tensors; the build for the CPU
// (csrc/cuda_on_cpu/) registers the same kernels as torch.ops.pixelcnn_kernels_cuda_on_cpu.*
// for CPU tensors, so that both libraries can load in one process.
#if PIXELCNN_CUDA_ON_CPU
#define PIXELCNN_OPS_NAMESPACE pixelcnn_kernels_cuda_on_cpu
#define PIXELCNN_KERNELS_DEVICE CPU
#else
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#define PIXELCNN_OPS_NAMESPACE pixelcnn_kernels_cuda
#define PIXELCNN_KERNELS_DEVICE CUDA
#endif

namespace pixelcnn_kernels {

#if PIXELCNN_CUDA_ON_CPU
inline bool on_kernels_device(const at::Tensor& t) { return t.is_cpu(); }
struct KernelsDeviceGuard {
  explicit KernelsDeviceGuard(c10::Device) {}
};
inline cudaStream_t current_stream() { return nullptr; }
#else
inline bool on_kernels_device(const at::Tensor& t) { return t.is_cuda(); }
using KernelsDeviceGuard = c10::cuda::CUDAGuard;
inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }
#endif

// Extents and offsets below this keep the kernels' 32-bit index arithmetic (y + dy,
// channel counts, column offsets) far from overflow.
constexpr int64_t kMaxExtent = int64_t{1} << 30;

inline DType to_kernel_dtype(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: TORCH_CHECK_TYPE(false, name, " must be float32, float16 or bfloat16, got ", t.scalar_type());
  }
}

inline void check_cuda_contiguous(const at::Tensor& t, const char* name) {
  TORCH_CHECK(on_kernels_device(t), name, " must be a CUDA tensor");
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

inline void check_same_device(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK(on_kernels_device(t) && t.device() == ref.device(), name, " is on ", t.device(), " but ", ref_name, " is on ",
              ref.device());
}

inline void check_same_dtype(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), name, " has dtype ", t.scalar_type(), " but ", ref_name,
                   " has dtype ", ref.scalar_type(), "; they must match");
}

// On ref's device and of its dtype.
inline void check_like(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name) {
  check_same_device(t, name, ref, ref_name);
  check_same_dtype(t, name, ref, ref_name);
}

// An operand the kernels read beside `ref`: contiguous, on its device, of its dtype and of exactly `shape`.
inline void check_operand(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name,
                          at::IntArrayRef shape) {
  check_cuda_contiguous(t, name);
  check_like(t, name, ref, ref_name);
  TORCH_CHECK(t.sizes() == shape, name, " must have shape ", shape, ", got ", t.sizes());
}

// An optional activation-typed operand (a residual, an addend, an accumulated gradient) must be like x, of `shape`.
inline void check_optional_operand(const std::optional<at::Tensor>& t, const char* name, const at::Tensor& x,
                                   at::IntArrayRef shape) {
  if (t.has_value()) check_operand(*t, name, x, "x", shape);
}

inline const void* raw_data_or_null(const std::optional<at::Tensor>& t) { return t.has_value() ? t->data_ptr() : nullptr; }

// Raises a RuntimeError naming the kernel when the last launch failed.
inline void check_launch(const char* kernel) {
  cudaError_t err = cudaGetLastError();
  TORCH_CHECK(err == cudaSuccess, kernel, " launch failed: ", cudaGetErrorString(err));
}

}  // namespace pixelcnn_kernels
