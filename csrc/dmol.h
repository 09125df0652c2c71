// Launchers of the discretized logistic mixture (DMOL) CUDA kernels (csrc/dmol.cu).
//
// Shapes (every tensor is read and written through its strides, in elements):
//   x       (B, C, H, W), C in {1, 3}: float32 values in [-1, 1], or uint8/int64 bins
//   logits  (B, P, H, W) float32/float16/bfloat16, P = 3K (C = 1) or 10K (C = 3), in
//           PixelCNN++'s order: K mixture logits, then per colour channel c the block
//           [K means, K log-scales, K coefficients (C = 3 only)] starting at K * (1 + n*c),
//           n = 3 for C = 3 and 2 for C = 1 (see pixelcnn_kernels/reference/dmol.py)
//   nll     (B, H, W) float32: per-pixel negative log-likelihood in nats
//   grad_nll (B, H, W) float32 (the upstream gradient; any strides, e.g. expanded)
//   grad_logits: the logits' shape and dtype, its own strides
//   u_mix (B, K, H, W), u_logistic (B, C, H, W) float32 uniform noise; sample (B, C, H, W) float32
// One thread handles one pixel and loops over the K mixture components; offsets are
// 64-bit, pixel counts below 2^31 (the Python op checks). Torch-free.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda_utils.h"

namespace pixelcnn_kernels {
namespace dmol {

enum class XType : int { kFloat32 = 0, kUInt8 = 1, kInt64 = 2 };

// Strides of a 4-d tensor (for (B, H, W) tensors the channel stride is unused).
struct Strides4 {
  int64_t b, c, h, w;
};

// Logit channels per mixture component: its mixture logit, then per colour channel a mean, a
// log-scale and, for C = 3, a coefficient (P = 3K for C = 1, 10K for C = 3).
__host__ __device__ constexpr int logits_per_mixture(int channels) { return 1 + channels * (channels == 3 ? 3 : 2); }

// The problem every DMOL kernel shares.
struct Problem {
  const void* logits;
  DType logits_dtype;
  Strides4 logits_strides;
  int batch;
  int height;
  int width;
  int channels;
  int mixtures;
  int num_bins;
};

// Writes nll (contiguous (B, H, W) float32).
void launch_nll_forward(const Problem& problem, const void* x, XType x_type, Strides4 x_strides, float* nll,
                        cudaStream_t stream);

// Writes grad_logits = d(sum(grad_nll * nll)) / d logits, recomputing the forward. A null grad_nll
// stands for 1 at every pixel (the gradient of the NLL's sum, bit for bit as given ones); a non-null
// nll also gets the per-pixel NLL, as launch_nll_forward writes it: the loss and its gradient in one pass.
void launch_nll_backward(const Problem& problem, const void* x, XType x_type, Strides4 x_strides,
                         const float* grad_nll, Strides4 grad_nll_strides, float* nll, void* grad_logits,
                         Strides4 grad_logits_strides, cudaStream_t stream);

// Writes one draw per pixel into sample (contiguous (B, C, H, W) float32): the component
// argmax_k(logit_k - log(-log(u_mix_k))) (first on ties), then per channel
// mean' + exp(max(log_scale, -7)) * (log(u) - log(1 - u)), clamped to [-1, 1] and, if
// quantize, rounded to the nearest bin centre before it conditions the next channel.
void launch_sample(const Problem& problem, const float* u_mix, Strides4 u_mix_strides, const float* u_logistic,
                   Strides4 u_logistic_strides, bool quantize, float* sample, cudaStream_t stream);

// Cached sampling's draw of the pixel p = *pixel from the head's logits (B, P) (the op
// dmol_draw_step of pixelcnn_kernels/ops/sampling.py): for each image b, the sampler's
// quantized draw from logits[b] at the noise u_mix[b, :, p], u_logistic[b, :, p]; its bins
// floor((v + 1) (num_bins - 1) / 2 + 0.5) go to images[b, :, p] unless known[b, p], and
// inputs[b, c, input_index[p]] (input_index null: p; outside [0, N): no write) = bin_inputs[images[b, c, p]].
// logits (B, P), u_mix (B, K, HW), u_logistic and images (B, C, HW) int64, known (B, HW)
// bool: contiguous; inputs (B, C, N) through input_strides; logits, inputs and bin_inputs
// of `dtype`. p outside [0, HW) does nothing.
struct DrawStep {
  const int64_t* pixel;
  const void* logits;
  DType dtype;
  const float* u_mix;
  const float* u_logistic;
  const bool* known;
  int64_t* images;
  void* inputs;
  int64_t input_strides[3];
  int64_t input_positions;  // N: inputs' last dimension
  const int64_t* input_index;
  const void* bin_inputs;
  int64_t batch, pixels;
  int channels, mixtures, num_bins;
};

void launch_draw_step(const DrawStep& step, cudaStream_t stream);

}  // namespace dmol
}  // namespace pixelcnn_kernels
