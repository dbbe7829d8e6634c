"""Backbones with timm's state-dict layout, a name registry, and safe checkpoint loading."""

from .checkpoint import CheckpointError, load_pretrained, read_checkpoint, resample_pos_embed
from .registry import create_model, list_models, register_model
from . import jointst  # noqa: E402,F401  (registers the JointST video models)
from .vit import Block, ReductionInfo, StageRecord, ViTConfig, VisionTransformer

__all__ = [
    "Block", "CheckpointError", "ReductionInfo", "StageRecord", "ViTConfig", "VisionTransformer",
    "create_model", "list_models", "load_pretrained", "read_checkpoint", "register_model", "resample_pos_embed",
]
