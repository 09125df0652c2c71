// Torch glue of the discretized logistic mixture: schemas and CUDA implementations of
// torch.ops.pixelcnn_kernels_cuda.{dmol_nll_forward, dmol_nll_backward, dmol_nll_with_grad_of_sum,
// dmol_sample}.
// The Python ops (pixelcnn_kernels/ops/dmol.py) validate the arguments first; these
// check what the kernels rely on and launch. Layouts in dmol.h.
#include <ATen/ops/empty_like.h>

#include <tuple>

#include "dmol.h"
#include "torch_glue.h"

namespace pixelcnn_kernels {
namespace {

dmol::Strides4 strides_of(const at::Tensor& t) {
  if (t.dim() == 3) return {t.stride(0), 0, t.stride(1), t.stride(2)};  // (B, H, W)
  return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

// Checks logits (B, P, H, W) for `channels` colour channels; returns the shared problem.
dmol::Problem make_problem(const at::Tensor& logits, int64_t channels, int64_t num_bins) {
  TORCH_CHECK(on_kernels_device(logits), "logits must be a CUDA tensor");
  TORCH_CHECK(logits.dim() == 4, "logits must have shape (B, P, H, W), got ", logits.sizes());
  TORCH_CHECK(channels == 1 || channels == 3, "C must be 1 or 3, got ", channels);
  const int64_t per_mixture = dmol::logits_per_mixture(static_cast<int>(channels));
  TORCH_CHECK(logits.size(1) > 0 && logits.size(1) % per_mixture == 0, "logits must have P = ", per_mixture,
              "K channels, got ", logits.size(1));
  TORCH_CHECK(logits.size(0) * logits.size(2) * logits.size(3) < (int64_t{1} << 31), "at most 2^31 - 1 pixels");
  TORCH_CHECK(num_bins >= 2 && num_bins <= 2000, "num_bins must be in [2, 2000], got ", num_bins);
  return {logits.data_ptr(),
          to_kernel_dtype(logits, "logits"),
          strides_of(logits),
          static_cast<int>(logits.size(0)),
          static_cast<int>(logits.size(2)),
          static_cast<int>(logits.size(3)),
          static_cast<int>(channels),
          static_cast<int>(logits.size(1) / per_mixture),
          static_cast<int>(num_bins)};
}

dmol::XType check_x(const at::Tensor& x, const at::Tensor& logits) {
  check_same_device(x, "x", logits, "logits");
  TORCH_CHECK(x.dim() == 4 && x.size(0) == logits.size(0) && x.size(2) == logits.size(2) &&
                  x.size(3) == logits.size(3),
              "x must have shape (B, C, H, W) matching logits ", logits.sizes(), ", got ", x.sizes());
  switch (x.scalar_type()) {
    case at::kFloat: return dmol::XType::kFloat32;
    case at::kByte: return dmol::XType::kUInt8;
    case at::kLong: return dmol::XType::kInt64;
    default: TORCH_CHECK_TYPE(false, "x must be float32, uint8 or int64, got ", x.scalar_type());
  }
}

// An uninitialised per-pixel NLL (B, H, W) float32 for logits (B, P, H, W).
at::Tensor new_nll(const at::Tensor& logits) {
  return logits.new_empty({logits.size(0), logits.size(2), logits.size(3)}, logits.options().dtype(at::kFloat));
}

void check_float32_like(const at::Tensor& t, const char* name, const at::Tensor& logits, at::IntArrayRef shape) {
  check_same_device(t, name, logits, "logits");
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat, name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == shape, name, " must have shape ", shape, ", got ", t.sizes());
}

at::Tensor dmol_nll_forward(const at::Tensor& x, const at::Tensor& logits, int64_t num_bins) {
  const dmol::Problem problem = make_problem(logits, x.dim() == 4 ? x.size(1) : 0, num_bins);
  const dmol::XType x_type = check_x(x, logits);
  const KernelsDeviceGuard guard(logits.device());
  at::Tensor nll = new_nll(logits);
  if (nll.numel() > 0) {
    dmol::launch_nll_forward(problem, x.data_ptr(), x_type, strides_of(x), nll.data_ptr<float>(), current_stream());
    check_launch("dmol_nll_forward");
  }
  return nll;
}

at::Tensor dmol_nll_backward(const at::Tensor& x, const at::Tensor& logits, const at::Tensor& grad_nll,
                             int64_t num_bins) {
  const dmol::Problem problem = make_problem(logits, x.dim() == 4 ? x.size(1) : 0, num_bins);
  const dmol::XType x_type = check_x(x, logits);
  check_float32_like(grad_nll, "grad_nll", logits, {logits.size(0), logits.size(2), logits.size(3)});
  const KernelsDeviceGuard guard(logits.device());
  at::Tensor grad_logits = at::empty_like(logits);
  if (grad_logits.numel() > 0) {
    dmol::launch_nll_backward(problem, x.data_ptr(), x_type, strides_of(x), grad_nll.data_ptr<float>(),
                              strides_of(grad_nll), nullptr, grad_logits.data_ptr(), strides_of(grad_logits),
                              current_stream());
    check_launch("dmol_nll_backward");
  }
  return grad_logits;
}

// (nll, d(sum(nll)) / d logits) in one pass.
std::tuple<at::Tensor, at::Tensor> dmol_nll_with_grad_of_sum(const at::Tensor& x, const at::Tensor& logits,
                                                             int64_t num_bins) {
  const dmol::Problem problem = make_problem(logits, x.dim() == 4 ? x.size(1) : 0, num_bins);
  const dmol::XType x_type = check_x(x, logits);
  const KernelsDeviceGuard guard(logits.device());
  at::Tensor nll = new_nll(logits);
  at::Tensor grad_logits = at::empty_like(logits);
  if (grad_logits.numel() > 0) {
    dmol::launch_nll_backward(problem, x.data_ptr(), x_type, strides_of(x), nullptr, dmol::Strides4{},
                              nll.data_ptr<float>(), grad_logits.data_ptr(), strides_of(grad_logits), current_stream());
    check_launch("dmol_nll_with_grad_of_sum");
  }
  return {nll, grad_logits};
}

at::Tensor dmol_sample(const at::Tensor& logits, const at::Tensor& u_mix, const at::Tensor& u_logistic,
                       int64_t num_bins, bool quantize) {
  const dmol::Problem problem = make_problem(logits, u_logistic.dim() == 4 ? u_logistic.size(1) : 0, num_bins);
  check_float32_like(u_mix, "u_mix", logits, {logits.size(0), problem.mixtures, logits.size(2), logits.size(3)});
  check_float32_like(u_logistic, "u_logistic", logits,
                     {logits.size(0), problem.channels, logits.size(2), logits.size(3)});
  const KernelsDeviceGuard guard(logits.device());
  at::Tensor sample = u_logistic.new_empty(u_logistic.sizes());
  if (sample.numel() > 0) {
    dmol::launch_sample(problem, u_mix.data_ptr<float>(), strides_of(u_mix), u_logistic.data_ptr<float>(),
                        strides_of(u_logistic), quantize, sample.data_ptr<float>(), current_stream());
    check_launch("dmol_sample");
  }
  return sample;
}

}  // namespace
}  // namespace pixelcnn_kernels

TORCH_LIBRARY_FRAGMENT(PIXELCNN_OPS_NAMESPACE, m) {
  m.def("dmol_nll_forward(Tensor x, Tensor logits, int num_bins) -> Tensor");
  m.def("dmol_nll_backward(Tensor x, Tensor logits, Tensor grad_nll, int num_bins) -> Tensor");
  m.def("dmol_nll_with_grad_of_sum(Tensor x, Tensor logits, int num_bins) -> (Tensor, Tensor)");
  m.def("dmol_sample(Tensor logits, Tensor u_mix, Tensor u_logistic, int num_bins, bool quantize) -> Tensor");
}

TORCH_LIBRARY_IMPL(PIXELCNN_OPS_NAMESPACE, PIXELCNN_KERNELS_DEVICE, m) {
  m.impl("dmol_nll_forward", &pixelcnn_kernels::dmol_nll_forward);
  m.impl("dmol_nll_backward", &pixelcnn_kernels::dmol_nll_backward);
  m.impl("dmol_nll_with_grad_of_sum", &pixelcnn_kernels::dmol_nll_with_grad_of_sum);
  m.impl("dmol_sample", &pixelcnn_kernels::dmol_sample);
}
