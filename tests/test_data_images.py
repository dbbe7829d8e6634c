"""`load_image`: every odd file a person has decodes to clean 8-bit RGB/L; bad files raise
`ImageError` naming the file. All files are made here with Pillow."""

import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from iared.data.images import MAX_PIXELS, ImageError, load_image, resize_center_crop, to_tensor


def _save(img: Image.Image, path, **kw):
    img.save(path, **kw)
    return path


def test_rgb_roundtrip_png(tmp_path):
    a = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    p = _save(Image.fromarray(a), tmp_path / "x.png")
    out = load_image(p)
    assert out.mode == "RGB" and out.size == (7, 5)
    np.testing.assert_array_equal(np.asarray(out), a)


def test_grayscale_to_rgb_and_l(tmp_path):
    a = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    p = _save(Image.fromarray(a, "L"), tmp_path / "g.png")
    rgb = np.asarray(load_image(p, "RGB"))
    assert rgb.shape == (3, 4, 3)
    for c in range(3):
        np.testing.assert_array_equal(rgb[..., c], a)
    np.testing.assert_array_equal(np.asarray(load_image(p, "L")), a)


def test_rgba_composited_on_white_or_dropped(tmp_path):
    a = np.zeros((2, 2, 4), dtype=np.uint8)
    a[0, 0] = (255, 0, 0, 255)     # opaque red
    a[0, 1] = (0, 0, 255, 0)       # fully transparent blue
    a[1, 0] = (0, 0, 0, 128)       # half-transparent black
    a[1, 1] = (10, 20, 30, 255)
    p = _save(Image.fromarray(a, "RGBA"), tmp_path / "a.png")
    white = np.asarray(load_image(p, alpha="white")).astype(int)
    assert tuple(white[0, 0]) == (255, 0, 0)
    assert tuple(white[0, 1]) == (255, 255, 255)
    assert all(abs(v - 127) <= 1 for v in white[1, 0])   # half black over white
    assert tuple(white[1, 1]) == (10, 20, 30)
    dropped = np.asarray(load_image(p, alpha="drop"))
    assert tuple(dropped[0, 1]) == (0, 0, 255)


def test_palette_with_transparency(tmp_path):
    img = Image.new("P", (3, 1))
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    img.putdata([0, 1, 0])
    p = _save(img, tmp_path / "p.png", transparency=0)
    out = np.asarray(load_image(p))
    assert tuple(out[0, 0]) == (255, 255, 255) and tuple(out[0, 1]) == (255, 0, 0)


def test_cmyk_jpeg(tmp_path):
    img = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # no cyan, full magenta+yellow: red
    p = _save(img, tmp_path / "c.jpg", quality=95)
    out = np.asarray(load_image(p)).astype(int)
    assert out.shape == (8, 8, 3)
    r, g, b = out[4, 4]
    assert r > 200 and g < 60 and b < 60


def test_16bit_scaled_to_8bit(tmp_path):
    a = np.array([[0, 257, 65535, 32896]], dtype=np.uint16)
    p = _save(Image.fromarray(a), tmp_path / "d.png")  # 16-bit grayscale PNG
    assert Image.open(p).mode.startswith("I")
    np.testing.assert_array_equal(np.asarray(load_image(p, "L")), [[0, 1, 255, 128]])


def test_32bit_int_within_8bit_kept(tmp_path):
    a = np.array([[0, 17, 255]], dtype=np.int32)
    p = _save(Image.fromarray(a, "I"), tmp_path / "i.tif")
    np.testing.assert_array_equal(np.asarray(load_image(p, "L")), [[0, 17, 255]])


def test_exif_rotation_applied(tmp_path):
    a = np.zeros((2, 4, 3), dtype=np.uint8)  # wide image
    a[0, 0] = 255
    img = Image.fromarray(a)
    exif = img.getexif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    p = _save(img, tmp_path / "r.png", exif=exif.tobytes())
    out = load_image(p)
    assert out.size == (2, 4)  # now tall
    assert np.asarray(out)[0, 1].max() == 255  # top-left went to the top-right corner


def test_bytes_source():
    buf = io.BytesIO()
    Image.new("RGB", (3, 3), (1, 2, 3)).save(buf, "PNG")
    out = load_image(buf.getvalue(), name="zip:member.png")
    assert tuple(np.asarray(out)[1, 1]) == (1, 2, 3)


def test_missing_empty_not_image(tmp_path):
    with pytest.raises(ImageError, match="not found.*nope.png"):
        load_image(tmp_path / "nope.png")
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(ImageError, match="empty.*empty.jpg"):
        load_image(tmp_path / "empty.jpg")
    (tmp_path / "text.jpg").write_text("this is not an image\n")
    with pytest.raises(ImageError, match="not an image.*text.jpg"):
        load_image(tmp_path / "text.jpg")


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated(tmp_path, fmt):
    a = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, fmt)
    p = tmp_path / f"cut.{fmt.lower()}"
    p.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ImageError, match=f"cut.{fmt.lower()}") as e:
        load_image(p)
    assert "\n" not in str(e.value)


def _png_with_size(width: int, height: int) -> bytes:
    """A real 1x1 PNG whose header is rewritten to claim width x height (CRC fixed)."""
    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    ihdr = data[12:29]  # b"IHDR" + 13 bytes of fields
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    return bytes(data)


def test_too_large_refused_before_decoding(tmp_path):
    p = tmp_path / "huge.png"
    p.write_bytes(_png_with_size(8193, 8192))
    with pytest.raises(ImageError, match="too large.*huge.png"):
        load_image(p)
    # Beyond Pillow's own bomb limit too (its DecompressionBombError path).
    p.write_bytes(_png_with_size(20000, 20000))
    with pytest.raises(ImageError, match="too large.*huge.png"):
        load_image(p)
    # A smaller limit applies to an ordinary image.
    q = _save(Image.new("RGB", (10, 10)), tmp_path / "small.png")
    with pytest.raises(ImageError, match="too large"):
        load_image(q, max_pixels=99)
    assert MAX_PIXELS == 8192 * 8192


def test_resize_center_crop_and_to_tensor():
    img = Image.new("RGB", (400, 200))
    out = resize_center_crop(img, (224, 224))
    assert out.size == (224, 224)
    a = np.zeros((4, 6), dtype=np.uint8)
    a[:, 1:5] = 255  # the central 4x4 is white, the side columns black
    crop = resize_center_crop(Image.fromarray(a, "L"), (4, 4), crop_pct=1.0)
    np.testing.assert_array_equal(np.asarray(crop), 255)
    t = to_tensor(Image.fromarray(np.full((2, 3, 3), 255, np.uint8)))
    assert t.shape == (3, 2, 3) and float(t.max()) == 1.0


@pytest.mark.parametrize("size", [(227, 227), (500, 375), (333, 640), (249, 248)])
@pytest.mark.parametrize("crop_pct", [0.875, 0.9, 0.95])
def test_resize_center_crop_is_timms_eval_transform(size, crop_pct):
    # The same pixels as timm's eval transform (Resize + CenterCrop, bicubic): a checkpoint's
    # published accuracy is measured through it.
    timm_data = pytest.importorskip("timm.data")
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")
    ours = to_tensor(resize_center_crop(img, (224, 224), crop_pct=crop_pct))
    theirs = timm_data.create_transform(input_size=(3, 224, 224), interpolation="bicubic", crop_pct=crop_pct,
                                        mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))(img)
    assert ours.shape == theirs.shape == (3, 224, 224)
    assert (ours - theirs).abs().max().item() == 0.0


# -- segfolder: photos with masks ---------------------------------------------------------


def _segfolder(root, n=4, size=(60, 40), labels=False):
    from PIL import Image

    (root / "img").mkdir(parents=True)
    (root / "msk").mkdir()
    lines = ["image\tmask\tnote" + ("\tlabel" if labels else "")]
    for i in range(n):
        w, h = size
        Image.fromarray(np.full((h, w, 3), 40 * i, dtype=np.uint8)).save(root / "img" / f"{i}.png")
        m = np.zeros((h, w), dtype=np.uint8)
        m[:, : w // 2] = 7  # any non-zero value is foreground
        Image.fromarray(m).save(root / "msk" / f"{i}.png")
        lines.append(f"img/{i}.png\tmsk/{i}.png\tx" + (f"\t{i}" if labels else ""))
    (root / "masks.tsv").write_text("\n".join(lines) + "\n")
    return root


def test_segfolder_masks_follow_the_image_resize_and_crop(tmp_path):
    from iared.data import build_dataset
    from iared.data.images import resize_center_crop

    root = _segfolder(tmp_path / "seg")
    ds = build_dataset(f"segfolder:{root}", "test", preprocess={"input_size": (3, 32, 32), "crop_pct": 0.8})
    item = ds[0]
    assert item["image"].shape == (3, 32, 32) and item["mask"].dtype == torch.bool and item["label"] == -1
    # by hand: short side 40 -> 32 / 0.8 = 40, long 60; the centre 32x32 crop starts at x = 14
    mask = np.zeros((40, 60), dtype=bool)
    mask[:, :30] = True
    assert torch.equal(item["mask"], torch.from_numpy(mask[4:36, 14:46]))
    want = resize_center_crop(Image.open(root / "msk" / "0.png"), (32, 32), 0.8, "nearest")
    assert torch.equal(item["mask"], torch.from_numpy(np.asarray(want) > 0))
    assert ds.info.has_masks and ds.info.num_classes == 0


def test_segfolder_labels_and_bad_tables(tmp_path):
    from iared.data import DataError, build_dataset

    root = _segfolder(tmp_path / "seg", labels=True)
    ds = build_dataset(f"segfolder:{root}", "test")
    assert [ds[i]["label"] for i in range(4)] == [0, 1, 2, 3] and ds.info.num_classes == 4
    (root / "masks.tsv").write_text("picture\tmask\na.png\tb.png\n")
    with pytest.raises(DataError, match="columns image and mask"):
        build_dataset(f"segfolder:{root}", "test")
    with pytest.raises(DataError, match="no masks.tsv"):
        build_dataset(f"segfolder:{tmp_path}", "test")


def test_eval_segmentation_on_unlabeled_segfolder(tmp_path, capsys):
    import json

    import iared
    from iared.cli import main

    root = _segfolder(tmp_path / "seg")
    torch.manual_seed(0)
    m = iared.patch(iared.create_model("vit_custom", img_size=32, patch_size=8, embed_dim=16, depth=3, num_heads=2,
                                       num_classes=5), policy="iared", groups=3)
    m.pretrained_cfg.update(input_size=(3, 32, 32), crop_pct=1.0)
    iared.save_model(m, tmp_path / "m.safetensors", arch="vit_custom")
    out = tmp_path / "r.json"
    assert main(["eval", "--data", f"segfolder:{root}", "--checkpoint", str(tmp_path / "m.safetensors"),
                 "--segmentation", "--methods", "original,iared", "--json", str(out), "--no-throughput",
                 "--device", "cpu"]) == 0
    res = json.loads(out.read_text())
    assert res["methods"]["original"]["top1"] is None
    assert {"iared", "iared@group=0", "iared@group=2", "attention", "rollout", "gradcam", "chefer"} <= \
        set(res["segmentation"])
    assert "(no labels)" in capsys.readouterr().out
    # without --segmentation there is nothing to measure on unlabeled images
    assert main(["eval", "--data", f"segfolder:{root}", "--checkpoint", str(tmp_path / "m.safetensors"),
                 "--json", str(out), "--device", "cpu"]) == 2
    assert "has no labels" in capsys.readouterr().err
