// Launcher of cached Gated PixelCNN sampling's per-pixel step (csrc/sampling.cu); the math
// and layouts are those of pixelcnn_kernels/ops/sampling.py and triton/sampling.py:
//
//   pixel   int64 (1,) on the device: the flat pixel index p = i * W + j (read by the kernel,
//           so one launch with fixed pointers serves every pixel and a CUDA graph replays it)
//   x, out  (B, H, W, C) read/written through their strides, in elements (stride 0 allowed)
//   wp      (T, Cin, Npre) contiguous packed taps; offsets[t] the column offset dx of tap t
//   gated:  v_pre (B, W, 2C) strided; link_weight (2C, 2C), out_weight (C, C) contiguous (in, out);
//           cond (B, 2C) contiguous or null; biases contiguous or null; group_size = C / colour groups
//
// Plain (first conv):  out[b,i,j,:] = bias + sum_t x[b,i,j+dx_t,:] . wp[t]           (Npre = Cout)
// Gated layer:         pre = that (Npre = 2C) + v_pre[b,j,:] . link_weight + link_bias + cond[b]
//                      out[b,i,j,o] = x[b,i,j,o] + out_bias[o] + sum_n tanh(pre_a(n)) sigmoid(pre_b(n)) out_weight[n,o]
//                      with pre_a(n) = pre[(n / G) * 2G + n % G], pre_b(n) = pre_a(n) + G, G = group_size.
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

}  // namespace sampling
}  // namespace pixelcnn_kernels
