"""`iared interpret`: outputs and their schema, odd and bad inputs, bad checkpoints, real photos and video."""

import io
import json
import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

import iared
from iared.backbones.checkpoint import save_safetensors
from iared.backbones.jointst import frame_maps
from iared.cli import main
from iared.commands.interpret import data_config, load_interpreter, output_names, prepare_image

from helpers import CLASSES, model_file, write_png


@pytest.fixture
def ckpt(tmp_path):
    return str(model_file(tmp_path / "model.safetensors"))


def _jpeg_bytes(size=(64, 48), seed=0, exif_orientation=None):
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")
    buf = io.BytesIO()
    if exif_orientation:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        img.save(buf, "JPEG", exif=exif.tobytes())
    else:
        img.save(buf, "JPEG")
    return buf.getvalue()


def _run(capsys, *argv):
    rc = main(["interpret", "--no-progress", "--device", "cpu", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _leftovers(root):
    return [p for p in root.rglob("*") if p.name.endswith(".tmp")]


# -- the happy path and the schema ---------------------------------------------------------


def test_outputs_and_scores_json_schema(tmp_path, ckpt, capsys):
    img = write_png(tmp_path / "photo.png", size=(50, 37))
    out = tmp_path / "out"
    rc, stdout, err = _run(capsys, "-p", img, "-o", str(out), "--checkpoint", ckpt)
    assert rc == 0, err
    assert err == ""
    d = out / "photo"
    assert sorted(p.name for p in d.iterdir()) == ["panel.png", "scores.json"]
    with Image.open(d / "panel.png") as im:
        assert im.format == "PNG"
    rec = json.loads((d / "scores.json").read_text())
    assert set(rec) >= {"input", "checkpoint", "kind", "grid_shape", "groups", "scores", "keep",
                        "keep_ratio_per_group", "keep_ratio", "prediction", "top5"}
    assert rec["kind"] == "image" and rec["grid_shape"] == [4, 4] and rec["groups"] == 3
    scores = np.array(rec["scores"])
    keep = np.array(rec["keep"]).astype(bool)
    assert scores.shape == (3, 4, 4) and keep.shape == (3, 4, 4)
    assert scores.min() >= 0.0 and scores.max() <= 1.0
    np.testing.assert_allclose(rec["keep_ratio_per_group"], keep.reshape(3, -1).mean(1))
    assert rec["keep_ratio"] == rec["keep_ratio_per_group"][-1]
    # Hierarchical: a token dropped in an earlier group scores 0 and stays dropped.
    for j in (1, 2):
        assert np.all(scores[j][~keep[j - 1]] == 0.0)
        assert not np.any(keep[j] & ~keep[j - 1])

    # The numbers are those of the model on the prepared input.
    model, cfg = load_interpreter(ckpt)
    x, _ = prepare_image(img, cfg)
    with torch.no_grad():
        logits, info = model(x[None], return_info=True)
    probs = logits.softmax(-1)[0]
    for j, stage in enumerate(info.stages):
        np.testing.assert_allclose(scores[j], stage.scores[0].reshape(4, 4).numpy(), atol=1e-5)
        np.testing.assert_array_equal(keep[j], stage.keep[0].reshape(4, 4).numpy())
    pred = rec["prediction"]
    assert pred["index"] == int(probs.argmax()) and pred["class"] == CLASSES[pred["index"]]
    assert pred["probability"] == pytest.approx(float(probs.max()), abs=1e-6)
    assert [t["index"] for t in rec["top5"]] == probs.argsort(descending=True).tolist()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["inputs"][0]["output"] == "photo"
    assert "photo.png" in stdout
    assert not _leftovers(out)


def test_odd_inputs_grayscale_rgba_aspect_exif(tmp_path, ckpt, capsys):
    paths = [write_png(tmp_path / "gray.png", (33, 90), "L"), write_png(tmp_path / "rgba.png", (64, 20), "RGBA"),
             write_png(tmp_path / "wide.png", (300, 7))]
    (tmp_path / "rot.jpg").write_bytes(_jpeg_bytes((60, 20), exif_orientation=6))
    paths.append(str(tmp_path / "rot.jpg"))
    out = tmp_path / "out"
    argv = [a for p in paths for a in ("-p", p)]
    rc, _, err = _run(capsys, *argv, "-o", str(out), "--checkpoint", ckpt)
    assert rc == 0, err
    for name in ("gray", "rgba", "wide", "rot"):
        rec = json.loads((out / name / "scores.json").read_text())
        assert np.array(rec["scores"]).shape == (3, 4, 4)


def test_grayscale_model_takes_colour_photos(tmp_path, capsys):
    ckpt = str(model_file(tmp_path / "g.safetensors", in_chans=1))
    model, cfg = load_interpreter(ckpt)
    x, shown = prepare_image(write_png(tmp_path / "c.png", (20, 50)), cfg)
    assert x.shape == (1, 16, 16) and shown.shape == (1, 16, 16)
    rc, _, err = _run(capsys, "-p", str(tmp_path / "c.png"), "-o", str(tmp_path / "o"), "--checkpoint", ckpt)
    assert rc == 0, err


def test_data_config_resize_rules(tmp_path):
    small = load_interpreter(str(model_file(tmp_path / "s.safetensors")))[1]
    assert small.resize == "resize" and small.img_size == (16, 16) and small.class_names == tuple(CLASSES)
    photo_data = {"kind": "imagefolder", "img_size": [16, 16], "in_chans": 3, "mean": [0.4] * 3, "std": [0.2] * 3}
    photo = load_interpreter(str(model_file(tmp_path / "p.safetensors", data=photo_data)))[1]
    assert photo.resize == "crop" and photo.crop_pct == 0.875 and photo.mean == (0.4,) * 3
    # No data config: the architecture's size and channels, ImageNet statistics, indices as names.
    model, bare = load_interpreter(str(model_file(tmp_path / "b.safetensors", data={})))
    assert bare.img_size == (16, 16) and bare.in_chans == 3 and bare.resize == "resize"
    assert bare.mean == (0.485, 0.456, 0.406) and bare.class_names == ()
    assert data_config({"data": {"img_size": [16, 16], "resize": "crop"}}, model).resize == "crop"
    # Whole-image resize keeps every pixel of a wide picture; crop cuts the sides away.
    img = np.zeros((16, 64, 3), dtype=np.uint8)
    img[:, :8] = 255                                             # a white band on the far left
    Image.fromarray(img).save(tmp_path / "band.png")
    _, shown_resize = prepare_image(str(tmp_path / "band.png"), small)
    _, shown_crop = prepare_image(str(tmp_path / "band.png"), photo)
    assert shown_resize[:, :, 0].mean() > 0.9 and shown_crop.max() < 0.1


def test_duplicate_stems_get_distinct_folders(tmp_path, ckpt, capsys):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    p1, p2 = write_png(tmp_path / "a" / "x.png", seed=1), write_png(tmp_path / "b" / "x.png", seed=2)
    out = tmp_path / "out"
    rc, _, err = _run(capsys, "-p", p1, "-p", p2, "-p", p1, "-o", str(out), "--checkpoint", ckpt)
    assert rc == 0, err
    assert {p.name for p in out.iterdir() if p.is_dir()} == {"x", "x_2", "x_3"}
    assert json.loads((out / "x_2" / "scores.json").read_text())["input"] == p2
    assert output_names(["a/X.png", "b/x.jpg", "c/odd name!.png", "d/.png"]) == ["X", "x_2", "odd_name", "png"]


# -- bad inputs ------------------------------------------------------------------------------


def test_bad_inputs_one_line_each_others_still_processed(tmp_path, ckpt, capsys):
    good = write_png(tmp_path / "good.png")
    text = tmp_path / "notes.jpg"
    text.write_text("this is not an image\n")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    trunc = tmp_path / "cut.jpg"
    trunc.write_bytes(_jpeg_bytes((256, 256))[:1500])
    missing = tmp_path / "missing.png"
    good2 = write_png(tmp_path / "good2.png", seed=5)
    bad = [str(text), str(empty), str(trunc), str(missing)]
    argv = [a for p in [good, *bad, good2] for a in ("-p", p)]
    out = tmp_path / "out"
    rc, _, err = _run(capsys, *argv, "-o", str(out), "--checkpoint", ckpt)
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == len(bad)
    for path, line in zip(bad, lines):
        assert path in line and line.startswith("iared interpret: error:")
        assert "Traceback" not in line
    assert {p.name for p in out.iterdir() if p.is_dir()} == {"good", "good2"}  # nothing for bad inputs
    summary = json.loads((out / "summary.json").read_text())["inputs"]
    assert [("error" in s) for s in summary] == [False, True, True, True, True, False]
    assert not _leftovers(out)


def test_video_file_with_an_image_model_is_a_bad_input(tmp_path, ckpt, capsys):
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(b"\x00\x00\x00\x18ftypmp42")
    rc, _, err = _run(capsys, "-p", str(clip), "-o", str(tmp_path / "o"), "--checkpoint", ckpt)
    assert rc == 2 and len(err.strip().splitlines()) == 1 and str(clip) in err


# -- bad checkpoints -------------------------------------------------------------------------


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _bad_checkpoints(tmp_path, ckpt):
    good = open(ckpt, "rb").read()
    (tmp_path / "trunc.safetensors").write_bytes(good[: len(good) // 2])
    marker = tmp_path / "pwned"
    for name in ("evil.safetensors", "evil.pt"):
        with open(tmp_path / name, "wb") as f:
            pickle.dump({"model": _Payload(marker)}, f)
    # Metadata that promises a deeper model than the weights hold.
    torch.manual_seed(0)
    small = iared.create_model("vit_custom", img_size=16, patch_size=4, in_chans=3, embed_dim=16, depth=2,
                               num_heads=2, num_classes=4)
    meta = json.loads(json.dumps({"format": 1, "arch": "vit_custom", "config": {**small.config.to_dict(), "depth": 3},
                                  "policy": {"name": "iared", "groups": 3, "num_heads": 2, "head_dim": 8,
                                             "threshold": 0.5}, "data": None, "extra": {}}))
    save_safetensors(small.state_dict(), tmp_path / "wrongarch.safetensors", metadata={"iared": json.dumps(meta)})
    save_safetensors(small.state_dict(), tmp_path / "unknownarch.safetensors",
                     metadata={"iared": json.dumps({**meta, "arch": "no_such_model"})})
    save_safetensors(small.state_dict(), tmp_path / "bare.safetensors")  # no iared metadata
    model_file(tmp_path / "nopolicy.safetensors", policy=False)
    names = ["trunc.safetensors", "evil.safetensors", "evil.pt", "wrongarch.safetensors",
             "unknownarch.safetensors", "bare.safetensors", "nopolicy.safetensors", "absent.safetensors"]
    return [tmp_path / n for n in names], marker


def test_bad_checkpoints_exit_2_with_one_line(tmp_path, ckpt, capsys):
    img = write_png(tmp_path / "img.png")
    bad, marker = _bad_checkpoints(tmp_path, ckpt)
    for path in bad:
        out = tmp_path / f"out_{path.stem}"
        rc, _, err = _run(capsys, "-p", img, "-o", str(out), "--checkpoint", str(path))
        assert rc == 2, path
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("iared interpret: error:"), (path, err)
        assert str(path) in lines[0]
        assert not out.exists() or not any(out.iterdir())
    assert not marker.exists()  # the pickle's code never ran


# -- real data (skipped without ../shared) ----------------------------------------------------


def test_real_photos_end_to_end(tmp_path, shared_dir, capsys):
    photos = sorted((shared_dir / "data" / "imagenet_val_subset" / "images").glob("*.JPEG"))[:4]
    assert photos
    words = (shared_dir / "data" / "imagenet_val_subset" / "synset_words.txt").read_text().splitlines()
    names = [w.split(" ", 1)[1].split(",")[0] for w in words]
    data = {"kind": "imagefolder", "img_size": [64, 64], "in_chans": 3, "mean": [0.485, 0.456, 0.406],
            "std": [0.229, 0.224, 0.225], "class_names": names, "num_classes": 1000}
    ckpt = str(model_file(tmp_path / "inet.safetensors", img_size=64, patch_size=8, num_classes=1000, data=data))
    out = tmp_path / "out"
    rc, _, err = _run(capsys, *[a for p in photos for a in ("-p", str(p))], "-o", str(out), "--checkpoint", ckpt)
    assert rc == 0, err
    for p in photos:
        rec = json.loads((out / p.stem / "scores.json").read_text())
        assert rec["grid_shape"] == [8, 8] and rec["prediction"]["class"] == names[rec["prediction"]["index"]]
        with Image.open(out / p.stem / "panel.png") as im:
            assert im.size[0] > 4 * im.size[1] // 2


def test_video_checkpoint_on_a_real_clip(tmp_path, shared_dir, capsys):
    clip = shared_dir / "data" / "video" / "kinetics400_demo_arm_wrestling.mp4"
    torch.manual_seed(0)
    model = iared.create_model("jointst_custom", img_size=32, patch_size=8, in_chans=3, num_frames=4, embed_dim=16,
                               depth=3, num_heads=2, num_classes=3)
    iared.patch(model, "iared", groups=3)
    ckpt = tmp_path / "video.safetensors"
    iared.save_model(model, ckpt, arch="jointst_custom",
                     data={"kind": "videofolder", "img_size": [32, 32], "in_chans": 3, "mean": [0.45] * 3,
                           "std": [0.225] * 3, "class_names": ["a", "b", "c"], "num_frames": 4})
    out = tmp_path / "out"
    rc, _, err = _run(capsys, "-p", str(clip), "-o", str(out), "--checkpoint", str(ckpt))
    assert rc == 0, err
    d = out / clip.stem
    assert sorted(p.name for p in d.iterdir()) == ["frames.png", "scores.json"]
    rec = json.loads((d / "scores.json").read_text())
    assert rec["kind"] == "video" and rec["grid_shape"] == [4, 4, 4]
    # Per-frame maps are the JointST grid (n * T + t) regrouped by frame.
    from iared.commands.interpret import prepare_video

    loaded, cfg = load_interpreter(str(ckpt))
    x, shown = prepare_video(str(clip), cfg)
    assert x.shape == (3, 4, 32, 32)
    with torch.no_grad():
        _, info = loaded(x[None], return_info=True)
    for j, stage in enumerate(info.stages):
        np.testing.assert_allclose(np.array(rec["scores"][j]), frame_maps(stage.scores, 4, (4, 4))[0].numpy(),
                                   atol=1e-5)
    # An image given to a video model is one bad input.
    img = write_png(tmp_path / "still.png")
    rc, _, err = _run(capsys, "-p", img, "-o", str(out), "--checkpoint", str(ckpt))
    assert rc == 2 and len(err.strip().splitlines()) == 1 and img in err


# -- a training-free policy on any backbone ------------------------------------------------


@pytest.mark.parametrize("method, heat", [("ats", True), ("topk@0.5", True), ("random@0.5", False)])
def test_method_interprets_a_plain_backbone(tmp_path, capsys, method, heat):
    plain = str(model_file(tmp_path / "plain.safetensors", policy=False))
    out = tmp_path / method
    rc, _, err = _run(capsys, "-p", write_png(tmp_path / "a.png"), "-o", str(out), "--checkpoint", plain,
                      "--method", method)
    assert rc == 0, err
    rec = json.loads((out / "a" / "scores.json").read_text())
    assert (rec["scores"] is not None) == heat
    assert rec["stage_blocks"] == ([1, 2] if method != "random@0.5" else [0])  # ATS: round(3*3/12).. of 3 blocks
    assert 0 < rec["keep_ratio"] <= 1 and (out / "a" / "panel.png").is_file()


def test_plain_backbone_without_method_or_with_a_bad_one_is_one_line(tmp_path, capsys):
    plain = str(model_file(tmp_path / "plain.safetensors", policy=False))
    image = write_png(tmp_path / "a.png")
    for extra, says in (([], "pass --method ats"), (["--method", "iared"], "one training-free policy"),
                        (["--method", "ats,topk"], "one training-free policy"),
                        (["--method", "ats@foo=1"], "ats has no setting 'foo'")):
        rc, _, err = _run(capsys, "-p", image, "-o", str(tmp_path / "o"), "--checkpoint", plain, *extra)
        assert rc == 2 and says in err and len(err.strip().splitlines()) == 1, err
