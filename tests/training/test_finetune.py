"""The fine-tuning step of Algorithm 1 (`iared.training.finetune`): cross-entropy through the
network as it will run at inference, interpreters up to j greedy and the later ones keeping all."""

import torch
import torch.nn.functional as F

import iared
from iared.reduction.interpreter import IARedPolicy
from iared.training.finetune import finetune_step


def _model():
    torch.manual_seed(0)
    model = iared.create_model("vit_custom", img_size=32, patch_size=8, in_chans=1, num_classes=5,
                               embed_dim=16, depth=4, num_heads=2)
    iared.patch(model, IARedPolicy.for_model(model, groups=2))
    with torch.no_grad():  # interpreters that drop some tokens and keep others
        for p in model.policy.parameters():
            p.add_(torch.randn_like(p))
    return model


def test_finetune_step_is_cross_entropy_of_the_inference_network():
    model = _model()
    batch = {"image": torch.randn(6, 1, 32, 32), "label": torch.arange(6) % 5}
    out = finetune_step(model, batch, group=0, groups=2, label_smoothing=0.1)
    # the same network as inference runs it (dropped tokens removed, second interpreter off)
    logits, info = model(batch["image"], return_info=True, mode=["greedy", "all"], execution="compact")
    torch.testing.assert_close(out["output"], logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["loss"], F.cross_entropy(logits, batch["label"], label_smoothing=0.1),
                               atol=1e-5, rtol=1e-5)
    first, second = info.stages
    kept = first.keep.sum(1).float() / first.entering.sum(1).float()
    assert 0 < float(kept.mean()) < 1, "the test needs an interpreter that drops some tokens"
    assert abs(out["metrics"]["keep_greedy"] - float(kept.mean())) < 1e-6
    assert torch.equal(second.keep, second.entering)  # the later interpreter keeps every token
    acc = float((logits.argmax(-1) == batch["label"]).float().mean() * 100)
    assert abs(out["metrics"]["acc"] - acc) < 1e-6


def test_the_loss_reaches_the_blocks():
    model = _model()
    batch = {"image": torch.randn(4, 1, 32, 32), "label": torch.tensor([0, 1, 2, 3])}
    finetune_step(model, batch, group=1, groups=2)["loss"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.blocks[-1].parameters())
