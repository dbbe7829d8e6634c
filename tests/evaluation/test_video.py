"""Video evaluation (`iared.evaluation.video`): clip-1 / video-1 from hand-made logits, and a tiny
end-to-end run."""

import torch

import iared
from iared.evaluation.video import collect_view_logits, evaluate_video, video_errors

from helpers import tiny_video


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


def test_views_match_single_forwards():
    model, data = tiny_video()
    out = collect_view_logits(model, data, batch_size=4, limit=5)
    assert out["logits"].shape == (5, 3, 4)
    with torch.no_grad():
        single = model.eval()(data[3]["video"][2][None])
    torch.testing.assert_close(out["logits"][3, 2], single[0], atol=1e-5, rtol=1e-4)


def test_evaluate_video_with_tempdiff_keeps_and_saves_flops():
    model, data = tiny_video()
    full = evaluate_video(model, data, batch_size=4, limit=6, speed_batch=4, speed_repeats=1, flops_clips=2)
    iared.patch(model, "tempdiff", keep_ratio=0.25)
    cut = evaluate_video(model, data, batch_size=4, limit=6, speed_batch=4, speed_repeats=1, flops_clips=2)
    assert full["keep_ratio"] == 1.0 and abs(cut["keep_ratio"] - 0.25) < 0.01
    assert cut["gflops_per_clip"] < 0.5 * full["gflops_per_clip"]
    for r in (full, cut):
        assert set(r) >= {"clip1_err", "video1_err", "clips_per_s", "gflops_per_clip", "keep_ratio", "n"}
        assert 0 <= r["clip1_err"] <= 100 and r["n"] == 6 and r["clips_per_s"] > 0
