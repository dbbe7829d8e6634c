"""`iared eval` (`iared.commands.eval`): method parsing, the JSON layout of docs/results-format.md on
tiny synthetic data, segmentation, video models, and one-line errors."""

import dataclasses
import json

import pytest
import torch

import iared
from iared.cli import main
from iared.commands.eval import parse_methods
from iared.data import DATASETS, register_dataset
from iared.data.video import MovingFashionDataset
from iared.errors import UserError
from iared.evaluation.accuracy import accuracy
from iared.reduction.policy import available_policies

from helpers import TinyData, segfolder, tiny_classifier, tiny_video


@pytest.fixture
def tiny_data():
    register_dataset("tiny", lambda path, split, seed, **kw: TinyData(split, seed, **kw))
    yield "tiny"
    DATASETS.pop("tiny", None)


@pytest.fixture
def iared_file(tmp_path):
    m = tiny_classifier()
    iared.patch(m, policy="iared", groups=3)
    path = tmp_path / "model.safetensors"
    iared.save_model(m, path, arch="vit_custom", data={"kind": "tiny", "mean": [0.0] * 3, "std": [1.0] * 3})
    return path


def test_parse_methods():
    specs = parse_methods("original, ats@0.7,ats@K=48+stages=1-2,random@0.5,iared@0.6,attention@block=0",
                          available_policies())
    assert [s.label for s in specs] == ["original", "ats@0.7", "ats@K=48+stages=1-2", "random@0.5", "iared@0.6",
                                        "attention@block=0"]
    assert specs[1].settings == {"rho": 0.7}
    assert specs[2].settings == {"K": 48, "stages": [1, 2]}
    assert specs[3].settings == {"keep_ratio": 0.5} and specs[4].settings == {"threshold": 0.6}
    assert specs[5].settings == {"block": 0}
    # a comma inside a setting's list is not a method separator
    specs = parse_methods("ats@K=48+stages=2,3,topk@K=8,4+stages=1,2,random", available_policies())
    assert [s.label for s in specs] == ["ats@K=48+stages=2,3", "topk@K=8,4+stages=1,2", "random"]
    assert specs[0].settings == {"K": 48, "stages": [2, 3]} and specs[1].settings == {"K": [8, 4], "stages": [1, 2]}
    # a range is a short list of blocks (found by fuzzing: "0-7777777777" allocated without end)
    for bad in ("nope", "original@0.5", "ats,ats", "", "ats@x", "ats,3", "ats@0.5,3", "ats@0-99999999999",
                "ats@stages=5-2"):
        with pytest.raises(UserError):
            parse_methods(bad, available_policies())


def test_eval_json_layout(tiny_data, iared_file, tmp_path):
    out = tmp_path / "res" / "eval.json"
    argv = ["eval", "--data", "tiny", "--checkpoint", str(iared_file), "--methods",
            "original,iared,ats@0.5,topk@0.5,random@0.5,attention", "--json", str(out), "--batch-size", "8",
            "--flops-images", "3", "--device", "cpu"]
    assert main(argv) == 0
    res = json.loads(out.read_text())
    assert res["data"] == "tiny" and res["checkpoint"] == str(iared_file)
    assert res["command"].startswith("iared eval --data tiny") and "--methods" in res["command"]
    assert res["kernels"] in ("native", "onednn", "aten") and res["allocator"] in ("glibc, no mmap/trim", "system")
    assert list(res["methods"]) == ["original", "iared", "ats@0.5", "topk@0.5", "random@0.5", "attention"]
    for name, r in res["methods"].items():
        for key in ("top1", "top5", "gflops_per_img", "img_per_s", "keep_ratio", "flops_ratio", "speedup"):
            assert key in r, (name, key)
        assert 0 <= r["top1"] <= r["top5"] <= 100 and r["img_per_s"] > 0 and r["n_images"] == 12
    o = res["methods"]["original"]
    assert o["keep_ratio"] == 1.0 and o["flops_ratio"] == 1.0
    assert len(res["methods"]["iared"]["keep_ratio_per_group"]) == 3
    assert res["methods"]["random@0.5"]["keep_ratio"] == pytest.approx(0.5)
    assert res["methods"]["random@0.5"]["gflops_per_img"] < o["gflops_per_img"]
    # The original model's GFLOPs: counted equals the analytic block count plus embedding and head.
    assert o["gflops_per_img"] > 0


def test_eval_threshold_knob_and_segmentation(tiny_data, iared_file, tmp_path):
    out = tmp_path / "eval.json"
    argv = ["eval", "--data", "tiny", "--checkpoint", str(iared_file), "--methods", "iared@0.0,iared@1.0",
            "--json", str(out), "--flops-images", "1", "--no-throughput", "--segmentation", "--limit-batches", "1",
            "--batch-size", "4"]
    assert main(argv) == 0
    res = json.loads(out.read_text())
    assert res["methods"]["iared@0.0"]["keep_ratio"] == 1.0      # every sigmoid score is > 0
    assert res["methods"]["iared@1.0"]["keep_ratio"] == 0.0      # none is > 1
    assert res["methods"]["iared@0.0"]["img_per_s"] is None
    # the paper's heatmap (group 2), each group's, and every explainer of Table 1
    assert set(res["segmentation"]) == {"iared", "iared@group=0", "iared@group=1", "iared@group=2", "attention",
                                        "rollout", "gradcam", "chefer"}
    assert res["segmentation"]["iared"] == res["segmentation"]["iared@group=1"]
    assert 0 <= res["segmentation"]["rollout"]["mIoU"] <= 100


def test_eval_method_budgets_out_of_range_are_one_line(tiny_data, iared_file, tmp_path, capsys, monkeypatch):
    """`iared@T` takes what `--threshold` takes, [0, 1]; every budget is checked before any
    method is evaluated (a bad last method used to fail after the others had run)."""
    import iared.commands.compare as compare_module

    evaluated = []
    monkeypatch.setattr(compare_module, "evaluate", lambda m, *a, **k: evaluated.append(m) or {})
    for method, says in (("iared@2", "threshold must be in [0, 1], got 2"),
                         ("iared@-0.5", "threshold must be in [0, 1], got -0.5"),
                         ("random@1.5", "keep_ratio must be in (0, 1], got 1.5"),
                         ("ats@0", "rho must be a number in (0, 16], got 0"),
                         ("ats@foo=3", "ats has no setting 'foo'")):
        argv = ["eval", "--data", "tiny", "--checkpoint", str(iared_file), "--methods", f"original,{method}",
                "--json", str(tmp_path / "e.json"), "--no-throughput", "--limit-batches", "1"]
        assert main(argv) == 2, method
        err = capsys.readouterr().err.strip()
        assert says in err and len(err.splitlines()) == 1, err
    assert evaluated == [] and not (tmp_path / "e.json").exists()


def test_build_method_takes_one_stage_as_a_number(iared_file):
    from iared.commands.eval import build_method, parse_methods
    from iared.models import load_model_file
    from iared.reduction.policy import available_policies

    model = load_model_file(str(iared_file))
    spec = parse_methods("ats@K=8+stages=1", available_policies())[0]
    assert build_method(model, spec).policy.settings.stages == [1]


def test_eval_backbone_runs_original_and_baselines(tiny_data, iared_file, tmp_path, capsys):
    """--backbone: "original", the baselines and their heatmaps use it; "iared" its own blocks."""
    other = tiny_classifier()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn_like(p))      # a different backbone: different logits
    bb = tmp_path / "backbone.safetensors"
    iared.save_model(other, bb, arch="vit_custom", data={"kind": "tiny", "mean": [0.0] * 3, "std": [1.0] * 3})
    common = ["--data", "tiny", "--checkpoint", str(iared_file), "--methods", "original,iared@0,random@0.5",
              "--flops-images", "1", "--no-throughput", "--segmentation", "--batch-size", "12"]
    res = {}
    for name, extra in (("own", []), ("bb", ["--backbone", str(bb)])):
        assert main(["eval", *common, "--json", str(tmp_path / f"{name}.json"), *extra]) == 0
        res[name] = json.loads((tmp_path / f"{name}.json").read_text())
    own, with_bb = res["own"]["methods"], res["bb"]["methods"]
    assert res["bb"]["backbone"] == str(bb)
    # without --backbone, "original" is the checkpoint's blocks, which iared@0 also runs (keeping all)
    assert own["original"]["top1"] == own["iared@0"]["top1"] and with_bb["iared@0"] == own["iared@0"]
    ds = TinyData("test", 0)
    expected = accuracy(other(ds.x), ds.y)[0]
    assert with_bb["original"]["top1"] == pytest.approx(expected)
    assert res["bb"]["segmentation"]["iared"] == res["own"]["segmentation"]["iared"]
    assert res["bb"]["segmentation"]["rollout"] != res["own"]["segmentation"]["rollout"]
    # a backbone that does not fit the checkpoint: one line, exit 2
    wrong = tmp_path / "wrong.safetensors"
    iared.save_model(iared.create_model("vit_custom", img_size=16, patch_size=4, embed_dim=24, depth=3, num_heads=2,
                                        num_classes=5), wrong, arch="vit_custom")
    capsys.readouterr()
    assert main(["eval", *common, "--json", str(tmp_path / "x.json"), "--backbone", str(wrong)]) == 2
    err = capsys.readouterr().err.strip()
    assert "does not match the checkpoint" in err and len(err.splitlines()) == 1
    assert main(["eval", *common, "--json", str(tmp_path / "x.json"), "--backbone", str(iared_file)]) == 2
    assert "has a token policy" in capsys.readouterr().err


def test_foreign_checkpoint_needs_arch(tiny_data, tmp_path, capsys):
    m = iared.create_model("vit_custom", img_size=16, patch_size=4, embed_dim=24, depth=3, num_heads=2,
                           num_classes=4)
    pth = tmp_path / "foreign.pth"
    torch.save(m.state_dict(), pth)
    out = tmp_path / "eval.json"
    base = ["eval", "--data", "tiny", "--checkpoint", str(pth), "--methods", "original,ats", "--json", str(out),
            "--no-throughput", "--flops-images", "1"]
    assert main(base) == 2
    err = capsys.readouterr().err.strip()
    assert "--arch" in err and len(err.splitlines()) == 1
    assert not out.exists()
    # vit_custom's defaults are a ViT-B; the file's shapes do not match it: a one-line error too.
    assert main(base + ["--arch", "vit_custom"]) == 2
    assert main(base + ["--arch", "no_such_arch"]) == 2
    assert main(["eval", "--data", "tiny", "--checkpoint", str(tmp_path / "missing.safetensors"),
                 "--json", str(out)]) == 2
    assert not out.exists()
    # an output that cannot be written fails before the evaluation, not after it
    capsys.readouterr()
    assert main(["eval", "--data", "tiny", "--checkpoint", str(pth), "--arch", "vit_custom", "--json",
                 str(pth / "x.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot write --json" in err[0], err


def test_eval_pretrained_mnist_checkpoint(shared_dir, tmp_path):
    out = tmp_path / "mnist.json"
    argv = ["eval", "--data", f"mnist:{shared_dir / 'data' / 'mnist'}", "--checkpoint",
            str(shared_dir / "models" / "vit_mnist_gauravpbhagwat.pth"), "--arch", "vit_mnist_patch7_28",
            "--methods", "original,ats@0.5", "--json", str(out), "--limit-images", "64", "--flops-images", "2",
            "--no-throughput"]
    assert main(argv) == 0
    res = json.loads(out.read_text())["methods"]
    assert res["original"]["top1"] > 90          # SOURCES.md: 97.94 % on the full test set
    assert res["ats@0.5"]["gflops_per_img"] < res["original"]["gflops_per_img"]


def test_segmentation_without_masks_fails_before_the_evaluation(tmp_path, iared_file, monkeypatch, capsys):
    # asked for explicitly, --segmentation on data without masks used to evaluate everything and
    # leave a note in the JSON; now one line and exit 2, and nothing written
    class NoMasks(TinyData):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.info = dataclasses.replace(self.info, has_masks=False)

    register_dataset("tiny-nomasks", lambda path, split, seed, **kw: NoMasks(split, seed, **kw))
    try:
        out = tmp_path / "e.json"
        argv = ["eval", "--data", "tiny-nomasks", "--checkpoint", str(iared_file), "--json", str(out),
                "--flops-images", "1", "--no-throughput"]
        assert main(argv + ["--segmentation"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "has no pixel masks" in err[0] and not out.exists()
        assert main(argv) == 0
        assert json.loads(out.read_text())["notes"]["img_per_s"] == "not measured (--no-throughput)"
    finally:
        DATASETS.pop("tiny-nomasks", None)


def test_eval_segmentation_on_unlabeled_segfolder(tmp_path, capsys):
    import json

    import iared
    from iared.cli import main

    root = segfolder(tmp_path / "seg")
    torch.manual_seed(0)
    m = iared.patch(iared.create_model("vit_custom", img_size=32, patch_size=8, embed_dim=16, depth=3, num_heads=2,
                                       num_classes=5), policy="iared", groups=3)
    m.pretrained_cfg.update(input_size=(3, 32, 32), crop_pct=1.0)
    iared.save_model(m, tmp_path / "m.safetensors", arch="vit_custom")
    out = tmp_path / "r.json"
    assert main(["eval", "--data", f"segfolder:{root}", "--checkpoint", str(tmp_path / "m.safetensors"),
                 "--segmentation", "--methods", "original,iared", "--json", str(out), "--no-throughput",
                 "--device", "cpu"]) == 0
    res = json.loads(out.read_text())
    assert res["methods"]["original"]["top1"] is None
    assert {"iared", "iared@group=0", "iared@group=2", "attention", "rollout", "gradcam", "chefer"} <= \
        set(res["segmentation"])
    assert "(no labels)" in capsys.readouterr().out
    # without --segmentation there is nothing to measure on unlabeled images
    assert main(["eval", "--data", f"segfolder:{root}", "--checkpoint", str(tmp_path / "m.safetensors"),
                 "--json", str(out), "--device", "cpu"]) == 2
    assert "has no labels" in capsys.readouterr().err


def test_cli_eval_on_video_reports_table3_keys(tmp_path, capsys):
    """`iared eval` with a video model: clip-1 / video-1 errors, clips/s, GFLOPs per clip per method."""
    import json

    from iared.cli import main
    from iared.data import DATASETS, register_dataset

    model, data = tiny_video()
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
