// Gated activations (see pixelcnn_kernels/reference/gates.py): launchers of the
// kernels in gates.cu and, for other kernels' epilogues, the elementwise math as
// fp32 device functions.
//
// Layout shared by every launcher: tensors are contiguous "rows" in memory order
// around the split dimension. A gate reads x as (outer, 2, half, inner) and
// writes y as (outer, half, inner); concat_elu reads x as (outer, row_len) and
// writes y as (outer, 2, row_len). All tensors of one call share one dtype.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda_utils.h"

namespace pixelcnn_kernels {

enum class GateKind : int { kTanhSigmoid = 0, kSigmoid = 1 };

// y = gate(x[:, 0] + cond_a, x[:, 1] + cond_b). cond: nullptr, or a contiguous
// (batch, 2 * half) bias in x's channel order; row o of x belongs to batch (o / batch_div) % batch.
// group_size: half, or colour groups: the 2 * half channels are blocks [a_1 b_1 | a_2 b_2 | ...]
// of twice group_size channels, the last one the rest; output channel c of group
// g = c / group_size reads a at channel c + g * group_size and b that plus its group's size.
void launch_gate_forward(DType dtype, GateKind kind, const void* x, const void* cond, void* y, int64_t outer, int64_t half,
                         int64_t inner, int64_t group_size, int64_t batch_div, int64_t batch, cudaStream_t stream);

// dx (outer, 2, half, inner) = d gate / d(x + cond) * grad + accumulate, grad (outer, half, inner);
// accumulate: nullptr, or x's shape (x's gradient from its other uses), added in fp32 before dx is rounded.
void launch_gate_backward(DType dtype, GateKind kind, const void* grad, const void* x, const void* cond,
                          const void* accumulate, void* dx, int64_t outer, int64_t half, int64_t inner, int64_t group_size,
                          int64_t batch_div, int64_t batch, cudaStream_t stream);

// y[o, 0, r] = elu(x[o, r]), y[o, 1, r] = elu(-x[o, r]); with keep (a (outer, 2, row_len) byte mask,
// or null) dropped out after: kept elements times keep_scale, the others 0.
void launch_concat_elu_forward(DType dtype, const void* x, void* y, int64_t outer, int64_t row_len, const uint8_t* keep,
                               float keep_scale, cudaStream_t stream);

// dx (outer, row_len) from grad (outer, 2, row_len) and x.
void launch_concat_elu_backward(DType dtype, const void* grad, const void* x, void* dx, int64_t outer, int64_t row_len,
                                cudaStream_t stream);

#if defined(__CUDACC__) || PIXELCNN_CUDA_ON_CPU  // device code: for nvcc, and the build for the CPU (cuda_on_cpu/)
// Elementwise math in fp32, with PyTorch's formulas (no fast-math intrinsics), so
// results match torch's to rounding and infinities and NaNs propagate alike.

__device__ __forceinline__ float sigmoid_math(float x) { return 1.0f / (1.0f + expf(-x)); }

// sigmoid(b) and 1 - sigmoid(b), the latter for b > 0 as e * s, e = exp(-b) (1 - e / (1 + e)
// without the cancellation: at b = 7.7, 1 - s from the rounded s is 1.5e-4 off relatively,
// near the float32 tolerance), and as 1 - s once s rounds to 1, keeping autograd's
// inf * 0 = nan for an infinite factor beside it.
struct SigmoidAndComplement {
  float s, one_minus_s;
};
__device__ __forceinline__ SigmoidAndComplement sigmoid_and_complement(float b) {
  const float e = expf(-b);
  const float s = 1.0f / (1.0f + e);
  return {s, b > 0.0f && s < 1.0f ? e * s : 1.0f - s};
}

__device__ __forceinline__ float gate_tanh_sigmoid_math(float a, float b) { return tanhf(a) * sigmoid_math(b); }

__device__ __forceinline__ float gate_sigmoid_math(float a, float b) { return a * sigmoid_math(b); }

// (d/da, d/db) of grad * tanh(a) * sigmoid(b): autograd's products, with
// 1 - tanh(a)^2 computed as 4u / (1 + u)^2, u = exp(-2|a|), where 1 - t*t cancels,
// and 1 - sigmoid(b) by sigmoid_and_complement.
__device__ __forceinline__ void gate_tanh_sigmoid_grad_math(float a, float b, float grad, float& grad_a, float& grad_b) {
  const SigmoidAndComplement sig = sigmoid_and_complement(b);
  const float u = expf(-2.0f * fabsf(a));
  grad_a = grad * sig.s * (4.0f * u / ((1.0f + u) * (1.0f + u)));
  grad_b = grad * tanhf(a) * sig.one_minus_s * sig.s;
}

// (d/da, d/db) of grad * a * sigmoid(b), autograd's products (so inf * 0 = nan alike).
__device__ __forceinline__ void gate_sigmoid_grad_math(float a, float b, float grad, float& grad_a, float& grad_b) {
  const SigmoidAndComplement sig = sigmoid_and_complement(b);
  grad_a = grad * sig.s;
  grad_b = grad * a * sig.one_minus_s * sig.s;
}

// F.elu with alpha = 1: x if x > 0 else expm1(x) (NaN takes the expm1 branch).
__device__ __forceinline__ float elu_math(float x) { return x > 0.0f ? x : expm1f(x); }

// (elu(x), elu(-x)). One of x, -x takes the identity branch, so one expm1(-|x|) serves both
// (two expm1f, each computed whichever branch is taken, held the bf16 forward to about half of
// copy bandwidth); the selects give F.elu's results bit for bit, signed zeros and NaNs included.
struct ConcatElu {
  float pos, neg;
};
__device__ __forceinline__ ConcatElu concat_elu_math(float x) {
  const float e = expm1f(-fabsf(x));
  return {x < 0.0f ? e : x, x > 0.0f ? e : -x};
}

// d/dx of concat_elu given the gradients of its two halves, with PyTorch's elu backward
// grad * exp(z) if z <= 0 else grad (a NaN x passes both through); the -x half's chain rule
// flips its sign. exp(x) for x <= 0 and exp(-x) for x >= 0 are both exp(-|x|): one expf.
__device__ __forceinline__ float concat_elu_grad_math(float x, float grad_pos, float grad_neg) {
  const float e = expf(-fabsf(x));
  return (x <= 0.0f ? grad_pos * e : grad_pos) - (x >= 0.0f ? grad_neg * e : grad_neg);
}

// The channels a, b of gated output channel n's two halves when the 2 * channels pre-activation
// channels are colour-group blocks [a_1 b_1 | a_2 b_2 | ...] of twice group_size, the last one
// the rest (masks.halves_first_channels; group_size == channels: one block [a | b]).
template <typename Index>
__device__ __forceinline__ void colour_group_halves(Index n, Index channels, Index group_size, Index& a, Index& b) {
  const Index group_start = n / group_size * group_size;  // the first output channel of n's group
  const Index group_end = group_start + group_size < channels ? group_start + group_size : channels;
  a = n + group_start;
  b = a + (group_end - group_start);
}
#endif  // __CUDACC__

}  // namespace pixelcnn_kernels
