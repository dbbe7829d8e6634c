"""The fine-tuning task of the curriculum: cross-entropy through the pruned network.

After interpreter j is trained it is frozen, and the MSA-FFN blocks of groups j..D are
fine-tuned with cross-entropy (Algorithm 1, epochs 11-30 of each group).

Decision (the paper does not say): interpreters 1..j act *greedily* (keep I > 0.5) while
the blocks are fine-tuned, i.e. the blocks see exactly the token sets they will see at
inference; sampled sets would train them on a distribution inference never produces.
Interpreters after j keep every token, as in the REINFORCE stage. The network runs with
execution "mask" (dropped tokens stay in the tensor but are masked out of attention), so
shapes are fixed and per-image keep counts may differ within a batch.
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import nn

from .reinforce import group_modes


def finetune_step(model: nn.Module, batch: dict[str, Any], *, group: int, groups: int,
                  label_smoothing: float = 0.0) -> dict[str, Any]:
    """One cross-entropy step with interpreters 0..`group` greedy, later ones keeping all.

    Args:
        model: a backbone patched with an `IARedPolicy`.
        batch: {"image", "label"} on the model's device.
        group: index j of the group whose interpreter was just trained (0-based).
        groups: D.
        label_smoothing: passed to the cross-entropy.

    Returns:
        {"loss": scalar, "output": logits, "metrics": {name: float}}.
    """
    images, labels = batch["image"], batch["label"]
    logits, info = model(images, return_info=True, mode=group_modes(group, groups, "greedy"), execution="mask")
    loss = F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
    rec = info.stages[group]
    keep = rec.keep.sum(dim=1).float() / rec.entering.sum(dim=1).float().clamp_min(1)
    metrics = {
        "loss": float(loss.detach()),
        "acc": float((logits.argmax(-1) == labels).float().mean() * 100),
        "keep_greedy": float(keep.mean()),
    }
    return {"loss": loss, "output": logits, "metrics": metrics}
