// Torch glue of the masked-convolution kernels: schemas and CUDA implementations of
// torch.ops.pixelcnn_kernels_cuda.masked_conv2d_{fwd,fwd_gated,dgrad,wgrad}.
//
// The Python op (pixelcnn_kernels/ops/masked_conv.py) validates the user's arguments
// and packs the weight; these checks guard the contract itself: CUDA tensors on one
// device, contiguous channels-last activations (N, H, W, C), wp (T, Cin, Cout) of the
// activations' dtype, offsets [dy_0, dx_0, ...] with 1 <= T <= kMaxTaps, a residual of
// the output's shape and dtype (an addend: the pre-activation's), Cin = 2C for a
// concat_elu input, and the weight gradient's layout (see masked_conv.h).
#include <ATen/ops/empty.h>
#include <cuda_runtime.h>

#include <limits>
#include <optional>
#include <vector>

#include "gates.h"
#include "masked_conv.h"
#include "torch_glue.h"

namespace pixelcnn_kernels {
namespace masked_conv {
namespace {

// Each channel count is the GEMM's columns in some pass (Cout forward, Cin dgrad), laid
// out 64 (or 128) per CTA along grid.y, which holds at most 65535 blocks.
constexpr int64_t kMaxChannels = int64_t{65535} * 64;

void check_activation(const at::Tensor& t, const char* name) {
  check_cuda_contiguous(t, name);
  TORCH_CHECK(t.dim() == 4, name, " must be channels-last (N, H, W, C), got shape ", t.sizes());
  to_kernel_dtype(t, name);
  for (int d = 1; d < 4; ++d)
    TORCH_CHECK(t.size(d) < kMaxExtent, name, " has size ", t.size(d), " in dimension ", d, "; the kernels take < 2^30");
  // The kernels index a pixel within its image in 32 bits.
  TORCH_CHECK(t.size(1) * t.size(2) <= std::numeric_limits<int32_t>::max(), name, " has H * W = ", t.size(1) * t.size(2),
              " pixels per image; the kernels take < 2^31");
}

// The offsets as 32-bit ints, after checking they form 1 to kMaxTaps (dy, dx) pairs within range.
std::vector<int> checked_offsets(at::IntArrayRef offsets) {
  TORCH_CHECK(offsets.size() % 2 == 0, "offsets must hold (dy, dx) pairs, got ", offsets.size(), " entries");
  const int taps = static_cast<int>(offsets.size() / 2);
  TORCH_CHECK(1 <= taps && taps <= kMaxTaps, "masked conv kernels take 1 to ", kMaxTaps, " active taps, got ", taps);
  std::vector<int> result;
  result.reserve(offsets.size());
  for (int64_t offset : offsets) {
    TORCH_CHECK(-kMaxExtent < offset && offset < kMaxExtent, "offsets must lie within +-2^30, got ", offset);
    result.push_back(static_cast<int>(offset));
  }
  return result;
}

void check_weight(const at::Tensor& wp, const at::Tensor& x, int taps, int64_t in_channels, int64_t out_channels) {
  check_cuda_contiguous(wp, "wp");
  check_like(wp, "wp", x, "the activations");
  TORCH_CHECK(wp.dim() == 3, "wp must be (T, Cin, Cout), got shape ", wp.sizes());
  TORCH_CHECK(wp.size(0) == taps, "wp has ", wp.size(0), " taps but offsets hold ", taps, " (dy, dx) pairs");
  TORCH_CHECK(wp.size(1) == in_channels, "wp has ", wp.size(1), " input channels but the input has ", in_channels);
  if (out_channels >= 0)
    TORCH_CHECK(wp.size(2) == out_channels, "wp has ", wp.size(2), " output channels but gout has ", out_channels);
  for (int64_t d : {1, 2})
    TORCH_CHECK(wp.size(d) <= kMaxChannels, "wp has ", wp.size(d), d == 1 ? " input" : " output",
                " channels; the kernels take at most ", kMaxChannels);
}

// The conv's input channels (wp's Cin): x's, or twice them when it reads concat_elu(x).
int64_t conv_in_channels(const at::Tensor& x, bool concat_elu_input) {
  return concat_elu_input ? 2 * x.size(3) : x.size(3);
}

// bias (Cout,) or cond (N, Cout) as a contiguous float32 tensor (the kernels read fp32).
std::optional<at::Tensor> checked_float32_copy(const std::optional<at::Tensor>& t, const char* name,
                                               const at::Tensor& x, at::IntArrayRef shape) {
  if (!t.has_value()) return std::nullopt;
  check_same_device(*t, name, x, "x");
  TORCH_CHECK_TYPE(t->scalar_type() == at::kFloat || t->scalar_type() == x.scalar_type(), name,
                   " must be float32 or x's dtype ", x.scalar_type(), ", got ", t->scalar_type());
  TORCH_CHECK(t->sizes() == shape, name, " must have shape ", shape, ", got ", t->sizes());
  return t->to(at::kFloat).contiguous();
}

int device_attribute(const at::Tensor& t, cudaDeviceAttr attribute) {
  int value = 0;
  const cudaError_t err = cudaDeviceGetAttribute(&value, attribute, t.device().index());
  TORCH_CHECK(err == cudaSuccess, "cudaDeviceGetAttribute failed: ", cudaGetErrorString(err));
  return value;
}

// The tensor-core kernels are compiled for sm_80 and newer only.
void check_device_capability(const at::Tensor& t) {
  const int major = device_attribute(t, cudaDevAttrComputeCapabilityMajor);
  TORCH_CHECK(major >= 8, "masked conv CUDA kernels need compute capability 8.0 or newer, got ", major, ".x");
}

ConvProblem make_problem(const at::Tensor& activations, int64_t in_channels, int64_t out_channels,
                         const std::vector<int>& offsets) {
  return {activations.size(0),
          static_cast<int>(activations.size(1)),
          static_cast<int>(activations.size(2)),
          static_cast<int>(in_channels),
          static_cast<int>(out_channels),
          static_cast<int>(offsets.size() / 2),
          offsets.data()};
}

// A dropout mask of the conv's concat_elu input: (N, H, W, in_channels) contiguous uint8 on x's device.
void check_keep(const std::optional<at::Tensor>& keep, bool concat_elu_input, const at::Tensor& x, int64_t in_channels) {
  if (!keep.has_value()) return;
  TORCH_CHECK(concat_elu_input, "keep (a dropout mask) needs a concat_elu input");
  TORCH_CHECK_TYPE(keep->scalar_type() == at::kByte, "keep must be uint8, got ", keep->scalar_type());
  check_same_device(*keep, "keep", x, "x");
  TORCH_CHECK(keep->is_contiguous(), "keep must be contiguous (N, H, W, Cin)");
  TORCH_CHECK(keep->dim() == 4 && keep->size(0) == x.size(0) && keep->size(1) == x.size(1) && keep->size(2) == x.size(2) &&
                  keep->size(3) == in_channels,
              "keep must be (N, H, W, Cin) = (", x.size(0), ", ", x.size(1), ", ", x.size(2), ", ", in_channels, "), got ",
              keep->sizes());
}

const float* data_or_null(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr<float>() : nullptr;
}

const uint8_t* keep_or_null(const std::optional<at::Tensor>& keep) {
  return keep.has_value() ? keep->data_ptr<uint8_t>() : nullptr;
}

// What the forward and wgrad GEMMs read: x itself, or concat_elu(x) (N, H, W, 2C) in x's dtype,
// dropped out by keep when given, written by one elementwise pass (see masked_conv.cu for why
// not while loading x). Call on x's device, after check_keep.
at::Tensor conv_input(const at::Tensor& x, bool concat_elu_input, const std::optional<at::Tensor>& keep,
                      double keep_scale) {
  if (!concat_elu_input) return x;
  at::Tensor activation = at::empty({x.size(0), x.size(1), x.size(2), 2 * x.size(3)}, x.options());
  launch_concat_elu_forward(to_kernel_dtype(x, "x"), x.data_ptr(), activation.data_ptr(), x.size(0) * x.size(1) * x.size(2),
                            x.size(3), keep_or_null(keep), static_cast<float>(keep_scale), current_stream());
  check_launch("concat_elu_forward (the masked conv's input)");
  return activation;
}

at::Tensor masked_conv2d_fwd_cuda(const at::Tensor& x, const at::Tensor& wp, const std::optional<at::Tensor>& bias,
                                  const std::optional<at::Tensor>& residual, at::IntArrayRef offsets,
                                  bool concat_elu_input, bool allow_tf32, const std::optional<at::Tensor>& keep,
                                  double keep_scale) {
  check_activation(x, "x");
  const std::vector<int> offsets32 = checked_offsets(offsets);
  const int64_t in_channels = conv_in_channels(x, concat_elu_input);
  check_weight(wp, x, static_cast<int>(offsets32.size() / 2), in_channels, -1);
  check_keep(keep, concat_elu_input, x, in_channels);
  const int64_t out_channels = wp.size(2);
  const auto bias32 = checked_float32_copy(bias, "bias", x, {out_channels});
  check_optional_operand(residual, "residual", x, {x.size(0), x.size(1), x.size(2), out_channels});
  check_device_capability(x);
  const KernelsDeviceGuard guard(x.device());
  const at::Tensor input = conv_input(x, concat_elu_input, keep, keep_scale);
  at::Tensor out = at::empty({x.size(0), x.size(1), x.size(2), out_channels}, x.options());
  masked_conv2d_fwd(to_kernel_dtype(x, "x"), allow_tf32, make_problem(x, in_channels, out_channels, offsets32),
                    input.data_ptr(), wp.data_ptr(), data_or_null(bias32), raw_data_or_null(residual), out.data_ptr(),
                    current_stream());
  check_launch("masked_conv2d_fwd");
  return out;
}

std::vector<at::Tensor> masked_conv2d_fwd_gated_cuda(const at::Tensor& x, const at::Tensor& wp,
                                                      const std::optional<at::Tensor>& bias,
                                                      const std::optional<at::Tensor>& cond,
                                                      const std::optional<at::Tensor>& residual,
                                                      const std::optional<at::Tensor>& addend,
                                                      at::IntArrayRef offsets, bool concat_elu_input, int64_t gate,
                                                      int64_t gate_groups, bool write_preact, bool allow_tf32,
                                                      const std::optional<at::Tensor>& keep, double keep_scale) {
  check_activation(x, "x");
  const std::vector<int> offsets32 = checked_offsets(offsets);
  const int64_t in_channels = conv_in_channels(x, concat_elu_input);
  check_weight(wp, x, static_cast<int>(offsets32.size() / 2), in_channels, -1);
  check_keep(keep, concat_elu_input, x, in_channels);
  const int64_t out_channels = wp.size(2);
  // Groups of ceil(half / gate_groups) channels, the last one the rest (masks.color_group_size): none may be empty.
  const int64_t half = out_channels / 2;
  TORCH_CHECK(gate_groups >= 1 && out_channels % 2 == 0 && (gate_groups - 1) * ((half + gate_groups - 1) / gate_groups) < half,
              "the gated conv splits Cout into gate_groups = ", gate_groups,
              " non-empty blocks of two halves; wp has Cout ", out_channels);
  TORCH_CHECK(gate == static_cast<int64_t>(Gate::kTanhSigmoid) || gate == static_cast<int64_t>(Gate::kLinearSigmoid),
              "gate must be 1 (tanh(a) * sigmoid(b)) or 2 (a * sigmoid(b)), got ", gate);
  const auto bias32 = checked_float32_copy(bias, "bias", x, {out_channels});
  const auto cond32 = checked_float32_copy(cond, "cond", x, {x.size(0), out_channels});
  check_optional_operand(residual, "residual", x, {x.size(0), x.size(1), x.size(2), out_channels / 2});
  check_optional_operand(addend, "addend", x, {x.size(0), x.size(1), x.size(2), out_channels});
  check_device_capability(x);
  const KernelsDeviceGuard guard(x.device());
  const at::Tensor input = conv_input(x, concat_elu_input, keep, keep_scale);
  at::Tensor out = at::empty({x.size(0), x.size(1), x.size(2), out_channels / 2}, x.options());
  at::Tensor preact = write_preact ? at::empty({x.size(0), x.size(1), x.size(2), out_channels}, x.options())
                                   : at::empty({0}, x.options());
  masked_conv2d_fwd_gated(to_kernel_dtype(x, "x"), allow_tf32, make_problem(x, in_channels, out_channels, offsets32),
                          input.data_ptr(), wp.data_ptr(), data_or_null(bias32), raw_data_or_null(addend), data_or_null(cond32),
                          raw_data_or_null(residual), static_cast<Gate>(gate), static_cast<int>(gate_groups), out.data_ptr(),
                          write_preact ? preact.data_ptr() : nullptr, current_stream());
  check_launch("masked_conv2d_fwd_gated");
  return {out, preact};
}

// x given: the forward read concat_elu(x) (dropped out by keep when given), and the result is
// the gradient w.r.t. x.
at::Tensor masked_conv2d_dgrad_cuda(const at::Tensor& gout, const at::Tensor& wp, const std::optional<at::Tensor>& x,
                                    at::IntArrayRef offsets, bool allow_tf32, const std::optional<at::Tensor>& keep,
                                    double keep_scale) {
  check_activation(gout, "gout");
  const std::vector<int> offsets32 = checked_offsets(offsets);
  TORCH_CHECK(wp.dim() == 3, "wp must be (T, Cin, Cout), got shape ", wp.sizes());
  const int64_t in_channels = wp.size(1);
  check_weight(wp, gout, static_cast<int>(offsets32.size() / 2), in_channels, gout.size(3));
  const bool concat_elu_input = x.has_value();
  if (concat_elu_input) {
    check_activation(*x, "x");
    check_like(*x, "x", gout, "gout");
    TORCH_CHECK(x->size(0) == gout.size(0) && x->size(1) == gout.size(1) && x->size(2) == gout.size(2) &&
                    2 * x->size(3) == in_channels,
                "x must be (N, H, W, Cin / 2) = (", gout.size(0), ", ", gout.size(1), ", ", gout.size(2), ", ",
                in_channels / 2, ") for a concat_elu input with wp's Cin = ", in_channels, ", got ", x->sizes());
  }
  check_keep(keep, concat_elu_input, gout, in_channels);
  check_device_capability(gout);
  const KernelsDeviceGuard guard(gout.device());
  const int64_t gx_channels = concat_elu_input ? in_channels / 2 : in_channels;
  at::Tensor gx = at::empty({gout.size(0), gout.size(1), gout.size(2), gx_channels}, gout.options());
  masked_conv2d_dgrad(to_kernel_dtype(gout, "gout"), allow_tf32, make_problem(gout, in_channels, gout.size(3), offsets32),
                      gout.data_ptr(), wp.data_ptr(), raw_data_or_null(x), keep_or_null(keep), static_cast<float>(keep_scale),
                      gx.data_ptr(), current_stream());
  check_launch("masked_conv2d_dgrad");
  return gx;
}

// The weight gradient's layout arguments (see WeightGradLayout): tap_positions, one per tap, within
// kernel_size (kh, kw); hidden, when given, (Cout, Cin) uint8 on x's device with anchor_tap a tap.
WeightGradLayout checked_layout(at::IntArrayRef tap_positions, at::IntArrayRef kernel_size,
                                const std::optional<at::Tensor>& hidden, int64_t anchor_tap, int taps,
                                int64_t in_channels, int64_t out_channels, const at::Tensor& x,
                                std::vector<int>& positions32) {
  TORCH_CHECK(kernel_size.size() == 2 && kernel_size[0] >= 1 && kernel_size[1] >= 1 &&
                  kernel_size[0] * kernel_size[1] <= kMaxExtent,
              "kernel_size must be (kh, kw) >= 1 of fewer than 2^30 positions, got ", kernel_size);
  const int64_t positions = kernel_size[0] * kernel_size[1];
  TORCH_CHECK(static_cast<int64_t>(tap_positions.size()) == taps, "tap_positions has ", tap_positions.size(),
              " entries but offsets hold ", taps, " taps");
  positions32.clear();
  for (int64_t position : tap_positions) {
    TORCH_CHECK(0 <= position && position < positions, "tap_positions must lie in [0, kh * kw = ", positions, "), got ",
                position);
    positions32.push_back(static_cast<int>(position));
  }
  if (hidden.has_value()) {
    TORCH_CHECK_TYPE(hidden->scalar_type() == at::kByte, "hidden must be uint8, got ", hidden->scalar_type());
    check_same_device(*hidden, "hidden", x, "x");
    TORCH_CHECK(hidden->is_contiguous() && hidden->dim() == 2 && hidden->size(0) == out_channels &&
                    hidden->size(1) == in_channels,
                "hidden must be contiguous (Cout, Cin) = (", out_channels, ", ", in_channels, "), got ", hidden->sizes());
    TORCH_CHECK(0 <= anchor_tap && anchor_tap < taps, "anchor_tap must be a tap index in [0, ", taps, "), got ",
                anchor_tap);
  }
  return {static_cast<int>(positions), positions32.data(), hidden.has_value() ? hidden->data_ptr<uint8_t>() : nullptr,
          static_cast<int>(anchor_tap)};
}

at::Tensor masked_conv2d_wgrad_cuda(const at::Tensor& x, const at::Tensor& gout, at::IntArrayRef offsets,
                                    at::IntArrayRef tap_positions, at::IntArrayRef kernel_size,
                                    const std::optional<at::Tensor>& hidden, int64_t anchor_tap, bool concat_elu_input,
                                    bool allow_tf32, const std::optional<at::Tensor>& keep, double keep_scale) {
  check_activation(x, "x");
  check_activation(gout, "gout");
  check_like(gout, "gout", x, "x");
  TORCH_CHECK(gout.size(0) == x.size(0) && gout.size(1) == x.size(1) && gout.size(2) == x.size(2),
              "gout (N, H, W, Cout) must match x (N, H, W, Cin) in N, H, W: got ", gout.sizes(), " and ", x.sizes());
  const std::vector<int> offsets32 = checked_offsets(offsets);
  check_device_capability(x);
  const KernelsDeviceGuard guard(x.device());
  const int64_t in_channels = conv_in_channels(x, concat_elu_input);
  check_keep(keep, concat_elu_input, x, in_channels);
  const ConvProblem problem = make_problem(x, in_channels, gout.size(3), offsets32);
  std::vector<int> positions32;
  const WeightGradLayout layout = checked_layout(tap_positions, kernel_size, hidden, anchor_tap, problem.taps,
                                                 in_channels, gout.size(3), x, positions32);
  const WgradPlan plan = plan_masked_conv2d_wgrad(to_kernel_dtype(x, "x"), allow_tf32, problem,
                                                  device_attribute(x, cudaDevAttrMultiProcessorCount));
  const at::Tensor input = conv_input(x, concat_elu_input, keep, keep_scale);
  at::Tensor grad = at::empty({gout.size(3), in_channels, kernel_size[0], kernel_size[1]}, x.options());
  at::Tensor workspace = at::empty({plan.workspace_elements}, x.options().dtype(at::kFloat));
  masked_conv2d_wgrad(to_kernel_dtype(x, "x"), allow_tf32, problem, plan, layout, input.data_ptr(), gout.data_ptr(),
                      grad.data_ptr(), workspace.data_ptr<float>(), current_stream());
  check_launch("masked_conv2d_wgrad");
  return grad;
}

}  // namespace
}  // namespace masked_conv
}  // namespace pixelcnn_kernels

TORCH_LIBRARY_FRAGMENT(PIXELCNN_OPS_NAMESPACE, m) {
  m.def(
      "masked_conv2d_fwd(Tensor x, Tensor wp, Tensor? bias, Tensor? residual, int[] offsets, bool concat_elu_input, "
      "bool allow_tf32, Tensor? keep=None, float keep_scale=1.0) -> Tensor");
  m.def(
      "masked_conv2d_fwd_gated(Tensor x, Tensor wp, Tensor? bias, Tensor? cond, Tensor? residual, Tensor? addend, "
      "int[] offsets, bool concat_elu_input, int gate, int gate_groups, bool write_preact, bool allow_tf32, "
      "Tensor? keep=None, float keep_scale=1.0) -> Tensor[]");
  m.def(
      "masked_conv2d_dgrad(Tensor gout, Tensor wp, Tensor? x, int[] offsets, bool allow_tf32, Tensor? keep=None, "
      "float keep_scale=1.0) -> Tensor");
  m.def(
      "masked_conv2d_wgrad(Tensor x, Tensor gout, int[] offsets, int[] tap_positions, int[] kernel_size, "
      "Tensor? hidden, int anchor_tap, bool concat_elu_input, bool allow_tf32, Tensor? keep=None, "
      "float keep_scale=1.0) -> Tensor");
}

TORCH_LIBRARY_IMPL(PIXELCNN_OPS_NAMESPACE, PIXELCNN_KERNELS_DEVICE, m) {
  using namespace pixelcnn_kernels::masked_conv;
  m.impl("masked_conv2d_fwd", &masked_conv2d_fwd_cuda);
  m.impl("masked_conv2d_fwd_gated", &masked_conv2d_fwd_gated_cuda);
  m.impl("masked_conv2d_dgrad", &masked_conv2d_dgrad_cuda);
  m.impl("masked_conv2d_wgrad", &masked_conv2d_wgrad_cuda);
}
