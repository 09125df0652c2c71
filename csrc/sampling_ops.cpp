// Torch glue of cached sampling's per-pixel steps: schemas and CUDA implementations of
// torch.ops.pixelcnn_kernels_cuda.{gated_pixel_step, resnet_position_step, softmax_draw_step,
// dmol_draw_step} (in-place, inference-only ops).
//
// The Python functions (pixelcnn_kernels/ops/sampling.py) validate the user's arguments and
// pack the weights; these checks guard the contract the kernel relies on (sampling.h): CUDA
// tensors on one device and of one dtype, the shapes, contiguous weights, at most kMaxTaps
// taps, and one image's staging within the kernel's shared memory. Nothing here reads
// device memory or synchronises, so a CUDA graph can capture the op.
#include <limits>
#include <optional>

#include "dmol.h"
#include "sampling.h"
#include "torch_glue.h"

namespace pixelcnn_kernels {
namespace sampling {
namespace {

// An optional operand like ref (check_operand); returns its data or null when absent.
const void* operand(const std::optional<at::Tensor>& t, const char* name, const at::Tensor& ref, at::IntArrayRef shape,
                    const char* ref_name = "x") {
  if (!t.has_value()) return nullptr;
  check_operand(*t, name, ref, ref_name, shape);
  return t->data_ptr();
}

// The step's pixel: an int64 (1,) on ref's device (read by the kernel, so a graph replays the launch).
void check_pixel(const at::Tensor& pixel, const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK(pixel.scalar_type() == at::kLong && pixel.numel() == 1 && on_kernels_device(pixel) && pixel.device() == ref.device(),
              "pixel must be an int64 (1,) tensor on ", ref_name, "'s device ", ref.device(), ", got ", pixel.scalar_type(),
              " ", pixel.sizes(), " on ", pixel.device());
}

// Checks that one image's staging fits in the kernel's shared memory, then launches on x's device and stream.
template <typename Step>
void launch_checked(const char* op, void (*launch)(DType, const Step&, cudaStream_t), DType dtype, const Step& step,
                    int64_t shared_bytes_per_image, const at::Tensor& x) {
  TORCH_CHECK(shared_bytes_per_image <= kMaxSharedBytes, op, " stages ", shared_bytes_per_image,
              " bytes per image in shared memory; the kernel takes at most ", kMaxSharedBytes, " (fewer taps, channels or bins)");
  const KernelsDeviceGuard guard(x.device());
  launch(dtype, step, current_stream());
  check_launch(op);
}

void gated_pixel_step_cuda(const at::Tensor& pixel, const at::Tensor& x, const at::Tensor& wp,
                           const std::optional<at::Tensor>& bias, at::IntArrayRef offsets,
                           const std::optional<at::Tensor>& v_pre, const std::optional<at::Tensor>& link_weight,
                           const std::optional<at::Tensor>& link_bias, const std::optional<at::Tensor>& cond,
                           const std::optional<at::Tensor>& out_weight, const std::optional<at::Tensor>& out_bias,
                           int64_t group_size, at::Tensor& out) {
  TORCH_CHECK(on_kernels_device(x), "x must be a CUDA tensor");
  TORCH_CHECK(x.dim() == 4, "x must be (B, H, W, Cin), got shape ", x.sizes());
  const DType dtype = to_kernel_dtype(x, "x");
  check_pixel(pixel, x, "x");
  check_like(out, "out", x, "x");
  check_cuda_contiguous(wp, "wp");
  check_like(wp, "wp", x, "x");
  TORCH_CHECK(wp.dim() == 3, "wp must be (T, Cin, Npre), got shape ", wp.sizes());
  const int64_t taps = static_cast<int64_t>(offsets.size());
  TORCH_CHECK(1 <= taps && taps <= kMaxTaps, "the step takes 1 to ", kMaxTaps, " taps, got ", taps);
  TORCH_CHECK(wp.size(0) == taps, "wp has ", wp.size(0), " taps but offsets hold ", taps);
  TORCH_CHECK(wp.size(1) == x.size(3), "wp has ", wp.size(1), " input channels but x has ", x.size(3));
  for (int d = 0; d < 4; ++d) TORCH_CHECK(x.size(d) < kMaxExtent, "x has size ", x.size(d), " in dimension ", d, "; the step takes < 2^30");
  TORCH_CHECK(x.size(1) * x.size(2) < kMaxExtent, "x has H * W = ", x.size(1) * x.size(2), "; the step takes < 2^30 pixels");
  TORCH_CHECK(wp.size(2) < kMaxExtent, "wp has ", wp.size(2), " output columns; the step takes < 2^30");

  const bool gated = v_pre.has_value();
  const int64_t out_channels = gated ? wp.size(2) / 2 : wp.size(2);
  TORCH_CHECK(out.dim() == 4 && out.size(0) == x.size(0) && out.size(1) == x.size(1) && out.size(2) == x.size(2) &&
                  out.size(3) == out_channels,
              "out must be (B, H, W, ", out_channels, ") matching x ", x.sizes(), ", got ", out.sizes());

  PixelStep step{};
  step.pixel = pixel.data_ptr<int64_t>();
  step.x = x.data_ptr();
  step.wp = wp.data_ptr();
  step.bias = operand(bias, "bias", x, {wp.size(2)});
  step.out = out.data_ptr();
  for (int d = 0; d < 4; ++d) {
    step.x_strides[d] = x.stride(d);
    step.out_strides[d] = out.stride(d);
  }
  step.batch = x.size(0);
  step.height = static_cast<int>(x.size(1));
  step.width = static_cast<int>(x.size(2));
  step.in_channels = static_cast<int>(x.size(3));
  step.out_channels = static_cast<int>(out_channels);
  step.taps = static_cast<int>(taps);
  for (int64_t t = 0; t < taps; ++t) {
    TORCH_CHECK(-kMaxExtent < offsets[t] && offsets[t] < kMaxExtent, "offsets must lie within +-2^30, got ", offsets[t]);
    step.offsets[t] = static_cast<int>(offsets[t]);
  }
  if (gated) {
    const int64_t channels = out_channels;
    TORCH_CHECK(wp.size(2) == 2 * channels && x.size(3) == channels,
                "a gated step maps C to 2C pre-activations and adds its C-channel input: got x ", x.sizes(), " and wp ",
                wp.sizes());
    TORCH_CHECK(group_size >= 1 && group_size <= channels, "group_size must be in [1, ", channels, "], got ",
                group_size);
    check_like(*v_pre, "v_pre", x, "x");
    TORCH_CHECK(v_pre->dim() == 3 && v_pre->size(0) == x.size(0) && v_pre->size(1) == x.size(2) &&
                    v_pre->size(2) == 2 * channels,
                "v_pre must be (B, W, 2C) = (", x.size(0), ", ", x.size(2), ", ", 2 * channels, "), got ", v_pre->sizes());
    TORCH_CHECK(link_weight.has_value() && out_weight.has_value(), "a gated step needs link_weight and out_weight");
    step.v_pre = v_pre->data_ptr();
    for (int d = 0; d < 3; ++d) step.v_strides[d] = v_pre->stride(d);
    step.link_weight = operand(link_weight, "link_weight", x, {2 * channels, 2 * channels});
    step.link_bias = operand(link_bias, "link_bias", x, {2 * channels});
    step.cond = operand(cond, "cond", x, {x.size(0), 2 * channels});
    step.out_weight = operand(out_weight, "out_weight", x, {channels, channels});
    step.out_bias = operand(out_bias, "out_bias", x, {channels});
    step.group_size = static_cast<int>(group_size);
  } else {
    TORCH_CHECK(!link_weight.has_value() && !link_bias.has_value() && !cond.has_value() && !out_weight.has_value() &&
                    !out_bias.has_value(),
                "the plain step (no v_pre) takes no link, cond or output weights");
  }
  launch_checked("gated_pixel_step", launch_pixel_step, dtype, step, pixel_step_shared_bytes_per_image(step), x);
}

// A resnet-step cache or weight (check_operand); returns its data.
const void* required(const at::Tensor& t, const char* name, const at::Tensor& x, at::IntArrayRef shape) {
  check_operand(t, name, x, "x", shape);
  return t.data_ptr();
}

void resnet_position_step_cuda(const at::Tensor& pixel, const at::Tensor& table, at::IntArrayRef kernel, const at::Tensor& x,
                               at::Tensor& inner, at::TensorList skips, const at::Tensor& input_weight,
                               const std::optional<at::Tensor>& input_bias, const std::optional<at::Tensor>& skip_weight,
                               const std::optional<at::Tensor>& skip_bias, const at::Tensor& out_weight,
                               const std::optional<at::Tensor>& out_bias, const std::optional<at::Tensor>& cond,
                               at::Tensor& out) {
  TORCH_CHECK(on_kernels_device(x), "x must be a CUDA tensor");
  TORCH_CHECK(x.dim() == 4 && x.is_contiguous(), "x must be a contiguous (B, H + 2, W + 2, C) cache, got shape ", x.sizes());
  const DType dtype = to_kernel_dtype(x, "x");
  for (int d = 0; d < 4; ++d) TORCH_CHECK(x.size(d) < kMaxExtent, "x has size ", x.size(d), " in dimension ", d, "; the step takes < 2^30");
  TORCH_CHECK(x.size(1) * x.size(2) * x.size(3) < kMaxExtent, "x has ", x.size(1) * x.size(2) * x.size(3),
              " elements per image; the step takes < 2^30");
  check_pixel(pixel, x, "x");
  TORCH_CHECK(table.scalar_type() == at::kInt && table.dim() == 3 && table.size(2) == 3 && table.is_contiguous() &&
                  table.device() == x.device(),
              "table must be a contiguous int32 (steps, slots, 3) tensor on x's device, got shape ", table.sizes());
  TORCH_CHECK(table.size(1) < kMaxExtent, "table has ", table.size(1), " slots; the step takes < 2^30");
  TORCH_CHECK(kernel.size() == 4, "kernel must be (kernel_height, kernel_width, top, left), got ", kernel);
  const int64_t kh = kernel[0], kw = kernel[1], top = kernel[2], left = kernel[3];
  // Windows reach at most one pixel past the image: the caches' zero ring.
  TORCH_CHECK(1 <= kh && kh <= 3 && 1 <= kw && kw <= 3 && 0 <= top && top < kh && kh - 1 - top <= 1 && top <= 1 &&
                  0 <= left && left < kw && kw - 1 - left <= 1 && left <= 1,
              "kernel ", kernel, " reaches more than one pixel past the image");
  const int64_t taps = kh * kw;
  const int64_t channels = x.size(3);
  const int64_t streams = static_cast<int64_t>(skips.size());
  TORCH_CHECK(streams <= 2, "the step takes at most 2 skip streams, got ", streams);
  TORCH_CHECK(skip_weight.has_value() == (streams > 0), "skip_weight must be given exactly when skips are");

  ResnetStep step{};
  step.x = x.data_ptr();
  step.inner = const_cast<void*>(required(inner, "inner", x, x.sizes()));
  step.out = const_cast<void*>(required(out, "out", x, x.sizes()));
  for (int64_t s = 0; s < streams; ++s) step.skip[s] = required(skips[s], "skips", x, x.sizes());
  step.input_weight = required(input_weight, "input_weight", x, {taps, 2 * channels, channels});
  step.input_bias = operand(input_bias, "input_bias", x, {channels});
  step.skip_weight = operand(skip_weight, "skip_weight", x, {2 * streams * channels, channels});
  step.skip_bias = operand(skip_bias, "skip_bias", x, {channels});
  step.out_weight = required(out_weight, "out_weight", x, {taps, 2 * channels, 2 * channels});
  step.out_bias = operand(out_bias, "out_bias", x, {2 * channels});
  step.cond = operand(cond, "cond", x, {x.size(0), 2 * channels});
  step.batch = x.size(0);
  step.padded_height = static_cast<int>(x.size(1));
  step.padded_width = static_cast<int>(x.size(2));
  step.channels = static_cast<int>(channels);
  step.skip_streams = static_cast<int>(streams);
  step.pixel = pixel.data_ptr<int64_t>();
  step.table = table.data_ptr<int32_t>();
  step.steps = table.size(0);
  step.slots = static_cast<int>(table.size(1));
  step.kernel_height = static_cast<int>(kh);
  step.kernel_width = static_cast<int>(kw);
  step.top = static_cast<int>(top);
  step.left = static_cast<int>(left);
  launch_checked("resnet_position_step", launch_resnet_step, dtype, step, resnet_step_shared_bytes_per_image(step), x);
}

// The draws' pixel-indexed operands: images (B, C, HW) int64, known (B, HW) bool and each
// noise tensor (B, channels, HW) float32, contiguous on `ref`'s device.
void check_draw_targets(const at::Tensor& images, const at::Tensor& known, const at::Tensor& ref, const char* ref_name) {
  check_cuda_contiguous(images, "images");
  check_same_device(images, "images", ref, ref_name);
  TORCH_CHECK_TYPE(images.scalar_type() == at::kLong, "images must be int64, got ", images.scalar_type());
  TORCH_CHECK(images.dim() == 3 && images.size(0) == ref.size(0), "images must be (B, C, HW) with ", ref_name, "'s B = ",
              ref.size(0), ", got shape ", images.sizes());
  TORCH_CHECK(images.size(2) < kMaxExtent, "images has ", images.size(2), " pixels; the draws take < 2^30");
  check_cuda_contiguous(known, "known");
  check_same_device(known, "known", ref, ref_name);
  TORCH_CHECK_TYPE(known.scalar_type() == at::kBool, "known must be bool, got ", known.scalar_type());
  TORCH_CHECK(known.dim() == 2 && known.size(0) == images.size(0) && known.size(1) == images.size(2),
              "known must be (B, HW) = (", images.size(0), ", ", images.size(2), "), got ", known.sizes());
}

void check_noise(const at::Tensor& noise, const char* name, const at::Tensor& images, int64_t channels) {
  check_cuda_contiguous(noise, name);
  check_same_device(noise, name, images, "images");
  TORCH_CHECK_TYPE(noise.scalar_type() == at::kFloat, name, " must be float32, got ", noise.scalar_type());
  TORCH_CHECK(noise.dim() == 3 && noise.size(0) == images.size(0) && noise.size(1) == channels &&
                  noise.size(2) == images.size(2),
              name, " must be (B, ", channels, ", HW) = (", images.size(0), ", ", channels, ", ", images.size(2),
              "), got ", noise.sizes());
}

// A draw's table of each bin's network input: (num_bins,) like ref, 2 <= num_bins < 2^30; returns num_bins.
int64_t check_bin_inputs(const at::Tensor& bin_inputs, const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK(bin_inputs.dim() == 1 && 2 <= bin_inputs.size(0) && bin_inputs.size(0) < kMaxExtent,
              "bin_inputs must be (num_bins,) with 2 <= num_bins < 2^30, got shape ", bin_inputs.sizes());
  check_operand(bin_inputs, "bin_inputs", ref, ref_name, {bin_inputs.size(0)});
  return bin_inputs.size(0);
}

void softmax_draw_step_cuda(const at::Tensor& pixel, const at::Tensor& h, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, const at::Tensor& bin_inputs, const at::Tensor& noise,
                            const at::Tensor& known, at::Tensor& images, at::Tensor& inputs, int64_t channel) {
  check_cuda_contiguous(h, "h");
  TORCH_CHECK(h.dim() == 2, "h must be (B, hidden), got shape ", h.sizes());
  const DType dtype = to_kernel_dtype(h, "h");
  check_pixel(pixel, h, "h");
  check_draw_targets(images, known, h, "h");
  const int64_t batch = h.size(0), hidden = h.size(1), channels = images.size(1), pixels = images.size(2);
  const int64_t num_bins = check_bin_inputs(bin_inputs, h, "h");
  // One block per image: the grid's x dimension.
  TORCH_CHECK(h.size(0) <= std::numeric_limits<int32_t>::max(), "the draw takes at most 2^31 - 1 images, got ", h.size(0));
  TORCH_CHECK(hidden < kMaxExtent && channels * num_bins < kMaxExtent,
              "the draw takes fewer than 2^30 hidden units and logits, got ", hidden, " and ", channels * num_bins);
  TORCH_CHECK(0 <= channel && channel < channels, "channel must be in [0, ", channels, "), got ", channel);
  check_operand(weight, "weight", h, "h", {hidden, channels * num_bins});
  check_operand(inputs, "inputs", h, "h", images.sizes());
  check_noise(noise, "noise", images, channels);

  SoftmaxDraw draw{};
  draw.pixel = pixel.data_ptr<int64_t>();
  draw.h = h.data_ptr();
  draw.weight = weight.data_ptr();
  draw.bias = operand(bias, "bias", h, {channels * num_bins}, "h");
  draw.bin_inputs = bin_inputs.data_ptr();
  draw.noise = noise.data_ptr<float>();
  draw.known = known.data_ptr<bool>();
  draw.images = images.data_ptr<int64_t>();
  draw.inputs = inputs.data_ptr();
  draw.batch = batch;
  draw.pixels = pixels;
  draw.hidden = static_cast<int>(hidden);
  draw.num_bins = static_cast<int>(num_bins);
  draw.channels = static_cast<int>(channels);
  draw.channel = static_cast<int>(channel);
  launch_checked("softmax_draw_step", launch_softmax_draw, dtype, draw, softmax_draw_shared_bytes(draw), h);
}

void dmol_draw_step_cuda(const at::Tensor& pixel, const at::Tensor& logits, const at::Tensor& u_mix,
                         const at::Tensor& u_logistic, const at::Tensor& known, at::Tensor& images, at::Tensor& inputs,
                         const std::optional<at::Tensor>& input_index, const at::Tensor& bin_inputs) {
  check_cuda_contiguous(logits, "logits");
  TORCH_CHECK(logits.dim() == 2, "logits must be (B, P), got shape ", logits.sizes());
  const DType dtype = to_kernel_dtype(logits, "logits");
  check_pixel(pixel, logits, "logits");
  check_draw_targets(images, known, logits, "logits");
  const int64_t channels = images.size(1), pixels = images.size(2);
  TORCH_CHECK(channels == 1 || channels == 3, "images must have 1 or 3 channels, got ", channels);
  const int64_t per_mixture = dmol::logits_per_mixture(static_cast<int>(channels));
  TORCH_CHECK(logits.size(1) > 0 && logits.size(1) % per_mixture == 0 && logits.size(1) < kMaxExtent, "logits must have P = ",
              per_mixture, "K channels for ", channels, " colour channels, got ", logits.size(1));
  const int64_t mixtures = logits.size(1) / per_mixture;
  check_noise(u_mix, "u_mix", images, mixtures);
  check_noise(u_logistic, "u_logistic", images, channels);
  const int64_t num_bins = check_bin_inputs(bin_inputs, logits, "logits");
  check_like(inputs, "inputs", logits, "logits");
  TORCH_CHECK(inputs.dim() == 3 && inputs.size(0) == images.size(0) && inputs.size(1) == channels,
              "inputs must be (B, C, N) with images' B and C, got shape ", inputs.sizes());
  if (input_index.has_value()) {
    check_operand(*input_index, "input_index", images, "images", {pixels});
  } else {
    TORCH_CHECK(inputs.size(2) == pixels, "inputs must have images' HW = ", pixels, " positions without input_index, got ",
                inputs.size(2));
  }

  dmol::DrawStep step{};
  step.pixel = pixel.data_ptr<int64_t>();
  step.logits = logits.data_ptr();
  step.dtype = dtype;
  step.u_mix = u_mix.data_ptr<float>();
  step.u_logistic = u_logistic.data_ptr<float>();
  step.known = known.data_ptr<bool>();
  step.images = images.data_ptr<int64_t>();
  step.inputs = inputs.data_ptr();
  for (int d = 0; d < 3; ++d) step.input_strides[d] = inputs.stride(d);
  step.input_positions = inputs.size(2);
  step.input_index = input_index.has_value() ? input_index->data_ptr<int64_t>() : nullptr;
  step.bin_inputs = bin_inputs.data_ptr();
  step.batch = images.size(0);
  step.pixels = pixels;
  step.channels = static_cast<int>(channels);
  step.mixtures = static_cast<int>(mixtures);
  step.num_bins = static_cast<int>(num_bins);
  const KernelsDeviceGuard guard(logits.device());
  dmol::launch_draw_step(step, current_stream());
  check_launch("dmol_draw_step");
}

}  // namespace
}  // namespace sampling
}  // namespace pixelcnn_kernels

TORCH_LIBRARY_FRAGMENT(PIXELCNN_OPS_NAMESPACE, m) {
  m.def(
      "gated_pixel_step(Tensor pixel, Tensor x, Tensor wp, Tensor? bias, int[] offsets, Tensor? v_pre, "
      "Tensor? link_weight, Tensor? link_bias, Tensor? cond, Tensor? out_weight, Tensor? out_bias, int group_size, "
      "Tensor(a!) out) -> ()");
  m.def(
      "resnet_position_step(Tensor pixel, Tensor table, int[] kernel, Tensor x, Tensor(a!) inner, Tensor[] skips, "
      "Tensor input_weight, Tensor? input_bias, Tensor? skip_weight, Tensor? skip_bias, Tensor out_weight, "
      "Tensor? out_bias, Tensor? cond, Tensor(b!) out) -> ()");
  m.def(
      "softmax_draw_step(Tensor pixel, Tensor h, Tensor weight, Tensor? bias, Tensor bin_inputs, Tensor noise, "
      "Tensor known, Tensor(a!) images, Tensor(b!) inputs, int channel) -> ()");
  m.def(
      "dmol_draw_step(Tensor pixel, Tensor logits, Tensor u_mix, Tensor u_logistic, Tensor known, Tensor(a!) images, "
      "Tensor(b!) inputs, Tensor? input_index, Tensor bin_inputs) -> ()");
}

TORCH_LIBRARY_IMPL(PIXELCNN_OPS_NAMESPACE, PIXELCNN_KERNELS_DEVICE, m) {
  m.impl("gated_pixel_step", &pixelcnn_kernels::sampling::gated_pixel_step_cuda);
  m.impl("resnet_position_step", &pixelcnn_kernels::sampling::resnet_position_step_cuda);
  m.impl("softmax_draw_step", &pixelcnn_kernels::sampling::softmax_draw_step_cuda);
  m.impl("dmol_draw_step", &pixelcnn_kernels::sampling::dmol_draw_step_cuda);
}
