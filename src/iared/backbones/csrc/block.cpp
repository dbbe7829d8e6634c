// One pre-norm ViT block (LayerNorm, qkv, SDPA, proj, residual, LayerNorm, fc1+GELU, fc2,
// residual) as a single call from Python, for inference on CPU without padding; also the block
// with ATS's token sampler (`Block::ats`), ToMe's merging (`Block::tome`) or EViT's keep-and-fuse
// (`Block::evit`) inside it, and IA-RED²'s policy stage (`score_and_keep`).
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

enum class PostOp { kNone, kGelu, kSigmoid };

// mkldnn::_linear_pointwise, the op `cpu_kernels` calls from Python (weight packed once), with
// the same post-op arguments as its Python callers.
at::Tensor packed_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                         PostOp post = PostOp::kNone) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("mkldnn::_linear_pointwise", "")
                             .typed<LinearFn>();
  const c10::List<std::optional<at::Scalar>> no_scalars;
  switch (post) {
    case PostOp::kGelu:
      return op.call(x, weight, bias, "gelu", no_scalars, c10::string_view("none"));  // erf GELU, as nn.GELU()
    case PostOp::kSigmoid:
      return op.call(x, weight, bias, "sigmoid", no_scalars, c10::string_view(""));
    default:
      return op.call(x, weight, bias, "none", no_scalars, std::nullopt);
  }
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
    auto qkv = qkv_heads(x);
    auto o = at::scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], std::nullopt, 0.0, false, scale_);
    auto y = x + packed_linear(o.transpose(1, 2).reshape({B, L, D}), w_[3], w_[4]);
    return y.add_(mlp(y));
  }

  // The block with an Adaptive Token Sampler in its attention, as `iared.reduction.ats.ATSBlock`
  // runs it for one image with every token valid and the default variant (CLS-row scores, CLS
  // enforced, one K): the same ATen ops in the same order, so the same values and the same
  // sampled set. x: (1, L, D) with P prefix tokens; K: the stage's budget; topk: top-K instead
  // of inverse transform sampling. Returns {out (1, P + K', D), rows (P + K',) kept rows of x,
  // keep (1, N) bool, scores (1, N), K' (1,)}.
  std::vector<at::Tensor> ats(const at::Tensor& x, int64_t P, int64_t K, bool topk) const {
    TORCH_CHECK(x.dim() == 3 && x.size(0) == 1, "the ATS block takes one image (1, L, D), got ", x.sizes());
    TORCH_CHECK(K >= 1, "K must be at least 1");
    const int64_t L = x.size(1), D = x.size(2), N = L - P;
    auto heads = qkv_heads(x);
    const auto &q = heads[0], &k = heads[1], &v = heads[2];
    // Eq. 3: the CLS row of the attention times the value norms, normalised per head, / H.
    auto received = at::matmul(q.slice(2, 0, 1) * scale_, k.transpose(-2, -1)).softmax(-1).select(2, 0);
    auto w = received.slice(-1, P) * at::linalg_vector_norm(v, 2, {-1}).slice(-1, P);                  // (1, H, N)
    const double tiny = std::numeric_limits<float>::min();
    auto s = (w / w.sum(-1, true).clamp_min(tiny)).sum(1);                        // (1, N)
    auto s_total = s.sum(-1, true);
    auto scores = at::where(s_total > 0, s / s_total.clamp_min(tiny), at::Scalar(1.0 / N));
    at::Tensor keep;
    if (topk) {
      auto order = std::get<1>(scores.sort(/*stable=*/true, 1, /*descending=*/true));
      auto rank = at::empty_like(order).scatter_(1, order, at::arange(N, order.options()).expand({1, -1}));
      keep = rank < K;
    } else {  // Eq. 4-5: the token whose CDF interval holds each quantile (2i - 1) / 2K
      auto opts = x.options().dtype(at::kDouble);
      auto quantiles = at::arange(1, 2 * K, 2, opts).div_(2 * K).expand({1, -1});
      auto cdf = scores.to(at::kDouble).cumsum(1);
      cdf = cdf / cdf.slice(1, N - 1).clamp_min(std::numeric_limits<double>::min());
      auto idx = at::searchsorted(cdf, quantiles.contiguous(), /*out_int32=*/false, /*right=*/false, "left").clamp_max_(N - 1);
      keep = at::zeros({1, N}, x.options().dtype(at::kBool)).scatter_(1, idx, true);
    }
    auto k_prime = keep.sum(1);
    // Eq. 6: attention output, projection, residual and MLP for the prefix and sampled rows only.
    auto rows = at::constant_pad_nd(keep, {P, 0}, 1).reshape(-1).nonzero().squeeze(1);
    const int64_t Ls = rows.size(0);
    auto qf = q.transpose(1, 2).reshape({1, L, D});
    auto sel = at::cat({x, qf}, -1).index_select(1, rows);
    auto xs = sel.slice(-1, 0, D), qs = sel.slice(-1, D).reshape({1, Ls, heads_, D / heads_}).transpose(1, 2);
    auto o = at::scaled_dot_product_attention(qs, k, v, std::nullopt, 0.0, false, scale_);
    auto y = xs + packed_linear(o.transpose(1, 2).reshape({1, Ls, D}), w_[3], w_[4]);
    return {y + mlp(y), rows, keep, scores, k_prime};
  }

  // The block as `iared.reduction.tome.ToMeBlock` runs it for one image with every token valid,
  // no source tracing and 1 <= r <= (L - P) / 2: attention (with log(size) on every key's logit
  // when size is given: proportional attention), bipartite soft matching of the keys averaged over
  // heads, the r most similar A tokens merged into their B matches by size-weighted average and
  // removed, then the MLP. size: (1, L) float or undefined (every token 1). Returns {out
  // (1, L - r, D), rows (L - r,) kept rows, size (1, L - r), keep (1, N)}.
  std::vector<at::Tensor> tome(const at::Tensor& x, int64_t P, int64_t r, const std::optional<at::Tensor>& size,
                               bool prop_attn) const {
    TORCH_CHECK(x.dim() == 3 && x.size(0) == 1, "the ToMe block takes one image (1, L, D), got ", x.sizes());
    const int64_t L = x.size(1), D = x.size(2);
    TORCH_CHECK(r >= 1 && r <= (L - P) / 2, "ToMe's C++ block merges 1 to (L - P) / 2 tokens, asked for ", r);
    std::optional<at::Tensor> bias;
    if (prop_attn && size) bias = size->log().to(x.scalar_type()).unsqueeze(1).unsqueeze(1);  // (1, 1, 1, L)
    auto heads = qkv_heads(x);
    auto o = at::scaled_dot_product_attention(heads[0], heads[1], heads[2], bias, 0.0, false, scale_);
    auto h = x + packed_linear(o.transpose(1, 2).reshape({1, L, D}), w_[3], w_[4]);
    // Bipartite soft matching: A = even positions, B = odd, the first P tokens protected.
    auto metric = heads[1].mean(1);                                                  // (1, L, hd)
    metric = metric / at::linalg_vector_norm(metric, 2, {-1}, true).clamp_min(1e-12).expand_as(metric);
    auto scores = at::matmul(metric.slice(1, 0, L, 2), metric.slice(1, 1, L, 2).transpose(1, 2));
    const double inf = std::numeric_limits<double>::infinity();
    scores.slice(1, 0, (P + 1) / 2).fill_(-inf);
    scores.slice(2, 0, P / 2).fill_(-inf);
    auto best_match = scores.max(-1);
    auto edges = std::get<1>(std::get<0>(best_match).sort(/*stable=*/true, -1, /*descending=*/true)).slice(1, 0, r);
    auto src = edges * 2, dst = std::get<1>(best_match).gather(1, edges) * 2 + 1;
    // Each A token merged into its B token by size-weighted average; only destinations change.
    auto s = size ? *size : at::ones({1, L}, x.options().dtype(at::kFloat));
    auto src_c = src.unsqueeze(-1).expand({-1, -1, D}), dst_c = dst.unsqueeze(-1).expand({-1, -1, D});
    auto weighted = h * s.unsqueeze(-1);
    auto summed = weighted.scatter_add(1, dst_c, weighted.gather(1, src_c));
    auto total = s.scatter_add(1, dst, s.gather(1, src));
    auto merged = summed.gather(1, dst_c) / total.gather(1, dst).unsqueeze(-1);
    h = h.scatter(1, dst_c, merged.to(h.scalar_type()));
    auto keep = at::ones({1, L - P}, x.options().dtype(at::kBool)).scatter_(1, src - P, false);
    auto rows = at::constant_pad_nd(keep, {P, 0}, 1).reshape(-1).nonzero().squeeze(1);
    auto y = h.index_select(1, rows);
    return {y + mlp(y), rows, total.index_select(1, rows), keep};
  }

  // The block as `iared.reduction.evit.EViTBlock` runs it for one image with every token valid
  // and K < N: attention, then the K patch tokens of highest CLS attention kept (and, with fuse,
  // the others summed into one token appended after them), then the MLP on those rows only.
  // Returns {out (1, P + K (+1), D), rows (P + K (+1),) kept rows of [x, fused], keep (1, N),
  // scores (1, N)}.
  std::vector<at::Tensor> evit(const at::Tensor& x, int64_t P, int64_t K, bool fuse) const {
    TORCH_CHECK(x.dim() == 3 && x.size(0) == 1, "the EViT block takes one image (1, L, D), got ", x.sizes());
    const int64_t L = x.size(1), D = x.size(2), N = L - P;
    TORCH_CHECK(K >= 1 && K < N, "EViT's C++ block keeps 1 to N - 1 tokens, asked for ", K, " of ", N);
    auto heads = qkv_heads(x);
    const auto &q = heads[0], &k = heads[1], &v = heads[2];
    auto o = at::scaled_dot_product_attention(q, k, v, std::nullopt, 0.0, false, scale_);
    auto h = x + packed_linear(o.transpose(1, 2).reshape({1, L, D}), w_[3], w_[4]);
    auto scores = at::matmul(q.slice(2, 0, 1) * scale_, k.transpose(-2, -1)).softmax(-1)
                      .select(2, 0).slice(-1, P).mean(1);                             // (1, N)
    auto top = std::get<1>(scores.sort(/*stable=*/true, 1, /*descending=*/true)).slice(1, 0, K);
    auto keep = at::zeros({1, N}, x.options().dtype(at::kBool)).scatter_(1, top, true);
    auto kept = keep;
    if (fuse) {  // x_fused = sum of a_j x_j over the dropped tokens, after the kept ones
      auto w = at::where(~keep, scores, at::Scalar(0.0)).to(h.scalar_type());
      auto fused = at::matmul(w.unsqueeze(1), h.slice(1, P)).squeeze(1);
      h = at::cat({h, fused.unsqueeze(1)}, 1);
      kept = at::constant_pad_nd(keep, {0, 1}, 1);
    }
    auto rows = at::constant_pad_nd(kept, {P, 0}, 1).reshape(-1).nonzero().squeeze(1);
    auto y = h.index_select(1, rows);
    return {y + mlp(y), rows, keep, scores};
  }

 private:
  // q, k, v (each (B, H, L, hd)) of x, as `Attention.qkv_heads`.
  std::vector<at::Tensor> qkv_heads(const at::Tensor& x) const {
    const int64_t B = x.size(0), L = x.size(1), D = x.size(2);
    return packed_linear(at::layer_norm(x, {D}, w_[0], w_[1], eps1_), w_[2], qkv_bias_)
        .reshape({B, L, 3, heads_, D / heads_}).permute({2, 0, 3, 1, 4}).unbind(0);
  }

  at::Tensor mlp(const at::Tensor& y) const {
    auto h = at::layer_norm(y, {y.size(-1)}, w_[5], w_[6], eps2_);
    return packed_linear(packed_linear(h, w_[7], w_[8], PostOp::kGelu), w_[9], w_[10]);
  }

  std::vector<at::Tensor> w_;
  std::optional<at::Tensor> qkv_bias_;
  int64_t heads_;
  double scale_, eps1_, eps2_;
};

// A policy stage that scores the patch tokens of one image (every token valid) with a linear map
// and keeps those scoring above a threshold, as IA-RED²'s interpreter does under `cpu_kernels`
// (`iared.reduction.interpreter`): LayerNorm, the packed linear map with the sigmoid fused, the
// mean over its outputs (`mv` with 1/H), the threshold, then the prefix and kept rows of x.
// map: norm.{weight,bias}, weight (packed), bias, mean. Returns {x (1, P + K, D), rows (P + K,),
// keep (1, N), scores (1, N)}.
std::vector<at::Tensor> score_and_keep(const at::Tensor& x, int64_t P, const std::vector<at::Tensor>& map,
                                       double eps, double threshold) {
  TORCH_CHECK(x.dim() == 3 && x.size(0) == 1, "a stage takes one image (1, L, D), got ", x.sizes());
  TORCH_CHECK(map.size() == 5, "a scoring map takes 5 tensors, got ", map.size());
  const int64_t D = x.size(2);
  auto h = at::layer_norm(x.slice(1, P), {D}, map[0], map[1], eps);
  auto probs = packed_linear(h.view({-1, D}), map[2], map[3], PostOp::kSigmoid);
  auto scores = at::mv(probs, map[4]).view({1, -1});
  auto keep = scores > threshold;
  auto rows = at::constant_pad_nd(keep, {P, 0}, 1).reshape(-1).nonzero().squeeze(1);
  return {rows.size(0) == x.size(1) ? x : x.index_select(1, rows), rows, keep, scores};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  py::class_<Block>(m, "Block")
      .def(py::init<std::vector<at::Tensor>, std::optional<at::Tensor>, int64_t, double, double, double>())
      .def("__call__", &Block::forward)
      .def("ats", &Block::ats)
      .def("evit", &Block::evit)
      .def("tome", &Block::tome);
  m.def("score_and_keep", &score_and_keep);
}
