// Gated activations: one elementwise pass per direction (see gates.h for layouts).
//
// Every kernel is `rows_kernel`, a grid-stride loop over an (outer, row_len) grid
// in pieces of kVec consecutive columns, running one of the functors below on
// each piece. kVec = 16 bytes of elements when every row starts 16-byte aligned
// (row_len % kVec == 0 and aligned base pointers), else 1. The index type is
// 32-bit unsigned when every offset fits in 2^31, else 64-bit. Math is fp32
// (gates.h); loads convert at once, stores round to the storage type.
//
// Floor for the issue's shape, x (64, 256, 32, 32) fp32, tanh * sigmoid forward +
// backward: the forward reads x (67 MB) and writes y (34 MB), the backward reads x
// and grad and writes dx: 268 MB, 65 us at 4.1 TB/s. Each piece costs two
// transcendentals per element and one integer division per kVec elements, well
// under the memory time on an H200, so the kernels should run near copy bandwidth.
#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <type_traits>

#include "gates.h"

namespace pixelcnn_kernels {
namespace {

constexpr int kThreads = 256;
constexpr int kVectorBytes = 16;
// Grid-stride cap: enough resident blocks (2048 threads / SM) for four waves.
constexpr int kBlocksPerSm = 4 * 2048 / kThreads;

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <int N, typename T>
__device__ __forceinline__ void load_floats(const T* p, float (&out)[N]) {
  const Pack<T, N> pack = *reinterpret_cast<const Pack<T, N>*>(p);
#pragma unroll
  for (int k = 0; k < N; ++k) out[k] = to_float(pack.v[k]);
}

template <int N, typename T>
__device__ __forceinline__ void store_floats(T* p, const float (&in)[N]) {
  Pack<T, N> pack;
#pragma unroll
  for (int k = 0; k < N; ++k) pack.v[k] = from_float<T>(in[k]);
  *reinterpret_cast<Pack<T, N>*>(p) = pack;
}

// Where a gate's halves are along the split dimension: a row (outer index) holds 2 * half
// channels of `inner` elements, in blocks [a_1 b_1 | a_2 b_2 | ...] of twice group_size
// channels, the last one the rest (colour groups; group_size == half: one block [a | b]).
struct GateHalves {
  int64_t half, inner, group_size;

  // The channel shifts of output column `col`'s a (from its own channel) and b (from a's):
  // 0 and half with one block. A vector piece never straddles two groups (launch_gate).
  template <typename Index>
  __device__ __forceinline__ void shifts(Index col, Index& a_shift, Index& b_shift) const {
    if (group_size == half) {  // uniform across the grid
      a_shift = 0;
      b_shift = Index(half);
      return;
    }
    const Index channel = col / Index(inner);
    Index a, b;
    colour_group_halves(channel, Index(half), Index(group_size), a, b);
    a_shift = a - channel;
    b_shift = b - a;
  }
};

// The optional per-(batch, channel) bias: a contiguous (batch, 2 * half) in x's channel
// order, added to both halves of a gate's input row.
template <typename T>
struct CondBias {
  const T* cond;  // nullptr: no bias
  int64_t batch_div, batch;

  template <int N, typename Index>
  __device__ __forceinline__ void add(const GateHalves& halves, Index row, Index col, Index a_shift, Index b_shift,
                                      float (&a)[N], float (&b)[N]) const {
    if (cond == nullptr) return;
    const Index batch_row = (row / Index(batch_div)) % Index(batch) * 2 * Index(halves.half);
#pragma unroll
    for (int k = 0; k < N; ++k) {
      const Index a_index = batch_row + (col + k) / Index(halves.inner) + a_shift;
      a[k] += to_float(cond[a_index]);
      b[k] += to_float(cond[a_index + b_shift]);
    }
  }
};

template <GateKind kKind>
__device__ __forceinline__ float gate_math(float a, float b) {
  if constexpr (kKind == GateKind::kTanhSigmoid) {
    return gate_tanh_sigmoid_math(a, b);
  } else {
    return gate_sigmoid_math(a, b);
  }
}

template <GateKind kKind>
__device__ __forceinline__ void gate_grad_math(float a, float b, float grad, float& grad_a, float& grad_b) {
  if constexpr (kKind == GateKind::kTanhSigmoid) {
    gate_tanh_sigmoid_grad_math(a, b, grad, grad_a, grad_b);
  } else {
    gate_sigmoid_grad_math(a, b, grad, grad_a, grad_b);
  }
}

// A gate: x (outer, 2, row_len) -> y (outer, row_len), row_len = half * inner.
template <typename T, GateKind kKind>
struct GateForward {
  const T* x;
  T* y;
  GateHalves halves;
  CondBias<T> bias;

  template <int N, typename Index>
  __device__ __forceinline__ void apply(Index row, Index col, Index row_len) const {
    Index a_shift, b_shift;
    halves.shifts(col, a_shift, b_shift);
    const Index a_offset = row * 2 * row_len + col + a_shift * Index(halves.inner);
    const Index b_offset = a_offset + b_shift * Index(halves.inner);
    float a[N], b[N], out[N];
    load_floats<N>(x + a_offset, a);
    load_floats<N>(x + b_offset, b);
    bias.template add<N>(halves, row, col, a_shift, b_shift, a, b);
#pragma unroll
    for (int k = 0; k < N; ++k) out[k] = gate_math<kKind>(a[k], b[k]);
    store_floats<N>(y + row * row_len + col, out);
  }
};

// Its backward: grad (outer, row_len), x (outer, 2, row_len) -> dx (outer, 2, row_len), plus
// `accumulate` (x's shape, may be null: x's gradient from its other uses) added before dx's rounding.
template <typename T, GateKind kKind>
struct GateBackward {
  const T* grad;
  const T* x;
  const T* accumulate;
  T* dx;
  GateHalves halves;
  CondBias<T> bias;

  template <int N, typename Index>
  __device__ __forceinline__ void apply(Index row, Index col, Index row_len) const {
    Index a_shift, b_shift;
    halves.shifts(col, a_shift, b_shift);
    const Index a_offset = row * 2 * row_len + col + a_shift * Index(halves.inner);
    const Index b_offset = a_offset + b_shift * Index(halves.inner);
    float a[N], b[N], g[N], grad_a[N], grad_b[N];
    load_floats<N>(x + a_offset, a);
    load_floats<N>(x + b_offset, b);
    load_floats<N>(grad + row * row_len + col, g);
    bias.template add<N>(halves, row, col, a_shift, b_shift, a, b);
#pragma unroll
    for (int k = 0; k < N; ++k) gate_grad_math<kKind>(a[k], b[k], g[k], grad_a[k], grad_b[k]);
    if (accumulate != nullptr) {
      float other_a[N], other_b[N];
      load_floats<N>(accumulate + a_offset, other_a);
      load_floats<N>(accumulate + b_offset, other_b);
#pragma unroll
      for (int k = 0; k < N; ++k) {
        grad_a[k] += other_a[k];
        grad_b[k] += other_b[k];
      }
    }
    store_floats<N>(dx + a_offset, grad_a);
    store_floats<N>(dx + b_offset, grad_b);
  }
};

// concat_elu: x (outer, row_len) -> y (outer, 2, row_len), then with `keep` (y's shape, bytes,
// may be null: PixelCNN++'s dropout, the masked convolution's concat_elu input in training) the
// activation rounded to T as stored without dropout, times keep_scale where kept and 0 elsewhere
// (a product, not a select: a NaN stays NaN, as in the reference).
template <typename T>
struct ConcatEluForward {
  const T* x;
  T* y;
  const uint8_t* keep;
  float keep_scale;

  template <int N, typename Index>
  __device__ __forceinline__ void apply(Index row, Index col, Index row_len) const {
    float v[N], pos[N], neg[N];
    load_floats<N>(x + row * row_len + col, v);
    const Index y_offset = row * 2 * row_len + col;
#pragma unroll
    for (int k = 0; k < N; ++k) {
      const ConcatElu both = concat_elu_math(v[k]);
      pos[k] = both.pos;
      neg[k] = both.neg;
      if (keep != nullptr) {
        pos[k] = round_to<T>(pos[k]) * (keep[y_offset + k] != 0 ? keep_scale : 0.0f);
        neg[k] = round_to<T>(neg[k]) * (keep[y_offset + row_len + k] != 0 ? keep_scale : 0.0f);
      }
    }
    store_floats<N>(y + y_offset, pos);
    store_floats<N>(y + y_offset + row_len, neg);
  }
};

// Its backward: grad (outer, 2, row_len), x (outer, row_len) -> dx (outer, row_len).
template <typename T>
struct ConcatEluBackward {
  const T* grad;
  const T* x;
  T* dx;

  template <int N, typename Index>
  __device__ __forceinline__ void apply(Index row, Index col, Index row_len) const {
    const Index x_offset = row * row_len + col;
    const Index grad_offset = row * 2 * row_len + col;
    float v[N], grad_pos[N], grad_neg[N], out[N];
    load_floats<N>(x + x_offset, v);
    load_floats<N>(grad + grad_offset, grad_pos);
    load_floats<N>(grad + grad_offset + row_len, grad_neg);
#pragma unroll
    for (int k = 0; k < N; ++k) out[k] = concat_elu_grad_math(v[k], grad_pos[k], grad_neg[k]);
    store_floats<N>(dx + x_offset, out);
  }
};

template <int kVec, typename Index, typename Op>
__global__ void __launch_bounds__(kThreads) rows_kernel(Op op, Index outer, Index row_len) {
  const Index pieces_per_row = row_len / kVec;
  const Index pieces = outer * pieces_per_row;
  const Index stride = static_cast<Index>(gridDim.x) * kThreads;
  for (Index piece = static_cast<Index>(blockIdx.x) * kThreads + threadIdx.x; piece < pieces; piece += stride) {
    const Index row = piece / pieces_per_row;
    const Index col = (piece - row * pieces_per_row) * kVec;
    op.template apply<kVec>(row, col, row_len);
  }
}

template <int kVec, typename Index, typename Op>
void launch_rows_kernel(const Op& op, int64_t outer, int64_t row_len, cudaStream_t stream) {
  int device = 0, sm_count = 0;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, device);
  const int64_t pieces = outer * (row_len / kVec);
  const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>(ceil_div(pieces, kThreads), int64_t{sm_count} * kBlocksPerSm));
  rows_kernel<kVec, Index><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(op, static_cast<Index>(outer),
                                                                                  static_cast<Index>(row_len));
}

bool aligned_to_vector(std::initializer_list<const void*> pointers) {
  return std::all_of(pointers.begin(), pointers.end(),
                     [](const void* p) { return reinterpret_cast<uintptr_t>(p) % kVectorBytes == 0; });
}

// Picks the vector width and the index type, then launches `op` over (outer, row_len).
// `numel` is the element count of the largest tensor the op touches; `aligned`
// whether all its tensors start on a 16-byte boundary.
template <typename T, typename Op>
void launch_rows(const Op& op, int64_t outer, int64_t row_len, int64_t numel, bool aligned, cudaStream_t stream) {
  constexpr int kVec = kVectorBytes / sizeof(T);
  const bool vectorized = aligned && row_len % kVec == 0;
  const bool wide = numel >= (int64_t{1} << 31);
  if (vectorized && wide) {
    launch_rows_kernel<kVec, int64_t>(op, outer, row_len, stream);
  } else if (vectorized) {
    launch_rows_kernel<kVec, uint32_t>(op, outer, row_len, stream);
  } else if (wide) {
    launch_rows_kernel<1, int64_t>(op, outer, row_len, stream);
  } else {
    launch_rows_kernel<1, uint32_t>(op, outer, row_len, stream);
  }
}

// A gate's launch: vectorised pieces must not straddle two colour groups, so with groups
// every group's elements (group_size * inner) must fill whole pieces too.
template <typename T, typename Op>
void launch_gate(const Op& op, const GateHalves& halves, int64_t outer, bool aligned, cudaStream_t stream) {
  const bool pieces_within_groups = halves.group_size == halves.half || halves.group_size * halves.inner % (kVectorBytes / sizeof(T)) == 0;
  launch_rows<T>(op, outer, halves.half * halves.inner, outer * 2 * halves.half * halves.inner, aligned && pieces_within_groups, stream);
}

template <typename Fn>
void dispatch_gate_kind(GateKind kind, Fn&& fn) {
  switch (kind) {
    case GateKind::kTanhSigmoid: fn(std::integral_constant<GateKind, GateKind::kTanhSigmoid>{}); break;
    case GateKind::kSigmoid: fn(std::integral_constant<GateKind, GateKind::kSigmoid>{}); break;
  }
}

}  // namespace

void launch_gate_forward(DType dtype, GateKind kind, const void* x, const void* cond, void* y, int64_t outer, int64_t half,
                         int64_t inner, int64_t group_size, int64_t batch_div, int64_t batch, cudaStream_t stream) {
  const GateHalves halves{half, inner, group_size};
  dispatch_dtype(dtype, [&](auto type_tag) {
    using T = decltype(type_tag);
    dispatch_gate_kind(kind, [&](auto kind_tag) {
      const GateForward<T, decltype(kind_tag)::value> op{
          static_cast<const T*>(x), static_cast<T*>(y), halves, {static_cast<const T*>(cond), batch_div, batch}};
      launch_gate<T>(op, halves, outer, aligned_to_vector({x, y}), stream);
    });
  });
}

void launch_gate_backward(DType dtype, GateKind kind, const void* grad, const void* x, const void* cond,
                          const void* accumulate, void* dx, int64_t outer, int64_t half, int64_t inner, int64_t group_size,
                          int64_t batch_div, int64_t batch, cudaStream_t stream) {
  const GateHalves halves{half, inner, group_size};
  dispatch_dtype(dtype, [&](auto type_tag) {
    using T = decltype(type_tag);
    dispatch_gate_kind(kind, [&](auto kind_tag) {
      const GateBackward<T, decltype(kind_tag)::value> op{static_cast<const T*>(grad),
                                                          static_cast<const T*>(x),
                                                          static_cast<const T*>(accumulate),
                                                          static_cast<T*>(dx),
                                                          halves,
                                                          {static_cast<const T*>(cond), batch_div, batch}};
      // A null accumulate, never read, passes the alignment test (address 0).
      launch_gate<T>(op, halves, outer, aligned_to_vector({grad, x, accumulate, dx}), stream);
    });
  });
}

void launch_concat_elu_forward(DType dtype, const void* x, void* y, int64_t outer, int64_t row_len, const uint8_t* keep,
                               float keep_scale, cudaStream_t stream) {
  dispatch_dtype(dtype, [&](auto type_tag) {
    using T = decltype(type_tag);
    const ConcatEluForward<T> op{static_cast<const T*>(x), static_cast<T*>(y), keep, keep_scale};
    launch_rows<T>(op, outer, row_len, outer * 2 * row_len, aligned_to_vector({x, y}), stream);
  });
}

void launch_concat_elu_backward(DType dtype, const void* grad, const void* x, void* dx, int64_t outer, int64_t row_len,
                                cudaStream_t stream) {
  dispatch_dtype(dtype, [&](auto type_tag) {
    using T = decltype(type_tag);
    const ConcatEluBackward<T> op{static_cast<const T*>(grad), static_cast<const T*>(x), static_cast<T*>(dx)};
    launch_rows<T>(op, outer, row_len, outer * 2 * row_len, aligned_to_vector({grad, x, dx}), stream);
  });
}

}  // namespace pixelcnn_kernels
