"""Preprocessing that travels with the model: registry defaults, file metadata, loaders, eval."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

import iared
from iared.backbones.checkpoint import save_safetensors
from iared.cli import main
from iared.data import DataError, build_dataset
from iared.data.images import resize_center_crop
from iared.preprocess import PreprocessError, loader_options, parse, to_metadata

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


def test_resize_center_crop_by_hand():
    # 300 x 200 picture, 224 output, crop_pct 0.9: the short side becomes floor(224 / 0.9) = 248,
    # the long one int(248 * 300 / 200) = 372; the crop starts at round(148 / 2) = 74, round(24 / 2) = 12.
    a = np.random.default_rng(0).integers(0, 256, (200, 300, 3), dtype=np.uint8)
    img = Image.fromarray(a)
    for interpolation, flt in (("bicubic", Image.BICUBIC), ("bilinear", Image.BILINEAR)):
        want = np.asarray(img.resize((372, 248), flt).crop((74, 12, 298, 236)))
        got = np.asarray(resize_center_crop(img, (224, 224), 0.9, interpolation))
        assert np.array_equal(got, want)
    squash = np.asarray(resize_center_crop(img, (224, 224), 0.9, "bilinear", "squash"))
    assert np.array_equal(squash, np.asarray(img.resize((248, 248), Image.BILINEAR).crop((12, 12, 236, 236))))


def _photo_folder(root, labels):
    (root / "images").mkdir(parents=True)
    rows = ["file\tclass_index"]
    for i, y in enumerate(labels):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (40 + 7 * i, 56, 3), dtype=np.uint8)).save(
            root / "images" / f"{i}.png")
        rows.append(f"images/{i}.png\t{y}")
    (root / "labels.tsv").write_text("\n".join(rows) + "\n")
    return root


def test_loader_applies_a_models_preprocessing_and_flags_override(tmp_path):
    root = _photo_folder(tmp_path / "f", [0, 1])
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


def test_labels_tsv_indices_index_the_head_and_bad_rows_are_errors(tmp_path):
    root = _photo_folder(tmp_path / "f", [3, 998])
    ds = build_dataset(f"imagefolder:{root}", "test", img_size=16)
    assert ds.info.indexed and ds.info.num_classes == 999
    (root / "labels.tsv").write_text("file\tclass_index\nimages/0.png\t3\nimages/1.png\n")
    with pytest.raises(DataError, match="line 3"):
        build_dataset(f"imagefolder:{root}", "test", img_size=16)
    (root / "labels.tsv").write_text("images/0.png\t3\nimages/1.png\tcat\n")
    with pytest.raises(DataError, match="mixes class indices and names"):
        build_dataset(f"imagefolder:{root}", "test", img_size=16)


def test_classes_tsv_maps_folders_to_head_indices(tmp_path):
    for wnid in ("n02", "n01"):
        (tmp_path / "d" / "train" / wnid).mkdir(parents=True)
        Image.new("RGB", (20, 20)).save(tmp_path / "d" / "train" / wnid / "a.png")
    (tmp_path / "d" / "classes.tsv").write_text("wnid\tclass_index\tname\nn01\t7\tseven, 7\nn02\t3\tthree\n")
    ds = build_dataset(f"imagefolder:{tmp_path / 'd'}", "train", img_size=16, val_fraction=0.0)
    assert sorted(ds[i]["label"] for i in range(len(ds))) == [3, 7]
    assert ds.info.indexed and ds.info.num_classes == 8 and ds.info.class_names[7] == "seven"


def test_eval_without_flags_on_a_timm_file(tmp_path, capsys):
    """A timm-layout safetensors file: arch and preprocessing from its metadata, labels a
    subset of its 1000 classes; an index outside the head is one line, exit 2."""
    torch.manual_seed(0)
    f = tmp_path / "vit.safetensors"
    save_safetensors(iared.create_model("vit_tiny_patch16_224").state_dict(), f, metadata={**TIMM_META})
    root = _photo_folder(tmp_path / "f", [5, 998])
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


def test_model_file_with_bad_metadata_is_a_checkpoint_error(tmp_path):
    m = _small_tiny()
    for meta, says in (({"iared": "{not json"}, "not JSON"), ({"iared": '{"arch": 3}'}, "lacks the arch"),
                       ({"iared": '{"arch": "vit_custom", "config": {"avtn_scale": 1}}'}, "cannot build the model"),
                       ({"iared": '{"arch": "vit_nope", "config": {}}'}, "cannot build the model")):
        save_safetensors(m.state_dict(), tmp_path / "m.safetensors", metadata=meta)
        with pytest.raises(iared.CheckpointError, match=says):
            iared.load_model(tmp_path / "m.safetensors")
