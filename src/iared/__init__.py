"""iared: faster and explainable vision transformers by dropping the patch tokens that do not matter.

    import iared
    model = iared.create_model("deit_small_patch16_224")
    iared.load_pretrained(model, "deit_small_patch16_224.pth")   # timm/DeiT checkpoints load as-is
    iared.patch(model, policy="iared", groups=3)                 # or "ats", "topk", "random", ...
    logits, info = model(images, return_info=True)               # info.stages[j].scores: heatmaps

    iared.patch(model, policy=iared.load_policy("iared_vit_tiny.safetensors"))  # trained interpreters
    iared.patch(model, "ats", budget=0.7)                        # every policy: one budget,
    model.policy.budget = 0.5                                    # settable after patching

    model = iared.patch(timm_or_hf_vit, policy="ats")            # a model you hold: converted (a new object)
    original = iared.unpatch(model)                              # and given back
"""

from . import reduction  # noqa: F401  (registers the token policies)
from .backbones import CheckpointError, ViTConfig, VisionTransformer, create_model, list_models, load_pretrained
from .models import load_model, load_policy, save_model, save_policy
from .patch import available_policies, patch, unpatch

__version__ = "0.1.0"

__all__ = [
    "CheckpointError", "ViTConfig", "VisionTransformer", "available_policies", "create_model", "list_models",
    "load_model", "load_policy", "load_pretrained", "patch", "save_model", "save_policy", "unpatch",
]
