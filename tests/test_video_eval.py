"""Video evaluation: clip-1 / video-1 from hand-made logits, and a tiny end-to-end run."""

import numpy as np
import torch

import iared
from iared.data.video import MovingFashionDataset
from iared.evaluation.video import collect_view_logits, evaluate_video, video_errors


def test_video_errors_by_hand():
    # 3 videos, 3 views, 2 classes; labels all 0.
    logits = torch.tensor([
        [[0.0, 5.0], [5.0, 0.0], [0.0, 5.0]],   # centre right; average of softmax wrong (2 of 3 views say 1)
        [[5.0, 0.0], [0.0, 1.0], [5.0, 0.0]],   # centre wrong; average right
        [[5.0, 0.0], [5.0, 0.0], [5.0, 0.0]],   # all right
    ])
    labels = torch.tensor([0, 0, 0])
    err = video_errors(logits, labels)
    assert err["clip1_err"] == 100 / 3 and err["video1_err"] == 100 / 3


def test_video_errors_use_softmax_not_logit_average():
    # Logit mean says class 1 (1.33 vs 3.33), mean probability says class 0 (0.59).
    logits = torch.tensor([[[2.0, 0.0], [2.0, 0.0], [0.0, 10.0]]])
    probs = logits.softmax(-1).mean(1)
    assert probs.argmax().item() == 0 and logits.mean(1).argmax().item() == 1
    assert video_errors(logits, torch.tensor([0]))["video1_err"] == 0.0


def _tiny_setup(policy=None, **kw):
    rng = np.random.default_rng(0)
    items = np.zeros((12, 28, 28), dtype=np.uint8)
    items[:, 6:22, 6:22] = rng.integers(60, 255, size=(12, 16, 16))
    data = MovingFashionDataset(items, "test", 0, views=3, num_fragments=2)
    torch.manual_seed(0)
    model = iared.create_model("jointst_custom", img_size=48, patch_size=8, in_chans=1, num_frames=8, embed_dim=16,
                               depth=2, num_heads=2, num_classes=4)
    if policy:
        iared.patch(model, policy, **kw)
    return model, data


def test_views_match_single_forwards():
    model, data = _tiny_setup()
    out = collect_view_logits(model, data, batch_size=4, limit=5)
    assert out["logits"].shape == (5, 3, 4)
    with torch.no_grad():
        single = model.eval()(data[3]["video"][2][None])
    torch.testing.assert_close(out["logits"][3, 2], single[0], atol=1e-5, rtol=1e-4)


def test_evaluate_video_with_tempdiff_keeps_and_saves_flops():
    model, data = _tiny_setup()
    full = evaluate_video(model, data, batch_size=4, limit=6, speed_batch=4, speed_repeats=1, flops_clips=2)
    iared.patch(model, "tempdiff", keep_ratio=0.25)
    cut = evaluate_video(model, data, batch_size=4, limit=6, speed_batch=4, speed_repeats=1, flops_clips=2)
    assert full["keep_ratio"] == 1.0 and abs(cut["keep_ratio"] - 0.25) < 0.01
    assert cut["gflops_per_clip"] < 0.5 * full["gflops_per_clip"]
    for r in (full, cut):
        assert set(r) >= {"clip1_err", "video1_err", "clips_per_s", "gflops_per_clip", "keep_ratio", "n"}
        assert 0 <= r["clip1_err"] <= 100 and r["n"] == 6 and r["clips_per_s"] > 0


def test_interleaved_throughput_times_every_model():
    from iared.evaluation.throughput import interleaved_throughput

    full, data = _tiny_setup()
    cut, _ = _tiny_setup("tempdiff", keep_ratio=0.25)
    clips = torch.stack([data[i]["video"][1] for i in range(4)])
    full.train()
    speeds = interleaved_throughput({"full": (full, {}), "cut": (cut, {})}, clips, warmup=1, repeats=3)
    assert set(speeds) == {"full", "cut"} and all(v > 0 for v in speeds.values())
    assert full.training  # modes are restored


def test_cli_eval_on_video_reports_table3_keys(tmp_path, capsys):
    """`iared eval` with a video model: clip-1 / video-1 errors, clips/s, GFLOPs per clip per method."""
    import json

    from iared.cli import main
    from iared.data import DATASETS, register_dataset

    model, data = _tiny_setup()
    register_dataset("tinyvideo", lambda path, split, seed, views=1, num_frames=8, **kw:
                     MovingFashionDataset(data.items, split, seed, views=views, num_frames=num_frames,
                                          num_fragments=2, item_size=data.item_size))
    try:
        iared.patch(model, "iared", groups=1)
        ckpt = tmp_path / "video.safetensors"
        iared.save_model(model, ckpt, arch="jointst_custom")
        out = tmp_path / "video.json"
        argv = ["eval", "--data", "tinyvideo", "--checkpoint", str(ckpt), "--methods",
                "original,iared,tempdiff@0.5,random@0.5", "--json", str(out), "--batch-size", "4",
                "--limit-batches", "2", "--flops-images", "2", "--device", "cpu", "--allocator", "system"]
        assert main(argv) == 0
        res = json.loads(out.read_text())
        assert res["allocator"] == "system"
        assert list(res["methods"]) == ["original", "iared", "tempdiff@0.5", "random@0.5"]
        for name, r in res["methods"].items():
            assert {"clip1_err", "video1_err", "clips_per_s", "gflops_per_clip", "keep_ratio", "speedup"} <= set(r)
            assert r["n"] == 8 and 0 <= r["clip1_err"] <= 100 and r["clips_per_s"] > 0
        assert res["methods"]["tempdiff@0.5"]["keep_ratio"] == 0.5
        assert res["methods"]["tempdiff@0.5"]["gflops_per_clip"] < res["methods"]["original"]["gflops_per_clip"]
        assert "clip-1 err" in capsys.readouterr().out
        # an image data set for a video model: one line, exit 2
        assert main(["eval", "--data", "cluttered-digits", "--checkpoint", str(ckpt), "--json",
                     str(tmp_path / "x.json")]) == 2
        assert "video" in capsys.readouterr().err
        # segmentation metrics are for images with masks: one line, exit 2 (was silently ignored)
        assert main(argv + ["--segmentation"]) == 2
        assert "--segmentation is for image models" in capsys.readouterr().err
    finally:
        DATASETS.pop("tinyvideo", None)
