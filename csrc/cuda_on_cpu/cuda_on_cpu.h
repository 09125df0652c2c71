// The CUDA the kernels use, for compiling csrc/*.cu as C++ that runs on the CPU, so that
// machines without a GPU test the CUDA backend's kernels as TRITON_INTERPRET=1 tests the
// Triton ones (pixelcnn_kernels/cuda_on_cpu/ builds it; PIXELCNN_KERNELS_CUDA_ON_CPU=1).
//
// Force-included before every source of that build. Each CUDA thread of a block is a fiber;
// a block's fibers run one at a time on the calling thread, switching only where a CUDA
// thread would wait for others (__syncthreads, and the warp-synchronous shuffles, ldmatrix
// and mma.sync); blocks run one after another. So the kernels' indexing, tiling, fragment
// layouts, barriers' placement (a divergent __syncthreads or a warp-synchronous op that
// not every lane reaches is reported, not hung) and epilogues run as written, in the CPU's
// IEEE arithmetic (no FMA contraction, glibc's expf and logf; mma.sync sums in fp32 in k
// order). Races between threads do not change its results (threads switch only at those
// points): the ThreadSanitizer build finds them (runtime.cpp). What it cannot show: speed,
// and the GPU's own rounding.
#pragma once

#include <cuda_bf16.h>  // the toolkit's types and conversions, which compile for the host
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <math.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <tuple>
#include <type_traits>

#define PIXELCNN_CUDA_ON_CPU 1

// The toolkit's host headers define the execution-space qualifiers as nothing.
#define __launch_bounds__(...)

// CUDA's math library has these in the global namespace.
using std::isfinite;
using std::isinf;
using std::isnan;
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }

namespace cuda_on_cpu {

// The running CUDA thread's coordinates and its launch's shape.
const uint3& thread_index();
const uint3& block_index();
const dim3& block_dim();
const dim3& grid_dim();

void syncthreads();

// Warp-synchronous exchange: every lane of the warp gives `bytes` (<= kExchangeBytes) and
// gets back the warp's 32 contributions, lane l's at offset l * kExchangeBytes.
constexpr std::size_t kExchangeBytes = 32;
const unsigned char* warp_exchange(const void* mine, std::size_t bytes);
int lane_id();

// The block's dynamic shared memory (the launch's third parameter), 16-byte aligned.
void* dynamic_shared();

// A static `__shared__` array of the running block: the build's rewriting turns
// `__shared__ T name[n];` into `struct S { T name[n]; }; auto& name = block_shared<S>().name;`.
// A block's shared memory (dynamic, then static) is renewed for every block, as on the GPU:
// all bits set (a float NaN, so that a value read before the block wrote it shows), and new
// memory to ThreadSanitizer.
void* static_shared(const void* declaration, std::size_t bytes, std::size_t alignment);
template <typename Array>
Array& block_shared() {
  static const char declaration = 0;
  return *static_cast<Array*>(static_shared(&declaration, sizeof(Array), alignof(Array)));
}

[[noreturn]] void trap();

// Runs body() once for every thread of every block of the grid.
void run_grid(dim3 grid, dim3 block, std::size_t shared_bytes, const std::function<void()>& body);

// `kernel<<<grid, block, shared, stream>>>(args...)` is rewritten to
// `::cuda_on_cpu::launch(grid, block, shared, stream, call)(args...)`, where call(params...)
// calls the kernel: every thread gets its own copy of the arguments, as on the GPU.
template <typename Call>
auto launch(dim3 grid, dim3 block, std::size_t shared_bytes, cudaStream_t, Call call) {
  return [=](const auto&... args) {
    const auto params = std::make_tuple(args...);
    run_grid(grid, block, shared_bytes, [&] { std::apply(call, params); });
  };
}

template <typename T>
T shuffle(T value, int source_lane) {
  static_assert(sizeof(T) <= kExchangeBytes, "one lane's value must fit its exchange slot");
  const unsigned char* slots = warp_exchange(&value, sizeof(T));
  T out;
  std::memcpy(&out, slots + (source_lane & 31) * kExchangeBytes, sizeof(T));
  return out;
}

// ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16: lanes 8j .. 8j + 7 hold the row addresses
// of matrix j; lane l = 4g + t receives in r[j] the elements (g, 2t), (g, 2t + 1) of matrix j,
// or with trans (2t, g), (2t + 1, g); the first in the low half.
void load_matrices_x4(uint32_t (&r)[4], const void* row_address, bool transposed);

// mma.sync.aligned.m16n8k{16 (16-bit elements), 8 (tf32)}.row.col.f32: d += a * b.
enum class MmaInput { kBFloat16, kFloat16, kTf32 };
void mma(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], MmaInput input);

// cvt.rna.tf32.f32: to 10 mantissa bits, to nearest, ties away from zero.
uint32_t to_tf32_rna(float v);

// The runtime API the sources call.
cudaError_t get_last_error();
const char* get_error_string(cudaError_t error);
cudaError_t get_device(int* device);
cudaError_t device_get_attribute(int* value, cudaDeviceAttr attribute, int device);
cudaError_t memset_async(void* dst, int value, std::size_t bytes, cudaStream_t stream);

}  // namespace cuda_on_cpu

#define threadIdx (::cuda_on_cpu::thread_index())
#define blockIdx (::cuda_on_cpu::block_index())
#define blockDim (::cuda_on_cpu::block_dim())
#define gridDim (::cuda_on_cpu::grid_dim())

inline void __syncthreads() { ::cuda_on_cpu::syncthreads(); }
[[noreturn]] inline void __trap() { ::cuda_on_cpu::trap(); }
template <typename T>
inline T __ldg(const T* p) {
  return *p;
}
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
template <typename T>
inline T __shfl_sync(unsigned, T value, int source_lane) {
  return ::cuda_on_cpu::shuffle(value, source_lane);
}
template <typename T>
inline T __shfl_xor_sync(unsigned, T value, int lane_mask) {
  return ::cuda_on_cpu::shuffle(value, ::cuda_on_cpu::lane_id() ^ lane_mask);
}
template <typename T>
inline T __shfl_up_sync(unsigned, T value, unsigned delta) {
  const int lane = ::cuda_on_cpu::lane_id();
  const T shifted = ::cuda_on_cpu::shuffle(value, lane - static_cast<int>(delta));
  return lane >= static_cast<int>(delta) ? shifted : value;  // lanes below delta keep their own
}

// Runtime calls renamed, so they never bind to a libcudart loaded in the same process.
#define cudaGetLastError ::cuda_on_cpu::get_last_error
#define cudaGetErrorString ::cuda_on_cpu::get_error_string
#define cudaGetDevice ::cuda_on_cpu::get_device
#define cudaDeviceGetAttribute ::cuda_on_cpu::device_get_attribute
#define cudaMemsetAsync ::cuda_on_cpu::memset_async
