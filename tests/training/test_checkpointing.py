"""Checkpoint files (`iared.training.checkpointing`): atomic writes, damaged and foreign files, RNG
state round trips."""

import random

import numpy as np
import pytest
import torch

from iared.training.checkpointing import (ResumeError, list_checkpoints, load_checkpoint, load_latest, rng_state,
                                          save_checkpoint, set_rng_state)


def test_checkpoints_atomic_keep_two_weights_only(tmp_path):
    for step in (5, 10, 15):
        save_checkpoint({"model": {"w": torch.full((2,), float(step))}, "position": {"step": step}}, tmp_path, step)
    files = list_checkpoints(tmp_path)
    assert [f.name for f in files] == ["step-00000010.pt", "step-00000015.pt"]
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.endswith(".tmp")]
    # plain containers only: loads with weights_only=True
    raw = torch.load(files[-1], weights_only=True)
    assert raw["position"] == {"step": 15}
    assert torch.equal(load_latest(tmp_path)["model"]["w"], torch.full((2,), 15.0))


def test_failed_or_killed_write_leaves_no_temporary_file(tmp_path):
    save_checkpoint({"x": torch.ones(3)}, tmp_path, 1)
    d = tmp_path / "checkpoints"
    with pytest.raises(Exception):
        save_checkpoint({"x": lambda: 0}, tmp_path, 2)          # torch.save cannot pickle a lambda
    assert sorted(p.name for p in d.iterdir()) == ["step-00000001.pt"]
    (d / ".step-00000002.pt.999999.tmp").write_bytes(b"half")   # what a SIGKILL mid-write leaves
    save_checkpoint({"x": torch.ones(3)}, tmp_path, 3)
    assert sorted(p.name for p in d.iterdir()) == ["step-00000001.pt", "step-00000003.pt"]


def test_damaged_checkpoint_clear_error_previous_kept(tmp_path):
    save_checkpoint({"x": torch.ones(3)}, tmp_path, 1)
    save_checkpoint({"x": torch.ones(1000)}, tmp_path, 2)
    newest = list_checkpoints(tmp_path)[-1]
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])   # truncated
    with pytest.raises(ResumeError, match="damaged or incomplete.*step-00000001.pt is intact"):
        load_latest(tmp_path)
    assert torch.equal(load_checkpoint(list_checkpoints(tmp_path)[0])["x"], torch.ones(3))


def test_foreign_file_is_refused(tmp_path):
    d = tmp_path / "checkpoints"
    d.mkdir()
    torch.save({"something": 1}, d / "step-00000003.pt")
    with pytest.raises(ResumeError, match="not an iared training checkpoint"):
        load_latest(tmp_path)
    assert load_latest(tmp_path / "nothing") is None


def test_rng_state_round_trip(tmp_path):
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    save_checkpoint({"rng": rng_state()}, tmp_path, 1)
    expected = (torch.rand(3), np.random.rand(3), random.random())
    set_rng_state(load_latest(tmp_path)["rng"])        # through a weights_only load
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], got[0]) and np.array_equal(expected[1], got[1]) and expected[2] == got[2]
