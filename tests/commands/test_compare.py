"""`compare_methods`, the comparison every command and benchmark runs: each method's row from
the same images, and the ratios against the original (`iared.commands.compare`)."""

import copy

import pytest
import torch

import iared
from iared.commands.compare import compare_methods, relative_to_original


def test_relative_to_original_on_hand_made_rows():
    rows = {"original": {"g": 4.0, "r": 10.0}, "half": {"g": 2.0, "r": 15.0}, "untimed": {"g": 1.0, "r": None}}
    relative_to_original(rows, "g", "r")
    assert rows["original"]["flops_ratio"] == 1.0 and rows["original"]["speedup"] == 1.0
    assert rows["half"]["flops_ratio"] == 2.0 and rows["half"]["speedup"] == 1.5
    assert rows["untimed"]["flops_ratio"] == 4.0 and "speedup" not in rows["untimed"]
    alone = {"x": {"g": 1.0, "r": 1.0}}
    relative_to_original(alone, "g", "r")  # nothing to compare with: unchanged
    assert alone == {"x": {"g": 1.0, "r": 1.0}}


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    base = iared.create_model("vit_custom", img_size=32, patch_size=8, in_chans=1, num_classes=4,
                              embed_dim=16, depth=4, num_heads=2).eval()
    reduced = iared.patch(copy.deepcopy(base), "random", keep_ratio=0.5).eval()
    return base, reduced


def test_every_method_sees_the_same_images(models):
    base, reduced = models
    g = torch.Generator().manual_seed(1)
    batches = [{"image": torch.randn(5, 1, 32, 32, generator=g), "label": torch.randint(0, 4, (5,), generator=g)}
               for _ in range(2)]
    rows = compare_methods([("original", base), ("random", reduced)], batches, batches[0]["image"][:2],
                           speed_batches=[batches[0]["image"], batches[1]["image"][:2]], repeats=(2,),
                           progress=False)
    with torch.no_grad():
        logits = torch.cat([base(b["image"]) for b in batches])
    labels = torch.cat([b["label"] for b in batches])
    assert rows["original"]["top1"] == pytest.approx(float((logits.argmax(-1) == labels).float().mean() * 100))
    assert rows["original"]["n_images"] == rows["random"]["n_images"] == 10
    assert rows["original"]["keep_ratio"] == 1.0 and 0 < rows["random"]["keep_ratio"] < 1
    o, t = rows["original"], rows["random"]
    assert t["gflops_per_img"] < o["gflops_per_img"]
    assert t["flops_ratio"] == pytest.approx(o["gflops_per_img"] / t["gflops_per_img"])
    # the first speed batch gives img_per_s / speedup, the others carry their size in the key
    assert o["speedup"] == 1.0 and t["speedup"] == pytest.approx(t["img_per_s"] / o["img_per_s"])
    assert t["speedup_b2"] == pytest.approx(t["img_per_s_b2"] / o["img_per_s_b2"])


def test_unlabelled_images_have_no_accuracy(models):
    base, _ = models
    batches = [{"image": torch.randn(3, 1, 32, 32), "label": torch.full((3,), -1)}]
    rows = compare_methods([("original", base)], batches, batches[0]["image"][:1], labeled=False, progress=False)
    assert rows["original"]["top1"] is None and rows["original"]["top1_se"] is None
    assert "img_per_s" in rows["original"] and rows["original"]["img_per_s"] is None
