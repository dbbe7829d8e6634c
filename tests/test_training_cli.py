"""`iared train-backbone` / `iared train` end to end on tiny models, bad input, SIGKILL + resume."""

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
from iared.cli import main
from iared.backbones.checkpoint import read_checkpoint

ROOT = Path(__file__).resolve().parents[1]
DATA = "cluttered-digits"


@pytest.fixture(scope="module")
def backbone(tmp_path_factory) -> Path:
    """A tiny random backbone model file for cluttered-digits (48x48, 1 channel, 10 classes)."""
    torch.manual_seed(0)
    model = iared.create_model("vit_custom", img_size=48, patch_size=8, in_chans=1, num_classes=10,
                               embed_dim=16, depth=2, num_heads=2)
    path = tmp_path_factory.mktemp("bb") / "backbone.safetensors"
    iared.save_model(model, path, arch="vit_custom", data={"spec": DATA})
    return path


def _train_args(backbone, out, *extra):
    return ["train", "--data", DATA, "--checkpoint", str(backbone), "--groups", "2", "--out", str(out),
            "--epochs", "3", "--schedule", "1:2", "--limit-batches", "2", "--batch-size", "4", "--val-size", "8",
            "--lr", "1e-3", "--device", "cpu", "--no-progress", *extra]


def test_train_backbone_tiny(tmp_path):
    out = tmp_path / "bb"
    rc = main(["train-backbone", "--data", DATA, "--arch", "vit_custom", "--out", str(out), "--embed-dim", "16",
               "--depth", "2", "--heads", "2", "--patch-size", "8", "--epochs", "1", "--limit-batches", "2",
               "--batch-size", "8", "--val-size", "8", "--clutter-ramp", "0", "--device", "cpu", "--no-progress"])
    assert rc == 0
    model = iared.load_model(out / "model.safetensors")
    assert model.config.embed_dim == 16 and model.config.num_classes == 10 and model.policy is None
    assert model.model_meta["data"]["kind"] == DATA
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0 <= metrics["val"]["top1"] <= 100 and metrics["history"]["stages"][0]["epochs"][0]["steps"] == 2


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


def test_train_backbone_init_from_model_file(tmp_path, backbone, capsys):
    common = ["train-backbone", "--data", DATA, "--arch", "vit_custom", "--embed-dim", "16", "--depth", "2",
              "--heads", "2", "--epochs", "1", "--limit-batches", "1", "--batch-size", "4", "--val-size", "4",
              "--lr", "1e-9", "--device", "cpu", "--no-progress", "--init", str(backbone)]
    assert main(common + ["--out", str(tmp_path / "a"), "--patch-size", "8"]) == 0
    before, after = read_checkpoint(backbone), read_checkpoint(tmp_path / "a" / "model.safetensors")
    assert torch.allclose(before["pos_embed"], after["pos_embed"], atol=1e-6)   # started from the file
    # another patch size does not fit the file: one-line error, exit 2
    assert main(common + ["--out", str(tmp_path / "b"), "--patch-size", "4"]) == 2
    assert "does not fit" in capsys.readouterr().err


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


@pytest.mark.parametrize("case", ["bad_data", "unknown_arch", "truncated_init"])
def test_train_backbone_early_error_leaves_no_out_folder(tmp_path, capsys, case):
    out = tmp_path / "out"
    args = ["train-backbone", "--data", DATA, "--arch", "vit_custom", "--out", str(out), "--embed-dim", "16",
            "--depth", "2", "--heads", "2", "--epochs", "1", "--limit-batches", "1", "--no-progress"]
    if case == "bad_data":
        args[args.index("--data") + 1] = f"imagefolder:{tmp_path / 'nope'}"
    elif case == "unknown_arch":
        args[args.index("--arch") + 1] = "vit_nope"
    else:
        (tmp_path / "init.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
        args += ["--init", str(tmp_path / "init.safetensors")]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("iared train-backbone: error:"), err
    assert not out.exists()


@pytest.mark.parametrize("command", ["train-backbone", "eval"])
def test_negative_workers_is_a_usage_error(command, capsys):
    argv = {"train-backbone": ["train-backbone", "--data", DATA, "--arch", "vit_custom", "--out", "x"],
            "eval": ["eval", "--data", DATA, "--checkpoint", "c", "--json", "j"]}[command]
    with pytest.raises(SystemExit) as e:
        main(argv + ["--workers", "-1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "--workers: expected a non-negative integer" in err[0], err


def test_agreement_target_relabels_with_the_unreduced_backbone(tmp_path, backbone):
    from iared.training.setup import relabel, with_teacher_labels
    from iared.training.curriculum import load_backbone

    model, _, _, _, val = load_backbone(str(backbone), None, DATA)
    labelled = relabel(val, model, limit=6, batch_size=4)
    assert len(labelled) == 6
    images = torch.stack([val[i]["image"] for i in range(6)])
    assert [labelled[i]["label"] for i in range(6)] == model(images).argmax(-1).tolist()
    seen = {}
    step = with_teacher_labels(model)(lambda m, b, g: seen.update(b) or {})
    step(None, {"image": images, "label": torch.full((6,), -1)}, None)
    assert seen["label"].tolist() == model(images).argmax(-1).tolist()


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
