"""benchmarks/block_times.py's schedule: the unreduced blocks at given token counts, nothing scored."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from iared.evaluation.flops import count_flops

from helpers import tiny_model

ROOT = Path(__file__).resolve().parents[1]


def _block_times():
    spec = importlib.util.spec_from_file_location("block_times", ROOT / "benchmarks" / "block_times.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_schedule_runs_the_blocks_at_the_given_counts():
    bt = _block_times()
    model = tiny_model(depth=4)
    image = torch.randn(1, 3, 32, 32)
    L = model.grid_size + 1
    with torch.inference_mode():
        torch.testing.assert_close(bt.run_schedule(model, image, [L] * 4), model(image), rtol=0, atol=0)
        seen = []
        hooks = [blk.register_forward_pre_hook(lambda _m, args: seen.append(args[0].x.shape[1]))
                 for blk in model.blocks]
        bt.run_schedule(model, image, [L, 40, 40, 9])
        for h in hooks:
            h.remove()
    assert seen == [L, 40, 40, 9]


def test_schedule_gflops_are_the_counted_flops_of_the_unreduced_model():
    bt = _block_times()
    model = tiny_model(depth=4)
    image = torch.randn(1, 3, 32, 32)
    L = model.grid_size + 1
    gflops = bt.schedule_gflops(model, image, {"original": [L] * 4, "half": [L, L, 33, 33]})
    assert abs(gflops["original"] - float(count_flops(model, image)[0]) / 1e9) < 1e-12
    assert 0 < gflops["half"] < gflops["original"]
