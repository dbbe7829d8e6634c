"""JointST: TimeSformer's `joint_space_time` video ViT, whose blocks can lose tokens.

TimeSformer (facebookresearch/TimeSformer, `timesformer/models/vit.py`) with
`attention_type='joint_space_time'` keeps the plain ViT blocks and feeds them every patch
of every frame as one sequence. The IA-RED² paper builds its video model on it (8 frames
x 196 patches = 1568 tokens). What it adds to a ViT, and therefore to the state dict, is
one parameter: `time_embed` (1, T, D). All other keys are timm's (`cls_token`,
`pos_embed`, `patch_embed.proj`, `blocks.N...`, `norm`, `head`), so a TimeSformer
checkpoint (`{"model_state": {"model.cls_token": ...}}`) loads with `load_pretrained`.

Embedding, as in TimeSformer's `forward_features`:

* each frame is patchified by the shared 2-D `patch_embed` (spatial index n = row * w + col);
* `pos_embed` (1, 1 + S, D) is shared by all frames: its patch part is added to every
  frame, its first row to the CLS token;
* `time_embed[t]` is added to every patch token of frame t (not to CLS);
* tokens are ordered patch-major with time inner, `rearrange('(b n) t m -> b (n t) m')`:
  the patch token at spatial index n of frame t sits at sequence index 1 + n * T + t.

So the patch grid of this model has `grid_size = T * S` cells and `Tokens.pos` (and every
`StageRecord` grid) indexes it as n * T + t. `frame_maps` reshapes such a grid into
per-frame maps (B, T, h, w) for heatmaps. Token policies (IA-RED² interpreters, random,
attention, ATS) see nothing but a longer sequence and work unchanged.

Frame count and resolution are free: a checkpoint made for another T or another image
size is resampled when loaded (`adapt_state_dict`: `time_embed` linearly over time,
`pos_embed` bicubically over space by `load_into`), and an image ViT checkpoint (no
`time_embed`) loads with a zero time embedding, which is how TimeSformer starts from
ImageNet weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .tokens import Execution, Tokens, initial_tokens
from .registry import register_model
from .vit import ViTConfig, VisionTransformer


@dataclass(frozen=True)
class JointSTConfig(ViTConfig):
    """A ViT config plus the clip length."""

    num_frames: int = 8  # T, frames per clip; the patch grid has T * (H/p) * (W/p) cells


def frame_maps(grid: Tensor, num_frames: int, grid_hw: tuple[int, int]) -> Tensor:
    """Reshape per-token values on the JointST grid (index n * T + t) into per-frame maps.

    Args:
        grid: (B, T * S) values, e.g. `StageRecord.scores` or `.keep`.
        num_frames: T.
        grid_hw: (h, w) patches per frame, h * w = S.

    Returns:
        (B, T, h, w): entry [b, t, i, j] is the value of patch (i, j) of frame t.
    """
    B = grid.shape[0]
    h, w = grid_hw
    return grid.reshape(B, h * w, num_frames).transpose(1, 2).reshape(B, num_frames, h, w)


def resample_time_embed(time_embed: Tensor, num_frames: int) -> Tensor:
    """Linear interpolation of a (1, T0, D) time embedding to (1, num_frames, D).

    TimeSformer resamples with "nearest" at inference when the input has another T;
    here it only happens when a checkpoint is loaded into a model of another T, where
    linear interpolation keeps neighbouring frames' embeddings smooth.
    """
    if time_embed.shape[1] == num_frames:
        return time_embed
    t = time_embed.transpose(1, 2).float()                                   # (1, D, T0)
    t = F.interpolate(t, size=num_frames, mode="linear", align_corners=False)
    return t.transpose(1, 2).to(time_embed.dtype)


class JointSTViT(VisionTransformer):
    """TimeSformer-JointST: classifies clips (B, C, T, H, W) with one joint attention.

    Modifications from `VisionTransformer`:

    * `embed` takes a clip, adds the shared spatial `pos_embed` and the per-frame
      `time_embed`, and orders tokens CLS, then n * T + t (see the module docstring);
    * `grid_size` is T * S;
    * `adapt_state_dict` resamples or creates `time_embed` when a checkpoint is loaded.

    Everything after `embed` (blocks, policy hook, head) is the ViT's.
    """

    config: JointSTConfig

    def __init__(self, config: Optional[JointSTConfig] = None, **overrides):
        config = JointSTConfig(**overrides) if config is None else config
        if config.distilled:
            raise ValueError("JointST has no distillation token")
        if config.num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {config.num_frames}")
        super().__init__(config)
        self.time_embed = nn.Parameter(torch.zeros(1, config.num_frames, config.embed_dim))
        # TimeSformer starts time_embed at zero (it fine-tunes from an image ViT); from
        # scratch a small random init lets frames differ from the first step.
        nn.init.trunc_normal_(self.time_embed, std=0.02)

    @property
    def num_frames(self) -> int:
        return self.config.num_frames

    @property
    def frame_grid(self) -> tuple[int, int]:
        """(h, w) patches per frame."""
        return tuple(self.patch_embed.grid_size)

    @property
    def grid_size(self) -> int:
        """Patch tokens of a whole clip: T * h * w."""
        return self.num_frames * self.patch_embed.num_patches

    def patch_position_embedding(self) -> Tensor:
        """(1, T * S, D) what `embed` adds to each patch token, in n * T + t order."""
        S, T = self.patch_embed.num_patches, self.num_frames
        pos = self.pos_embed[:, 1:]                                          # (1, S, D)
        return (pos[:, :, None, :] + self.time_embed[:, None, :, :]).reshape(1, S * T, -1)

    def embed(self, x: Tensor, execution: Execution = "compact") -> Tokens:
        """Clip (B, C, T, H, W) -> tokens: CLS, then patch n of frame t at 1 + n * T + t."""
        if x.dim() != 5:
            raise ValueError(f"JointST expects clips (B, C, T, H, W), got shape {tuple(x.shape)}")
        B, C, T, H, W = x.shape
        if T != self.num_frames:
            raise ValueError(f"clip has {T} frames; the model was built for {self.num_frames}")
        frames = x.transpose(1, 2).reshape(B * T, C, H, W)                   # (B*T, C, H, W)
        p = self.patch_embed(frames)                                         # (B*T, S, D)
        S, D = p.shape[1], p.shape[2]
        p = p.reshape(B, T, S, D).transpose(1, 2).reshape(B, S * T, D)       # (B, S*T, D), n*T + t
        p = p + self.patch_position_embedding()
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(B, -1, -1)     # (B, 1, D)
        return initial_tokens(torch.cat([cls, p], dim=1), self.num_prefix_tokens, execution)

    def raw_patch_tokens(self, tokens: Tokens) -> Tensor:
        """Patch tokens of freshly embedded `tokens` with the position/time embedding removed.

        Only valid before any token was dropped or reordered (as at the input).

        Returns:
            (B, T * S, D) the patch embedding's output, in n * T + t order.
        """
        return tokens.x[:, tokens.num_prefix:] - self.patch_position_embedding()

    def adapt_state_dict(self, sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Fit a checkpoint to this model's T: resample `time_embed`, or add a zero one.

        Called by `checkpoint.load_into` before shapes are checked. A missing
        `time_embed` (an image ViT checkpoint) becomes zeros, as TimeSformer does when it
        starts from ImageNet weights.
        """
        sd = dict(sd)
        te = sd.get("time_embed")
        if te is None:
            if "pos_embed" in sd:
                sd["time_embed"] = torch.zeros_like(self.time_embed)
        elif te.dim() == 3 and te.shape[-1] == self.time_embed.shape[-1]:
            sd["time_embed"] = resample_time_embed(te, self.num_frames)
        return sd


def _jointst(overrides: dict, **defaults) -> JointSTViT:
    return JointSTViT(JointSTConfig(**{**defaults, **overrides}))


@register_model
def timesformer_jointst_base_patch16_224(**kw) -> JointSTViT:
    """TimeSformer-JointST ViT-B/16 at 224, 8 frames (1568 patch tokens), Kinetics-400 head."""
    return _jointst(kw, img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12,
                    qkv_bias=True, num_frames=8, num_classes=400)


@register_model
def jointst_custom(**kw) -> JointSTViT:
    """Generic JointST constructor: every `JointSTConfig` field is an override, e.g.
    ``create_model("jointst_custom", img_size=48, patch_size=8, in_chans=1, num_frames=8,
    embed_dim=64, depth=4, num_heads=4, num_classes=8)``."""
    return _jointst(kw)
