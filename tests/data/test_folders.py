"""Folder and zip loaders (`iared.data.folders`: cifar10, imagefolder, segfolder) and bad files, on
tiny files written here, plus the real shared data when ../shared is present."""

import collections
import logging
import pickle
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from iared.data import DataError, ImageError, build_dataset, scan

from helpers import labelled_photos, segfolder


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


def test_labels_tsv_indices_index_the_head_and_bad_rows_are_errors(tmp_path):
    root = labelled_photos(tmp_path / "f", [3, 998])
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


def test_segfolder_masks_follow_the_image_resize_and_crop(tmp_path):
    from iared.data import build_dataset
    from iared.data.images import resize_center_crop

    root = segfolder(tmp_path / "seg")
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

    root = segfolder(tmp_path / "seg", labels=True)
    ds = build_dataset(f"segfolder:{root}", "test")
    assert [ds[i]["label"] for i in range(4)] == [0, 1, 2, 3] and ds.info.num_classes == 4
    (root / "masks.tsv").write_text("picture\tmask\na.png\tb.png\n")
    with pytest.raises(DataError, match="columns image and mask"):
        build_dataset(f"segfolder:{root}", "test")
    with pytest.raises(DataError, match="no masks.tsv"):
        build_dataset(f"segfolder:{tmp_path}", "test")


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
