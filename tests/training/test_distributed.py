"""Two processes on gloo: sharded data, averaged gradients, identical weights, rank 0 writes."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import iared

pytestmark = pytest.mark.slow  # each test launches torchrun with two ranks

ROOT = Path(__file__).resolve().parents[2]  # the repository

WORKER = textwrap.dedent('''
    import sys, torch
    import iared
    from torch.utils.data import Dataset
    from iared.training.curriculum import TrainOptions, build_stages
    from iared.training.distributed import broadcast_parameters, distributed
    from iared.training.loop import LoopOptions, run_stages

    class Synthetic(Dataset):
        """Class k: a bright 4x4 square in quadrant k, on noise."""
        def __len__(self):
            return 24
        def __getitem__(self, i):
            g = torch.Generator().manual_seed(i)
            x = torch.randn(1, 16, 16, generator=g) * 0.3
            k = i % 4
            x[0, (k // 2) * 8 + 2:(k // 2) * 8 + 6, (k % 2) * 8 + 2:(k % 2) * 8 + 6] += 2.0
            return {"image": x, "label": k}

    out = sys.argv[1]
    with distributed("cpu") as info:  # as `iared train` runs
        torch.manual_seed(100 + info.rank)   # different init per rank: rank 0's weights must be broadcast
        model = iared.create_model("vit_custom", img_size=16, patch_size=4, in_chans=1, num_classes=4,
                                   embed_dim=16, depth=2, num_heads=2)
        iared.patch(model, policy="iared", groups=2)
        broadcast_parameters(model, info)
        data = Synthetic()
        opts = TrainOptions(data="synthetic", checkpoint="none", out=out, groups=2, epochs=3, schedule=(1, 2),
                            lr=1e-3, batch_size=3)
        loop = LoopOptions(out=out, batch_size=3, limit_batches=2, seed=0, checkpoint_every=1, progress=False)
        history = run_stages(model, build_stages(model, data, opts), data, loop, dist_info=info)
        torch.save(model.state_dict(), f"{out}/rank{info.rank}.pt")
        # the evaluation's item count, one file per rank (a shared stdout can lose a rank's line)
        with open(f"{out}/val_n_rank{info.rank}.txt", "w") as f:
            f.write(str(history["stages"][0]["epochs"][0]["val"]["n"]))
''')


def _launch(args, tmp_path, timeout=240):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=tmp_path)


def test_two_ranks_end_with_identical_weights(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    out = tmp_path / "run"
    out.mkdir()
    r = _launch([str(script), str(out)], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    a = torch.load(out / "rank0.pt", weights_only=True)
    b = torch.load(out / "rank1.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the evaluation was sharded and summed: both ranks report the full 24 items
    assert [(out / f"val_n_rank{k}.txt").read_text() for k in (0, 1)] == ["24", "24"]
    # only rank 0 wrote checkpoints, and it did
    assert list((out / "checkpoints").glob("step-*.pt"))


def test_cli_train_under_torchrun(tmp_path):
    torch.manual_seed(0)
    model = iared.create_model("vit_custom", img_size=48, patch_size=8, in_chans=1, num_classes=10,
                               embed_dim=16, depth=2, num_heads=2)
    iared.save_model(model, tmp_path / "bb.safetensors", arch="vit_custom")
    r = _launch(["-m", "iared.cli", "train", "--data", "cluttered-digits", "--checkpoint",
                 str(tmp_path / "bb.safetensors"), "--groups", "1", "--out", str(tmp_path / "ia"), "--epochs", "2",
                 "--limit-batches", "1", "--batch-size", "4", "--val-size", "8", "--device", "cpu",
                 "--no-progress"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert iared.load_model(tmp_path / "ia" / "model.safetensors").policy.groups == 1


def test_user_errors_under_torchrun_are_one_line_from_rank_0(tmp_path):
    """Whether one rank (an --out that is a file: only rank 0 creates folders) or every rank
    (--groups that does not divide the depth) finds the mistake: one line, exit 2 on every
    rank, no rank left in a collective call, no traceback through our code."""
    torch.manual_seed(0)
    model = iared.create_model("vit_custom", img_size=48, patch_size=8, in_chans=1, num_classes=10,
                               embed_dim=16, depth=2, num_heads=2)
    iared.save_model(model, tmp_path / "bb.safetensors", arch="vit_custom")
    (tmp_path / "a_file").write_text("not a folder")
    base = ["-m", "iared.cli", "train", "--data", "cluttered-digits", "--checkpoint", str(tmp_path / "bb.safetensors"),
            "--epochs", "1", "--limit-batches", "1", "--batch-size", "4", "--val-size", "8", "--device", "cpu",
            "--no-progress"]
    for extra, says in ((["--groups", "1", "--out", str(tmp_path / "a_file")], "output folder"),
                        (["--groups", "3", "--out", str(tmp_path / "o")], "does not divide the backbone's depth"),
                        (["--groups", "1", "--out", str(tmp_path / "o"), "--workers", "-1"], "non-negative integer")):
        r = _launch(base + extra, tmp_path)
        assert r.returncode != 0
        ours = [line for line in r.stderr.splitlines() if line.startswith("iared train")]
        assert len(ours) == 1 and says in ours[0], r.stderr[-3000:]
        assert "exitcode  : 2" in r.stderr and "exitcode  : 1" not in r.stderr, r.stderr[-3000:]
        assert not any("/iared/" in line and line.strip().startswith("File ") for line in r.stderr.splitlines()), \
            r.stderr[-3000:]
    assert not (tmp_path / "o").exists()


CRASHING_RANK = textwrap.dedent('''
    from iared.training.distributed import agree, cleanup, init_distributed

    info = init_distributed("cpu")

    def prepare():
        if info.rank == 1:
            raise KeyError("a bug on rank 1")
        return "ready"

    try:
        agree(info, prepare)
    except Exception as e:
        with open(f"rank{info.rank}.txt", "w") as f:  # the cwd; one file per rank, not a shared stdout
            f.write(f"RAISED {type(e).__name__}: {e}")
    cleanup(info)
''')


def test_a_crash_on_one_rank_stops_every_rank(tmp_path):
    """A bug (not a user error) in one rank's set-up: that rank re-raises it, the others
    learn of it from `agree` instead of waiting for the rank forever."""
    script = tmp_path / "crash.py"
    script.write_text(CRASHING_RANK)
    r = _launch([str(script)], tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "rank1.txt").read_text() == "RAISED KeyError: 'a bug on rank 1'"
    assert (tmp_path / "rank0.txt").read_text() == \
        "RAISED RuntimeError: rank 1 failed while setting up: KeyError('a bug on rank 1')"
