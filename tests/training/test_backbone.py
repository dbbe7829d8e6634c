"""`iared train-backbone` (`iared.training.backbone`) end to end on a tiny model: training, `--init`
from a model file, early errors that leave no output folder."""

import json

import pytest
import torch

import iared
from iared.backbones.checkpoint import read_checkpoint
from iared.cli import main


DATA = "cluttered-digits"


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


def test_train_backbone_overlap_and_val_every(tmp_path):
    out = tmp_path / "bb"
    rc = main(["train-backbone", "--data", DATA, "--arch", "vit_custom", "--out", str(out), "--embed-dim", "16",
               "--depth", "2", "--heads", "2", "--patch-size", "8", "--patch-overlap", "2", "--epochs", "3",
               "--limit-batches", "1", "--batch-size", "8", "--val-size", "8", "--val-every", "2", "--device", "cpu",
               "--no-progress"])
    assert rc == 0
    model = iared.load_model(out / "model.safetensors")
    assert model.config.patch_overlap == 2 and model.patch_embed.proj.kernel_size == (12, 12)
    epochs = json.loads((out / "metrics.json").read_text())["history"]["stages"][0]["epochs"]
    # validated after epoch 2 (every 2nd) and after the last, not after the first
    assert ["val" in e for e in epochs] == [False, True, True]


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
