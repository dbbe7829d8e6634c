"""Throughput measurement (`iared.evaluation.throughput`) on tiny models: nothing here is timed."""

from __future__ import annotations

import pytest
import torch

import iared
from iared.evaluation.throughput import measure_throughput

from helpers import tiny_video


TINY = "vit_tiny8_patch4_32"  # dim 8, depth 6, 64 patches: fast enough for tests


def test_measure_throughput_restores_mode_and_is_positive():
    model = iared.create_model(TINY)
    model.train()
    ips = measure_throughput(model, torch.randn(3, 3, 32, 32), warmup=1, repeats=2)
    assert ips > 0 and model.training
    with pytest.raises(ValueError):
        measure_throughput(model, torch.randn(1, 3, 32, 32), repeats=0)


def test_interleaved_throughput_times_every_model():
    from iared.evaluation.throughput import interleaved_throughput

    full, data = tiny_video()
    cut, _ = tiny_video("tempdiff", keep_ratio=0.25)
    clips = torch.stack([data[i]["video"][1] for i in range(4)])
    full.train()
    speeds = interleaved_throughput({"full": (full, {}), "cut": (cut, {})}, clips, warmup=1, repeats=3)
    assert set(speeds) == {"full", "cut"} and all(v > 0 for v in speeds.values())
    assert full.training  # modes are restored
