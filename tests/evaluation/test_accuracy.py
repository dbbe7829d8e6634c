"""`accuracy` by hand, and what `evaluate` counts (images, kept tokens)."""

import pytest
import torch

import iared
from iared.evaluation.accuracy import accuracy, evaluate

from helpers import TinyData, tiny_classifier


def test_accuracy_hand_worked():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1], [0.2, 0.3, 0.5], [0.5, 0.4, 0.1]])
    labels = torch.tensor([1, 1, 0, 2])
    # top-1: only the first is right; top-2: the second too; top-5 capped at 3 classes.
    assert accuracy(logits, labels, (1, 2, 5)) == [25.0, 50.0, 100.0]


def test_evaluate_counts_tokens():
    m = tiny_classifier()
    ds = TinyData("test", 0)
    loader = torch.utils.data.DataLoader(ds, batch_size=5)
    full = evaluate(m, loader)
    assert full["n"] == 12 and full["keep_ratio"] == 1.0 and full["token_ratio"] == 1.0
    logits = m(ds.x)
    assert full["top1"] == pytest.approx(accuracy(logits, ds.y)[0])
    iared.patch(m, policy="random", keep_ratio=0.5)
    half = evaluate(m, loader, limit_batches=2, collect_counts=True)
    assert half["n"] == 10 and half["keep_ratio"] == pytest.approx(0.5)
    assert half["stage_counts"][0].tolist() == [8] * 10
