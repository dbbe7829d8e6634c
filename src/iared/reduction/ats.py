"""ATS: the Adaptive Token Sampler (Fayyaz et al., ECCV 2022), parameter-free, plug-in.

Inside the self-attention of a stage block, ATS scores the patch tokens with the CLS
token's attention, samples at most K of them by inverse transform sampling, and computes
the block's output only for the sampled tokens (plus CLS):

    S_j = sum_h  A^h_{1,j} ||V^h_j|| / sum_i A^h_{1,i} ||V^h_i||        (Eq. 3, per head)
    CDF_i = sum_{j<=i} S_j                                            (Eq. 4)
    Psi(k) = CDF^{-1}(k),  k in {1/2K, 3/2K, ..., (2K-1)/2K}          (Eq. 5)
    O = A^s V,  A^s = the rows of A of CLS and the sampled tokens     (Eq. 6)

then the block's output projection, residual and FFN run on those K'+1 tokens only. The
unsampled tokens still serve as keys and values in this block (A^s keeps all N+1
columns); they are gone from the next block on.

Choices where the paper is loose (so a reader can undo them):

* Eq. 3 normalises per head; summed over H heads the scores add up to H. We divide by H
  so S is a distribution (Eq. 4 needs CDF_N = 1); this changes neither the ranking nor
  the sampled set.
* "Nearest token" in Eq. 5: a quantile k selects the token whose CDF interval
  (CDF_{j-1}, CDF_j] contains k (`searchsorted`). With this reading the paper's remark
  holds exactly: a token with S_j >= 2/K owns at least two quantiles, so K' < K. It also
  never selects a token of score 0 (an empty interval), so dropped or padded tokens are
  never revived.
* The budget: K per stage, or K_n = max(round(rho * N), 8) with N the model's unreduced
  token count, CLS included (rounding half-up): rho = 1 is K = 197 at every stage of a
  224 px /16 model, the paper's "no limit" setting, which it trains and evaluates with.
  Appendix 0.E.1's "#InputTokens" could also mean the tokens entering stage n, so that
  the budget compounds from stage to stage; that reading is the named option
  `compound=True`. The default follows the authors' code, which never compounds, and is
  better at equal cost (ViT-Tiny, 650 ImageNet val photos: fixed K = 100 gives 76.5 %
  top-1 at 0.604 GMACs where compounding rho = 0.87 gives 69.1 % at 0.601).
* Beside the authors' released code (run unmodified on the same model and photos, with
  its DeiT-S config: K = 197 at blocks 3..11) our kept token counts agree to about one
  token per stage, but the selection maths differ in five places, where we follow the
  paper's text: it normalises the value norm over all heads together rather than per
  head; builds the CDF over ascending-sorted scores with min-max normalisation (so the
  lowest-scoring token can never be sampled); starts the sampling points at the CDF's
  smallest positive value; picks the nearest CDF value rather than the containing
  interval; and lets zero-score padding enter the normalisation, so its kept sets depend
  on the batch. Ours do not: an image keeps the same tokens alone or in a padded batch
  (`tests/reduction/test_ats.py`).
* Placement: the paper's multi-stage DeiT-S uses blocks 3..11 (0-indexed) of 12. For a
  depth-d model `default_stages` starts at round(3d/12) and runs to the last block
  (depth 6: blocks 2..5); the single stage is that first block.
* Distilled DeiT: both prefix tokens (CLS, distillation) are always kept; only the CLS
  row scores.

The block modification is `ATSBlock`, a subclass of the backbone's `Block` that
`ATSPolicy.attach` swaps in (class swap, no weight copy), as ToMe patches timm's blocks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..backbones.kernels import register_native_swap
from ..backbones.tokens import StageRecord, Tokens, apply_keep, attention_mask, with_rows
from ..backbones.vit import Block
from .policy import BlockSwapPolicy, register_policy, stage_blocks

# -- the math, as pure functions --------------------------------------------------------


def significance_scores(attn_row: Tensor, v_norm: Tensor, valid: Optional[Tensor] = None) -> Tensor:
    """Eq. 3: attention times value norm, normalised per head, summed over heads, / H.

    Args:
        attn_row: (B, H, N) attention each candidate token receives (ATS: the CLS row
            A_{1,j}; the self-attention variant: column sums).
        v_norm: (B, H, N) L2 norm of each candidate's value vector, per head.
        valid: (B, N) bool, candidates that exist (dropped / padding tokens score 0).

    Returns:
        (B, N) scores, each row summing to 1 (uniform over valid tokens if every
        weighted attention is 0).
    """
    w = attn_row * v_norm                                           # (B, H, N), >= 0
    if valid is not None:
        w = w * valid[:, None, :]
    tiny = torch.finfo(w.dtype).tiny
    # A head whose weights are all 0 has total 0 and gives 0 / tiny = 0: no special case.
    s = (w / w.sum(dim=-1, keepdim=True).clamp_min(tiny)).sum(dim=1)  # (B, N)
    s_total = s.sum(dim=-1, keepdim=True)
    if valid is None:
        uniform = 1.0 / s.shape[-1]
    else:
        uniform = valid.to(s.dtype) / valid.sum(dim=-1, keepdim=True).clamp_min(1)
    return torch.where(s_total > 0, s / s_total.clamp_min(tiny), uniform)


def sampling_quantiles(K: Tensor) -> tuple[Tensor, Tensor]:
    """The fixed quantiles k_i = (2i - 1) / (2K), i = 1..K, per image.

    Args:
        K: (B,) int budgets.

    Returns:
        (B, max K) quantiles and a (B, max K) bool mask of the real ones (i <= K_b).
    """
    K = K.long()
    k_max = int(K.max()) if K.numel() else 0
    i = torch.arange(1, k_max + 1, device=K.device, dtype=torch.float64)[None, :]   # (1, Kmax)
    q = (2 * i - 1) / (2 * K[:, None].double())
    return q, i <= K[:, None]


def inverse_transform_sample(scores: Tensor, K: Union[int, Tensor]) -> Tensor:
    """Eq. 4-5: tokens hit by the fixed quantiles of the scores' CDF, duplicates removed.

    Args:
        scores: (B, N) non-negative scores, each row summing to 1 (zeros never chosen).
        K: the number of quantiles (the maximum number of tokens), an int or (B,) ints.

    Returns:
        (B, N) bool keep mask with K'_b = keep[b].sum() <= min(K_b, N) tokens.
    """
    B, N = scores.shape
    if isinstance(K, int):
        # One K for every image: no padding quantiles, so the quantiles and the hits take
        # a few operations, which at batch 1 cost more than the arithmetic they do.
        if K < 1:
            raise ValueError("K must be at least 1")
        q = torch.arange(1, 2 * K, 2, dtype=torch.float64, device=scores.device).div_(2 * K).expand(B, -1)
        real = None
    else:
        K = torch.as_tensor(K, device=scores.device).long().expand(B)
        if bool((K < 1).any()):
            raise ValueError("K must be at least 1")
        q, real = sampling_quantiles(K)                            # (B, Kmax)
    cdf = scores.detach().double().cumsum(dim=1)                   # (B, N)
    cdf = cdf / cdf[:, -1:].clamp_min(torch.finfo(torch.float64).tiny)  # CDF_N exactly 1
    # First j with CDF_j >= k: the token whose interval (CDF_{j-1}, CDF_j] holds k.
    idx = torch.searchsorted(cdf, q.contiguous(), side="left").clamp_max_(N - 1)  # (B, Kmax)
    if real is None:
        return torch.zeros(B, N, dtype=torch.bool, device=scores.device).scatter_(1, idx, True)
    # Count hits per token (padding quantiles of images with a smaller K add 0).
    hits = torch.zeros(B, N, dtype=torch.long, device=scores.device).scatter_add_(1, idx, real.long())
    return hits > 0


def topk_keep(scores: Tensor, K: Union[int, Tensor], valid: Optional[Tensor] = None) -> Tensor:
    """Top-K selection on the same scores (the ATS paper's main ablation).

    Args:
        scores: (B, N) scores.
        K: int or (B,) ints; each image keeps min(K_b, its valid count) tokens.
        valid: (B, N) bool candidates.

    Returns:
        (B, N) bool keep mask.
    """
    B, N = scores.shape
    K = torch.as_tensor(K, device=scores.device).long().expand(B)
    s = scores.detach()
    if valid is not None:
        s = s.masked_fill(~valid, float("-inf"))
    order = s.argsort(dim=1, descending=True, stable=True)         # ties: lower index first
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(N, device=s.device).expand(B, -1))
    keep = rank < K[:, None]
    return keep if valid is None else keep & valid


def budget_k(input_tokens: Union[Tensor, int], rho: Optional[float] = None, K: Optional[int] = None,
             min_k: int = 8) -> Union[Tensor, int]:
    """K for one stage: a fixed K, or K = max(round(rho * tokens), min_k).

    Args:
        input_tokens: the token count rho scales, CLS included: the model's unreduced
            count (one int: the default rule), or the (B,) tokens entering the stage
            (the compounding rule, `ATSSettings.compound`).
        rho: the ratio (Appendix 0.E.1); ignored when K is given.
        K: a fixed budget.
        min_k: the floor of the ratio rule (8 in the paper).

    Returns:
        (B,) long budgets, or an int for an int `input_tokens`.
    """
    if K is None and rho is None:
        raise ValueError("give either K or rho")
    if isinstance(input_tokens, int):  # every image has this many: the same rule in Python floats
        return int(K) if K is not None else max(math.floor(float(rho) * input_tokens + 0.5), min_k)
    if K is not None:
        return torch.full_like(input_tokens, int(K), dtype=torch.long)
    k = torch.floor(float(rho) * input_tokens.double() + 0.5).long()  # round half up
    return k.clamp_min(min_k)


def default_stages(depth: int) -> list[int]:
    """Blocks 3..11 for a 12-block model, scaled for other depths: round(3d/12)..d-1."""
    start = min(depth - 1, int(math.floor(3 * depth / 12 + 0.5)))
    return list(range(start, depth))


# -- the block --------------------------------------------------------------------------


@dataclass
class ATSSettings:
    """How the ATS blocks of one model sample (shared by reference with those blocks)."""

    stages: list[int]                       # block indices (0-based) that carry an ATS module
    rho: Optional[float] = 1.0              # K = max(round(rho * unreduced tokens), min_k) ...
    K: Optional[Union[int, list[int]]] = None  # ... or a fixed K (one, or one per stage)
    min_k: int = 8                          # floor of the rho rule
    score: str = "cls"                      # "cls": CLS row (Eq. 3); "selfattn": column sums
    select: str = "sample"                  # "sample": inverse transform sampling; "topk"
    enforce_cls: bool = True                # False: CLS competes in the sampling (App. 0.F.1)
    compound: bool = False                  # rho scales the tokens entering each stage, per image

    def stage_k(self, block: int) -> Optional[int]:
        if self.K is None:
            return None
        if isinstance(self.K, (list, tuple)):
            return int(self.K[self.stages.index(block)])
        return int(self.K)


class ATSBlock(Block):
    """A transformer block with an Adaptive Token Sampler in its self-attention.

    Modifications from `iared.backbones.vit.Block`:
      * computes the attention explicitly enough to read the CLS row (or all rows for the
        self-attention score) and the value norms, and scores the patch tokens (Eq. 3);
      * samples K' <= K tokens by inverse transform sampling (or top-K) (Eq. 4-5);
      * the attention output, projection, residual and FFN are computed for CLS and the
        sampled tokens only, all tokens still serving as keys and values (Eq. 6).
    """

    ats: ATSSettings  # `ats_index`, `ats_grid` too: see `BlockSwapPolicy`

    def forward(self, tokens: Tokens) -> tuple[Tokens, StageRecord]:  # type: ignore[override]
        """Score the tokens, sample K' of them and run the block on those rows only (Eq. 3-6).

        Args:
            tokens: the tokens entering the block.

        Returns:
            The tokens leaving the block (the prefix tokens and the sampled ones) and the
            stage's record.
        """
        q, k, v = self.attn.qkv_heads(self.norm1(tokens.x))             # each (B, H, L, hd)
        mask = attention_mask(tokens.valid)                             # (B, 1, 1, L) or None
        # valid None (batch 1, or equal counts): every token is real; masks are skipped, not built all True.
        scores, cand_valid = self._scores(tokens, q, k, v, mask)        # (B, M) over the candidates
        K = self._budget(tokens)                                        # int or (B,)
        chosen = self._choose(scores, K, cand_valid)                    # (B, M) bool
        k_prime = chosen.sum(dim=1)                                     # K': distinct tokens chosen
        keep, x_in, q_in = chosen, tokens.x, q                          # (B, N) over patch tokens
        if not self.ats.enforce_cls:
            keep, x_in, q_in = _first_sampled_takes_cls_place(chosen, tokens.x, q, tokens.num_prefix)
        entering = None if tokens.valid is None else tokens.patch_valid  # None: all (the record makes it)
        keep = keep if entering is None else keep & entering
        new = self._block_on_sampled(tokens, x_in, q_in, k, v, mask, keep)
        return new, self._record(tokens, entering, keep, scores, chosen, K, k_prime)

    def _scores(self, tokens: Tokens, q: Tensor, k: Tensor, v: Tensor,
                mask: Optional[Tensor]) -> tuple[Tensor, Optional[Tensor]]:
        """Eq. 3: the significance scores of the candidate tokens.

        The candidates are the patch tokens, or (CLS not enforced) CLS and the patch tokens.

        Args:
            tokens: the tokens entering the block.
            q: (B, H, L, hd) queries.
            k: (B, H, L, hd) keys.
            v: (B, H, L, hd) values.
            mask: the (B, 1, 1, L) key mask, or None.

        Returns:
            (B, M) scores of the M candidates and their (B, M) bool validity (None: all valid).
        """
        cfg, valid = self.ats, tokens.valid
        # Attention rows that score: CLS only (Eq. 3), or every valid row (self-attention score).
        rows = q[:, :, :1] if cfg.score == "cls" else q
        logits = (rows * self.attn.scale) @ k.transpose(-2, -1)         # (B, H, R, L)
        if mask is not None:
            logits = logits.masked_fill(~mask, float("-inf"))
        probs = logits.softmax(dim=-1)
        if cfg.score == "cls":
            received = probs[:, :, 0]                                   # (B, H, L)
        elif cfg.score == "selfattn":
            received = (probs if valid is None else probs * valid[:, None, :, None]).sum(dim=2)
        else:
            raise ValueError(f"unknown ATS score {cfg.score!r}")
        v_norm = v.norm(dim=-1)                                         # (B, H, L)
        first = tokens.num_prefix if cfg.enforce_cls else tokens.num_prefix - 1
        cand_valid = None if valid is None else valid[:, first:]
        return significance_scores(received[..., first:], v_norm[..., first:], cand_valid), cand_valid

    def _budget(self, tokens: Tokens) -> Union[int, Tensor]:
        """The budget K of this stage: one int, or (B,) ints when compounding over a padded batch."""
        cfg = self.ats
        if cfg.compound:
            n_in = tokens.x.shape[1] if tokens.valid is None else tokens.kept_counts() + tokens.num_prefix
        else:
            n_in = tokens.num_prefix + self.ats_grid                    # unreduced: one K for every image
        return budget_k(n_in, cfg.rho, cfg.stage_k(self.ats_index), cfg.min_k)

    def _choose(self, scores: Tensor, K: Union[int, Tensor], cand_valid: Optional[Tensor]) -> Tensor:
        """Eq. 4-5: the candidates chosen by inverse transform sampling (or top-K), a (B, M) bool mask."""
        select = self.ats.select
        if select == "sample":
            chosen = inverse_transform_sample(scores, K)
            return chosen if cand_valid is None else chosen & cand_valid
        if select == "topk":
            return topk_keep(scores, K, cand_valid)
        raise ValueError(f"unknown ATS selection {select!r}")

    def _block_on_sampled(self, tokens: Tokens, x_in: Tensor, q_in: Tensor, k: Tensor, v: Tensor,
                          mask: Optional[Tensor], keep: Tensor) -> Tokens:
        """Eq. 6: attention output, projection, residual and FFN for the sampled rows only.

        Args:
            tokens: the tokens entering the block (their positions, validity and execution).
            x_in: (B, L, D) the block's input rows.
            q_in: (B, H, L, hd) the queries of those rows.
            k: (B, H, L, hd) keys of every token.
            v: (B, H, L, hd) values of every token.
            mask: the (B, 1, 1, L) key mask, or None.
            keep: (B, N) bool, the sampled patch tokens.

        Returns:
            The tokens leaving the block.
        """
        attn = self.attn
        B, L, D = x_in.shape
        if tokens.execution == "mask":
            # Shapes stay fixed: every row is computed; unsampled rows are marked invalid.
            out = F.scaled_dot_product_attention(q_in, k, v, attn_mask=mask, scale=attn.scale)
            h = x_in + attn.proj(out.transpose(1, 2).reshape(B, L, D))
            new = apply_keep(tokens.with_x(h), keep)
            return new.with_x(new.x + self.mlp(self.norm2(new.x)))
        # Gather the sampled rows of x and q with one apply_keep (keeps them aligned); O = A^s V.
        qf = q_in.transpose(1, 2).reshape(B, L, D)
        sel = apply_keep(tokens.with_x(torch.cat([x_in, qf], dim=-1)), keep)
        xs, qs = sel.x[..., :D], sel.x[..., D:]
        Ls = xs.shape[1]
        qs = qs.reshape(B, Ls, attn.num_heads, attn.head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(qs, k, v, attn_mask=mask, scale=attn.scale)
        h = xs + attn.proj(out.transpose(1, 2).reshape(B, Ls, D))
        h = h + self.mlp(self.norm2(h))
        return sel.with_x(h)

    def _record(self, tokens: Tokens, entering: Optional[Tensor], keep: Tensor, scores: Tensor, chosen: Tensor,
                K: Union[int, Tensor], k_prime: Tensor) -> StageRecord:
        """The stage's record: patch-token scores and keep mask, with K', the budget and (CLS
        not enforced) whether CLS was sampled."""
        enforce_cls = self.ats.enforce_cls
        patch_scores = scores[:, 1:] if not enforce_cls else scores
        budget = torch.full((tokens.x.shape[0],), K, device=tokens.x.device) if isinstance(K, int) else K
        extras = {"k_prime": k_prime, "budget": budget}
        if not enforce_cls:
            extras["cls_kept"] = chosen[:, 0]
        return StageRecord.on_tokens(self.ats_index, tokens, self.ats_grid, entering, keep, patch_scores, extras)


def _native_ats(block: ATSBlock, native, tokens: Tokens) -> Optional[tuple[Tokens, StageRecord]]:
    """`ATSBlock.forward` by the C++ block (`cpu_kernels(kernels="native")`): the same ops
    from C++ for one image whose tokens are all valid, in compact execution, with the
    default variant (CLS-row scores, CLS enforced, one K); None elsewhere."""
    cfg = block.ats
    if (tokens.size is not None or cfg.score != "cls" or not cfg.enforce_cls or cfg.compound
            or cfg.select not in ("sample", "topk")):
        return None
    K, P = block._budget(tokens), tokens.num_prefix
    x, rows, keep, scores, k_prime = native.ats(tokens.x, P, K, cfg.select == "topk")
    return with_rows(tokens, x, rows), block._record(tokens, None, keep, scores, keep, K, k_prime)


register_native_swap(ATSBlock, _native_ats)


def _first_sampled_takes_cls_place(chosen: Tensor, x: Tensor, q: Tensor, P: int) -> tuple[Tensor, Tensor, Tensor]:
    """CLS not enforced: where CLS was not sampled, the first sampled patch token takes its place.

    CLS not sampled: it leaves the sequence, and the first sampled token takes position 0,
    which the head reads (what "discarding the CLS token" means for a ViT whose classifier
    reads the first token).

    Args:
        chosen: (B, 1 + N) bool, whether the candidate at position P - 1 (CLS in a ViT with
            one prefix token) was sampled, then the patch tokens.
        x: (B, L, D) the block's input rows.
        q: (B, H, L, hd) their queries.
        P: the number of prefix tokens.

    Returns:
        The (B, N) keep mask over patch tokens (a moved token no longer in it), and x and q
        with each moved token's row at position P - 1 (copies; the inputs where none moved).
    """
    keep = chosen[:, 1:]
    lost = ~chosen[:, 0]
    first_kept = keep.to(torch.int8).argmax(dim=1)                      # (B,)
    b = lost.nonzero(as_tuple=True)[0]
    if not b.numel():
        return keep, x, q
    src = P + first_kept[b]
    x_in, q_in = x.clone(), q.clone()
    x_in[b, P - 1] = x[b, src]
    q_in[b, :, P - 1] = q[b, :, src]
    keep = keep.clone()
    keep[b, first_kept[b]] = False
    return keep, x_in, q_in


# -- the policy -------------------------------------------------------------------------


class ATSPolicy(BlockSwapPolicy):
    """The Adaptive Token Sampler in the stage blocks (`ATSBlock`), training-free.

    The budget is rho: ``model.policy.budget = 0.7`` after patching.

    Args:
        depth: the backbone's depth (for the default stages).
        stages: block indices with an ATS module (default: `default_stages(depth)`).
        rho: K = max(round(rho * N), min_k) at every stage, N the unreduced token count
            (CLS included); default 1.0 (K = N: no limit). rho > 1 samples more points
            than there are tokens, a milder reduction.
        K: fixed budget per stage (int, or one per stage); overrides rho.
        min_k: floor of the rho rule.
        score, select, enforce_cls: the variants (see `ATSSettings`).
        compound: rho scales the tokens entering each stage instead (per image), so the
            budget compounds from stage to stage.
    """

    name = "ats"
    block_class = ATSBlock
    key = "ats"
    budget_setting = "rho"

    def __init__(self, depth: int, stages: Optional[Sequence[int]] = None, rho: Optional[float] = None,
                 K: Optional[Union[int, Sequence[int]]] = None, min_k: int = 8, score: str = "cls",
                 select: str = "sample", enforce_cls: bool = True, compound: bool = False):
        super().__init__()
        stages = stage_blocks(default_stages(depth) if stages is None else stages, depth, "ATS")
        if isinstance(K, (list, tuple)):
            K = [int(k) for k in K]
            if len(K) != len(stages):
                raise ValueError(f"{len(K)} values of K for {len(stages)} stages")
        if K is None:
            rho = _checked_rho(1.0 if rho is None else rho)
        budgets = [] if K is None else K if isinstance(K, list) else [K]
        if any(k < 1 for k in budgets) or min_k < 1:
            raise ValueError(f"K and min_k must be at least 1, got K={K}, min_k={min_k}")
        if score not in ("cls", "selfattn") or select not in ("sample", "topk"):
            raise ValueError(f"unknown ATS variant score={score!r} select={select!r}")
        self.settings = ATSSettings(stages=stages, rho=None if K is not None else rho, K=K,
                                    min_k=int(min_k), score=score, select=select, enforce_cls=bool(enforce_cls),
                                    compound=bool(compound))

    @property
    def rho(self) -> Optional[float]:
        """The budget: K = max(round(rho * N), min_k) (None while a fixed K is set)."""
        return self.settings.rho

    @rho.setter
    def rho(self, value: float) -> None:
        self.settings.rho, self.settings.K = _checked_rho(value), None  # a rho replaces a fixed K

    def drops_nothing(self) -> Optional[str]:
        s = self.settings
        if s.select == "topk" and s.K is None and s.rho >= 1:
            return f"top-K at rho = {s.rho:g} keeps K >= N tokens, all of them; set a budget below 1"
        return None


def _checked_rho(value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 16:
        raise ValueError(f"rho must be a number in (0, 16], got {value!r}")
    return float(value)


def _builder(name: str, **fixed):
    def build(model: nn.Module, **kw) -> ATSPolicy:
        kw = {**fixed, **kw}
        kw.pop("name", None)
        p = ATSPolicy(model.config.depth, **kw)
        p.name = name
        return p

    return build


register_policy("ats", ATSPolicy)(_builder("ats"))
# Top-K on the same scores, everything else equal (ATS Fig. 5a, Table A.3).
register_policy("topk", ATSPolicy)(_builder("topk", select="topk"))
# "Self-attention score": attention received from every row, not just CLS's (Fig. 3).
register_policy("ats_selfattn", ATSPolicy)(_builder("ats_selfattn", score="selfattn"))
# App. 0.F.1 "Self-Attention Score (CLS Not Enforced)": CLS is one more candidate.
register_policy("ats_nocls", ATSPolicy)(_builder("ats_nocls", score="selfattn", enforce_cls=False))


def _single(model: nn.Module, **kw) -> ATSPolicy:
    """Single-stage ATS: one stage at the first default block (DeiT-S: block 3)."""
    kw.pop("name", None)
    kw.setdefault("stages", default_stages(model.config.depth)[:1])
    p = ATSPolicy(model.config.depth, **kw)
    p.name = "ats_single"
    return p


register_policy("ats_single", ATSPolicy)(_single)
