"""The cluttered generator: exact masks, labels, clutter from other items only, determinism,
per-epoch augmentation on train only, geometry rules, and the documented statistics."""

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from iared.data import DataError, build_dataset
from iared.data.cluttered import (DEFAULT_STATS, MASK_THRESHOLD, ClutteredDataset, digit_items, digits_split,
                                  measure_stats)

from helpers import make_idx_dir


def _item_offset(mask: np.ndarray, inside: np.ndarray) -> tuple[int, int]:
    """Where the item's top-left corner landed, recovered from the mask alone."""
    my, mx = np.argwhere(mask).min(0)
    iy, ix = np.argwhere(inside).min(0)
    return int(my - iy), int(mx - ix)


@pytest.fixture(scope="module")
def digits_train():
    return build_dataset("cluttered-digits", "train", seed=0)


def test_item_pixels_under_mask_exactly(digits_train):
    ds = digits_train
    h, w = ds.items.shape[1:]
    for i in range(0, len(ds), 97):
        canvas, mask, label = ds.generate(i)
        item = ds.items[i]
        inside = item > MASK_THRESHOLD
        assert mask.sum() == inside.sum() > 0
        y, x = _item_offset(mask, inside)
        np.testing.assert_array_equal(mask[y:y + h, x:x + w], inside)
        np.testing.assert_array_equal(canvas[y:y + h, x:x + w][inside], item[inside])
        assert label == ds.labels[i]


def test_labels_are_the_source_digits():
    from sklearn.datasets import load_digits
    target = load_digits().target
    for split in ("train", "val", "test"):
        ds = build_dataset("cluttered-digits", split)
        keep = digits_split(len(target), split)
        assert [ds[i]["label"] for i in range(5)] == target[keep][:5].tolist()


def test_digit_splits_partition():
    parts = {s: digits_split(1797, s) for s in ("train", "val", "test")}
    assert [len(parts[s]) for s in ("train", "val", "test")] == [1437, 180, 180]
    assert sorted(np.concatenate(list(parts.values())).tolist()) == list(range(1797))
    items, _ = digit_items()
    assert items.shape == (1797, 24, 24) and items.dtype == np.uint8 and items.max() == 255


def test_eval_splits_repeat_each_digit_on_distinct_canvases():
    from iared.data.cluttered import DIGITS_EVAL_REPEATS

    test = build_dataset("cluttered-digits", "test")
    n = len(test.items)
    assert (n, len(test)) == (180, 180 * DIGITS_EVAL_REPEATS) and len(build_dataset("cluttered-digits", "train")) == 1437
    for i in (0, 57):
        copies = [test.generate(i + r * n) for r in range(DIGITS_EVAL_REPEATS)]
        assert len({c.tobytes() for c, _, _ in copies}) == DIGITS_EVAL_REPEATS   # other position and clutter
        assert {label for _, _, label in copies} == {int(test.labels[i])}
        assert {int(m.sum()) for _, m, _ in copies} == {int((test.items[i] > MASK_THRESHOLD).sum())}
    # the first N canvases are the one-canvas-per-digit split
    single = build_dataset("cluttered-digits", "test", repeats=1)
    assert len(single) == n and single.generate(3)[0].tobytes() == test.generate(3)[0].tobytes()
    with pytest.raises(DataError, match="repeats"):
        build_dataset("cluttered-digits", "test", repeats=0)


def test_clutter_comes_from_other_items_and_never_covers_the_item():
    item = np.zeros((16, 16), np.uint8)
    item[4:12, 4:12] = 100          # item 0: a 100-valued square on a dark background
    other = np.full((16, 16), 200, np.uint8)  # item 1: uniform 200
    ds = ClutteredDataset(np.stack([item, other]), np.array([3, 7]), "test", seed=1,
                          num_fragments=8, mean=(0,), std=(1,))
    canvas, mask, label = ds.generate(0)
    assert label == 3 and mask.sum() == 64
    assert set(np.unique(canvas[mask]).tolist()) == {100}
    assert set(np.unique(canvas[~mask]).tolist()) <= {0, 200}
    assert (canvas == 200).sum() > 0  # some clutter landed


def test_image_is_normalised_canvas(digits_train):
    ds = digits_train
    out = ds[5]
    canvas, mask, _ = ds.generate(5)
    assert out["image"].shape == (1, 48, 48) and out["image"].dtype == torch.float32
    expect = (canvas / 255.0 - ds.info.mean[0]) / ds.info.std[0]
    np.testing.assert_allclose(out["image"][0].numpy(), expect, rtol=1e-5, atol=1e-6)
    assert out["mask"].dtype == torch.bool and torch.equal(out["mask"], torch.from_numpy(mask))
    assert ds.info.has_masks and ds.info.in_chans == 1 and ds.info.num_classes == 10


def test_deterministic_by_seed():
    a = build_dataset("cluttered-digits", "train", seed=0)
    b = build_dataset("cluttered-digits", "train", seed=0)
    c = build_dataset("cluttered-digits", "train", seed=1)
    assert all(a.generate(i)[0].tobytes() == b.generate(i)[0].tobytes() for i in range(20))
    assert any(a.generate(i)[0].tobytes() != c.generate(i)[0].tobytes() for i in range(20))
    # the order of access does not matter: each item is a function of its own key
    assert a.generate(7)[0].tobytes() == (b.generate(3), b.generate(7))[1][0].tobytes()


def test_set_epoch_changes_train_only():
    train = build_dataset("cluttered-digits", "train")
    test = build_dataset("cluttered-digits", "test")
    before_train = [train.generate(i)[0].tobytes() for i in range(10)]
    before_test = [test.generate(i)[0].tobytes() for i in range(10)]
    train.set_epoch(1)
    test.set_epoch(1)
    after_train = [train.generate(i) for i in range(10)]
    assert sum(c.tobytes() != b for (c, _, _), b in zip(after_train, before_train)) >= 9
    assert [test.generate(i)[0].tobytes() for i in range(10)] == before_test
    # the mask is still exact after re-drawing
    canvas, mask, _ = after_train[0]
    inside = train.items[0] > MASK_THRESHOLD
    assert mask.sum() == inside.sum()
    assert np.array_equal(np.sort(canvas[mask]), np.sort(train.items[0][inside]))
    train.set_epoch(0)
    assert [train.generate(i)[0].tobytes() for i in range(10)] == before_train


def test_geometry_rules():
    ds = build_dataset("cluttered-digits", "test")
    h, w = ds.items.shape[1:]
    s = ds.info.img_size[0]
    assert ds.info.img_size == (48, 48) and (s // 4) ** 2 == 144 >= 100
    assert h * w / s ** 2 <= 0.40
    with pytest.raises(DataError, match="tokens"):
        build_dataset("cluttered-digits", "test", canvas_size=36)   # 81 tokens at patch 4
    with pytest.raises(DataError, match="at most 40%"):
        build_dataset("cluttered-digits", "test", canvas_size=40, item_size=28)
    big = build_dataset("cluttered-digits", "test", canvas_size=64, num_fragments=3)
    assert big[0]["image"].shape == (1, 64, 64)
    assert big.info.mean != DEFAULT_STATS["cluttered-digits"][0]  # measured for this setting


def test_default_stats_match_measurement():
    ds = build_dataset("cluttered-digits", "train", seed=0)
    mean, std = measure_stats(ds, 2000)
    assert mean == pytest.approx(DEFAULT_STATS["cluttered-digits"][0], abs=2e-4)
    assert std == pytest.approx(DEFAULT_STATS["cluttered-digits"][1], abs=2e-4)


def test_dataloader_batches(digits_train):
    batch = next(iter(DataLoader(digits_train, batch_size=4)))
    assert batch["image"].shape == (4, 1, 48, 48) and batch["mask"].shape == (4, 48, 48)
    assert batch["label"].dtype == torch.int64


def test_cluttered_fashion_synthetic(tmp_path):
    sets = make_idx_dir(tmp_path / "f", n_train=30, n_test=12)
    ds = build_dataset(f"cluttered-fashion:{tmp_path / 'f'}", "test", mean=(0,), std=(1,))
    assert len(ds) == 12 and ds.info.class_names[9] == "Ankle boot"
    canvas, mask, label = ds.generate(4)
    assert label == sets["t10k"][1][4]
    item = sets["t10k"][0][4]
    inside = item > MASK_THRESHOLD
    y, x = _item_offset(mask, inside)
    np.testing.assert_array_equal(canvas[y:y + 28, x:x + 28][inside], item[inside])
    assert 28 * 28 / 48 ** 2 <= 0.40


def test_cluttered_fashion_needs_a_dir(tmp_path, monkeypatch):
    import iared.data.cluttered as cl
    monkeypatch.setattr(cl, "default_fashion_dir", lambda: None)
    with pytest.raises(DataError, match="cluttered-fashion:DIR"):
        build_dataset("cluttered-fashion", "test")


def test_shared_cluttered_fashion(shared_dir):
    spec = f"cluttered-fashion:{shared_dir / 'data' / 'fashion_mnist'}"
    test = build_dataset(spec, "test")
    val = build_dataset(spec, "val")
    assert len(test) == 10000 and len(val) == 5000
    train = build_dataset(spec, "train")
    assert len(train) == 55000
    mean, std = measure_stats(train, 2000)
    assert mean == pytest.approx(DEFAULT_STATS["cluttered-fashion"][0], abs=2e-4)
    assert std == pytest.approx(DEFAULT_STATS["cluttered-fashion"][1], abs=2e-4)


def test_normalisation_must_fit_the_channels():
    # two means for one-channel images would broadcast them to two channels
    with pytest.raises(DataError, match="mean has 2 values; cluttered-digits images have 1 channel"):
        build_dataset("cluttered-digits", "val", mean=(0.5, 0.5))
    with pytest.raises(DataError, match="std must be positive"):
        build_dataset("cluttered-digits", "val", std=(0.0,))
    ds = build_dataset("cluttered-digits", "val", mean=(0.5,), std=(0.25,))
    assert ds.info.mean == (0.5,) and ds.info.std == (0.25,)
