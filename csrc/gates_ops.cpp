// Torch glue of the gated activations: schemas and CUDA implementations of
// torch.ops.pixelcnn_kernels_cuda.{gate_forward, gate_backward, concat_elu_forward,
// concat_elu_backward}. The Python ops (pixelcnn_kernels/ops/gates.py) pass tensors
// already viewed as contiguous rows (layouts in gates.h); these check them and launch.
#include <optional>

#include "gates.h"
#include "torch_glue.h"

namespace pixelcnn_kernels {
namespace {

// The gate's x: a contiguous (outer, 2, half, inner).
DType check_gate_x(const at::Tensor& x) {
  check_cuda_contiguous(x, "x");
  TORCH_CHECK(x.dim() == 4 && x.size(1) == 2, "x must have shape (outer, 2, half, inner), got ", x.sizes());
  return to_kernel_dtype(x, "x");
}

struct GateBias {
  at::Tensor cond;  // contiguous, or undefined
  int64_t batch_div = 1;
  int64_t batch = 1;

  const void* data() const { return cond.defined() ? cond.data_ptr() : nullptr; }
};

GateBias gate_bias(const std::optional<at::Tensor>& cond, const at::Tensor& x, int64_t batch_div) {
  if (!cond.has_value()) return {};
  // A batch of at least one: the kernels read cond[(row / batch_div) % batch].
  TORCH_CHECK(cond->dim() == 2 && (cond->size(0) >= 1 || x.numel() == 0), "cond must have shape (batch >= 1, 2 * half), got ",
              cond->sizes());
  const at::Tensor contiguous = cond->contiguous();
  check_operand(contiguous, "cond", x, "x", {cond->size(0), 2 * x.size(2)});
  TORCH_CHECK(batch_div >= 1, "batch_div must be positive, got ", batch_div);
  return {contiguous, batch_div, cond->size(0)};
}

GateKind gate_kind(bool tanh_gate) { return tanh_gate ? GateKind::kTanhSigmoid : GateKind::kSigmoid; }

// Colour groups of group_size channels, the last one the rest (half: one group, also of no channels).
void check_group_size(int64_t group_size, int64_t half) {
  TORCH_CHECK(group_size == half || (group_size >= 1 && group_size < half), "group_size must be in [1, half = ", half,
              "], got ", group_size);
}

at::Tensor gate_forward(const at::Tensor& x, const std::optional<at::Tensor>& cond, int64_t batch_div, bool tanh_gate,
                        int64_t group_size) {
  const DType dtype = check_gate_x(x);
  const GateBias bias = gate_bias(cond, x, batch_div);
  const KernelsDeviceGuard guard(x.device());
  const int64_t outer = x.size(0), half = x.size(2), inner = x.size(3);
  check_group_size(group_size, half);
  at::Tensor y = x.new_empty({outer, half, inner});
  if (y.numel() > 0) {
    launch_gate_forward(dtype, gate_kind(tanh_gate), x.data_ptr(), bias.data(), y.data_ptr(), outer, half, inner,
                        group_size, bias.batch_div, bias.batch, current_stream());
    check_launch("gate_forward");
  }
  return y;
}

at::Tensor gate_backward(const at::Tensor& grad, const at::Tensor& x, const std::optional<at::Tensor>& cond,
                         const std::optional<at::Tensor>& accumulate, int64_t batch_div, bool tanh_gate, int64_t group_size) {
  const DType dtype = check_gate_x(x);
  const int64_t outer = x.size(0), half = x.size(2), inner = x.size(3);
  check_group_size(group_size, half);
  check_operand(grad, "grad", x, "x", {outer, half, inner});
  check_optional_operand(accumulate, "accumulate", x, {outer, 2, half, inner});
  const GateBias bias = gate_bias(cond, x, batch_div);
  const KernelsDeviceGuard guard(x.device());
  at::Tensor dx = x.new_empty(x.sizes());
  if (dx.numel() > 0) {
    launch_gate_backward(dtype, gate_kind(tanh_gate), grad.data_ptr(), x.data_ptr(), bias.data(),
                         raw_data_or_null(accumulate), dx.data_ptr(), outer, half, inner, group_size, bias.batch_div,
                         bias.batch, current_stream());
    check_launch("gate_backward");
  }
  return dx;
}

// concat_elu's x: a contiguous (outer, row_len).
DType check_concat_elu_x(const at::Tensor& x) {
  check_cuda_contiguous(x, "x");
  TORCH_CHECK(x.dim() == 2, "x must have shape (outer, row_len), got ", x.sizes());
  return to_kernel_dtype(x, "x");
}

at::Tensor concat_elu_forward(const at::Tensor& x) {
  const DType dtype = check_concat_elu_x(x);
  const KernelsDeviceGuard guard(x.device());
  const int64_t outer = x.size(0), row_len = x.size(1);
  at::Tensor y = x.new_empty({outer, 2, row_len});
  if (y.numel() > 0) {
    launch_concat_elu_forward(dtype, x.data_ptr(), y.data_ptr(), outer, row_len, nullptr, 1.0f, current_stream());
    check_launch("concat_elu_forward");
  }
  return y;
}

at::Tensor concat_elu_backward(const at::Tensor& grad, const at::Tensor& x) {
  const DType dtype = check_concat_elu_x(x);
  const int64_t outer = x.size(0), row_len = x.size(1);
  check_operand(grad, "grad", x, "x", {outer, 2, row_len});
  const KernelsDeviceGuard guard(x.device());
  at::Tensor dx = x.new_empty(x.sizes());
  if (dx.numel() > 0) {
    launch_concat_elu_backward(dtype, grad.data_ptr(), x.data_ptr(), dx.data_ptr(), outer, row_len, current_stream());
    check_launch("concat_elu_backward");
  }
  return dx;
}

}  // namespace
}  // namespace pixelcnn_kernels

TORCH_LIBRARY_FRAGMENT(PIXELCNN_OPS_NAMESPACE, m) {
  m.def("gate_forward(Tensor x, Tensor? cond, int batch_div, bool tanh_gate, int group_size) -> Tensor");
  m.def("gate_backward(Tensor grad, Tensor x, Tensor? cond, Tensor? accumulate, int batch_div, bool tanh_gate, int group_size) -> Tensor");
  m.def("concat_elu_forward(Tensor x) -> Tensor");
  m.def("concat_elu_backward(Tensor grad, Tensor x) -> Tensor");
}

TORCH_LIBRARY_IMPL(PIXELCNN_OPS_NAMESPACE, PIXELCNN_KERNELS_DEVICE, m) {
  m.impl("gate_forward", &pixelcnn_kernels::gate_forward);
  m.impl("gate_backward", &pixelcnn_kernels::gate_backward);
  m.impl("concat_elu_forward", &pixelcnn_kernels::concat_elu_forward);
  m.impl("concat_elu_backward", &pixelcnn_kernels::concat_elu_backward);
}
