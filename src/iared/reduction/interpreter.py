"""The multi-head interpreter (IA-RED² Eq. 1) and the grouped policy that uses it.

Eq. 1 of the paper scores patch token X_i at the entry of group j with a learned policy
token P_j:

    I_ij = 1/H * sum_h sigmoid( F_q^h(X_i) . F_k^h(P_j) )

F_q^h and F_k^h are per-head linear maps ("borrowed from the MSA layer"). A token with
I_ij below the threshold (0.5) is discarded at group j and is unavailable to every later
group. CLS and distillation tokens are never scored and always kept.

Choices where the paper is silent (noted so a reader can undo them):

* X is layer-normalised before F_q, as the MSA the interpreter borrows from is pre-norm
  (ViT blocks apply LayerNorm before qkv). Without it the scale of X_i grows with depth
  and the sigmoids of later groups saturate at initialisation.
* The dot product is not scaled by 1/sqrt(d_h): Eq. 1 has no scale, and the learned maps
  absorb any constant.
* Width: H heads of width d_h, by default the backbone's heads and head width. Since
  there is one policy token, Eq. 1 is computed with the policy token's keys folded into
  F_q (see `MultiHeadInterpreter.forward`): N·D·H multiply-adds per group instead of
  N·D², under 0.1 % of a 12-block ViT split in 3 groups.
* Initialisation: the interpreters start close to "keep everything" (I ≈ `init_keep`,
  0.9 by default) instead of I ≈ 0.5. At I ≈ 0.5 the first greedy decisions are arbitrary:
  similar tokens score alike, so whole objects get dropped, accuracy falls to chance, and
  from there dropping everything maximises Eq. 2 (we saw exactly this collapse on
  cluttered-fashion). Starting from the full model, REINFORCE only has to learn what to
  take away, and the self-critical baseline û (everything kept) is the backbone itself.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence, Union

import torch
from torch import Tensor, nn
import torch.nn.functional as F

from ..backbones.kernels import fast_path, packable, register_fusion
from ..backbones.native import native_module
from ..backbones.tokens import StageRecord, Tokens, apply_keep, to_grid, with_rows
from .policy import TokenPolicy, register_policy

# -- the math, as pure functions --------------------------------------------------------


def informative_scores(head_logits: Tensor) -> Tensor:
    """Eq. 1: mean over heads of the per-head sigmoids. (..., H) -> (...)."""
    return torch.sigmoid(head_logits).mean(dim=-1)


def log_keep_drop(head_logits: Tensor) -> tuple[Tensor, Tensor]:
    """log I and log(1 - I) from per-head logits, without ever taking log(0).

    I = mean_h sigmoid(z_h), so log I = logsumexp_h(logsigmoid(z_h)) - log H, and since
    1 - sigmoid(z) = sigmoid(-z), log(1 - I) = logsumexp_h(logsigmoid(-z_h)) - log H.
    Both stay finite for any finite z, unlike log(mean(sigmoid(z))).
    """
    log_h = math.log(head_logits.shape[-1])
    log_keep = torch.logsumexp(F.logsigmoid(head_logits), dim=-1) - log_h
    log_drop = torch.logsumexp(F.logsigmoid(-head_logits), dim=-1) - log_h
    return log_keep, log_drop


class MultiHeadInterpreter(nn.Module):
    """Scores patch tokens against a learned policy token (Eq. 1).

    Args:
        dim: token width D of the backbone.
        num_heads: H, the interpreter's heads.
        head_dim: d_h, the width of each head's projection.
        init_keep: the score every token starts near (see the module docstring).
    """

    def __init__(self, dim: int, num_heads: int, head_dim: int, init_keep: float = 0.9):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.init_keep = init_keep
        self.policy_token = nn.Parameter(torch.zeros(1, dim))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.q = nn.Linear(dim, num_heads * head_dim)  # F_q^h for all heads at once
        self.k = nn.Linear(dim, num_heads * head_dim)  # F_k^h for all heads at once
        nn.init.trunc_normal_(self.policy_token, std=0.02)
        # Equal biases beta on both maps make every head's logit start near d_h·beta², the
        # same for all tokens; choose beta so that sigmoid(d_h·beta²) = init_keep.
        beta = math.sqrt(math.log(init_keep / (1 - init_keep)) / head_dim) if init_keep > 0.5 else 0.0
        for lin in (self.q, self.k):
            nn.init.trunc_normal_(lin.weight, std=0.02)
            nn.init.constant_(lin.bias, beta)

    def forward(self, patches: Tensor) -> Tensor:
        """Per-head logits z (B, N, H) for patch tokens (B, N, D); I = informative_scores(z).

        With one policy token, z_h = (W_q^h x + b_q^h) . k_h is a linear function of x:
        z_h = x . (W_q^h^T k_h) + b_q^h . k_h. Folding k into W_q first costs H·d_h·D
        multiply-adds per call instead of N·H·d_h·D: the same Eq. 1 (to float rounding)
        and the same gradients, at a 1/N-th of the projection's cost.
        """
        weight, bias = self.folded()
        return F.linear(self.norm(patches), weight, bias)                        # (B, N, H)

    def informative(self, patches: Tensor) -> Tensor:
        """Eq. 1's scores I (B, N), in float32, for patch tokens (B, N, D).

        What inference needs (no per-head logits). `iared.backbones.kernels.cpu_kernels`
        replaces it with a LayerNorm and one oneDNN call (the linear map with the sigmoid
        fused), as it does for the backbone's linear layers.
        """
        # float32 whatever the backbone's dtype: in bfloat16 (8 significant bits) scores
        # near 1 would tie in large groups, and a threshold cannot split a tie.
        return informative_scores(self(patches).float())

    def folded(self) -> tuple[Tensor, Tensor]:
        """(H, D) weight and (H,) bias of Eq. 1's logits with the policy token folded in.

        Under `torch.inference_mode` (benchmarks, evaluation, the interpret tool) the
        result is cached until a parameter changes: an optimizer step, `load_state_dict`
        or any in-place update bumps the tensors' version counters, a move to another
        device changes their storage. Elsewhere (training, `no_grad` validation) it is
        recomputed on every call, which costs 2·H·d_h·D multiply-adds.
        """
        params = (self.q.weight, self.q.bias, self.k.weight, self.k.bias, self.policy_token)
        inference = torch.is_inference_mode_enabled()
        if inference:
            key = tuple((p.data_ptr(), p._version) for p in params)
            cached = getattr(self, "_folded_cache", None)
            if cached is not None and cached[0] == key:
                return cached[1]
        H, dh = self.num_heads, self.head_dim
        k = self.k(self.policy_token).view(H, dh)                                  # (H, dh)
        weight = (self.q.weight.view(H, dh, -1) * k[:, :, None]).sum(dim=1)       # (H, D)
        bias = (self.q.bias.view(H, dh) * k).sum(dim=-1)                          # (H,)
        if inference:
            self._folded_cache = (key, (weight, bias))
        return weight, bias


# -- the grouped policy -----------------------------------------------------------------

GroupMode = str  # "greedy" | "sample" | "all"
_MODES = ("greedy", "sample", "all")


class IARedPolicy(TokenPolicy):
    """D interpreters, one at the entry of each group of blocks (IA-RED² Fig. 2).

    Per-forward `mode` (a value passed to `model(x, mode=...)`, one string for every
    group or one per group):

    * ``"greedy"`` keeps tokens with I_ij > threshold (inference; the self-critical
      baseline û of Eq. 3 when threshold = 0.5);
    * ``"sample"`` draws u_i ~ Bernoulli(I_ij) (REINFORCE);
    * ``"all"`` keeps every token but still scores them (the curriculum keeps later
      groups' interpreters "masked" while an earlier one is trained).

    Each group adds a `StageRecord` whose `extras` hold the per-head logits and the
    actions on the full grid, which is all the policy-gradient loss needs.

    Args:
        dim: backbone width.
        depth: backbone depth; must be divisible by `groups`.
        groups: D, the number of groups (and interpreters).
        num_heads: interpreter heads H.
        head_dim: interpreter head width d_h.
        threshold: keep threshold at inference, one float or one per group.
    """

    budget_setting = "threshold"

    def __init__(self, dim: int, depth: int, groups: int = 3, num_heads: int = 6, head_dim: int = 64,
                 threshold: Union[float, Sequence[float]] = 0.5):
        super().__init__()
        if groups < 1 or depth % groups != 0:
            raise ValueError(f"groups ({groups}) must divide the depth ({depth}) evenly")
        self.groups = groups
        self.blocks_per_group = depth // groups
        self.interpreters = nn.ModuleList(MultiHeadInterpreter(dim, num_heads, head_dim) for _ in range(groups))
        self._group_ids = [torch.tensor(j) for j in range(groups)]  # records' extras["group"], made once
        if isinstance(threshold, (list, tuple)) and len(threshold) != groups:
            raise ValueError(f"{len(threshold)} thresholds for {groups} groups")
        self.threshold = threshold  # scores are in (0, 1): below 0 keeps every token, 1 or more none

    @classmethod
    def for_model(cls, model: nn.Module, groups: int = 3, num_heads: Optional[int] = None,
                  head_dim: Optional[int] = None, threshold: Union[float, Sequence[float]] = 0.5) -> "IARedPolicy":
        """Size the interpreters from a backbone: by default its heads and head width."""
        c = model.config
        heads = num_heads or c.num_heads
        return cls(c.embed_dim, c.depth, groups, heads, head_dim or c.embed_dim // c.num_heads, threshold)

    def config(self) -> dict[str, Any]:
        it = self.interpreters[0]
        return {"name": "iared", "groups": self.groups, "num_heads": it.num_heads, "head_dim": it.head_dim,
                "threshold": self.threshold}

    def attach(self, model: nn.Module) -> None:
        """Refuse a backbone these interpreters were not built for (`iared.patch` calls this)."""
        c = model.config
        dim = self.interpreters[0].norm.normalized_shape[0]
        if c.embed_dim != dim or c.depth != self.groups * self.blocks_per_group:
            raise ValueError(f"these interpreters fit a backbone of width {dim} and depth "
                             f"{self.groups * self.blocks_per_group}, not {c.embed_dim} and {c.depth}")

    def drops_nothing(self) -> Optional[str]:
        # Untrained interpreters (biases still at their constant start) score every token
        # within a few hundredths of init_keep; a threshold well below that drops nothing.
        fresh = all(bool((m.q.bias == m.q.bias[0]).all() and (m.k.bias == m.q.bias[0]).all())
                    for m in self.interpreters)
        start = min(m.init_keep for m in self.interpreters)
        if fresh and max(self.group_threshold(j) for j in range(self.groups)) < start - 0.1:
            return (f"untrained interpreters score every token near {start:g}; train them "
                    "(iared train) or load trained ones (iared.load_policy)")
        return None

    def group_threshold(self, j: int) -> float:
        t = self.threshold
        return float(t[j]) if isinstance(t, (list, tuple)) else float(t)

    def group_mode(self, j: int, mode: Any) -> GroupMode:
        m = mode[j] if isinstance(mode, (list, tuple)) else (mode or "greedy")
        if m not in _MODES:
            raise ValueError(f"unknown interpreter mode {m!r}; expected one of {_MODES}")
        return m

    def acts_before(self, index: int) -> bool:
        return index % self.blocks_per_group == 0  # at the entry of each group

    def forward(self, index: int, tokens: Tokens, model: nn.Module, mode: Any = None):
        if not self.acts_before(index):
            return tokens, None
        j = index // self.blocks_per_group
        P, G = tokens.num_prefix, model.grid_size
        interpreter, patches = self.interpreters[j], tokens.x[:, P:]
        # Only the policy-gradient loss needs the per-head logits: under no_grad or
        # inference_mode the interpreter gives the scores alone, a path `cpu_kernels` fuses
        # (between two blocks at batch 1 every small op costs tens of microseconds).
        if torch.is_grad_enabled():
            head_logits = interpreter(patches)                            # (B, N, H)
            scores = informative_scores(head_logits.float())              # (B, N), float32 as in `informative`
        else:
            head_logits, scores = None, interpreter.informative(patches)
        m = self.group_mode(j, mode)
        if m == "greedy":
            keep = scores > self.group_threshold(j)
        elif m == "sample":
            keep = torch.bernoulli(scores.detach()).bool()
        else:
            keep = torch.ones_like(scores, dtype=torch.bool)
        # Tokens already dropped need no masking here: `apply_keep` leaves them dropped and
        # `to_grid` puts no invalid token on the record's grids.
        return apply_keep(tokens, keep), self._record(index, tokens, G, keep, scores, head_logits)

    def _record(self, index: int, tokens: Tokens, grid_size: int, keep: Tensor, scores: Tensor,
                head_logits: Optional[Tensor] = None) -> StageRecord:
        """The stage's record: the group's scores and keep mask (and per-head logits when made)."""
        extras = {"group": self._group_ids[index // self.blocks_per_group]}
        if head_logits is not None:
            extras["head_logits"] = to_grid(head_logits, tokens, grid_size)
        return StageRecord.on_tokens(index, tokens, grid_size, None, keep, scores, extras)  # entering: when read


def has_interpreters(model: nn.Module) -> bool:
    """Whether `model` carries IA-RED² interpreters (an `IARedPolicy`)."""
    return isinstance(getattr(model, "policy", None), IARedPolicy)


@register_policy("iared", IARedPolicy)
def _build_iared(model: nn.Module, groups: int = 3, **kw) -> IARedPolicy:
    return IARedPolicy.for_model(model, groups=groups, **kw)


# -- CPU inference: `informative` fused for `iared.backbones.kernels.cpu_kernels` ----------

def _scoring_map(mod: MultiHeadInterpreter) -> tuple[Tensor, Tensor, Tensor]:
    """The policy-folded (H, D) weight packed for oneDNN, its (H,) bias and the (H,) 1/H
    of the mean over heads: a snapshot, as the packed linears."""
    with torch.no_grad():
        weight, bias = mod.folded()
        weight = torch.ops.mkldnn._reorder_linear_weight(weight, None)
        return weight, bias, torch.full((mod.num_heads,), 1.0 / mod.num_heads, device=bias.device)


def _fused_informative(mod: nn.Module):
    """`MultiHeadInterpreter.informative` in three ops: LayerNorm, the policy-folded
    linear map with oneDNN's sigmoid post-op, and the mean over heads as one `mv` with
    1/H (fewer calls than `mean`, a sum and a division). Both see the tokens as one
    (B * N, D) matrix, since `@` on a 3-d tensor would add three small operations
    around it: at batch 1 the op count is the cost (docs/performance.md)."""
    weight, bias, mean = _scoring_map(mod)
    norm, plain = mod.norm, type(mod).informative.__get__(mod)
    shape, eps = tuple(norm.normalized_shape), norm.eps

    def informative(x: Tensor) -> Tensor:
        if not fast_path(x, torch.float32):
            return plain(x)
        h = F.layer_norm(x, shape, norm.weight, norm.bias, eps)                       # contiguous
        probs = torch.ops.mkldnn._linear_pointwise(h.view(-1, shape[0]), weight, bias, "sigmoid", [], "")
        return torch.mv(probs, mean).view(x.shape[:-1])                              # (B, N)

    return informative


def _fusable(mod: nn.Module) -> bool:
    # float32 only: in bfloat16 the fused sigmoid would round scores to 8 significant bits.
    return (mod.q.weight.dtype == torch.float32
            and packable(mod.q.weight) and type(mod.norm) is nn.LayerNorm)


register_fusion(MultiHeadInterpreter, "informative", _fusable, _fused_informative)


def _native_stage(policy: nn.Module):
    """`IARedPolicy.forward` with each greedy stage of one image (every token valid, compact
    execution) in one call to the C++ extension: the same ops as the fused `informative`
    above, the threshold and `apply_keep`, so the same scores and kept tokens."""
    native = native_module()
    maps = [[i.norm.weight.detach(), i.norm.bias.detach(), *_scoring_map(i)] for i in policy.interpreters]
    eps = [i.norm.eps for i in policy.interpreters]

    def forward(index: int, tokens: Tokens, model: nn.Module, mode: Any = None):
        j = index // policy.blocks_per_group
        if (not policy.acts_before(index) or tokens.x.shape[0] != 1 or tokens.valid is not None
                or tokens.execution != "compact" or tokens.size is not None or not fast_path(tokens.x, torch.float32)
                or policy.group_mode(j, mode) != "greedy"):
            return type(policy).forward(policy, index, tokens, model, mode)
        P = tokens.num_prefix
        x, rows, keep, scores = native.score_and_keep(tokens.x, P, maps[j], eps[j], policy.group_threshold(j))
        new = with_rows(tokens, x, rows) if rows.numel() < tokens.x.shape[1] else tokens  # as `compact`
        return new, policy._record(index, tokens, model.grid_size, keep, scores)

    return forward


register_fusion(IARedPolicy, "forward", lambda policy: all(_fusable(i) for i in policy.interpreters), _native_stage,
                kernels=("native",))
