"""Heatmap figures: grid -> pixel mapping, dropped tokens stay 0, corner ratios, video frame order."""

import numpy as np
import pytest
import torch
from matplotlib import colormaps
from PIL import Image

import iared
from iared.evaluation.figures import (
    display_image,
    grid_heatmap,
    heatmap_panel,
    keep_mask_pixels,
    kept_patches,
    method_grid,
    overlay,
    save_figure,
    video_strip,
)


def _axes_images(fig):
    """The (H, W, 3) array shown in each image axis, in axis order."""
    return [ax.images[0].get_array() for ax in fig.axes if ax.images]


def _texts(ax):
    return [t.get_text() for t in ax.texts]


def test_grid_heatmap_is_the_grid_at_grid_size_and_blocks_when_upsampled():
    grid = torch.arange(6, dtype=torch.float32) / 10  # (2, 3) grid in raster order
    same = grid_heatmap(grid, (2, 3), (2, 3))
    np.testing.assert_allclose(same, grid.reshape(2, 3).numpy(), atol=1e-6)
    # A zero region stays exactly zero away from its border: left 2 columns of a 4x4 grid are 0.
    g = torch.ones(4, 4)
    g[:, :2] = 0
    heat = grid_heatmap(g.reshape(-1), (4, 4), (32, 32))
    assert heat.shape == (32, 32)
    assert heat[:, :12].max() == 0.0           # cells 0-1 (pixels 0-15), minus the blend zone
    assert heat[:, 20:].min() == 1.0
    assert 0.0 < heat[0, 16] < 1.0              # bilinear blend across the boundary


def test_grid_heatmap_normalize_and_clip():
    g = torch.tensor([2.0, 4.0, 6.0, 8.0])
    np.testing.assert_allclose(grid_heatmap(g, (2, 2), (2, 2), normalize=True), [[0, 1 / 3], [2 / 3, 1]], atol=1e-6)
    assert grid_heatmap(g, (2, 2), (2, 2)).max() == 1.0   # fixed [0, 1] scale: clipped
    assert grid_heatmap(torch.full((4,), 3.0), (2, 2), (4, 4), normalize=True).max() == 0.0  # constant -> 0


def test_overlay_blend_endpoints():
    img = np.full((4, 4, 3), 0.2, dtype=np.float32)
    heat = np.zeros((4, 4), dtype=np.float32)
    heat[0, 0] = 1.0
    np.testing.assert_allclose(overlay(img, heat, alpha=0.0), img)
    full = overlay(img, heat, cmap="jet", alpha=1.0)
    np.testing.assert_allclose(full[0, 0], colormaps["jet"](1.0)[:3], atol=1e-6)
    np.testing.assert_allclose(full[1, 1], colormaps["jet"](0.0)[:3], atol=1e-6)
    half = overlay(img, heat, cmap="gray", alpha=0.5)
    np.testing.assert_allclose(half[0, 0], 0.5 * 0.2 + 0.5 * 1.0, atol=1e-6)


def test_kept_patches_shades_exactly_the_dropped_patches():
    img = np.ones((8, 12, 3), dtype=np.float32)
    keep = torch.tensor([True, False, True, True, True, False])  # (2, 3) grid of 4x4 patches
    mask = keep_mask_pixels(keep, (2, 3), (8, 12))
    assert mask[:4, 4:8].sum() == 0 and mask[4:, 8:].sum() == 0 and mask.sum() == 4 * 16
    out = kept_patches(img, keep, (2, 3), fill=0.0, fade=1.0)
    assert out[:4, 4:8].max() == 0.0 and out[4:, 8:].max() == 0.0
    assert out[:4, :4].min() == 1.0 and out[4:, :8].min() == 1.0
    # Default: dropped patches washed towards grey, so a dropped black patch is visible too.
    black = kept_patches(np.zeros((8, 12, 3), dtype=np.float32), keep, (2, 3), fill=0.5, fade=0.8)
    np.testing.assert_allclose(black[:4, 4:8], 0.4)
    assert black[:4, :4].max() == 0.0


def test_display_image_layouts():
    chw = torch.rand(3, 5, 7)
    np.testing.assert_allclose(display_image(chw), chw.permute(1, 2, 0).numpy(), atol=1e-6)
    gray = display_image(torch.rand(1, 5, 7))
    assert gray.shape == (5, 7, 3) and np.all(gray[..., 0] == gray[..., 2])
    u8 = display_image(np.full((2, 2), 255, dtype=np.uint8))
    assert u8.shape == (2, 2, 3) and u8.max() == 1.0


def _tiny_iared(seed: int = 0, threshold: float = 0.5):
    torch.manual_seed(seed)
    model = iared.create_model("vit_custom", img_size=16, patch_size=4, in_chans=3, embed_dim=16, depth=3,
                               num_heads=2, num_classes=4)
    iared.patch(model, "iared", groups=3, threshold=threshold)
    return model.eval()


def test_tokens_dropped_in_group1_are_zero_in_later_groups_of_the_rendered_maps():
    # Interpreters start near "keep everything" (I ~ 0.9): a threshold in that range drops some.
    model = _tiny_iared(seed=3, threshold=0.9)
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        _, info = model(x, return_info=True)
    scores = [s.scores[0] for s in info.stages]
    keeps = [s.keep[0] for s in info.stages]
    dropped1 = ~keeps[0]
    assert dropped1.any() and keeps[0].any(), "seed must give a partial drop in group 1"
    for j in (1, 2):
        rendered = grid_heatmap(scores[j], (4, 4), (4, 4)).reshape(-1)  # at grid size: one value per patch
        assert np.all(rendered[dropped1.numpy()] == 0.0)
        assert np.all(rendered[keeps[j].numpy()] > 0.9)                 # kept by group j: score > threshold
    # The panel draws exactly these maps: with alpha 1 and a gray colormap each overlay is the map itself.
    fig = heatmap_panel(torch.rand(3, 4, 4), scores, keeps, (4, 4), cmap="gray", alpha=1.0)
    shown = _axes_images(fig)
    for j in (1, 2):
        np.testing.assert_allclose(shown[j + 1][..., 0].reshape(-1)[dropped1.numpy()], 0.0, atol=1e-6)


def test_heatmap_panel_layout_and_corner_ratios():
    D, hw = 3, (4, 4)
    keeps = [torch.ones(16, dtype=torch.bool), torch.arange(16) < 10, torch.arange(16) < 5]
    scores = [torch.rand(16) * k for k in keeps]
    fig = heatmap_panel(torch.rand(3, 16, 16), scores, keeps, hw, title="cat (91.0%)")
    axes = fig.axes
    assert len(axes) == D + 2
    assert fig._suptitle.get_text() == "cat (91.0%)"
    assert _texts(axes[0]) == []
    expected = ["1.00", f"{10 / 16:.2f}", f"{5 / 16:.2f}"]
    for j in range(D):
        (t,) = axes[j + 1].texts
        assert t.get_text() == expected[j]
        # Upper-left corner, in axes coordinates, anchored at its top-left.
        x, y = t.get_position()
        assert x < 0.1 and y > 0.9 and t.get_ha() == "left" and t.get_va() == "top"
        assert t.get_transform() == axes[j + 1].transAxes
    assert _texts(axes[D + 1]) == [expected[-1]]
    # The last panel is the kept-patch image: rows 2-3 of the grid (patches 8-15) are dropped.
    last = _axes_images(fig)[-1]
    assert last.shape == (16, 16, 3)


def test_heatmap_panel_rejects_mismatched_groups():
    with pytest.raises(ValueError, match="keep mask"):
        heatmap_panel(torch.rand(3, 8, 8), [torch.rand(4)], [], (2, 2))


def test_method_grid_shape_and_normalisation():
    imgs = [torch.rand(3, 8, 8) for _ in range(2)]
    maps = {"attention": [torch.tensor([0.0, 2.0, 2.0, 4.0])] * 2, "iared": [torch.tensor([0.0, 0.5, 0.5, 0.25])] * 2}
    fig = method_grid(imgs, maps, (2, 2), row_labels=["a", "b"], cmap="gray", alpha=1.0)
    assert len(fig.axes) == 2 * 3
    shown = _axes_images(fig)
    # Row 0: image, attention (normalised to [0, 1]), iared (fixed scale: max 0.5).
    # (gray is a 256-entry lookup table, hence the 1/255 tolerance)
    assert shown[1].max() == pytest.approx(1.0) and shown[2].max() == pytest.approx(0.5, abs=1 / 255)
    assert _texts(fig.axes[0]) == ["a"] and _texts(fig.axes[3]) == ["b"]
    with pytest.raises(ValueError):
        method_grid(imgs, {"rollout": [torch.rand(4)]}, (2, 2))


def test_video_strip_maps_the_jointst_order_to_frames():
    T, hw = 3, (2, 2)
    S = hw[0] * hw[1]
    # Grid index n * T + t holds t / 2: each frame's map is constant, frame t at t/2.
    t_of = torch.arange(S * T) % T
    scores = [t_of.float() / 2]
    keep = [t_of != 1]                                   # frame 1 fully dropped
    frames = torch.rand(3, T, 8, 8)                      # (C, T, H, W)
    fig = video_strip(frames, scores, keep, T, hw, cmap="gray", alpha=1.0)
    assert len(fig.axes) == 3 * T                        # frames row, one group row, kept row
    rows = np.array(fig.axes).reshape(3, T)
    for t in range(T):
        overlay_t = rows[1, t].images[0].get_array()
        np.testing.assert_allclose(overlay_t[..., 0], t / 2, atol=1 / 255)
        assert _texts(rows[1, t])[0] == ("0.00" if t == 1 else "1.00")
        np.testing.assert_allclose(rows[0, t].images[0].get_array(), frames[:, t].permute(1, 2, 0).numpy(), atol=1e-6)
    dropped = rows[2, 1].images[0].get_array()                     # frame 1: washed towards grey
    np.testing.assert_allclose(dropped, 0.2 * frames[:, 1].permute(1, 2, 0).numpy() + 0.4, atol=1e-6)
    np.testing.assert_allclose(rows[2, 0].images[0].get_array(), frames[:, 0].permute(1, 2, 0).numpy(), atol=1e-6)


def test_save_figure_writes_a_png_atomically(tmp_path):
    fig = heatmap_panel(torch.rand(3, 8, 8), [torch.rand(4)], [torch.ones(4, dtype=torch.bool)], (2, 2))
    out = save_figure(fig, tmp_path / "p.png")
    with Image.open(out) as im:
        im.load()
        assert im.format == "PNG" and im.size[0] > im.size[1]
    assert [p.name for p in tmp_path.iterdir()] == ["p.png"]   # no temp file left behind
