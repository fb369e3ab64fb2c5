// gemv.c's kernel as a torch operator, ibllm_kernel::gemv, so that a compiled decode step calls it from C++.
//
// A graph compiled with inductor's C++ wrapper calls an op through torch's dispatcher; an op written in Python
// (torch.library.custom_op) costs a trip back into the interpreter on every call: ~20 us, against ~4 us for this one
// (measured on the 2-core EPYC: 17 products of a toy-sized step, 441 against 87 us). Built and loaded by gemv.py
// (``native_op``) from the same gemv.c, linked in; where this cannot be built, graphs use the Python op instead.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <optional>
#include <vector>

extern "C" int gemv(const void* w, const float* scale, int kind, const void* x, int x_kind, const float* bias,
                    void* y, int y_kind, int64_t m, int64_t k_all, int64_t n);

namespace {

// gemv.c's element types.
int kind_of(c10::ScalarType t) {
  switch (t) {
    case c10::ScalarType::Half: return 0;
    case c10::ScalarType::BFloat16: return 1;
    case c10::ScalarType::Char: return 2;
    case c10::ScalarType::Float: return 3;
    default: TORCH_CHECK(false, "ibllm_kernel::gemv: unsupported dtype ", t);
  }
}

const float* float_or_null(const std::optional<at::Tensor>& t) {
  if (!t) return nullptr;
  TORCH_CHECK(t->scalar_type() == c10::ScalarType::Float && t->is_contiguous(),
              "ibllm_kernel::gemv: scale and bias must be contiguous float32");
  return t->data_ptr<float>();
}

// x (..., k) @ weight (n, k)^T, times scale (n,) and plus bias (n,) where given, in x's dtype: gemv.py's product().
at::Tensor gemv_op(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& scale,
                   const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous(), "ibllm_kernel::gemv: weight must be 2-d and contiguous");
  const int64_t n = weight.size(0), k = weight.size(1);
  TORCH_CHECK(x.size(-1) == k, "ibllm_kernel::gemv: x has ", x.size(-1), " columns, weight ", k);
  const at::Tensor rows = x.reshape({-1, k}).contiguous();
  std::vector<int64_t> sizes = x.sizes().vec();
  sizes.back() = n;
  at::Tensor y = at::empty(sizes, x.options());
  const int failed = gemv(weight.data_ptr(), float_or_null(scale), kind_of(weight.scalar_type()), rows.data_ptr(),
                          kind_of(rows.scalar_type()), float_or_null(bias), y.data_ptr(), kind_of(y.scalar_type()),
                          rows.size(0), k, n);
  TORCH_CHECK(!failed, "ibllm_kernel::gemv: no memory to widen the input rows");
  return y;
}

}  // namespace

TORCH_LIBRARY(ibllm_kernel, m) { m.def("gemv(Tensor x, Tensor weight, Tensor? scale, Tensor? bias) -> Tensor"); }
TORCH_LIBRARY_IMPL(ibllm_kernel, CPU, m) { m.impl("gemv", gemv_op); }
