"""Preprocessing that travels with the model: registry defaults, file metadata, loaders, eval."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

import iared
from iared.backbones.checkpoint import save_safetensors
from iared.cli import main
from iared.data import build_dataset
from iared.data.images import resize_center_crop
from iared.preprocess import PreprocessError, loader_options, parse, to_metadata

from helpers import labelled_photos


TIMM_META = {"input_size": "224", "crop_pct": "0.9", "architecture": "vit_tiny_patch16_224", "std": "0.5,0.5,0.5",
             "interpolation": "bicubic", "num_classes": "1000", "layout": "timm", "mean": "0.5,0.5,0.5"}


def test_parse_metadata_strings_and_round_trip():
    p = parse(TIMM_META)
    assert p == {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "input_size": (3, 224, 224), "crop_pct": 0.9,
                 "interpolation": "bicubic"}
    assert parse(to_metadata(p)) == p
    assert loader_options(p) == {"mean": (0.5,) * 3, "std": (0.5,) * 3, "crop_pct": 0.9, "interpolation": "bicubic",
                                 "img_size": 224}
    assert parse({"input_size": (1, 28, 28)})["input_size"] == (1, 28, 28)
    for bad in ({"crop_pct": "1.5"}, {"std": "0.5,0"}, {"interpolation": "cubic-ish"}, {"mean": "a,b"},
                {"crop_mode": "border"}):
        with pytest.raises(PreprocessError):
            parse(bad)


def test_registry_archs_carry_their_published_preprocessing():
    assert iared.create_model("vit_tiny_patch16_224").pretrained_cfg["crop_pct"] == 0.9
    deit = iared.create_model("deit_small_patch16_224", img_size=32)
    assert deit.pretrained_cfg["mean"] == (0.485, 0.456, 0.406) and deit.pretrained_cfg["input_size"] == (3, 32, 32)
    assert iared.create_model("deit_base_patch16_384", depth=1).pretrained_cfg["crop_pct"] == 1.0
    assert iared.create_model("vit_custom", img_size=16, patch_size=4, embed_dim=8, depth=1,
                              num_heads=2).pretrained_cfg == {}


def _small_tiny(**kw):
    return iared.create_model("vit_tiny_patch16_224", depth=1, **kw)


def test_load_pretrained_reads_the_file_metadata(tmp_path):
    m = _small_tiny()
    f = tmp_path / "w.safetensors"
    save_safetensors(m.state_dict(), f, metadata={**TIMM_META, "mean": "0.1,0.2,0.3", "crop_pct": "0.95"})
    loaded = iared.load_pretrained(_small_tiny(), f)
    assert loaded.pretrained_cfg["mean"] == (0.1, 0.2, 0.3) and loaded.pretrained_cfg["crop_pct"] == 0.95
    assert loaded.pretrained_cfg["std"] == (0.5, 0.5, 0.5)
    # A .pth has no metadata: the arch's defaults stay.
    torch.save(m.state_dict(), tmp_path / "w.pth")
    assert iared.load_pretrained(_small_tiny(), tmp_path / "w.pth").pretrained_cfg["mean"] == (0.5, 0.5, 0.5)
    save_safetensors(m.state_dict(), tmp_path / "bad.safetensors", metadata={"crop_pct": "2"})
    with pytest.raises(iared.CheckpointError, match="crop_pct"):
        iared.load_pretrained(_small_tiny(), tmp_path / "bad.safetensors")


def test_save_model_writes_it_and_load_model_restores_it(tmp_path):
    m = _small_tiny()
    m.pretrained_cfg["crop_pct"] = 0.8
    iared.save_model(m, tmp_path / "m.safetensors", arch="vit_tiny_patch16_224")
    back = iared.load_model(tmp_path / "m.safetensors")
    assert back.pretrained_cfg["crop_pct"] == 0.8 and back.pretrained_cfg["interpolation"] == "bicubic"
    # The data a model was trained on sets its normalisation.
    iared.save_model(m, tmp_path / "d.safetensors", arch="vit_tiny_patch16_224",
                     data={"mean": [0.2, 0.2, 0.2], "std": [0.3, 0.3, 0.3]})
    assert iared.load_model(tmp_path / "d.safetensors").pretrained_cfg["std"] == (0.3, 0.3, 0.3)


def test_loader_applies_a_models_preprocessing_and_flags_override(tmp_path):
    root = labelled_photos(tmp_path / "f", [0, 1])
    pre = {"input_size": (3, 32, 32), "mean": (0.5,) * 3, "std": (0.25,) * 3, "crop_pct": 0.9,
           "interpolation": "bilinear"}
    ds = build_dataset(f"imagefolder:{root}", "test", preprocess=pre)
    img = Image.open(root / "images" / "1.png").convert("RGB")
    want = (np.asarray(resize_center_crop(img, (32, 32), 0.9, "bilinear"), dtype=np.float32) / 255 - 0.5) / 0.25
    assert torch.allclose(ds[1]["image"], torch.from_numpy(want).permute(2, 0, 1), atol=1e-6)
    assert ds.info.img_size == (32, 32)
    assert build_dataset(f"imagefolder:{root}", "test", preprocess=pre, std=(1.0,) * 3).info.std == (1.0,) * 3
    # Generated data takes the normalisation only, never a resize.
    digits = build_dataset("cluttered-digits", "test", preprocess={**pre, "mean": (0.5,), "std": (0.25,)})
    assert digits.info.mean == (0.5,) and digits.info.img_size != (32, 32)


def test_eval_without_flags_on_a_timm_file(tmp_path, capsys):
    """A timm-layout safetensors file: arch and preprocessing from its metadata, labels a
    subset of its 1000 classes; an index outside the head is one line, exit 2."""
    torch.manual_seed(0)
    f = tmp_path / "vit.safetensors"
    save_safetensors(iared.create_model("vit_tiny_patch16_224").state_dict(), f, metadata={**TIMM_META})
    root = labelled_photos(tmp_path / "f", [5, 998])
    out = tmp_path / "e.json"
    assert main(["eval", "--data", f"imagefolder:{root}", "--checkpoint", str(f), "--methods", "original",
                 "--json", str(out), "--no-throughput", "--flops-images", "1"]) == 0
    got = json.loads(out.read_text())["methods"]["original"]
    assert got["n_images"] == 2
    capsys.readouterr()
    (root / "labels.tsv").write_text("file\tclass_index\nimages/0.png\t1000\n")
    assert main(["eval", "--data", f"imagefolder:{root}", "--checkpoint", str(f), "--methods", "original",
                 "--json", str(out), "--no-throughput"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "class index 1000, outside the model's head of 1000" in err[0]


def test_real_vit_tiny_file_carries_timms_transform(shared_dir):
    m = iared.load_pretrained(iared.create_model("vit_tiny_patch16_224"),
                              shared_dir / "models" / "vit_tiny_patch16_224_augreg_in1k.safetensors")
    assert parse(m.pretrained_cfg) == {**parse(TIMM_META), "crop_mode": "center"}
    ds = build_dataset(f"imagefolder:{shared_dir / 'data' / 'imagenet_val_subset'}", "test",
                       preprocess=m.pretrained_cfg)
    path = ds.files[0]
    img = Image.open(path).convert("RGB")
    w, h = img.size
    short = 248  # floor(224 / 0.9)
    nw, nh = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
    left, top = int(round((nw - 224) / 2)), int(round((nh - 224) / 2))
    want = np.asarray(img.resize((nw, nh), Image.BICUBIC).crop((left, top, left + 224, top + 224)), np.float32)
    want = torch.from_numpy((want / 255 - 0.5) / 0.5).permute(2, 0, 1)
    assert torch.allclose(ds[0]["image"], want, atol=1e-6)
