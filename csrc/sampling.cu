// Cached sampling's per-pixel steps (see sampling.h): Gated PixelCNN's horizontal-stack layer,
// PixelCNN++'s gated resnet block, then the softmax head's draw.
//
// The Gated PixelCNN step: a block takes kImages images of the batch at the pixel p read from the device. It first
// stages, in fp32 shared memory, each image's tap inputs x[b, i, j + dx_t, :] (zero outside
// the image) and, for a gated layer, the v_pre column v_pre[b, j, :]; then thread n computes
// pre-activation columns a(n) and b(n) for all kImages images (each weight is read once per
// block, consecutive threads reading consecutive columns), gates them into shared memory,
// and thread o computes output channel o: the 1x1 over the gated values plus bias and residual.
// The work is a few hundred thousand multiply-adds per layer at the tutorial's size: the
// kernel is bound by latency, and full fp32 FMAs (no tensor cores) keep it close to the
// PyTorch step.
#include "gates.h"
#include "sampling.h"

namespace pixelcnn_kernels {
namespace sampling {
namespace {

constexpr int kThreads = 128;
// Images per block when their staging fits in shared memory (else one): enough to read each
// weight once for several images, small enough that a batch of 64 still fills 16 blocks.
constexpr int kImagesPerBlock = 4;

__host__ __device__ inline int pre_channels(const PixelStep& s) { return s.v_pre != nullptr ? 2 * s.out_channels : s.out_channels; }

template <typename T>
__device__ __forceinline__ float load_or_zero(const void* p, int64_t index) {
  return p == nullptr ? 0.0f : to_float(static_cast<const T*>(p)[index]);
}

// acc[image] += sum_i in[image * len + i] * w[i * row_stride + column] for the block's images:
// `in` the images' fp32 staging in shared memory, w a weight matrix read at one column.
template <typename T, int kImages>
__device__ __forceinline__ void add_products(const float* in, int len, const T* w, int row_stride, int column,
                                             float (&acc)[kImages]) {
  for (int i = 0; i < len; ++i) {
    const float weight = to_float(w[int64_t{i} * row_stride + column]);
#pragma unroll
    for (int image = 0; image < kImages; ++image) acc[image] = fmaf(in[image * len + i], weight, acc[image]);
  }
}

template <typename T, bool kGated, int kImages>
__global__ void __launch_bounds__(kThreads) pixel_step_kernel(const PixelStep s) {
  extern __shared__ float shared[];
  const int64_t p = *s.pixel;
  if (p < 0 || p >= int64_t{s.height} * s.width) return;
  const int64_t row = p / s.width;
  const int64_t col = p - row * s.width;
  const int64_t image0 = int64_t{blockIdx.x} * kImages;
  const int tap_len = s.taps * s.in_channels;
  const int n_pre = pre_channels(s);
  float* x_s = shared;                    // [kImages][tap_len]
  float* v_s = x_s + kImages * tap_len;   // [kImages][n_pre] (gated)
  float* g_s = v_s + kImages * n_pre;     // [kImages][out_channels] (gated)
  const T* x = static_cast<const T*>(s.x);

  for (int i = threadIdx.x; i < kImages * tap_len; i += kThreads) {
    const int image = i / tap_len, r = i - image * tap_len, tap = r / s.in_channels, k = r - tap * s.in_channels;
    const int64_t b = image0 + image, c = col + s.offsets[tap];
    const bool inside = b < s.batch && c >= 0 && c < s.width;
    x_s[i] = inside ? to_float(x[b * s.x_strides[0] + row * s.x_strides[1] + c * s.x_strides[2] + k * s.x_strides[3]]) : 0.0f;
  }
  if constexpr (kGated) {
    const T* v = static_cast<const T*>(s.v_pre);
    for (int i = threadIdx.x; i < kImages * n_pre; i += kThreads) {
      const int image = i / n_pre, m = i - image * n_pre;
      const int64_t b = image0 + image;
      v_s[i] = b < s.batch ? to_float(v[b * s.v_strides[0] + col * s.v_strides[1] + m * s.v_strides[2]]) : 0.0f;
    }
  }
  __syncthreads();

  const T* wp = static_cast<const T*>(s.wp);
  T* out = static_cast<T*>(s.out);
  const int64_t out_pixel = row * s.out_strides[1] + col * s.out_strides[2];
  if constexpr (!kGated) {
    for (int n = threadIdx.x; n < s.out_channels; n += kThreads) {
      float acc[kImages] = {};
      add_products(x_s, tap_len, wp, n_pre, n, acc);
      const float bias = load_or_zero<T>(s.bias, n);
#pragma unroll
      for (int image = 0; image < kImages; ++image) {
        const int64_t b = image0 + image;
        if (b < s.batch) out[b * s.out_strides[0] + out_pixel + n * s.out_strides[3]] = from_float<T>(acc[image] + bias);
      }
    }
  } else {
    const T* link = static_cast<const T*>(s.link_weight);
    const T* cond = static_cast<const T*>(s.cond);
    for (int n = threadIdx.x; n < s.out_channels; n += kThreads) {
      int ca, cb;
      colour_group_halves(n, s.out_channels, s.group_size, ca, cb);
      float acc_a[kImages] = {}, acc_b[kImages] = {};
      add_products(x_s, tap_len, wp, n_pre, ca, acc_a);
      add_products(x_s, tap_len, wp, n_pre, cb, acc_b);
      add_products(v_s, n_pre, link, n_pre, ca, acc_a);
      add_products(v_s, n_pre, link, n_pre, cb, acc_b);
      const float bias_a = load_or_zero<T>(s.bias, ca) + load_or_zero<T>(s.link_bias, ca);
      const float bias_b = load_or_zero<T>(s.bias, cb) + load_or_zero<T>(s.link_bias, cb);
#pragma unroll
      for (int image = 0; image < kImages; ++image) {
        const int64_t b = image0 + image;
        float a = acc_a[image] + bias_a, g = acc_b[image] + bias_b;
        if (cond != nullptr && b < s.batch) {
          a += to_float(cond[b * n_pre + ca]);
          g += to_float(cond[b * n_pre + cb]);
        }
        g_s[image * s.out_channels + n] = gate_tanh_sigmoid_math(a, g);
      }
    }
    __syncthreads();
    const T* w1 = static_cast<const T*>(s.out_weight);
    for (int o = threadIdx.x; o < s.out_channels; o += kThreads) {
      float acc[kImages] = {};
      add_products(g_s, s.out_channels, w1, s.out_channels, o, acc);
      const float bias = load_or_zero<T>(s.out_bias, o);
#pragma unroll
      for (int image = 0; image < kImages; ++image) {
        const int64_t b = image0 + image;
        if (b >= s.batch) continue;
        const float residual = to_float(x[b * s.x_strides[0] + row * s.x_strides[1] + col * s.x_strides[2] + o * s.x_strides[3]]);
        out[b * s.out_strides[0] + out_pixel + o * s.out_strides[3]] = from_float<T>(residual + acc[image] + bias);
      }
    }
  }
}

// Cached PixelCNN++ sampling's resnet step (sampling.h). Same scheme as the pixel step: a block
// takes kImages images; for each new inner pixel it stages the fp32 concat_elu of the tap window
// of x (and of the skips) in shared memory, thread n computes inner channel n and stores it; then
// the block stages the concat_elu of the inner window (read back from global memory, rounded as
// stored, after a barrier that makes the block's own stores visible), and thread n computes the
// gate's channel n from pre-activation columns n and C + n, plus the residual.

__host__ __device__ inline int resnet_taps(const ResnetStep& s) { return s.kernel_height * s.kernel_width; }

// window[image][t * 2C + k] = elu(v), [t * 2C + C + k] = elu(-v), v = src at (row, col) + tap t's
// offset (padded coordinates) in image image0 + image; zero for images past the batch. Each elu is
// rounded to T, as the full forward's materialised concat_elu gives it.
template <typename T, int kImages>
__device__ __forceinline__ void stage_window(const T* src, const ResnetStep& s, int64_t image0, int row, int col,
                                             float* window) {
  const int c = s.channels, per_image = resnet_taps(s) * c;
  for (int i = threadIdx.x; i < kImages * per_image; i += kThreads) {
    const int image = i / per_image, r = i - image * per_image, t = r / c, k = r - t * c;
    const int64_t b = image0 + image;
    const int64_t pixel = int64_t{row + t / s.kernel_width - s.top} * s.padded_width + col + t % s.kernel_width - s.left;
    const float v = b < s.batch ? to_float(src[(b * s.padded_height * s.padded_width + pixel) * c + k]) : 0.0f;
    float* dst = window + image * 2 * per_image + t * 2 * c;
    const ConcatElu both = concat_elu_math(v);
    dst[k] = round_to<T>(both.pos);
    dst[c + k] = round_to<T>(both.neg);
  }
}

// One position (row, col) of the block with its new inner pixels (new_taps); every argument is uniform
// over the block, so the barriers are safe.
template <typename T, int kImages>
__device__ void resnet_position(const ResnetStep& s, int row, int col, uint32_t new_taps, float* shared) {
  const int c = s.channels, n_skip = s.skip_streams * c;
  const int window_len = 2 * resnet_taps(s) * c, skip_len = 2 * n_skip;
  float* window_s = shared;                         // [kImages][window_len]
  float* skip_s = window_s + kImages * window_len;  // [kImages][skip_len]
  const int64_t image0 = int64_t{blockIdx.x} * kImages;
  const int64_t image_len = int64_t{s.padded_height} * s.padded_width * c;
  const T* x = static_cast<const T*>(s.x);
  T* inner = static_cast<T*>(s.inner);

  for (int tap = 0; tap < resnet_taps(s); ++tap) {
    const int q_row = row + 1 + tap / s.kernel_width - s.top, q_col = col + 1 + tap % s.kernel_width - s.left;
    const bool inside = 1 <= q_row && q_row <= s.padded_height - 2 && 1 <= q_col && q_col <= s.padded_width - 2;
    if (((new_taps >> tap) & 1u) == 0 || !inside) continue;  // the zero ring stays zero
    const int64_t q_pixel = int64_t{q_row} * s.padded_width + q_col;
    __syncthreads();  // the previous new pixel's (or position's) products are done with the staging
    stage_window<T, kImages>(x, s, image0, q_row, q_col, window_s);
    for (int i = threadIdx.x; i < kImages * n_skip; i += kThreads) {
      const int image = i / n_skip, r = i - image * n_skip, stream = r / c, k = r - stream * c;
      const int64_t b = image0 + image;
      const T* skip = static_cast<const T*>(s.skip[stream]);
      const float v = b < s.batch ? to_float(skip[b * image_len + q_pixel * c + k]) : 0.0f;
      const ConcatElu both = concat_elu_math(v);
      skip_s[image * skip_len + r] = round_to<T>(both.pos);
      skip_s[image * skip_len + n_skip + r] = round_to<T>(both.neg);
    }
    __syncthreads();
    for (int n = threadIdx.x; n < c; n += kThreads) {
      float acc[kImages] = {};
      add_products(window_s, window_len, static_cast<const T*>(s.input_weight), c, n, acc);
      if (n_skip > 0) add_products(skip_s, skip_len, static_cast<const T*>(s.skip_weight), c, n, acc);
      const float bias = load_or_zero<T>(s.input_bias, n) + load_or_zero<T>(s.skip_bias, n);
#pragma unroll
      for (int image = 0; image < kImages; ++image) {
        const int64_t b = image0 + image;
        if (b < s.batch) inner[b * image_len + q_pixel * c + n] = from_float<T>(acc[image] + bias);
      }
    }
  }
  __syncthreads();  // the inner stores are visible to the whole block, and the staging is free
  stage_window<T, kImages>(inner, s, image0, row + 1, col + 1, window_s);
  __syncthreads();

  const T* cond = static_cast<const T*>(s.cond);
  T* out = static_cast<T*>(s.out);
  const int64_t pixel = (int64_t{row} + 1) * s.padded_width + col + 1;
  for (int n = threadIdx.x; n < c; n += kThreads) {
    float acc_a[kImages] = {}, acc_g[kImages] = {};
    add_products(window_s, window_len, static_cast<const T*>(s.out_weight), 2 * c, n, acc_a);
    add_products(window_s, window_len, static_cast<const T*>(s.out_weight), 2 * c, c + n, acc_g);
    const float bias_a = load_or_zero<T>(s.out_bias, n), bias_g = load_or_zero<T>(s.out_bias, c + n);
#pragma unroll
    for (int image = 0; image < kImages; ++image) {
      const int64_t b = image0 + image;
      if (b >= s.batch) continue;
      float a = acc_a[image] + bias_a, g = acc_g[image] + bias_g;
      if (cond != nullptr) {
        a += to_float(cond[b * 2 * c + n]);
        g += to_float(cond[b * 2 * c + c + n]);
      }
      const int64_t at = b * image_len + pixel * c + n;
      out[at] = from_float<T>(to_float(x[at]) + gate_sigmoid_math(a, g));
    }
  }
}

template <typename T, int kImages>
__global__ void __launch_bounds__(kThreads) resnet_step_kernel(const ResnetStep s) {
  extern __shared__ float shared[];
  const int64_t p = *s.pixel;
  if (p < 0 || p >= s.steps) return;  // uniform over the block
  for (int slot = 0; slot < s.slots; ++slot) {
    const int32_t* entry = s.table + (p * s.slots + slot) * 3;
    const int row = entry[0], col = entry[1];
    if (row < 0 || row >= s.padded_height - 2 || col < 0 || col >= s.padded_width - 2) continue;
    // Before the next position stages over shared memory, every thread is done reading it.
    __syncthreads();
    resnet_position<T, kImages>(s, row, col, static_cast<uint32_t>(entry[2]), shared);
  }
}


// ---------------------------------------------------------------------------------
// The softmax head's draw

constexpr int kDrawThreads = 256;
constexpr int kWarp = 32;
constexpr unsigned kFullWarp = 0xffffffffu;

// Every thread computes the logits of bins tid, tid + kDrawThreads, ... (consecutive threads read
// consecutive weight columns); then warp 0 turns them into the draw: each lane takes a run of
// consecutive bins, the lanes' sums are scanned across the warp, and each lane counts the bins
// of its run whose CDF is at most the threshold. The count is the drawn bin.
template <typename T>
__global__ void __launch_bounds__(kDrawThreads) softmax_draw_kernel(const SoftmaxDraw d) {
  extern __shared__ double draw_shared[];
  double* weights = draw_shared;                                        // [num_bins]: logits, then exp(logit - max)
  float* elu_h = reinterpret_cast<float*>(draw_shared + d.num_bins);    // [hidden]
  const int64_t p = *d.pixel;
  if (p < 0 || p >= d.pixels) return;
  const int64_t b = blockIdx.x;
  const T* h = static_cast<const T*>(d.h) + b * d.hidden;
  // Rounded to T, as F.elu's output is before the PyTorch head's 1x1.
  for (int n = threadIdx.x; n < d.hidden; n += kDrawThreads) elu_h[n] = round_to<T>(elu_math(to_float(h[n])));
  __syncthreads();
  const int64_t columns = int64_t{d.channels} * d.num_bins;
  const int64_t first_column = int64_t{d.channel} * d.num_bins;
  const T* weight = static_cast<const T*>(d.weight) + first_column;
  for (int k = threadIdx.x; k < d.num_bins; k += kDrawThreads) {
    float acc = 0.0f;
    for (int n = 0; n < d.hidden; ++n) acc = fmaf(elu_h[n], to_float(weight[n * columns + k]), acc);
    acc += load_or_zero<T>(d.bias, first_column + k);
    weights[k] = round_to<T>(acc);
  }
  __syncthreads();
  if (threadIdx.x >= kWarp) return;

  const int lane = threadIdx.x;
  const int run = (d.num_bins + kWarp - 1) / kWarp;
  const int begin = min(lane * run, d.num_bins), end = min(begin + run, d.num_bins);
  double max_logit = -INFINITY;
  for (int k = begin; k < end; ++k) max_logit = fmax(max_logit, weights[k]);
  for (int offset = kWarp / 2; offset > 0; offset /= 2) max_logit = fmax(max_logit, __shfl_xor_sync(kFullWarp, max_logit, offset));
  double run_sum = 0.0;
  for (int k = begin; k < end; ++k) {
    weights[k] = exp(weights[k] - max_logit);
    run_sum += weights[k];
  }
  double inclusive = run_sum;  // the CDF at the end of this lane's run
  for (int offset = 1; offset < kWarp; offset *= 2) {
    const double before = __shfl_up_sync(kFullWarp, inclusive, offset);
    if (lane >= offset) inclusive += before;
  }
  // CDF(bins - 1); a non-finite logit (NaN, +inf, or all -inf) makes it NaN: no bin passes, bin 0 is drawn.
  const double total = __shfl_sync(kFullWarp, inclusive, kWarp - 1);
  const double exclusive = __shfl_up_sync(kFullWarp, inclusive, 1);
  double cdf = lane == 0 ? 0.0 : exclusive;
  const int64_t value_index = (b * d.channels + d.channel) * d.pixels + p;
  // The CDF unnormalised: u scaled by its last entry, as the PyTorch draw does.
  const double threshold = static_cast<double>(d.noise[value_index]) * total;
  int count = 0;
  for (int k = begin; k < end; ++k) {
    cdf += weights[k];
    count += cdf <= threshold;
  }
  for (int offset = kWarp / 2; offset > 0; offset /= 2) count += __shfl_xor_sync(kFullWarp, count, offset);
  if (lane != 0) return;
  write_drawn_value(d.images, value_index, d.known[b * d.pixels + p], min(count, d.num_bins - 1),
                    static_cast<T*>(d.inputs) + value_index, static_cast<const T*>(d.bin_inputs), d.num_bins);
}

// ---------------------------------------------------------------------------------
// Launchers

// kernel<kImagesPerBlock> (one block per kImagesPerBlock images) when their staging fits in
// shared memory, else kernel<1> (one block per image).
template <typename Step>
void launch_blocks(void (*many)(Step), void (*one)(Step), const Step& s, int64_t per_image, cudaStream_t stream) {
  if (kImagesPerBlock * per_image <= kMaxSharedBytes) {
    const auto blocks = static_cast<unsigned>(ceil_div(s.batch, kImagesPerBlock));
    many<<<blocks, kThreads, kImagesPerBlock * per_image, stream>>>(s);
  } else {
    one<<<static_cast<unsigned>(s.batch), kThreads, per_image, stream>>>(s);
  }
}

template <typename T, bool kGated>
void launch_typed(const PixelStep& s, cudaStream_t stream) {
  launch_blocks<PixelStep>(pixel_step_kernel<T, kGated, kImagesPerBlock>, pixel_step_kernel<T, kGated, 1>, s,
                           pixel_step_shared_bytes_per_image(s), stream);
}

}  // namespace

int64_t pixel_step_shared_bytes_per_image(const PixelStep& s) {
  const int64_t floats = int64_t{s.taps} * s.in_channels + (s.v_pre != nullptr ? 3 * int64_t{s.out_channels} : 0);
  return floats * static_cast<int64_t>(sizeof(float));
}

int64_t resnet_step_shared_bytes_per_image(const ResnetStep& s) {
  return 2 * (int64_t{resnet_taps(s)} + s.skip_streams) * s.channels * static_cast<int64_t>(sizeof(float));
}

void launch_resnet_step(DType dtype, const ResnetStep& step, cudaStream_t stream) {
  if (step.batch == 0 || step.steps == 0 || step.slots == 0) return;
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    launch_blocks<ResnetStep>(resnet_step_kernel<T, kImagesPerBlock>, resnet_step_kernel<T, 1>, step,
                              resnet_step_shared_bytes_per_image(step), stream);
  });
}

void launch_pixel_step(DType dtype, const PixelStep& step, cudaStream_t stream) {
  if (step.batch == 0) return;
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    if (step.v_pre != nullptr) {
      launch_typed<T, true>(step, stream);
    } else {
      launch_typed<T, false>(step, stream);
    }
  });
}

int64_t softmax_draw_shared_bytes(const SoftmaxDraw& d) {
  return int64_t{d.num_bins} * static_cast<int64_t>(sizeof(double)) + int64_t{d.hidden} * static_cast<int64_t>(sizeof(float));
}

void launch_softmax_draw(DType dtype, const SoftmaxDraw& draw, cudaStream_t stream) {
  if (draw.batch == 0) return;
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    softmax_draw_kernel<T><<<static_cast<unsigned>(draw.batch), kDrawThreads, softmax_draw_shared_bytes(draw), stream>>>(draw);
  });
}

}  // namespace sampling
}  // namespace pixelcnn_kernels
