"""Video data: moving-fashion clips (motion-only labels, masks, views) and videofolder decoding."""

import numpy as np
import pytest
import torch

from iared.data import DataError, build_dataset
from iared.data.video import (MF_DEFAULT_STATS, MOTION_NAMES, SPEEDS, MovingFashionDataset, VideoError,
                              crop_offsets, decode_clip, measure_video_stats, sample_indices, spatial_crops)
from iared.errors import UserError


def synthetic_items(n=40, seed=0):
    rng = np.random.default_rng(seed)
    items = np.zeros((n, 28, 28), dtype=np.uint8)
    items[:, 4:24, 6:22] = rng.integers(60, 255, size=(n, 20, 16))   # a solid-ish blob per item
    return items


def mf(split="val", seed=0, **kw):
    return MovingFashionDataset(synthetic_items(), split, seed, **kw)


def centroids(mask):
    """(T, 2) mean (y, x) of the mask pixels of each frame."""
    return torch.stack([m.nonzero().float().mean(0) for m in mask])


def test_shapes_and_determinism():
    a, b = mf(), mf()
    item = a[3]
    assert item["video"].shape == (1, 8, 48, 48) and item["mask"].shape == (8, 48, 48)
    assert item["mask"].dtype == torch.bool and 0 <= item["label"] < 4
    torch.testing.assert_close(item["video"], b[3]["video"])
    assert not torch.equal(item["video"], mf(seed=1)[3]["video"])
    assert a.info.num_frames == 8 and a.info.num_classes == 4 and a.info.in_chans == 1


def test_label_is_the_motion():
    ds = mf(limit=40)
    seen = set()
    for i in range(len(ds)):
        video, mask, label, _ = ds.generate(i)
        c = centroids(torch.from_numpy(mask))
        step = (c[-1] - c[0]) / 7                                       # mean displacement per frame
        v = SPEEDS[MOTION_NAMES[label]]
        # Along one axis (the random direction), at the label's speed; none along the other.
        torch.testing.assert_close(step.abs().max(), torch.tensor(v), atol=0.15, rtol=0)
        assert step.abs().min() < 0.15
        seen.add((label, tuple(step.sign().tolist())))
    assert len({lab for lab, _ in seen}) == 4          # labels spread over the classes
    assert len({d for lab, d in seen if lab > 0}) >= 3  # and directions vary within them


def test_appearance_is_independent_of_label():
    # Item `index` is used whatever the label: the same item shows up under different labels
    # in different epochs, so a frame's content cannot tell the class.
    ds = mf(split="train")
    labels = set()
    for epoch in range(12):
        ds.set_epoch(epoch)
        _, mask, label, _ = ds.generate(5)
        labels.add(label)
    assert len(labels) >= 4


def test_mask_pixels_show_the_item_and_clutter_is_static():
    ds = mf()
    video, mask, label, _ = ds.generate(2)
    item = ds.items[2]
    for t in range(8):
        assert set(np.unique(video[t][mask[t]])) <= set(np.unique(item[item > 25]))
    # Off the item's path, every frame is the same static clutter. (Faint item pixels,
    # below the mask threshold, blend in around the mask: leave a 2-pixel margin.)
    near = torch.nn.functional.max_pool2d(torch.from_numpy(mask).float()[None], 5, 1, 2)[0]
    off = ~near.bool().any(dim=0).numpy()
    assert (video[:, off] == video[0, off]).all()


def test_views_left_centre_right():
    three, one = mf(views=3), mf(views=1)
    v3, v1 = three[1]["video"], one[1]["video"]
    assert v3.shape == (3, 1, 8, 48, 48)
    torch.testing.assert_close(v3[1], v1)                               # centre view = the 1-view item
    # The trajectory lies inside the centre view: the whole item is visible there.
    _, full_mask, _, _ = three.generate(1)
    assert three[1]["mask"][1].sum() == int(full_mask.sum())
    assert crop_offsets(64, 48, 3) == [0, 8, 16] and crop_offsets(64, 48, 1) == [8]


def test_spatial_crops_tall_frames():
    v = torch.arange(2 * 6 * 4, dtype=torch.float).reshape(1, 2, 6, 4)    # H=6 > W=4
    crops = spatial_crops(v, 4, 3)
    assert crops.shape == (3, 1, 2, 4, 4)
    torch.testing.assert_close(crops[2], v[..., 2:6, :])


def test_default_stats_remeasured():
    ds = mf(limit=40)
    mean, std = measure_video_stats(ds, 40)
    # Synthetic items are denser than Fashion-MNIST, so only check the measuring runs and
    # is sane here; the real default stats are checked on the real items below.
    assert 0 < mean[0] < 1 and 0 < std[0] < 1


def test_real_moving_fashion_via_build_dataset(shared_dir):
    ds = build_dataset(f"moving-fashion:{shared_dir / 'data' / 'fashion_mnist'}", "train", seed=0)
    assert len(ds) == 55000 and ds.info.kind == "moving-fashion"
    mean, std = measure_video_stats(ds, 500)
    assert abs(mean[0] - MF_DEFAULT_STATS[0][0]) < 2e-3 and abs(std[0] - MF_DEFAULT_STATS[1][0]) < 2e-3
    val = build_dataset(f"moving-fashion:{shared_dir / 'data' / 'fashion_mnist'}", "val", views=3, limit=10)
    assert len(val) == 10 and val[0]["video"].shape == (3, 1, 8, 48, 48)


# ------------------------------------------------------------------------ videofolder

def write_video(path, frames=12, size=(40, 56)):
    import av

    with av.open(str(path), mode="w") as out:
        stream = out.add_stream("mpeg4", rate=10)
        stream.height, stream.width = size
        stream.pix_fmt = "yuv420p"
        for i in range(frames):
            img = np.zeros((*size, 3), dtype=np.uint8)
            img[:, : (i + 1) * 4] = 200
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def test_sample_indices_uniform():
    assert sample_indices(16, 4).tolist() == [2, 6, 10, 14]
    assert sample_indices(8, 8).tolist() == list(range(8))


def test_videofolder_on_a_written_video(tmp_path):
    write_video(tmp_path / "a.mp4")
    write_video(tmp_path / "b.mp4", frames=20)
    (tmp_path / "labels.tsv").write_text("a.mp4\tcat\nb.mp4\tdog\n")
    ds = build_dataset(f"videofolder:{tmp_path}", "test", num_frames=4, img_size=32, views=3)
    assert ds.info.class_names == ("cat", "dog") and len(ds) == 2
    item = ds[1]
    assert item["video"].shape == (3, 3, 4, 32, 32) and item["label"] == 1
    clip = decode_clip(tmp_path / "a.mp4", 4, 32)
    assert clip.shape == (4, 32, 45, 3) and clip.dtype == np.uint8


def test_videofolder_errors_name_the_file(tmp_path):
    write_video(tmp_path / "short.mp4", frames=3)
    (tmp_path / "junk.mp4").write_bytes(b"not a video at all" * 10)
    with pytest.raises(VideoError, match="short.mp4.*3 frames"):
        decode_clip(tmp_path / "short.mp4", 8, 32)
    with pytest.raises(VideoError, match="junk.mp4"):
        decode_clip(tmp_path / "junk.mp4", 8, 32)
    with pytest.raises(UserError, match="not found"):
        decode_clip(tmp_path / "missing.mp4", 8, 32)
    with pytest.raises(DataError, match="labels.tsv"):
        build_dataset(f"videofolder:{tmp_path}", "test")


def test_decode_real_kinetics_clip(shared_dir):
    path = shared_dir / "data" / "video" / "kinetics400_demo_arm_wrestling.mp4"
    if not path.is_file():
        pytest.skip("Kinetics demo clip missing")
    clip = decode_clip(path, 8, 224)
    assert clip.shape == (8, 224, 298, 3)                 # 340x256 frames, shorter side -> 224
    assert 30 < clip.mean() < 220 and clip.std() > 10      # real content, not blank frames
    assert not np.array_equal(clip[0], clip[-1])           # frames spread over the video
