// One pre-norm ViT block (LayerNorm, qkv, SDPA, proj, residual, LayerNorm, fc1+GELU, fc2,
// residual) as a single call from Python, for inference on CPU without padding.
//
// Why: at batch 1 a narrow block (ViT-Tiny, width 192) spends a fixed ~0.25 ms in the Python
// calls around its dozen ATen ops whatever its token count, a fifth of its whole time at 197
// tokens and more once tokens are dropped. Here the same ops run back to back from C++; the
// linear layers are the packed oneDNN calls of `iared.backbones.kernels`, so the values are
// those of the Python path (same kernels, same order). Built on first use by
// `iared.backbones.native`; the Python block is the fallback wherever this is unavailable.
#include <torch/extension.h>
#include <ATen/core/dispatch/Dispatcher.h>

namespace {

using LinearFn = at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                            c10::string_view, c10::List<std::optional<at::Scalar>>,
                            std::optional<c10::string_view>);

// mkldnn::_linear_pointwise, the op `cpu_kernels` calls from Python (weight packed once).
at::Tensor packed_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                  bool gelu = false) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("mkldnn::_linear_pointwise", "")
                             .typed<LinearFn>();
  if (gelu) {
    return op.call(x, weight, bias, "gelu", c10::List<std::optional<at::Scalar>>(), c10::string_view("none"));  // erf GELU, as nn.GELU()
  }
  return op.call(x, weight, bias, "none", c10::List<std::optional<at::Scalar>>(), std::nullopt);
}

class Block {
 public:
  // weights: norm1.{weight,bias}, qkv.weight (packed), proj.weight (packed), proj.bias,
  //          norm2.{weight,bias}, fc1.weight (packed), fc1.bias, fc2.weight (packed), fc2.bias.
  Block(std::vector<at::Tensor> w, std::optional<at::Tensor> qkv_bias, int64_t heads, double scale,
        double eps1, double eps2)
      : w_(std::move(w)), qkv_bias_(std::move(qkv_bias)), heads_(heads), scale_(scale), eps1_(eps1),
        eps2_(eps2) {
    TORCH_CHECK(w_.size() == 11, "a block takes 11 weight tensors, got ", w_.size());
  }

  // x: (B, L, D), every token valid (no attention mask). Returns a new tensor.
  at::Tensor forward(const at::Tensor& x) const {
    TORCH_CHECK(x.dim() == 3, "block input must be (B, L, D), got ", x.sizes());
    const int64_t B = x.size(0), L = x.size(1), D = x.size(2);
    auto h = at::layer_norm(x, {D}, w_[0], w_[1], eps1_);
    auto qkv = packed_linear(h, w_[2], qkv_bias_).view({B, L, 3, heads_, D / heads_}).permute({2, 0, 3, 1, 4});
    auto o = at::scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], std::nullopt, 0.0, false, scale_);
    auto y = x + packed_linear(o.transpose(1, 2).reshape({B, L, D}), w_[3], w_[4]);
    h = at::layer_norm(y, {D}, w_[5], w_[6], eps2_);
    return y.add_(packed_linear(packed_linear(h, w_[7], w_[8], /*gelu=*/true), w_[9], w_[10]));
  }

 private:
  std::vector<at::Tensor> w_;
  std::optional<at::Tensor> qkv_bias_;
  int64_t heads_;
  double scale_, eps1_, eps2_;
};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  py::class_<Block>(m, "Block")
      .def(py::init<std::vector<at::Tensor>, std::optional<at::Tensor>, int64_t, double, double, double>())
      .def("__call__", &Block::forward);
}
