// Small helpers shared by the .cu kernel files. Deliberately free of ATen and
// torch headers so each .cu file compiles in seconds.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace pixelcnn_kernels {

// Element types a kernel is instantiated for; the glue code maps torch dtypes to these.
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

template <typename T>
__device__ __forceinline__ float to_float(T v);
template <>
__device__ __forceinline__ float to_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// v rounded to T's precision, as a value stored in a T tensor and read back.
template <typename T>
__device__ __forceinline__ float round_to(float v) {
  return to_float(from_float<T>(v));
}

// Calls `fn` with a value of the element type named by `dtype`:
//   dispatch_dtype(dtype, [&](auto tag) { using T = decltype(tag); ... });
template <typename Fn>
void dispatch_dtype(DType dtype, Fn&& fn) {
  switch (dtype) {
    case DType::kFloat32: fn(float{}); break;
    case DType::kFloat16: fn(__half{}); break;
    case DType::kBFloat16: fn(__nv_bfloat16{}); break;
  }
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Cached sampling's fused draws end alike: images[index] becomes `drawn` unless `known` (then it
// keeps its value), and *input, when given, the network input of that value's bin, looked up in
// bin_inputs (clamped: a known value is a bin, the sampler checks its prefix, but the lookup
// never leaves the table).
template <typename T>
__device__ __forceinline__ void write_drawn_value(int64_t* images, int64_t index, bool known, int64_t drawn, T* input,
                                                  const T* bin_inputs, int num_bins) {
  const int64_t value = known ? images[index] : drawn;
  images[index] = value;
  if (input != nullptr) *input = bin_inputs[value < 0 ? 0 : (value >= num_bins ? num_bins - 1 : value)];
}

}  // namespace pixelcnn_kernels
