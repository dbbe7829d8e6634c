"""Weight pruning against token dropping (IA-RED² paper, Fig. 5 "Is Data-level Redundancy
Orthogonal to the Model-level?"), without fine-tuning.

* Weight pruning: magnitude pruning (the smallest |w| set to 0) of the fully connected
  layers of the transformer blocks (qkv, proj, fc1, fc2), globally or per layer.
* Cost: the multiply-adds of those layers, where a layer with sparsity s costs (1 - s) of
  its dense count (the dense-equivalent reduction) and a block's layers run on the tokens
  entering that block. The x axis of Fig. 5 is the reduction of this count. Patch
  embedding, head, attention matmuls and the interpreters are not linear layers of the
  blocks and are left out, as in the paper's "FLOPs reduction ratio of all linear layers".
* Three curves: pruning ratio up (no token dropping), interpreter threshold up (no
  pruning), and the greedy combination: each step takes whichever of "next pruning ratio"
  or "next threshold" loses less accuracy.
"""

from __future__ import annotations

import copy
from typing import Any, Optional, Sequence

import torch
from torch import Tensor, nn

from .accuracy import accuracy


def prunable_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """The blocks' fully connected layers by name ("blocks.0.attn.qkv", ...), in order."""
    return {f"blocks.{i}.{n}": m for i, blk in enumerate(model.blocks)
            for n, m in blk.named_modules() if isinstance(m, nn.Linear)}


def magnitude_masks(weights: dict[str, Tensor], ratio: float, scope: str = "global") -> dict[str, Tensor]:
    """Keep masks that zero the `ratio` fraction of weights with the smallest magnitude.

    Args:
        weights: name -> weight tensor.
        ratio: fraction pruned, in [0, 1).
        scope: "global" (one threshold over all layers) or "layer" (each layer loses `ratio`).

    Returns:
        name -> bool mask (True = kept), same shapes. Ties at the threshold are broken by
        position, so exactly round(ratio * count) weights are pruned.
    """
    if not 0 <= ratio < 1:
        raise ValueError(f"pruning ratio must be in [0, 1), got {ratio}")
    if scope not in ("global", "layer"):
        raise ValueError(f"scope must be 'global' or 'layer', got {scope!r}")

    def prune(flat: Tensor) -> Tensor:
        k = int(round(ratio * flat.numel()))
        keep = torch.ones_like(flat, dtype=torch.bool)
        if k > 0:
            keep[flat.abs().argsort(stable=True)[:k]] = False
        return keep

    if scope == "layer":
        return {n: prune(w.detach().reshape(-1)).reshape(w.shape) for n, w in weights.items()}
    flat = torch.cat([w.detach().reshape(-1) for w in weights.values()])
    keep = prune(flat)
    out, start = {}, 0
    for n, w in weights.items():
        out[n] = keep[start:start + w.numel()].reshape(w.shape)
        start += w.numel()
    return out


def apply_masks(model: nn.Module, masks: dict[str, Tensor]) -> dict[str, float]:
    """Zero the masked weights of `model` in place; returns each layer's sparsity."""
    layers = prunable_linears(model)
    with torch.no_grad():
        for n, mask in masks.items():
            layers[n].weight.mul_(mask.to(layers[n].weight.dtype))
    return {n: 1.0 - float(m.float().mean()) for n, m in masks.items()}


def linear_macs(shapes: dict[str, tuple[int, int]], tokens: dict[str, float],
                sparsities: Optional[dict[str, float]] = None) -> float:
    """Dense-equivalent multiply-adds of linear layers.

    Args:
        shapes: name -> (in_features, out_features).
        tokens: name -> tokens the layer runs on (per image).
        sparsities: name -> fraction of zero weights (missing: 0).

    Returns:
        sum over layers of tokens * in * out * (1 - sparsity).
    """
    sp = sparsities or {}
    return float(sum(tokens[n] * i * o * (1.0 - sp.get(n, 0.0)) for n, (i, o) in shapes.items()))


def model_linear_macs(model: nn.Module, sparsities: Optional[dict[str, float]] = None,
                      block_tokens: Optional[Sequence[float]] = None) -> float:
    """`linear_macs` of a model's block linears.

    Args:
        model: a ViT of this package.
        sparsities: per-layer sparsity (see `apply_masks`); None = dense.
        block_tokens: mean tokens entering each block (prefix included), as in
            `ReductionInfo.block_tokens`; None = every token.
    """
    layers = prunable_linears(model)
    full = model.grid_size + getattr(model, "num_prefix_tokens", 1)
    shapes = {n: (m.in_features, m.out_features) for n, m in layers.items()}
    tokens = {n: float(full if block_tokens is None else block_tokens[int(n.split(".")[1])]) for n in layers}
    return linear_macs(shapes, tokens, sparsities)


@torch.inference_mode()
def evaluate_point(model: nn.Module, images: Tensor, labels: Tensor, batch_size: int = 256) -> tuple[float, list[float]]:
    """Top-1 (percent) and mean tokens entering each block, on in-memory images."""
    model.eval()
    correct, tokens = 0.0, []
    for i in range(0, images.shape[0], batch_size):
        logits, info = model(images[i:i + batch_size], return_info=True, execution="compact")
        correct += accuracy(logits, labels[i:i + batch_size], (1,))[0] * logits.shape[0] / 100.0
        tokens.append(info.block_tokens.double())
    return correct * 100.0 / images.shape[0], torch.cat(tokens).mean(dim=0).tolist()


class TradeoffRunner:
    """Evaluates (pruning ratio, threshold) points of one IA-RED² model, with a cache.

    Args:
        model: a model with an IA-RED² policy (`model.policy.threshold` is the knob).
        images, labels: the evaluation set, in memory.
        ratios: pruning ratios, increasing, the first normally 0.
        thresholds: interpreter thresholds, increasing; the first (e.g. 0.0) keeps every token.
        scope: magnitude pruning scope ("global" or "layer").
        batch_size: evaluation batch size.
    """

    def __init__(self, model: nn.Module, images: Tensor, labels: Tensor, ratios: Sequence[float],
                 thresholds: Sequence[float], scope: str = "global", batch_size: int = 256):
        self.model, self.images, self.labels = model, images, labels
        self.ratios, self.thresholds, self.batch_size = list(ratios), list(thresholds), batch_size
        weights = {n: m.weight for n, m in prunable_linears(model).items()}
        self.masks = [magnitude_masks(weights, r, scope) for r in self.ratios]
        self.dense = model_linear_macs(model)
        self.cache: dict[tuple[int, int], dict[str, Any]] = {}

    def point(self, i: int, j: int) -> dict[str, Any]:
        """Pruning ratio index i, threshold index j -> {ratio, threshold, top1, macs, reduction}."""
        if (i, j) not in self.cache:
            m = copy.deepcopy(self.model)
            sp = apply_masks(m, self.masks[i])
            m.policy.threshold = self.thresholds[j]
            top1, tokens = evaluate_point(m, self.images, self.labels, self.batch_size)
            macs = model_linear_macs(m, sp, tokens)
            self.cache[(i, j)] = {"ratio": self.ratios[i], "threshold": self.thresholds[j], "top1": top1,
                                  "linear_macs": macs, "reduction": 1.0 - macs / self.dense,
                                  "mean_block_tokens": tokens}
        return self.cache[(i, j)]

    def pruning_curve(self) -> list[dict[str, Any]]:
        """Pruning ratio up, threshold fixed at the first (keep-all) value."""
        return [self.point(i, 0) for i in range(len(self.ratios))]

    def token_curve(self) -> list[dict[str, Any]]:
        """Threshold up, no pruning."""
        return [self.point(0, j) for j in range(len(self.thresholds))]

    def greedy_curve(self, steps: Optional[int] = None) -> list[dict[str, Any]]:
        """From (0, 0), each step moves the knob whose next value loses less accuracy.

        Ties go to the larger FLOPs reduction. Stops when both knobs are at their last
        value (or after `steps` steps).
        """
        i = j = 0
        path = [{**self.point(0, 0), "step": "start"}]
        while steps is None or len(path) <= steps:
            cands = []
            if i + 1 < len(self.ratios):
                cands.append(("prune", i + 1, j))
            if j + 1 < len(self.thresholds):
                cands.append(("threshold", i, j + 1))
            if not cands:
                break
            kind, i, j = max(cands, key=lambda c: (self.point(c[1], c[2])["top1"],
                                                   self.point(c[1], c[2])["reduction"]))
            path.append({**self.point(i, j), "step": kind})
        return path
