// Launchers of the masked-convolution CUDA kernels (csrc/masked_conv.cu).
//
// A masked convolution is resolved on the host (pixelcnn_kernels/ops/masked_conv.py)
// to its T active taps: a packed weight wp (T, Cin, Cout) and the taps' offsets
// (dy_t, dx_t), already scaled by the dilation and relative to the output pixel.
// Activations are channels-last, (N, H, W, C) contiguous. With M = N*H*W pixels:
//
//   forward   out[m, co]    = bias[co] + sum_t sum_ci x[shift_t(m), ci] * wp[t, ci, co]
//   dgrad     gx[m, ci]     = sum_t sum_co gout[shift_-t(m), co] * wp[t, ci, co]
//   wgrad     gwp[t, ci, co] = sum_m x[shift_t(m), ci] * gout[m, co],
//             written as the weight's gradient grad[co, ci, i_t, j_t] (WeightGradLayout)
//
// where shift_t(n, y, x) = (n, y + dy_t, x + dx_t) and pixels outside the image read
// as zero. Masked-out taps are not in the list, so no kernel ever loads or
// multiplies them. Torch-free: included by the .cu file and by the glue.
//
// Two fusions ride on these GEMMs. A residual (the output's shape) is added last in
// the forward's epilogue. When the conv's input is concat_elu(x) = elu(cat([x, -x],
// channels)) (x has C = Cin / 2 channels), the forward and wgrad take that activation
// as their x (the glue writes it with gates.h's launch_concat_elu_forward, dropout
// included), while dgrad, given x, accumulates the gradients g1, g2 w.r.t. elu(x),
// elu(-x) side by side and its epilogue writes the gradient w.r.t. x,
// g1 * elu'(x) - g2 * elu'(-x); given `keep` (PixelCNN++'s dropout after concat_elu, in
// training: the conv's input was keep ? concat_elu(x) * keep_scale : 0) it takes g1, g2
// through the same dropout first.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda_utils.h"

namespace pixelcnn_kernels {
namespace masked_conv {

// Most active taps a launch takes (a full 7x7 kernel). The offsets travel in the
// kernels' parameter space, so no kernel reads a mask or a masked-out tap.
inline constexpr int kMaxTaps = 49;

// The convolution's sizes and taps, shared by the forward and both backward passes.
struct ConvProblem {
  int64_t batch;
  int height;
  int width;
  int in_channels;  // of the weight: the conv's input channels (2C when the input is concat_elu(x))
  int out_channels;
  int taps;
  const int* offsets;  // host array [dy_0, dx_0, dy_1, dx_1, ...] of 2 * taps entries
};

// The gated epilogue, applied to the two halves a = pre[..., :Cout/2], b = pre[..., Cout/2:].
enum class Gate : int {
  kTanhSigmoid = 1,    // tanh(a) * sigmoid(b)
  kLinearSigmoid = 2,  // a * sigmoid(b)
};

// How the weight gradient is tiled and split over the pixels (split-K): each split writes
// its partial gwp to a float workspace and a second kernel sums the splits in order (so
// the result is deterministic) into the weight's layout.
struct WgradPlan {
  int splits;
  int64_t pixels_per_split;
  int64_t workspace_elements;  // splits * T * Cin * Cout
  bool wide_tiles;             // 128 x 128 channel tiles, else 64 x 64
};

// Where the weight gradient's taps go in the weight's (Cout, Cin, kh, kw) layout: tap t at the
// flat kernel position tap_positions[t] = i_t * kw + j_t of `positions` = kh * kw, the others 0;
// hidden (device, (Cout, Cin) bytes, nonzero: a channel pair the colour groups hide at tap
// anchor_tap, whose gradient is 0 there; or null).
struct WeightGradLayout {
  int positions;
  const int* tap_positions;  // host array of T entries
  const uint8_t* hidden;
  int anchor_tap;
};

// Every launcher takes the element type of the activations and weight (the output
// has the same type) and computes in float32:
// on tensor cores (mma.sync: TF32 for float32 inputs when allow_tf32, else exact FFMA;
// bf16/fp16 inputs with fp32 accumulation). Pointers are device pointers; bias and
// cond are float32, a residual or addend has the activations' type. x is (N, H, W, Cin).
// All launches go on `stream`; errors surface via cudaGetLastError.

// out (N, H, W, Cout) = conv(x, wp (T, Cin, Cout)) + bias (Cout, may be null) + residual
// (N, H, W, Cout, may be null).
void masked_conv2d_fwd(DType dtype, bool allow_tf32, const ConvProblem& problem, const void* x, const void* wp,
                       const float* bias, const void* residual, void* out, cudaStream_t stream);

// pre = conv + bias (Cout, may be null) + addend (N, H, W, Cout, may be null); out (N, H, W, Cout/2)
// = gate(pre + cond[n]) (cond (N, Cout), may be null) + residual (N, H, W, Cout/2, may be null);
// preact (N, H, W, Cout) receives pre unless null. Cout must be a multiple of 2 * gate_groups: the
// channels of bias, addend, cond and pre are gate_groups blocks [a_1 b_1 | a_2 b_2 | ...], each
// gated in its halves, while wp's columns come halves first ([a_1 a_2 ... | b_1 b_2 ...]).
void masked_conv2d_fwd_gated(DType dtype, bool allow_tf32, const ConvProblem& problem, const void* x, const void* wp,
                             const float* bias, const void* addend, const float* cond, const void* residual, Gate gate,
                             int gate_groups, void* out, void* preact, cudaStream_t stream);

// gx from gout (N, H, W, Cout) and wp (T, Cin, Cout): with x null, (N, H, W, Cin), the gradient
// w.r.t. the conv's input; with x the forward's concat_elu input (N, H, W, Cin / 2), the
// gradient w.r.t. x, of x's shape, through the dropout `keep` ((N, H, W, Cin) bytes, nonzero:
// kept, times keep_scale = 1 / (1 - p); or null) first. keep needs x.
void masked_conv2d_dgrad(DType dtype, bool allow_tf32, const ConvProblem& problem, const void* gout, const void* wp,
                         const void* x, const uint8_t* keep, float keep_scale, void* gx, cudaStream_t stream);

// The tiles and split of the weight gradient for a device with `sm_count` multiprocessors.
WgradPlan plan_masked_conv2d_wgrad(DType dtype, bool allow_tf32, const ConvProblem& problem, int sm_count);

// grad (Cout, Cin, kh, kw) in `dtype`, laid out as `layout` says, from x (N, H, W, Cin) and gout
// (N, H, W, Cout); `workspace` holds plan.workspace_elements floats.
void masked_conv2d_wgrad(DType dtype, bool allow_tf32, const ConvProblem& problem, const WgradPlan& plan,
                         const WeightGradLayout& layout, const void* x, const void* gout, void* grad, float* workspace,
                         cudaStream_t stream);

}  // namespace masked_conv
}  // namespace pixelcnn_kernels
