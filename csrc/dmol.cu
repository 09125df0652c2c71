// CUDA kernels of the discretized logistic mixture (DMOL): NLL forward, NLL backward
// (recomputes the forward and writes the logits' gradient in the same pass; or writes the NLL
// and the gradient of its sum at once, for a loss that will be differentiated), sampler, and
// cached sampling's draw step.
// Layouts in dmol.h; the math is pixelcnn_kernels/reference/dmol.py's, in float32 with
// the same numerically stable forms as the Triton kernels (pixelcnn_kernels/triton/dmol.py).
#include <cmath>
#include <type_traits>

#include "dmol.h"

namespace pixelcnn_kernels {
namespace dmol {
namespace {

constexpr int kThreads = 128;
constexpr float kLogScaleMin = -7.f;
constexpr float kMinBinProbability = 1e-5f;  // below it, the mid-point density stands in for P
constexpr float kEdgeThreshold = 0.999f;                      // PixelCNN++'s edge tests for float x
constexpr float kUEps = 1e-5f;                                // PixelCNN++'s clamp of the sampling noise

// NaN-propagating max(v, 0) + log1p(exp(-|v|)).
__device__ __forceinline__ float softplus(float v) { return (v > 0.f ? v : 0.f) + log1pf(expf(-fabsf(v))); }

__device__ __forceinline__ float sign_of(float v) { return v > 0.f ? 1.f : (v < 0.f ? -1.f : 0.f); }

// tanh(v) and its derivative 1 - tanh(v)^2, both to float32 rounding: (1 - e2) / (1 + e2) with
// e2 = exp(-2|v|), and expm1 for 1 - e2 only below |v| = 0.25, where the subtraction would
// cancel (the Triton kernel's split). A colour coefficient's tanh error reaches the gradient
// times x / scale, up to e^7: -expm1f throughout, a rounding of its own, was 1 ulp off for ~7%
// of v and put the float32 gradient test 1.09x past its tolerance in a CPU emulation of this
// kernel (2026-11-30); this form puts that case at 0.46x, as the Triton kernel's.
struct TanhSech2 {
  float tanh, sech2;
};
__device__ __forceinline__ TanhSech2 tanh_and_sech2(float v) {
  const float e2 = expf(-2.f * fabsf(v));
  const float one_plus = 1.f + e2;
  const float one_minus = fabsf(v) < 0.25f ? -expm1f(-2.f * fabsf(v)) : 1.f - e2;
  return {sign_of(v) * one_minus / one_plus, 4.f * e2 / (one_plus * one_plus)};
}

// log P(bin) of one discretized logistic, and with kGrad its derivatives w.r.t. the
// (colour-adjusted) mean and the raw log-scale (unclamped: passes_clamp says where the
// written gradient is it rather than 0).
// With m = (x - mean) / scale and h = half_bin / scale each branch gives dlp/dm and
// h * dlp/dh; d/dmean = -dm / scale and d/dlog_scale = -m * dm - h * dh (minus 1 more
// for the mid-point density). The interior probability is
// P = sinh(h) / (cosh m + cosh h), all terms scaled by exp(-max(|m|, h)).
struct SubPixel {
  float log_prob, d_mean, d_log_scale;
  // Whether the raw log-scale's gradient passes the clamp at -7: at or above it, not below nor
  // for NaN, as reference.clamp_log_scales; the written gradient is 0 elsewhere, where a NaN
  // posterior times 0 would leave NaN.
  bool passes_clamp;
};

template <bool kGrad>
__device__ __forceinline__ SubPixel sub_pixel_terms(float value, bool first_bin, bool last_bin, float mean,
                                                    float raw_log_scale, float half_bin, float log_half_bins) {
  const float log_scale = raw_log_scale < kLogScaleMin ? kLogScaleMin : raw_log_scale;  // NaN stays NaN
  const float inv_scale = expf(-log_scale);
  const float m = (value - mean) * inv_scale;
  const float h = inv_scale * half_bin;
  float log_prob, dm = 0.f, dh_term = 0.f;
  if (first_bin) {  // log sigmoid(m + h)
    log_prob = -softplus(-(m + h));
    if (kGrad) {
      dm = 1.f / (1.f + expf(m + h));
      dh_term = h * dm;
    }
  } else if (last_bin) {  // log(1 - sigmoid(m - h))
    log_prob = -softplus(m - h);
    if (kGrad) {
      const float sigmoid_minus = 1.f / (1.f + expf(h - m));
      dm = -sigmoid_minus;
      dh_term = h * sigmoid_minus;
    }
  } else {
    const float abs_m = fabsf(m);
    const float widest = abs_m > h ? abs_m : h;
    const float p = expf(abs_m - widest), q = expf(-abs_m - widest), s = expf(-h - widest);
    const float scaled_exp_h = expf(h - widest);
    const float inv_scaled_sum = 1.f / (p + q + scaled_exp_h + s);
    const float one_minus_e2h = -expm1f(-2.f * h);
    // P = delta_ratio * e^(h - widest): the reference's test log P > log(1e-5) made on P, so
    // that the branch taken needs one log, not two.
    const float delta_ratio = one_minus_e2h * inv_scaled_sum;
    if (delta_ratio * scaled_exp_h > kMinBinProbability) {
      log_prob = logf(delta_ratio) + (h - widest);
      if (kGrad) {
        dm = -sign_of(m) * p * -expm1f(-2.f * abs_m) * inv_scaled_sum;
        dh_term = h * ((p + q) * (2.f - one_minus_e2h) + 4.f * s) * inv_scaled_sum / one_minus_e2h;
      }
    } else {  // mid-point density fallback
      log_prob = m - log_scale - 2.f * softplus(m) - log_half_bins;
      if (kGrad) {
        dm = -sign_of(m) * -expm1f(-abs_m) / (1.f + expf(-abs_m));  // -tanh(m / 2)
        dh_term = 1.f;
      }
    }
  }
  SubPixel out{log_prob, 0.f, 0.f, raw_log_scale >= kLogScaleMin};
  if (kGrad) {
    out.d_mean = -dm * inv_scale;
    out.d_log_scale = -m * dm - dh_term;
  }
  return out;
}

// One pixel's logits, read through the channel stride.
template <typename T>
struct PixelLogits {
  const T* logits;
  int64_t offset;
  int64_t channel_stride;
  __device__ __forceinline__ float operator[](int channel) const {
    return to_float(logits[offset + channel * channel_stride]);
  }
};

// Bins and their centres, rounded as reference/dmol.py's to_bins and bins_to_values round them,
// so a drawn bin and a bin's value do not depend on the compiler's choices:
// - the centre (2 bin - last) / last with last = num_bins - 1 (bin and last exact integers):
//   one IEEE division, correctly rounded (nvcc's default -prec-div=true);
// - the nearest bin floor((v + 1) * last / 2 + 0.5) of v in [-1, 1], each step rounded on its
//   own (__fadd_rn/__fmul_rn are never fused into an FMA), halves up, clamped to [0, last] (NaN: bin 0).
__device__ __forceinline__ float bin_centre(float bin, float last) { return (2.f * bin - last) / last; }
__device__ __forceinline__ float nearest_bin(float value, float last) {
  const float bin = floorf(__fadd_rn(__fmul_rn(__fadd_rn(value, 1.f), 0.5f * last), 0.5f));
  return bin > 0.f ? (bin < last ? bin : last) : 0.f;
}

// One pixel's x per colour channel: value in [-1, 1] and edge-bin flags.
template <int C>
struct PixelX {
  float value[C];
  bool first_bin[C], last_bin[C];
};

template <typename XT, int C>
__device__ __forceinline__ PixelX<C> load_x(const XT* x, int64_t offset, int64_t channel_stride, int num_bins) {
  PixelX<C> out;
#pragma unroll
  for (int c = 0; c < C; ++c) {
    const XT raw = x[offset + c * channel_stride];
    if constexpr (std::is_same_v<XT, float>) {
      out.value[c] = raw;
      out.first_bin[c] = raw < -kEdgeThreshold;
      out.last_bin[c] = raw > kEdgeThreshold;
    } else {  // integer bins: edges by index
      const int64_t bin = static_cast<int64_t>(raw);
      out.value[c] = bin_centre(static_cast<float>(bin), static_cast<float>(num_bins - 1));
      out.first_bin[c] = bin == 0;
      out.last_bin[c] = bin == num_bins - 1;
    }
  }
  return out;
}

// Channel index of parameter `kind` (0 mean, 1 log-scale, 2 coefficient) of colour c, mixture k.
template <int C>
__device__ __forceinline__ int param_channel(int kind, int c, int k, int mixtures) {
  constexpr int kPerChannel = C == 3 ? 3 : 2;
  return mixtures * (1 + kPerChannel * c + kind) + k;
}

// Everything mixture component k contributes: sum_c log P(x_c), and with kGrad the
// derivatives of each log P(x_c) and the coefficients' tanh derivatives.
template <int C>
struct Component {
  float log_prob;
  SubPixel channel[C];
  float sech2[C];
};

template <bool kGrad, int C, typename T>
__device__ __forceinline__ Component<C> component_terms(const PixelLogits<T>& px, const PixelX<C>& x, int k,
                                                        int mixtures, float half_bin, float log_half_bins) {
  Component<C> out;
  float coef[C];
  if constexpr (C == 3) {
#pragma unroll
    for (int c = 0; c < 3; ++c) {
      const TanhSech2 t = tanh_and_sech2(px[param_channel<C>(2, c, k, mixtures)]);
      coef[c] = t.tanh;
      out.sech2[c] = t.sech2;
    }
  }
  out.log_prob = 0.f;
#pragma unroll
  for (int c = 0; c < C; ++c) {
    float mean = px[param_channel<C>(0, c, k, mixtures)];
    if constexpr (C == 3) {  // green's mean gets coef_0 * red; blue's coef_1 * red + coef_2 * green
      if (c == 1) mean += coef[0] * x.value[0];
      if (c == 2) {  // in the reference's order: (mean + coef_1 red) + coef_2 green
        mean += coef[1] * x.value[0];
        mean += coef[2] * x.value[1];
      }
    }
    out.channel[c] = sub_pixel_terms<kGrad>(x.value[c], x.first_bin[c], x.last_bin[c], mean,
                                           px[param_channel<C>(1, c, k, mixtures)], half_bin, log_half_bins);
    out.log_prob += out.channel[c].log_prob;
  }
  return out;
}

// Online log-sum-exp; -inf terms are skipped, NaN terms poison the sum.
struct LogSumExp {
  float max = -INFINITY, sum = 0.f;
  __device__ __forceinline__ void add(float v) {
    if (v > max) {
      sum = sum * expf(max - v) + 1.f;
      max = v;
    } else if (v != -INFINITY) {
      sum += expf(v - max);
    }
  }
  __device__ __forceinline__ float value() const { return max + logf(sum); }
};

__device__ __forceinline__ int64_t offset4(const Strides4& s, int b, int c, int h, int w) {
  return b * s.b + c * s.c + h * s.h + w * s.w;
}

// The pixel (b, h, w) of this thread: one thread per pixel, pixels in (B, H, W) order.
// 64-bit flat index: the last block's padding threads sit past 2^31 when the pixel count is near it.
struct ThreadPixel {
  int64_t flat;
  int b, h, w;
  __device__ __forceinline__ explicit ThreadPixel(const Problem& p)
      : flat(int64_t{blockIdx.x} * kThreads + threadIdx.x),
        b(static_cast<int>(flat / (int64_t{p.width} * p.height))),
        h(static_cast<int>((flat / p.width) % p.height)),
        w(static_cast<int>(flat % p.width)) {}
  __device__ __forceinline__ bool in_range(const Problem& p) const { return flat < int64_t{p.batch} * p.height * p.width; }
  template <typename T>
  __device__ __forceinline__ PixelLogits<T> logits(const Problem& p) const {
    return {static_cast<const T*>(p.logits), offset4(p.logits_strides, b, 0, h, w), p.logits_strides.c};
  }
};

template <bool kGrad, int C, typename T, typename XT>
__global__ void __launch_bounds__(kThreads) nll_kernel(Problem problem, const XT* __restrict__ x, Strides4 x_strides,
                                                       float* __restrict__ nll, const float* __restrict__ grad_nll,
                                                       Strides4 grad_nll_strides, T* __restrict__ grad_logits,
                                                       Strides4 grad_logits_strides) {
  const ThreadPixel at(problem);
  if (!at.in_range(problem)) return;
  const int b = at.b, h = at.h, w = at.w;
  const int mixtures = problem.mixtures;
  const float half_bin = 1.f / (problem.num_bins - 1);
  const float log_half_bins = logf(0.5f * (problem.num_bins - 1));
  const PixelLogits<T> px = at.logits<T>(problem);
  const PixelX<C> xv = load_x<XT, C>(x, offset4(x_strides, b, 0, h, w), x_strides.c, problem.num_bins);

  // NLL = logsumexp_k(mix_k) - logsumexp_k(mix_k + sum_c log P_k(x_c)).
  LogSumExp norm, total;
  for (int k = 0; k < mixtures; ++k) {
    const float mix = px[k];
    norm.add(mix);
    total.add(mix + component_terms<false, C>(px, xv, k, mixtures, half_bin, log_half_bins).log_prob);
  }
  const float log_norm = norm.value(), log_total = total.value();
  if (!kGrad || nll != nullptr) nll[at.flat] = log_norm - log_total;
  if constexpr (kGrad) {
    // d NLL / d log P_k = -posterior_k; d NLL / d mix_k = prior_k - posterior_k.
    const float grad = grad_nll != nullptr ? grad_nll[offset4(grad_nll_strides, b, 0, h, w)] : 1.f;
    const int64_t out_offset = offset4(grad_logits_strides, b, 0, h, w);
    const int64_t out_stride = grad_logits_strides.c;
    auto write = [&](int channel, float value) { grad_logits[out_offset + channel * out_stride] = from_float<T>(value); };
    for (int k = 0; k < mixtures; ++k) {
      const float mix = px[k];
      const Component<C> comp = component_terms<true, C>(px, xv, k, mixtures, half_bin, log_half_bins);
      const float neg_posterior = -grad * expf(mix + comp.log_prob - log_total);
      write(k, grad * expf(mix - log_norm) + neg_posterior);
#pragma unroll
      for (int c = 0; c < C; ++c) {
        write(param_channel<C>(0, c, k, mixtures), neg_posterior * comp.channel[c].d_mean);
        const SubPixel& channel = comp.channel[c];
        write(param_channel<C>(1, c, k, mixtures), channel.passes_clamp ? neg_posterior * channel.d_log_scale : 0.f);
      }
      if constexpr (C == 3) {
        const float g_mean1 = neg_posterior * comp.channel[1].d_mean;
        const float g_mean2 = neg_posterior * comp.channel[2].d_mean;
        write(param_channel<C>(2, 0, k, mixtures), g_mean1 * xv.value[0] * comp.sech2[0]);
        write(param_channel<C>(2, 1, k, mixtures), g_mean2 * xv.value[0] * comp.sech2[1]);
        write(param_channel<C>(2, 2, k, mixtures), g_mean2 * xv.value[1] * comp.sech2[2]);
      }
    }
  }
}

__device__ __forceinline__ float clamp_noise(float u) { return u < kUEps ? kUEps : (u > 1.f - kUEps ? 1.f - kUEps : u); }

// Clamps to [-1, 1] (NaN-propagating) and, if quantize, rounds to the nearest bin centre (halves up;
// NaN: bin 0's, as reference/dmol.py's to_bins).
__device__ __forceinline__ float finish_channel(float value, bool quantize, int num_bins) {
  value = value < -1.f ? -1.f : (value > 1.f ? 1.f : value);
  if (quantize) {
    const float last = static_cast<float>(num_bins - 1);
    value = bin_centre(nearest_bin(value, last), last);
  }
  return value;
}

// One pixel's draw from its logits `px`, given its noise u_mix(k) and u_logistic(c): the
// component is the first with the largest logit - log(-log(u)) (Gumbel-max; as in
// torch.argmax, the first NaN score wins: the Triton kernel and the reference agree), then
// channel c is mean' + exp(max(log_scale, -7)) * (log(u) - log(1 - u)), finished
// (finish_channel) before it conditions the next channel.
template <int C, typename T, typename MixNoise, typename LogisticNoise>
__device__ __forceinline__ void draw_pixel(const PixelLogits<T>& px, int mixtures, MixNoise u_mix,
                                           LogisticNoise u_logistic, bool quantize, int num_bins, float (&drawn)[C]) {
  int chosen = 0;
  float best = -INFINITY;
  for (int k = 0; k < mixtures; ++k) {
    const float score = px[k] - logf(-logf(clamp_noise(u_mix(k))));
    if (isnan(score)) {
      chosen = k;
      break;
    }
    if (score > best) {
      best = score;
      chosen = k;
    }
  }
#pragma unroll
  for (int c = 0; c < C; ++c) {
    const float u = clamp_noise(u_logistic(c));
    const float raw_log_scale = px[param_channel<C>(1, c, chosen, mixtures)];
    const float log_scale = raw_log_scale < kLogScaleMin ? kLogScaleMin : raw_log_scale;
    // Each product rounded on its own (__fmul_rn is never fused into an FMA), as the reference rounds it.
    float value = px[param_channel<C>(0, c, chosen, mixtures)] + __fmul_rn(expf(log_scale), logf(u) - logf(1.f - u));
    if constexpr (C == 3) {  // the colour coefficients act on the channels already drawn
      if (c == 1) value += __fmul_rn(tanh_and_sech2(px[param_channel<C>(2, 0, chosen, mixtures)]).tanh, drawn[0]);
      if (c == 2) {  // in the reference's order: (value + coef_1 red) + coef_2 green
        value += __fmul_rn(tanh_and_sech2(px[param_channel<C>(2, 1, chosen, mixtures)]).tanh, drawn[0]);
        value += __fmul_rn(tanh_and_sech2(px[param_channel<C>(2, 2, chosen, mixtures)]).tanh, drawn[1]);
      }
    }
    drawn[c] = finish_channel(value, quantize, num_bins);
  }
}

template <int C, typename T>
__global__ void __launch_bounds__(kThreads)
    sample_kernel(Problem problem, const float* __restrict__ u_mix, Strides4 u_mix_strides,
                  const float* __restrict__ u_logistic, Strides4 u_logistic_strides, bool quantize,
                  float* __restrict__ sample) {
  const ThreadPixel at(problem);
  if (!at.in_range(problem)) return;
  const int b = at.b, h = at.h, w = at.w;
  float drawn[C];
  draw_pixel<C>(
      at.logits<T>(problem), problem.mixtures, [&](int k) { return u_mix[offset4(u_mix_strides, b, k, h, w)]; },
      [&](int c) { return u_logistic[offset4(u_logistic_strides, b, c, h, w)]; }, quantize, problem.num_bins, drawn);
#pragma unroll
  for (int c = 0; c < C; ++c) sample[((static_cast<int64_t>(b) * C + c) * problem.height + h) * problem.width + w] = drawn[c];
}

// Cached sampling's draw at the pixel *step.pixel: one thread per image (layouts in dmol.h).
template <int C, typename T>
__global__ void __launch_bounds__(kThreads) draw_step_kernel(const DrawStep step) {
  const int64_t b = int64_t{blockIdx.x} * kThreads + threadIdx.x;
  const int64_t p = *step.pixel;
  if (b >= step.batch || p < 0 || p >= step.pixels) return;
  const int mixtures = step.mixtures;
  const PixelLogits<T> px{static_cast<const T*>(step.logits), b * mixtures * logits_per_mixture(C), 1};
  const float* u_mix = step.u_mix + b * mixtures * step.pixels + p;
  const float* u_logistic = step.u_logistic + b * C * step.pixels + p;
  float drawn[C];
  draw_pixel<C>(px, mixtures, [&](int k) { return u_mix[k * step.pixels]; },
                [&](int c) { return u_logistic[c * step.pixels]; }, true, step.num_bins, drawn);
  const bool known = step.known[b * step.pixels + p];
  const int64_t position = step.input_index == nullptr ? p : step.input_index[p];
  // A position outside inputs (a bad input_index) writes no input.
  const bool input_ok = 0 <= position && position < step.input_positions;
  const float last = static_cast<float>(step.num_bins - 1);
#pragma unroll
  for (int c = 0; c < C; ++c) {
    // The drawn centre's bin, as the PyTorch sampler's to_bins maps it.
    const auto bin = static_cast<int64_t>(nearest_bin(drawn[c], last));
    T* input = static_cast<T*>(step.inputs) + b * step.input_strides[0] + c * step.input_strides[1] + position * step.input_strides[2];
    write_drawn_value(step.images, (b * C + c) * step.pixels + p, known, bin, input_ok ? input : nullptr,
                      static_cast<const T*>(step.bin_inputs), step.num_bins);
  }
}

// Calls fn(int_constant<C>) for C in {1, 3}.
template <typename Fn>
void dispatch_channels(int channels, Fn&& fn) {
  if (channels == 3) {
    fn(std::integral_constant<int, 3>{});
  } else {
    fn(std::integral_constant<int, 1>{});
  }
}

template <typename Fn>
void dispatch_x_type(XType x_type, Fn&& fn) {
  switch (x_type) {
    case XType::kFloat32: fn(float{}); break;
    case XType::kUInt8: fn(uint8_t{}); break;
    case XType::kInt64: fn(int64_t{}); break;
  }
}

unsigned int num_blocks(const Problem& p) {
  return static_cast<unsigned int>(ceil_div(static_cast<int64_t>(p.batch) * p.height * p.width, kThreads));
}

template <bool kGrad>
void launch_nll(const Problem& problem, const void* x, XType x_type, Strides4 x_strides, float* nll,
                const float* grad_nll, Strides4 grad_nll_strides, void* grad_logits, Strides4 grad_logits_strides,
                cudaStream_t stream) {
  dispatch_dtype(problem.logits_dtype, [&](auto logits_tag) {
    using T = decltype(logits_tag);
    dispatch_x_type(x_type, [&](auto x_tag) {
      using XT = decltype(x_tag);
      dispatch_channels(problem.channels, [&](auto channels) {
        nll_kernel<kGrad, decltype(channels)::value, T, XT><<<num_blocks(problem), kThreads, 0, stream>>>(
            problem, static_cast<const XT*>(x), x_strides, nll, grad_nll, grad_nll_strides, static_cast<T*>(grad_logits),
            grad_logits_strides);
      });
    });
  });
}

}  // namespace

void launch_nll_forward(const Problem& problem, const void* x, XType x_type, Strides4 x_strides, float* nll,
                        cudaStream_t stream) {
  launch_nll<false>(problem, x, x_type, x_strides, nll, nullptr, Strides4{}, nullptr, Strides4{}, stream);
}

void launch_nll_backward(const Problem& problem, const void* x, XType x_type, Strides4 x_strides,
                         const float* grad_nll, Strides4 grad_nll_strides, float* nll, void* grad_logits,
                         Strides4 grad_logits_strides, cudaStream_t stream) {
  launch_nll<true>(problem, x, x_type, x_strides, nll, grad_nll, grad_nll_strides, grad_logits, grad_logits_strides,
                   stream);
}

void launch_sample(const Problem& problem, const float* u_mix, Strides4 u_mix_strides, const float* u_logistic,
                   Strides4 u_logistic_strides, bool quantize, float* sample, cudaStream_t stream) {
  dispatch_dtype(problem.logits_dtype, [&](auto logits_tag) {
    using T = decltype(logits_tag);
    dispatch_channels(problem.channels, [&](auto channels) {
      sample_kernel<decltype(channels)::value, T><<<num_blocks(problem), kThreads, 0, stream>>>(
          problem, u_mix, u_mix_strides, u_logistic, u_logistic_strides, quantize, sample);
    });
  });
}

void launch_draw_step(const DrawStep& step, cudaStream_t stream) {
  if (step.batch == 0) return;
  dispatch_dtype(step.dtype, [&](auto tag) {
    using T = decltype(tag);
    dispatch_channels(step.channels, [&](auto channels) {
      draw_step_kernel<decltype(channels)::value, T>
          <<<static_cast<unsigned int>(ceil_div(step.batch, kThreads)), kThreads, 0, stream>>>(step);
    });
  });
}

}  // namespace dmol
}  // namespace pixelcnn_kernels
