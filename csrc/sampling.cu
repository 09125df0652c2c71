// Cached Gated PixelCNN sampling: the per-pixel step of one horizontal-stack layer (see sampling.h).
//
// A block takes kImages images of the batch at the pixel p read from the device. It first
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
      const int ca = (n / s.group_size) * 2 * s.group_size + n % s.group_size;
      const int cb = ca + s.group_size;
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

template <typename T, bool kGated>
void launch_typed(const PixelStep& s, cudaStream_t stream) {
  const int64_t per_image = pixel_step_shared_bytes_per_image(s);
  if (kImagesPerBlock * per_image <= kMaxSharedBytes) {
    const auto blocks = static_cast<unsigned>(ceil_div(s.batch, kImagesPerBlock));
    pixel_step_kernel<T, kGated, kImagesPerBlock><<<blocks, kThreads, kImagesPerBlock * per_image, stream>>>(s);
  } else {
    pixel_step_kernel<T, kGated, 1><<<static_cast<unsigned>(s.batch), kThreads, per_image, stream>>>(s);
  }
}

}  // namespace

int64_t pixel_step_shared_bytes_per_image(const PixelStep& s) {
  const int64_t floats = int64_t{s.taps} * s.in_channels + (s.v_pre != nullptr ? 3 * int64_t{s.out_channels} : 0);
  return floats * static_cast<int64_t>(sizeof(float));
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

}  // namespace sampling
}  // namespace pixelcnn_kernels
