"""A plain ViT / DeiT with timm's state-dict layout, whose blocks can lose tokens.

Read top to bottom: the parts (patch embedding, attention, MLP, block), then the config,
then the model. Parameter names follow timm's `VisionTransformer` exactly (`cls_token`,
`pos_embed`, `patch_embed.proj`, `blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}`,
`norm`, `head`, and for distilled DeiT `dist_token`, `head_dist`), so a timm or DeiT
checkpoint loads with `strict=True`.

What differs from timm: blocks take and return `Tokens` (the token tensor plus which
tokens are valid and where each came from), so a token policy attached with
`iared.patch` can drop tokens between blocks, and a forward can return what the policy
did as a value (`ReductionInfo`) rather than as hidden state.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .packing import MAX_BUCKETS, PackedLayout
from .tokens import Execution, ReductionInfo, StageRecord, Tokens, attention_mask, initial_tokens


def _pair(v: Union[int, Sequence[int]]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


class PatchEmbed(nn.Module):
    """Image (B, C, H, W) to patch tokens (B, N, D) by a strided convolution.

    `overlap` > 0 widens each patch's kernel by that many pixels on every side (zero padding
    at the image border), keeping the grid: overlapping patch embedding (as in PVTv2 or
    CvT). Token i still sits on patch i, so heatmaps and token dropping are unchanged; a
    small ViT trained from scratch on objects at arbitrary pixel offsets learns far faster
    with it, because a patch's features no longer depend on where the patch grid cuts the
    object. timm's ViTs use 0.
    """

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768, overlap: int = 0):
        super().__init__()
        self.img_size = _pair(img_size)
        self.patch_size = _pair(patch_size)
        if any(s <= 0 or s % p for s, p in zip(self.img_size, self.patch_size)):
            # timm's strict PatchEmbed refuses these too; a strided convolution would
            # silently ignore the last rows and columns of every image.
            raise ValueError(f"image size {self.img_size} is not a positive multiple of the patch size "
                             f"{self.patch_size}")
        self.grid_size = (self.img_size[0] // self.patch_size[0], self.img_size[1] // self.patch_size[1])
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        if overlap < 0:
            raise ValueError(f"patch overlap must be >= 0, got {overlap}")
        kernel = (self.patch_size[0] + 2 * overlap, self.patch_size[1] + 2 * overlap)
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=kernel, stride=self.patch_size, padding=overlap)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or tuple(x.shape[1:]) != (self.proj.in_channels, *self.img_size):
            raise ValueError(f"input of shape {tuple(x.shape)} does not match the model's images "
                             f"(B, {self.proj.in_channels}, {self.img_size[0]}, {self.img_size[1]})")
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, N, D)


class Attention(nn.Module):
    """Multi-head self-attention (timm layout: one `qkv` linear, one `proj`).

    Dropped or padded tokens are excluded as keys through `valid`; see
    `iared.backbones.tokens` for why masking keys alone is exact.
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, scale: Optional[float] = None):
        super().__init__()
        if num_heads < 1 or dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        # timm scales by head_dim**-0.5; some foreign checkpoints were trained with another scale.
        self.scale = scale if scale is not None else self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def qkv_heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(B, L, D) -> q, k, v, each (B, H, L, hd)."""
        B, L, _ = x.shape
        qkv = self.qkv(x).reshape(B, L, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return qkv.unbind(0)  # one op for three views (three `select`s cost ~3x the dispatch at batch 1)

    def attention_probs(self, x: Tensor, valid: Optional[Tensor] = None) -> Tensor:
        """The softmax attention matrix (B, H, L, L), computed explicitly (for explainers)."""
        q, k, _ = self.qkv_heads(x)
        logits = (q * self.scale) @ k.transpose(-2, -1)
        if valid is not None:
            logits = logits.masked_fill(~attention_mask(valid), float("-inf"))
        return logits.softmax(dim=-1)

    def forward(self, x: Tensor, valid: Optional[Tensor] = None) -> Tensor:
        return self.attend(x, attention_mask(valid))[0]

    def attend(self, x: Tensor, attn_mask: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """`forward` with any SDPA mask (bool or additive), also returning q and k.

        For the policies that score tokens from the attention they run (EViT, ToMe).

        Returns:
            The output after `proj` (B, L, D), and q, k, each (B, H, L, hd).
        """
        B, L, D = x.shape
        q, k, v = self.qkv_heads(x)
        if attn_mask is not None and attn_mask.is_floating_point():
            attn_mask = attn_mask.to(q.dtype)  # an additive mask must match q's dtype (autocast)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=self.scale)
        return self.proj(out.transpose(1, 2).reshape(B, L, D)), q, k

    def forward_packed(self, x: Tensor, layout: PackedLayout) -> Tensor:
        """Attention on packed tokens: `forward` for the valid tokens only.

        Args:
            x: (T, D) the valid tokens of the batch, in `layout`'s packed order.
            layout: where each packed token sits in the padded batch; attention runs
                once per bucket of images of similar length.

        Returns:
            (T, D) the attention output (after `proj`) of each packed token.
        """
        T, D = x.shape
        qkv = self.qkv(x)                                                     # (T, 3D)
        out = torch.empty_like(x) if not torch.is_grad_enabled() else None
        pieces = []
        for bucket in layout.buckets:
            t0, t1 = bucket.tokens
            n, Lb = bucket.images.numel(), bucket.length
            padded = qkv.index_select(0, bucket.gather)                      # (n * Lb, 3D)
            q, k, v = padded.view(n, Lb, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=bucket.mask, scale=self.scale)
            o = o.transpose(1, 2).reshape(n * Lb, D)  # a view where the kernel writes (n, Lb, H, hd), as on CPU
            if out is None:
                pieces.append(o.index_select(0, bucket.slot))
            else:
                torch.index_select(o, 0, bucket.slot, out=out[t0:t1])
        return self.proj(out if out is not None else torch.cat(pieces) if len(pieces) > 1 else pieces[0])


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block (MSA + FFN), mapping `Tokens` to `Tokens`.

    Compact tokens with padding (images of a batch keeping different counts) run packed:
    every per-token layer sees only the batch's real tokens (see "packed execution" in
    `iared.backbones.tokens`). The result equals the padded computation for every
    valid token; padded slots keep their input values, which nothing reads.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = False,
                 attn_scale: Optional[float] = None, eps: float = 1e-6):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, scale=attn_scale)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, tokens: Tokens) -> Tokens:
        if tokens.execution == "compact" and tokens.valid is not None:
            return self.forward_packed(tokens)
        # "mask", "padded", or nothing padded: every row computed, padding masked as keys.
        x = tokens.x
        x = x + self.attn(self.norm1(x), tokens.valid)
        x = x + self.mlp(self.norm2(x))
        return tokens.with_x(x)

    def forward_packed(self, tokens: Tokens) -> Tokens:
        """`forward` on the valid tokens only, gathered into one (T, D) sequence."""
        layout = PackedLayout(tokens.valid, tokens.x.shape[-1])
        return tokens.with_x(layout.unpack(self.forward_packed_tokens(layout.pack(tokens.x), layout), tokens.x))

    def forward_packed_tokens(self, h: Tensor, layout: PackedLayout) -> Tensor:
        """The block on packed tokens (T, D) -> (T, D); see `PackedLayout`."""
        h = h + self.attn.forward_packed(self.norm1(h), layout)
        return h + self.mlp(self.norm2(h))


def _runs_packed(blk: nn.Module, tokens: Tokens) -> bool:
    """Whether `blk` can run inside a packed run: a plain `Block` on padded compact tokens,
    without hooks of its own (a run calls `forward_packed_tokens`, not the module)."""
    return (tokens.execution == "compact" and tokens.valid is not None
            and type(blk).forward is Block.forward and isinstance(blk, Block)
            and not (blk._forward_hooks or blk._forward_pre_hooks))


def _unpacked(tokens: Tokens, layout: Optional[PackedLayout], h: Optional[Tensor]) -> Tokens:
    """`tokens` with the packed values `h` of a run scattered back (as they are without a run)."""
    return tokens if h is None else tokens.with_x(layout.unpack(h, tokens.x))


@dataclass(frozen=True)
class ViTConfig:
    """Everything that determines a ViT's architecture (and so its state-dict shapes)."""

    img_size: Union[int, tuple[int, int]] = 224  # input height/width in pixels
    patch_size: int = 16           # side of a square patch in pixels
    in_chans: int = 3              # input channels (1 for MNIST-like data)
    num_classes: int = 1000        # classifier outputs; 0 for no head
    embed_dim: int = 768           # token width D
    depth: int = 12                # number of MSA-FFN blocks
    num_heads: int = 12            # attention heads per block
    mlp_ratio: float = 4.0         # FFN hidden width / D
    qkv_bias: bool = True          # bias in the qkv projection (timm ViT/DeiT: True)
    distilled: bool = False        # DeiT distillation token and second head
    final_norm: bool = True        # LayerNorm before the head (False: Identity)
    head_hidden: int = 0           # >0: two-layer head Linear-GELU-Linear (foreign checkpoints)
    attn_scale: Optional[float] = None  # None: head_dim**-0.5 as in timm
    norm_eps: float = 1e-6         # LayerNorm epsilon (timm ViT: 1e-6)
    patch_overlap: int = 0         # pixels each patch kernel sees beyond its patch on every side (timm: 0)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if isinstance(d["img_size"], tuple):
            d["img_size"] = list(d["img_size"])
        return d


class VisionTransformer(nn.Module):
    """ViT / DeiT classifier. `policy`, when set (see `iared.patch`), drops tokens.

    A token policy is an `nn.Module` with
    ``forward(index, tokens, model, mode) -> (tokens, StageRecord | None)``,
    called in front of every block; `mode` is a per-forward argument of the policy's
    own (e.g. "greedy" / "sample" for the IA-RED² interpreters).

    `max_buckets` bounds the attention calls of a packed run (see `PackedLayout`).
    """

    max_buckets: int = MAX_BUCKETS

    def __init__(self, config: Optional[ViTConfig] = None, **overrides):
        super().__init__()
        config = ViTConfig(**overrides) if config is None else config
        self.config = config
        c = config
        self.num_prefix_tokens = 2 if c.distilled else 1
        self.patch_embed = PatchEmbed(c.img_size, c.patch_size, c.in_chans, c.embed_dim, c.patch_overlap)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.embed_dim))
        self.dist_token = nn.Parameter(torch.zeros(1, 1, c.embed_dim)) if c.distilled else None
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + self.num_prefix_tokens, c.embed_dim))
        self.blocks = nn.ModuleList(
            Block(c.embed_dim, c.num_heads, c.mlp_ratio, c.qkv_bias, c.attn_scale, c.norm_eps) for _ in range(c.depth)
        )
        self.norm = nn.LayerNorm(c.embed_dim, eps=c.norm_eps) if c.final_norm else nn.Identity()
        self.head = self._make_head(c)
        self.head_dist = nn.Linear(c.embed_dim, c.num_classes) if c.distilled and c.num_classes > 0 else None
        self.policy: Optional[nn.Module] = None
        self._init_weights()

    @staticmethod
    def _make_head(c: ViTConfig) -> nn.Module:
        if c.num_classes <= 0:
            return nn.Identity()
        if c.head_hidden > 0:
            return nn.Sequential(nn.Linear(c.embed_dim, c.head_hidden), nn.GELU(), nn.Linear(c.head_hidden, c.num_classes))
        return nn.Linear(c.embed_dim, c.num_classes)

    def _init_weights(self) -> None:
        # timm's defaults: truncated normal 0.02 for linear weights and tokens, zero biases.
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        if self.dist_token is not None:
            nn.init.trunc_normal_(self.dist_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    # -- shape facts ---------------------------------------------------------------
    @property
    def grid_size(self) -> int:
        """Number of patch tokens on the full grid."""
        return self.patch_embed.num_patches

    @property
    def embed_dim(self) -> int:
        return self.config.embed_dim

    # -- forward -------------------------------------------------------------------
    def embed(self, x: Tensor, execution: Execution = "compact") -> Tokens:
        """Patchify, add position embeddings, prepend CLS (and distillation) tokens."""
        x = self.patch_embed(x)
        B = x.shape[0]
        prefix = [self.cls_token.expand(B, -1, -1)]
        if self.dist_token is not None:
            prefix.append(self.dist_token.expand(B, -1, -1))
        x = torch.cat(prefix + [x], dim=1) + self.pos_embed
        return initial_tokens(x, self.num_prefix_tokens, execution)

    def forward_tokens(self, tokens: Tokens, mode: Any = None,
                       count_tokens: bool = True) -> tuple[Tokens, list[StageRecord], Optional[Tensor]]:
        """Run the blocks, letting the policy (if any) drop tokens in front of each.

        Compact tokens with padding run packed (see `PackedLayout`): gathered once when a
        run of plain blocks starts, scattered back only where something reads the padded
        tokens (a policy that acts, a block of another kind, the head).

        Returns:
            (tokens after the last block, the policy's stage records, (B, depth) valid
            tokens entering each block, or None with `count_tokens=False`).
        """
        records: list[StageRecord] = []
        counts = []
        seen: Optional[Tokens] = None  # the tokens `count` was computed for
        acts = getattr(self.policy, "acts_before", None)
        layout: Optional[PackedLayout] = None
        h: Optional[Tensor] = None     # the valid tokens, packed by `layout`, while a run lasts
        for i, blk in enumerate(self.blocks):
            if self.policy is not None and (acts is None or acts(i)):
                tokens, h = _unpacked(tokens, layout, h), None
                tokens, rec = self.policy(i, tokens, self, mode)
                if rec is not None:
                    records.append(rec)
            if count_tokens:
                if seen is None or tokens.valid is not seen.valid or tokens.x.shape[1] != seen.x.shape[1]:
                    seen, count = tokens, tokens.kept_counts() + tokens.num_prefix  # only where tokens change
                counts.append(count)
            if _runs_packed(blk, tokens):
                if h is None:
                    if layout is None or not layout.matches(tokens.valid):
                        layout = PackedLayout(tokens.valid, tokens.x.shape[-1], self.max_buckets)
                    h = layout.pack(tokens.x)
                h = blk.forward_packed_tokens(h, layout)
                continue
            tokens, h = _unpacked(tokens, layout, h), None
            tokens = blk(tokens)
            if isinstance(tokens, tuple):  # a block that drops tokens inside itself (ATS) returns its record
                tokens, rec = tokens
                if rec is not None:
                    records.append(rec)
        tokens = _unpacked(tokens, layout, h)
        if not count_tokens:
            return tokens, records, None
        return tokens, records, torch.stack(counts, dim=1) if counts else torch.zeros(tokens.x.shape[0], 0)

    def forward_head(self, tokens: Tokens) -> Tensor:
        x = self.norm(tokens.x)
        if self.head_dist is not None:
            # DeiT: at inference the class and distillation heads are averaged.
            return (self.head(x[:, 0]) + self.head_dist(x[:, 1])) / 2
        return self.head(x[:, 0])

    def forward(self, x: Tensor, *, return_info: bool = False, mode: Any = None,
                execution: Optional[Execution] = None):
        """Classify images (B, C, H, W).

        Args:
            x: input images.
            return_info: also return a `ReductionInfo` describing what the policy kept.
            mode: passed to the policy (e.g. "greedy", "sample", or one per group).
            execution: "mask" keeps shapes fixed (dropped tokens masked); "compact"
                really removes them (the batch's valid tokens packed for the per-token
                layers); "padded" removes them too but runs every layer on the batch
                padded to its longest image. Default: "mask" in training, "compact" in eval.

        Returns:
            logits (B, num_classes), or (logits, ReductionInfo) with `return_info`.
        """
        execution = execution or ("mask" if self.training else "compact")
        if execution not in ("mask", "compact", "padded"):
            raise ValueError(f"execution must be 'mask', 'compact' or 'padded', got {execution!r}")
        tokens = self.embed(x, execution)
        tokens, records, counts = self.forward_tokens(tokens, mode, count_tokens=return_info)
        logits = self.forward_head(tokens)
        if not return_info:
            return logits
        return logits, ReductionInfo(grid_size=self.grid_size, stages=records, block_tokens=counts)
