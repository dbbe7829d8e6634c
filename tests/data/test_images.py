"""`iared.data.images`: every odd file a person has decodes to clean 8-bit RGB/L, bad files raise
`ImageError` naming the file, and timm's resize and centre crop. All files are made here with Pillow."""

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from iared.data.images import ImageError, MAX_PIXELS, load_image, resize_center_crop, to_tensor


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
    with pytest.raises(ImageError, match="cannot read image .*File name too long"):  # is_file() raises
        load_image(tmp_path / ("x" * 300 + ".png"))


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
