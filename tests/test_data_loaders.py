"""File-based loaders (idx, cifar10 folder/zip, imagefolder) and `build_dataset`, on tiny
files written here, plus the real shared data when ../shared is present."""

import collections
import gzip
import logging
import pickle
import struct
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from iared.data import (DATASETS, DataError, ImageError, build_dataset, carve_split, parse_data_spec,
                        register_dataset, scan)
from iared.data.idx import read_idx

# ----------------------------------------------------------------------------- helpers


def write_idx(path, array: np.ndarray, gz: bool = True) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if gz:
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


def make_idx_dir(root, n_train=50, n_test=20, gz=True, with_train_images=True):
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    sfx = ".gz" if gz else ""
    sets = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        if prefix != "train" or with_train_images:
            write_idx(root / f"{prefix}-images-idx3-ubyte{sfx}", images, gz)
        write_idx(root / f"{prefix}-labels-idx1-ubyte{sfx}", labels, gz)
        sets[prefix] = (images, labels)
    return sets


def _jpeg_bytes(color, size=(32, 32)) -> bytes:
    import io
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "JPEG", quality=95)
    return buf.getvalue()


CLASSES = ("cat", "dog", "frog")


def make_cifar_zip(path, split="test", per_class=4, root="cifar10_jpg"):
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{root}/{split}/", b"")
        for c, cls in enumerate(CLASSES):
            for i in range(per_class):
                zf.writestr(f"{root}/{split}/{cls}/{i:04d}.jpg", _jpeg_bytes((80 * c, 10 * i, 0)))
    return path


def make_cifar_folder(root, split="test", per_class=4):
    for c, cls in enumerate(CLASSES):
        (root / split / cls).mkdir(parents=True)
        for i in range(per_class):
            (root / split / cls / f"{i:04d}.jpg").write_bytes(_jpeg_bytes((80 * c, 10 * i, 0)))
    return root


# ------------------------------------------------------------------------------- specs


def test_parse_data_spec():
    assert parse_data_spec("cluttered-digits") == ("cluttered-digits", None)
    assert parse_data_spec("cifar10:/a/b:c.zip") == ("cifar10", "/a/b:c.zip")
    assert parse_data_spec("CIFAR10:x") == ("cifar10", "x")
    for bad in ("", ":x", "cifar10:"):
        with pytest.raises(DataError):
            parse_data_spec(bad)


@pytest.mark.parametrize("spec,match", [
    ("nosuchkind", "unknown data kind"),
    ("mnist", "needs a path"),
    ("cifar10:/definitely/not/here", "does not exist"),
    ("imagefolder:/definitely/not/here", "not a directory"),
    ("cluttered-digits:/x", "takes no path"),
])
def test_build_dataset_errors_are_one_line(spec, match):
    with pytest.raises(DataError, match=match) as e:
        build_dataset(spec, "test")
    assert "\n" not in str(e.value)


def test_data_errors_are_user_errors():
    from iared.errors import UserError  # what the CLI turns into one line and exit code 2
    assert issubclass(DataError, UserError) and issubclass(ImageError, DataError)


def test_unknown_split_and_empty_folder(tmp_path):
    with pytest.raises(DataError, match="unknown split"):
        build_dataset("cluttered-digits", "training")
    with pytest.raises(DataError, match="no images"):
        build_dataset(f"imagefolder:{tmp_path}", "test")


def test_registry_is_extensible():
    def builder(path, split, seed, **kw):
        return [path, split, seed, kw]
    register_dataset("toy-kind", builder)
    try:
        assert build_dataset("toy-kind:p", "val", 3, a=1) == ["p", "val", 3, {"a": 1}]
    finally:
        DATASETS.pop("toy-kind")


def test_carve_split_partitions():
    tr, va = carve_split(100, "train", 0, 10), carve_split(100, "val", 0, 10)
    assert len(va) == 10 and len(tr) == 90
    assert sorted(np.concatenate([tr, va]).tolist()) == list(range(100))
    np.testing.assert_array_equal(va, carve_split(100, "val", 0, 10))
    assert not np.array_equal(va, carve_split(100, "val", 1, 10))


# --------------------------------------------------------------------------------- idx


@pytest.mark.parametrize("gz", [True, False])
def test_idx_dataset(tmp_path, gz):
    sets = make_idx_dir(tmp_path / "m", gz=gz)
    ds = build_dataset(f"mnist:{tmp_path / 'm'}", "test")
    assert len(ds) == 20 and ds.info.img_size == (28, 28) and ds.info.in_chans == 1
    item = ds[3]
    assert item["image"].shape == (1, 28, 28) and item["image"].dtype == torch.float32
    assert item["label"] == 3 and "mask" not in item
    expect = (sets["t10k"][0][3] / 255.0 - ds.info.mean[0]) / ds.info.std[0]
    np.testing.assert_allclose(item["image"][0].numpy(), expect, rtol=1e-5, atol=1e-5)
    tr = build_dataset(f"mnist:{tmp_path / 'm'}", "train", val_size=5)
    va = build_dataset(f"mnist:{tmp_path / 'm'}", "val", val_size=5)
    assert len(tr) == 45 and len(va) == 5
    # train and val images are disjoint rows of the 50 training images
    rows = {im.tobytes() for im in sets["train"][0]}
    seen = [im.tobytes() for im in np.concatenate([tr.images, va.images])]
    assert set(seen) == rows and len(seen) == 50


def test_idx_missing_train_images_named_but_test_works(tmp_path):
    make_idx_dir(tmp_path / "m", with_train_images=False)
    with pytest.raises(DataError, match="train-images-idx3-ubyte"):
        build_dataset(f"mnist:{tmp_path / 'm'}", "train")
    with pytest.raises(DataError, match="train-images-idx3-ubyte"):
        build_dataset(f"mnist:{tmp_path / 'm'}", "val")
    assert len(build_dataset(f"mnist:{tmp_path / 'm'}", "test")) == 20


def test_read_idx_rejects_bad_files(tmp_path):
    (tmp_path / "junk").write_bytes(b"\x01\x02\x03\x04hello")
    with pytest.raises(DataError, match="not an idx file"):
        read_idx(tmp_path / "junk")
    write_idx(tmp_path / "ok", np.zeros((3, 2, 2), np.uint8), gz=False)
    (tmp_path / "cut").write_bytes((tmp_path / "ok").read_bytes()[:-3])
    with pytest.raises(DataError, match="cut"):
        read_idx(tmp_path / "cut")


def test_fashion_mnist_class_names(tmp_path):
    make_idx_dir(tmp_path / "f")
    ds = build_dataset(f"fashion-mnist:{tmp_path / 'f'}", "test")
    assert ds.info.class_names[0] == "T-shirt/top" and ds.info.num_classes == 10


def test_fashion_mnist_default_system_dir(tmp_path, monkeypatch):
    import iared.data.idx as idx
    monkeypatch.setattr(idx, "FASHION_MNIST_SYSTEM_DIR", str(tmp_path / "none"))
    with pytest.raises(DataError, match="fashion-mnist:DIR"):
        build_dataset("fashion-mnist", "test")
    make_idx_dir(tmp_path / "sys")  # stands in for the Debian package's folder
    monkeypatch.setattr(idx, "FASHION_MNIST_SYSTEM_DIR", str(tmp_path / "sys"))
    assert len(build_dataset("fashion-mnist", "test")) == 20
    assert len(build_dataset("cluttered-fashion", "test")) == 20


# ------------------------------------------------------------------------------ cifar10


def test_cifar10_zip_single_and_folder_of_zips(tmp_path):
    z = make_cifar_zip(tmp_path / "cifar10_jpg_test.zip")
    make_cifar_zip(tmp_path / "cifar10_jpg_train.zip", split="train", per_class=10)
    ds = build_dataset(f"cifar10:{z}", "test")
    assert len(ds) == 12 and ds.info.class_names == CLASSES and ds.info.num_classes == 3
    assert ds.zip_path == str(z)
    item = ds[5]
    assert item["image"].shape == (3, 32, 32) and item["label"] == 1
    tr = build_dataset(f"cifar10:{tmp_path}", "train")
    va = build_dataset(f"cifar10:{tmp_path}", "val")
    assert tr.zip_path.endswith("train.zip") and len(tr) == 27 and len(va) == 3
    assert not set(tr.files) & set(va.files)
    with pytest.raises(DataError, match="no 'train/<class>/<image>' entries"):
        build_dataset(f"cifar10:{z}", "train")


def test_cifar10_zip_handle_reopened_after_pickle(tmp_path):
    ds = build_dataset(f"cifar10:{make_cifar_zip(tmp_path / 'c.zip')}", "test")
    first = ds[0]["image"]
    clone = pickle.loads(pickle.dumps(ds))  # what a spawned DataLoader worker receives
    assert clone._zf is None
    torch.testing.assert_close(clone[0]["image"], first)


def test_cifar10_folder_matches_zip(tmp_path):
    make_cifar_folder(tmp_path / "folder")
    fds = build_dataset(f"cifar10:{tmp_path / 'folder'}", "test")
    zds = build_dataset(f"cifar10:{make_cifar_zip(tmp_path / 'c.zip')}", "test")
    assert len(fds) == len(zds) == 12 and fds.zip_path is None
    for i in (0, 7, 11):
        assert fds[i]["label"] == zds[i]["label"]
        torch.testing.assert_close(fds[i]["image"], zds[i]["image"])


def test_cifar10_mean_std_override_and_resize(tmp_path):
    z = make_cifar_zip(tmp_path / "c.zip")
    raw = build_dataset(f"cifar10:{z}", "test", mean=(0, 0, 0), std=(1, 1, 1), img_size=16)
    x = raw[0]["image"]
    assert x.shape == (3, 16, 16) and 0.0 <= float(x.min()) and float(x.max()) <= 1.0


# -------------------------------------------------------------------------- imagefolder


def make_flat_folder(root, n=6):
    (root / "images").mkdir(parents=True)
    rows = ["file\tclass_index"]
    for i in range(n):
        Image.new("RGB", (60 + 10 * i, 40), (i * 30, 0, 0)).save(root / "images" / f"im{i}.JPEG")
        rows.append(f"images/im{i}.JPEG\t{i % 3}")
    (root / "labels.tsv").write_text("\n".join(rows) + "\n")
    (root / "synset_words.txt").write_text("n0001 alpha, a\nn0002 beta\nn0003 gamma, g\nn0004 delta\n")
    return root


def test_imagefolder_labels_tsv(tmp_path):
    root = make_flat_folder(tmp_path / "flat")
    ds = build_dataset(f"imagefolder:{root}", "test", img_size=32)
    assert len(ds) == 6 and ds.info.num_classes == 4
    assert ds.info.class_names[:3] == ("alpha", "beta", "gamma")
    assert [ds[i]["label"] for i in range(6)] == [0, 1, 2, 0, 1, 2]
    assert ds[5]["image"].shape == (3, 32, 32)  # odd-sized 110x40 -> resize + centre crop
    tr = build_dataset(f"imagefolder:{root}", "train", img_size=32, val_fraction=0.34)
    va = build_dataset(f"imagefolder:{root}", "val", img_size=32, val_fraction=0.34)
    assert len(tr) + len(va) == 6 and not set(tr.files) & set(va.files)


def test_imagefolder_class_dirs_and_split_dirs(tmp_path):
    for split in ("train", "val"):
        for c, cls in enumerate(("n02", "n01")):
            (tmp_path / "in" / split / cls).mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (50, 50), (c * 200, 0, 0)).save(tmp_path / "in" / split / cls / f"{i}.JPEG")
    ds = build_dataset(f"imagefolder:{tmp_path / 'in'}", "val", img_size=24)
    assert ds.info.class_names == ("n01", "n02") and len(ds) == 4
    assert [ds[i]["label"] for i in range(4)] == [0, 0, 1, 1]
    with pytest.raises(DataError, match="no test/ folder"):
        build_dataset(f"imagefolder:{tmp_path / 'in'}", "test")
    # one set of class folders (no split folders): test is everything
    flat = build_dataset(f"imagefolder:{tmp_path / 'in' / 'train'}", "test", img_size=24)
    assert len(flat) == 4 and flat.info.num_classes == 2


# ----------------------------------------------------------------------- bad files


def _folder_with_bad_files(root):
    (root / "a").mkdir(parents=True)
    Image.new("RGB", (8, 8), (255, 0, 0)).save(root / "a" / "0_good.png")
    (root / "a" / "1_empty.png").write_bytes(b"")
    (root / "a" / "2_text.jpg").write_text("not an image")
    Image.new("RGB", (8, 8), (0, 255, 0)).save(root / "a" / "3_good.png")
    (root / "a" / "notes.txt").write_text("ignored: not an image extension")
    return root


def test_bad_file_raises_naming_it_by_default(tmp_path):
    ds = build_dataset(f"imagefolder:{_folder_with_bad_files(tmp_path / 'd')}", "test", img_size=8)
    assert len(ds) == 4
    ds[0]
    with pytest.raises(ImageError, match="1_empty.png"):
        ds[1]


def test_skip_bad_warns_and_returns_next_good(tmp_path, caplog):
    ds = build_dataset(f"imagefolder:{_folder_with_bad_files(tmp_path / 'd')}", "test", img_size=8,
                       skip_bad=True, mean=(0, 0, 0), std=(1, 1, 1))
    with caplog.at_level(logging.WARNING):
        item = ds[1]
    assert float(item["image"][1].mean()) == pytest.approx(1.0)  # the green 3_good.png
    assert "1_empty.png" in caplog.text and "2_text.jpg" in caplog.text


def test_scan_lists_bad_files(tmp_path):
    ds = build_dataset(f"imagefolder:{_folder_with_bad_files(tmp_path / 'd')}", "test", img_size=8)
    bad = scan(ds)
    assert [(i, name.rsplit("/", 1)[-1]) for i, name, _ in bad] == [(1, "1_empty.png"), (2, "2_text.jpg")]
    assert "empty" in bad[0][2] and "not an image" in bad[1][2]


def test_corrupt_zip_member_is_an_image_error(tmp_path):
    z = tmp_path / "c.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("r/test/cat/0.jpg", _jpeg_bytes((1, 2, 3)))
        zf.writestr("r/test/cat/1.jpg", _jpeg_bytes((1, 2, 3))[:100])  # truncated JPEG
    ds = build_dataset(f"cifar10:{z}", "test")
    assert [i for i, _, _ in scan(ds)] == [1]
    with pytest.raises(ImageError, match="1.jpg"):
        ds[1]


# ----------------------------------------------------------------- the real shared data


def test_shared_fashion_mnist(shared_dir):
    ds = build_dataset(f"fashion-mnist:{shared_dir / 'data' / 'fashion_mnist'}", "test")
    assert len(ds) == 10000
    assert collections.Counter(ds.labels.tolist()) == {c: 1000 for c in range(10)}
    assert len(build_dataset(f"fashion-mnist:{shared_dir / 'data' / 'fashion_mnist'}", "val")) == 6000


def test_shared_mnist_lacks_train_images(shared_dir):
    spec = f"mnist:{shared_dir / 'data' / 'mnist'}"
    assert len(build_dataset(spec, "test")) == 10000
    with pytest.raises(DataError, match="train-images-idx3-ubyte"):
        build_dataset(spec, "train")


def test_shared_cifar10_zip(shared_dir):
    folder = shared_dir / "data" / "cifar10_jpg"
    ds = build_dataset(f"cifar10:{folder}", "test")
    assert len(ds) == 10000 and ds.info.num_classes == 10
    assert ds.info.class_names[0] == "airplane" and ds.info.class_names[-1] == "truck"
    assert collections.Counter(ds.labels.tolist()) == {c: 1000 for c in range(10)}
    assert ds[9999]["image"].shape == (3, 32, 32) and ds[9999]["label"] == 9
    assert len(build_dataset(f"cifar10:{folder / 'cifar10_jpg_test.zip'}", "test")) == 10000


def test_shared_imagenet_val_subset(shared_dir):
    ds = build_dataset(f"imagefolder:{shared_dir / 'data' / 'imagenet_val_subset'}", "test")
    assert len(ds) == 650 and ds.info.num_classes == 1000
    assert ds.info.class_names[0] == "tench"
    item = ds[0]
    assert item["image"].shape == (3, 224, 224) and 0 <= item["label"] < 1000
    assert scan(ds, limit=20) == []
