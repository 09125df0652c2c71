// Launchers of cached sampling's per-pixel steps (csrc/sampling.cu). Gated PixelCNN's layer step: the math
// and layouts are those of pixelcnn_kernels/ops/sampling.py and triton/sampling.py:
//
//   pixel   int64 (1,) on the device: the flat pixel index p = i * W + j (read by the kernel,
//           so one launch with fixed pointers serves every pixel and a CUDA graph replays it)
//   x, out  (B, H, W, C) read/written through their strides, in elements (stride 0 allowed)
//   wp      (T, Cin, Npre) contiguous packed taps; offsets[t] the column offset dx of tap t
//   gated:  v_pre (B, W, 2C) strided; link_weight (2C, 2C), out_weight (C, C) contiguous (in, out);
//           cond (B, 2C) contiguous or null; biases contiguous or null; group_size = ceil(C / colour groups)
//
// Plain (first conv):  out[b,i,j,:] = bias + sum_t x[b,i,j+dx_t,:] . wp[t]           (Npre = Cout)
// Gated layer:         pre = that (Npre = 2C) + v_pre[b,j,:] . link_weight + link_bias + cond[b]
//                      out[b,i,j,o] = x[b,i,j,o] + out_bias[o] + sum_n tanh(pre_a(n)) sigmoid(pre_b(n)) out_weight[n,o]
//                      with pre_a(n) = pre[a], a = n + (n / G) * G, pre_b(n) = pre[min(a + G, n + C)],
//                      G = group_size (the last colour group holds the rest of the C channels).
// Every tensor of a call has one dtype (float32, float16, bfloat16); arithmetic is fp32.
// Torch-free.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda_utils.h"

namespace pixelcnn_kernels {
namespace sampling {

// Taps of a 1xk horizontal conv: (k + 1) / 2 for the "horizontal" mask, so k <= 31.
constexpr int kMaxTaps = 16;

struct PixelStep {
  const int64_t* pixel;
  const void* x;
  int64_t x_strides[4];
  const void* wp;
  const void* bias;
  const void* v_pre;  // null: the plain (first-conv) step
  int64_t v_strides[3];
  const void* link_weight;
  const void* link_bias;
  const void* cond;
  const void* out_weight;
  const void* out_bias;
  void* out;
  int64_t out_strides[4];
  int64_t batch;
  int height, width, in_channels, out_channels, group_size, taps;
  int offsets[kMaxTaps];
};

// Shared memory per image of a block: the fp32 staging of its taps, v_pre column and gated values.
int64_t pixel_step_shared_bytes_per_image(const PixelStep& step);

// The shared memory a block may use without opting in to more (the launcher never opts in):
// the glue rejects steps whose single image needs more.
constexpr int64_t kMaxSharedBytes = 48 * 1024;

void launch_pixel_step(DType dtype, const PixelStep& step, cudaStream_t stream);

// Cached PixelCNN++ sampling: one gated resnet block at the positions of one step of a table
// (pixelcnn_kernels/ops/sampling.py's resnet_position_step). Caches x, inner, skip[s], out are
// (B, H + 2, W + 2, C) contiguous with a zero ring (pixel (i, j) at [i + 1, j + 1]). Both convs have every
// tap of a kernel_height x kernel_width kernel anchored at (top, left): tap t = ty * kernel_width + tx
// reads pixel (row + ty - top, col + tx - left).
//
// The step p is *pixel (read on the device: one launch serves every step, a CUDA graph replays it);
// table[p][slot] = (row, col, new_taps) for slot = 0 .. slots - 1 in order, or -1s for none. An entry
// outside the image, a new_taps bit whose pixel is outside it, or p outside [0, steps) does nothing.
// For each position:
//
//   for each tap t set in new_taps, at its pixel q:
//     inner[b,q,:] = input_bias + sum_t' concat_elu(x[b,q+off_t',:]) . input_weight[t']
//                    (+ skip_bias + concat_elu(cat(skip[0], skip[1])[b,q,:]) . skip_weight)
//   a | g = out_bias + cond[b] + sum_t concat_elu(inner[b,(row,col)+off_t,:]) . out_weight[t]
//   out[b,row,col,:] = x[b,row,col,:] + a * sigmoid(g)
//
// input_weight (T, 2C, C) and out_weight (T, 2C, 2C) packed taps, skip_weight (2SC, C) with rows
// [elu(skip0), elu(skip1), elu(-skip0), elu(-skip1)], all contiguous (in, out); cond (B, 2C)
// contiguous or null; biases contiguous or null. One dtype, fp32 arithmetic.
struct ResnetStep {
  const void* x;
  void* inner;
  const void* skip[2];  // the first skip_streams are set
  void* out;
  const void* input_weight;
  const void* input_bias;
  const void* skip_weight;
  const void* skip_bias;
  const void* out_weight;
  const void* out_bias;
  const void* cond;
  const int64_t* pixel;  // (1,): the step p
  const int32_t* table;  // (steps, slots, 3): (row, col, new_taps), new_taps bit t: tap t's inner pixel is computed first
  int64_t batch, steps;
  int padded_height, padded_width, channels, skip_streams, slots;
  int kernel_height, kernel_width, top, left;
};

// Shared memory per image of a block: the fp32 concat_elu of its tap window and of its skips.
int64_t resnet_step_shared_bytes_per_image(const ResnetStep& step);

void launch_resnet_step(DType dtype, const ResnetStep& step, cudaStream_t stream);

// Cached Gated PixelCNN sampling: the softmax head's draw of channel c at the pixel p = *pixel
// (pixelcnn_kernels/ops/sampling.py's softmax_draw_step), one block per image b:
//
//   logits[k] = bias[c * bins + k] + sum_n elu(h[b, n]) * weight[n, c * bins + k]   (elu and logits rounded to T)
//   value     = the first k with cdf[k] > u[b, c, p] * cdf[bins - 1], cdf the float64 cumulative
//               sum of exp(logits - max logit)
//   images[b, c, p] = value unless known[b, p];  inputs[b, c, p] = bin_inputs[images[b, c, p]]
//
// h (B, hidden), weight (hidden, C * bins), bias (C * bins) or null, bin_inputs (bins) and inputs
// (B, C, HW) of one dtype T; noise (B, C, HW) float32, known (B, HW) bool, images (B, C, HW) int64;
// all contiguous. p outside [0, HW) does nothing.
struct SoftmaxDraw {
  const int64_t* pixel;
  const void* h;
  const void* weight;
  const void* bias;
  const void* bin_inputs;
  const float* noise;
  const bool* known;
  int64_t* images;
  void* inputs;
  int64_t batch, pixels;
  int hidden, num_bins, channels, channel;
};

// Shared memory of a block: the float64 logits of every bin and the fp32 elu(h).
int64_t softmax_draw_shared_bytes(const SoftmaxDraw& draw);

void launch_softmax_draw(DType dtype, const SoftmaxDraw& draw, cudaStream_t stream);

}  // namespace sampling
}  // namespace pixelcnn_kernels
