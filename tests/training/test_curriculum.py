"""`iared train` (`iared.training.curriculum`) end to end on tiny models: the curriculum, bad input,
SIGKILL + resume, the agreement target, unlabeled photos, timm-layout files."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import iared
from iared.backbones.checkpoint import read_checkpoint
from iared.cli import main


ROOT = Path(__file__).resolve().parents[2]
DATA = "cluttered-digits"


def _train_args(backbone, out, *extra):
    return ["train", "--data", DATA, "--checkpoint", str(backbone), "--groups", "2", "--out", str(out),
            "--epochs", "3", "--schedule", "1:2", "--limit-batches", "2", "--batch-size", "4", "--val-size", "8",
            "--lr", "1e-3", "--device", "cpu", "--no-progress", *extra]


def test_train_curriculum_tiny(tmp_path, backbone):
    out = tmp_path / "ia"
    assert main(_train_args(backbone, out)) == 0
    model = iared.load_model(out / "model.safetensors")
    assert model.policy is not None and model.policy.groups == 2
    metrics = json.loads((out / "metrics.json").read_text())
    assert [s["stage"] for s in metrics["per_stage"]] == ["policy-1", "finetune-1", "policy-2", "finetune-2"]
    assert len(metrics["val"]["keep_ratio_per_group"]) == 2
    # frozen throughout: patch embedding, position embedding, class token; fine-tuned: the blocks
    before = read_checkpoint(backbone)
    after = read_checkpoint(out / "model.safetensors")
    for k in ("patch_embed.proj.weight", "pos_embed", "cls_token"):
        assert torch.equal(before[k], after[k]), k
    assert not torch.equal(before["blocks.1.mlp.fc1.weight"], after["blocks.1.mlp.fc1.weight"])


def test_no_finetune_leaves_backbone_untouched(tmp_path, backbone):
    out = tmp_path / "ia"
    assert main(_train_args(backbone, out, "--no-finetune")) == 0
    before, after = read_checkpoint(backbone), read_checkpoint(out / "model.safetensors")
    assert all(torch.equal(v, after[k]) for k, v in before.items())
    assert any(k.startswith("policy.") for k in after)


def test_sgd_optimizer_is_used(tmp_path, backbone, monkeypatch):
    from iared.training import loop

    made = []
    real = loop.make_optimizer
    monkeypatch.setattr(loop, "make_optimizer", lambda stage, params: made.append(real(stage, params)) or made[-1])
    assert main(_train_args(backbone, tmp_path / "ia", "--optimizer", "sgd")) == 0
    assert len(made) == 4 and all(isinstance(o, torch.optim.SGD) for o in made)
    assert all(g["momentum"] == 0.9 for o in made for g in o.param_groups)


@pytest.mark.parametrize("case", ["missing_data", "arch_mismatch", "groups", "unwritable", "no_backbone",
                                  "state_dict_wrong_arch"])
def test_bad_input_exit_2_before_training(tmp_path, backbone, capsys, case):
    out = tmp_path / "out"
    args = _train_args(backbone, out)
    if case == "missing_data":
        args[args.index("--data") + 1] = f"cifar10:{tmp_path / 'nope'}"
    elif case == "arch_mismatch":
        args += ["--arch", "deit_tiny_patch16_224"]
    elif case == "groups":
        args[args.index("--groups") + 1] = "3"
    elif case == "unwritable":
        (tmp_path / "file").write_text("x")
        out = tmp_path / "file" / "out"
        args[args.index("--out") + 1] = str(out)
    elif case == "no_backbone":
        args[args.index("--checkpoint") + 1] = str(tmp_path / "missing.safetensors")
    elif case == "state_dict_wrong_arch":
        sd_path = tmp_path / "sd.pth"
        torch.save(read_checkpoint(backbone), sd_path)
        args[args.index("--checkpoint") + 1] = str(sd_path)
        args += ["--arch", "vit_tiny8_patch4_32"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("iared train: error:"), err
    assert not (out / "checkpoints").exists()


def _cli(*args) -> list[str]:
    return [sys.executable, "-m", "iared.cli", *args]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}


@pytest.mark.slow
def test_sigkill_then_resume_gives_identical_weights(tmp_path, backbone):
    full, killed = tmp_path / "full", tmp_path / "killed"
    extra = ("--checkpoint-every", "1")
    ref = subprocess.Popen(_cli(*_train_args(backbone, full, *extra)), env=_env(), stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE)
    victim = subprocess.Popen(_cli(*_train_args(backbone, killed, *extra)), env=_env(), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    # 12 steps in all (2 + 4 + 2 + 4); kill inside finetune-1 once step 4 is on disk.
    deadline = time.time() + 300
    while time.time() < deadline and victim.poll() is None:
        ckpts = list((killed / "checkpoints").glob("step-*.pt")) if (killed / "checkpoints").exists() else []
        if any(int(p.stem.split("-")[1]) >= 4 for p in ckpts):
            break
        time.sleep(0.02)
    assert victim.poll() is None, "the run ended before it could be killed"
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    assert not (killed / "model.safetensors").exists()
    resumed = subprocess.run(_cli(*_train_args(backbone, killed, *extra), "--resume"), env=_env(),
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming at stage" in resumed.stderr
    assert ref.wait(timeout=300) == 0, ref.stderr.read()[-2000:]
    a, b = read_checkpoint(full / "model.safetensors"), read_checkpoint(killed / "model.safetensors")
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different


def test_starting_over_removes_the_earlier_runs_checkpoints(tmp_path, backbone, capfd):
    # A new run in the folder of an earlier one (no --resume) used to leave that run's checkpoints,
    # whose higher steps a later --resume took as the newest: it continued the earlier run.
    out = tmp_path / "ia"
    assert main(_train_args(backbone, out, "--checkpoint-every", "1", "--limit-batches", "4")) == 0  # more steps
    assert list((out / "checkpoints").glob("step-*.pt"))
    capfd.readouterr()
    assert main(_train_args(backbone, out, "--checkpoint-every", "1", "--seed", "1")) == 0
    assert "removed, starting over" in capfd.readouterr().err
    second = read_checkpoint(out / "model.safetensors")
    assert main(_train_args(backbone, out, "--checkpoint-every", "1", "--seed", "1", "--resume")) == 0
    assert "is complete: nothing left to train" in capfd.readouterr().err
    again = read_checkpoint(out / "model.safetensors")
    assert second.keys() == again.keys() and all(torch.equal(second[k], again[k]) for k in second)


def test_train_agreement_tiny(tmp_path, backbone):
    out = tmp_path / "ag"
    assert main(_train_args(backbone, out, "--target", "agreement", "--no-finetune")) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["options"]["target"] == "agreement"
    # validation measures agreement with the unreduced backbone: before training it is perfect
    assert metrics["backbone_val"]["top1"] == 100.0


def _photo_folder(root: Path, n: int = 12, size: int = 40) -> Path:
    from PIL import Image

    root.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        arr = (torch.rand(size, size + 8, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(arr).save(root / f"img{i:02d}.png")
    return root


def test_train_on_unlabeled_photos_needs_the_agreement_target(tmp_path, capsys):
    """A folder of images without classes: label-free training works, label training says why not."""
    torch.manual_seed(0)
    model = iared.create_model("vit_custom", img_size=32, patch_size=8, num_classes=5, embed_dim=16, depth=2,
                               num_heads=2)
    model.pretrained_cfg.update(input_size=(3, 32, 32), mean=(0.5,) * 3, std=(0.5,) * 3, crop_pct=1.0)
    iared.save_model(model, tmp_path / "bb.safetensors", arch="vit_custom")
    photos = _photo_folder(tmp_path / "photos")
    args = ["train", "--data", f"imagefolder:{photos}", "--checkpoint", str(tmp_path / "bb.safetensors"),
            "--groups", "2", "--epochs", "1", "--no-finetune", "--batch-size", "4", "--lr", "1e-3",
            "--device", "cpu", "--no-progress"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 2
    assert "has no labels: train with --target agreement" in capsys.readouterr().err
    assert main([*args, "--out", str(tmp_path / "b"), "--target", "agreement"]) == 0
    assert iared.load_model(tmp_path / "b" / "model.safetensors").policy.groups == 2


def test_train_from_a_timm_layout_file(tmp_path):
    """A timm-layout .safetensors names its architecture: no --arch, its preprocessing applies,
    and labels that index part of the head (classes.tsv) are fine."""
    from iared.backbones.checkpoint import save_safetensors
    from iared.training.curriculum import load_backbone

    torch.manual_seed(0)
    model = iared.create_model("vit_tiny_patch16_224", num_classes=20)
    save_safetensors(model.state_dict(), tmp_path / "timm.safetensors",
                     metadata={"architecture": "vit_tiny_patch16_224", "num_classes": "20", "mean": "0.5,0.5,0.5",
                               "std": "0.5,0.5,0.5", "input_size": "224", "crop_pct": "0.9"})
    root = tmp_path / "folder"
    for wnid in ("n1", "n2"):
        _photo_folder(root / wnid, n=6)
    (root / "classes.tsv").write_text("wnid\tclass_index\nn1\t3\nn2\t17\n")
    got, arch, _, train, val = load_backbone(str(tmp_path / "timm.safetensors"), None, f"imagefolder:{root}")
    assert arch == "vit_tiny_patch16_224" and train.info.mean == (0.5, 0.5, 0.5)
    assert {int(train[i]["label"]) for i in range(len(train))} <= {3, 17}
    assert torch.equal(got.head.weight, model.head.weight)
