"""idx files (`iared.data.idx`: MNIST, Fashion-MNIST) on tiny files written here, plus the real
shared data when ../shared is present."""

import collections

import numpy as np
import pytest
import torch

from iared.data import DataError, build_dataset
from iared.data.idx import read_idx

from helpers import make_idx_dir, write_idx


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
