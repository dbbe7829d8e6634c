"""Segmentation metrics against hand-computed values."""

import pytest
import torch

from iared.evaluation.segmentation import (
    SegmentationMeter,
    add_counts,
    average_precision,
    binarize,
    segmentation_counts,
    segmentation_metrics,
    segmentation_scores,
    upsample_heatmap,
)

GT = torch.tensor([[1, 1, 0, 0],
                   [1, 1, 0, 0],
                   [0, 0, 0, 0],
                   [0, 0, 0, 0]], dtype=torch.bool)[None]
PRED = torch.tensor([[1, 1, 1, 0],
                     [1, 0, 0, 0],
                     [0, 0, 0, 0],
                     [0, 0, 0, 0]], dtype=torch.bool)[None]


def test_hand_computed_4x4():
    # TP = 3 ((0,0), (0,1), (1,0)), FP = 1 ((0,2)), FN = 1 ((1,1)), TN = 16 - 5 = 11.
    s = segmentation_scores(PRED, GT)
    assert s["correct"].tolist() == [11, 3]
    assert s["labelled"].tolist() == [12, 4]
    assert s["intersection"].tolist() == [11, 3]
    assert s["union"].tolist() == [13, 5]
    # pixel acc = (3 + 11) / 16 = 87.5
    assert s["pixel_acc"] == pytest.approx(87.5)
    # class accuracies: fg 3/4, bg 11/12 -> mean (75 + 91.667) / 2 = 83.333
    assert s["mAcc"] == pytest.approx(100 * (3 / 4 + 11 / 12) / 2)
    # IoU: fg 3 / (3 + 1 + 1) = 0.6, bg 11 / (11 + 1 + 1) = 0.846 -> mean 72.308
    assert s["mIoU"] == pytest.approx(100 * (3 / 5 + 11 / 13) / 2)


def test_perfect_and_inverted():
    perfect = segmentation_scores(GT, GT)
    assert perfect["pixel_acc"] == perfect["mAcc"] == perfect["mIoU"] == pytest.approx(100.0)
    inv = segmentation_scores(~GT, GT)
    assert inv["intersection"].tolist() == [0, 0]  # IoU of fg (and bg) is 0
    assert inv["pixel_acc"] == inv["mAcc"] == inv["mIoU"] == 0.0


def test_accumulation_equals_one_batch():
    g = torch.Generator().manual_seed(0)
    pred = torch.rand(5, 6, 7, generator=g) > 0.5
    gt = torch.rand(5, 6, 7, generator=g) > 0.6
    summed = add_counts(segmentation_counts(pred[:2], gt[:2]), segmentation_counts(pred[2:], gt[2:]))
    whole = segmentation_counts(pred, gt)
    for k in whole:
        assert torch.equal(summed[k], whole[k])
    assert segmentation_metrics(summed) == segmentation_metrics(whole)
    # ... and it is not the same as averaging per-batch percentages (batches of 2 and 3 images).
    per_batch = [segmentation_scores(pred[:2], gt[:2])["mIoU"], segmentation_scores(pred[2:], gt[2:])["mIoU"]]
    assert segmentation_metrics(whole)["mIoU"] != pytest.approx(sum(per_batch) / 2, abs=1e-9)


def test_binarize_min_max_then_mean():
    h = torch.tensor([[[0.0, 1.0], [2.0, 3.0]],      # normalised 0, 1/3, 2/3, 1; mean 0.5
                      [[5.0, 5.0], [5.0, 5.0]],      # constant: no information -> all background
                      [[10.0, 10.0], [10.0, 14.0]]])  # normalised 0, 0, 0, 1; mean 0.25
    fg = binarize(h)
    assert fg.tolist() == [[[False, False], [True, True]],
                           [[False, False], [False, False]],
                           [[False, False], [False, True]]]
    # invariant to a per-image affine change with positive scale
    assert torch.equal(binarize(3 * h + 7), fg)


def test_upsample_bilinear_hand_values():
    # (1, 2) grid [0, 4] to 4 pixels, align_corners=False: source x = (i + 0.5) / 2 - 0.5
    # = -0.25 (clamped to 0), 0.25, 0.75, 1.25 (clamped to 1) -> 0, 1, 3, 4.
    out = upsample_heatmap(torch.tensor([[0.0, 4.0]]), (1, 2), (1, 4))
    assert out.shape == (1, 1, 4)
    assert torch.allclose(out[0, 0], torch.tensor([0.0, 1.0, 3.0, 4.0]))
    with pytest.raises(ValueError):
        upsample_heatmap(torch.zeros(1, 5), (2, 2), (4, 4))


def test_average_precision_hand_values():
    # ranking 0.9(+) 0.8(-) 0.7(+) 0.6(-): P@R=.5 is 1, P@R=1 is 2/3 -> AP = .5 + .5 * 2/3
    s = torch.tensor([[0.9, 0.8, 0.7, 0.6]])
    y = torch.tensor([[1, 0, 1, 0]], dtype=torch.bool)
    assert average_precision(s, y).item() == pytest.approx(100 * (0.5 + 0.5 * 2 / 3))
    # ties enter together: {0.5: +, -} gives P=.5 at R=.5; then 0.1(+) gives P=2/3 at R=1
    s = torch.tensor([[0.5, 0.5, 0.1]])
    y = torch.tensor([[1, 0, 1]], dtype=torch.bool)
    assert average_precision(s, y).item() == pytest.approx(100 * (0.5 * 0.5 + 0.5 * 2 / 3))
    # a perfect ranking is 100, whatever the scale
    assert average_precision(GT.float() * 3 + 1, GT).item() == pytest.approx(100.0)
    # no foreground pixel: 0 (not NaN)
    assert average_precision(torch.rand(1, 4, 4), torch.zeros(1, 4, 4, dtype=torch.bool)).item() == 0.0


def test_average_precision_matches_sklearn():
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    g = torch.Generator().manual_seed(1)
    scores = (torch.rand(3, 8, 8, generator=g) * 5).round() / 5  # many ties
    gt = torch.rand(3, 8, 8, generator=g) > 0.5
    ours = average_precision(scores, gt)
    for b in range(3):
        ref = sklearn_metrics.average_precision_score(gt[b].flatten().numpy(), scores[b].flatten().numpy())
        assert ours[b].item() == pytest.approx(100 * ref)


def test_meter_over_batches_and_upsampling():
    g = torch.Generator().manual_seed(2)
    heat = torch.rand(4, 2, 2, generator=g)
    masks = torch.rand(4, 8, 8, generator=g) > 0.5
    one = SegmentationMeter()
    one.update(heat, masks)
    two = SegmentationMeter()
    two.update(heat[:1], masks[:1])
    two.update(heat[1:], masks[1:])
    assert one.compute() == pytest.approx(two.compute())
    # the meter upsamples a small heatmap to the masks' size exactly as upsample_heatmap does
    up = upsample_heatmap(heat.reshape(4, 4), (2, 2), (8, 8))
    expected = segmentation_metrics(segmentation_counts(binarize(up), masks))
    expected["mAP"] = average_precision(up, masks).mean().item()
    assert one.compute() == pytest.approx(expected)
    # a heatmap equal to the mask gives 100 everywhere
    perfect = SegmentationMeter()
    perfect.update(masks.float(), masks)
    assert all(v == pytest.approx(100.0) for v in perfect.compute().values())


def test_one_pass_over_the_data_for_several_models_equals_one_pass_each():
    import iared
    from iared.evaluation.segmentation import segmentation_metrics_for

    torch.manual_seed(0)
    base = iared.create_model("vit_custom", img_size=16, patch_size=4, in_chans=1, embed_dim=16, depth=2,
                              num_heads=2, num_classes=3).eval()
    other = iared.create_model("vit_custom", img_size=16, patch_size=4, in_chans=1, embed_dim=16, depth=2,
                               num_heads=2, num_classes=3).eval()
    batches = [{"image": torch.randn(3, 1, 16, 16), "mask": torch.rand(3, 16, 16) > 0.6} for _ in range(2)]

    class Counted(list):
        reads = 0

        def __iter__(self):
            Counted.reads += 1
            return super().__iter__()

    loader = Counted(batches)
    together = segmentation_metrics_for(base, loader, {"rollout": base, "attention": other}, "cpu", None)
    assert Counted.reads == 1
    assert together == {**segmentation_metrics_for(base, batches, ["rollout"], "cpu", None),
                        **segmentation_metrics_for(other, batches, ["attention"], "cpu", None)}
