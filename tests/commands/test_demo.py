"""`iared demo --quick` end to end (one run shared by the tests, marked slow) and its one-line errors."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from iared.cli import main
from iared.commands.sweep import MATCHED_METHODS


NUMBER = (int, float)


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "run"
    assert main(["demo", "--quick", "--out", str(out), "--device", "cpu"]) == 0
    return out


@pytest.mark.slow
def test_results_json_layout(demo_out):
    r = json.loads((demo_out / "results.json").read_text())
    assert r["data"] == "cluttered-digits"
    assert isinstance(r["checkpoint"], str) and Path(r["checkpoint"]).is_file()
    assert r["command"].startswith("iared demo") and "--quick" in r["command"]
    assert list(r["methods"]) == list(MATCHED_METHODS)
    for name, m in r["methods"].items():
        for key in ("top1", "top5", "gflops_per_img", "img_per_s", "keep_ratio"):
            assert isinstance(m[key], NUMBER), (name, key)
        assert 0 <= m["top1"] <= m["top5"] <= 100
        assert 0 <= m["keep_ratio"] <= 1 and m["gflops_per_img"] > 0
    assert r["methods"]["original"]["keep_ratio"] == 1.0
    per_group = r["methods"]["iared"]["keep_ratio_per_group"]
    assert len(per_group) == 3 and all(isinstance(k, NUMBER) for k in per_group)
    # Groups can only drop more: the kept share never grows from one group to the next.
    assert all(a >= b - 1e-9 for a, b in zip(per_group, per_group[1:]))
    for name in ("iared", "attention", "rollout", "gradcam"):
        seg = r["segmentation"][name]
        for key in ("pixel_acc", "mAcc", "mIoU"):
            assert isinstance(seg[key], NUMBER) and 0 <= seg[key] <= 100


@pytest.mark.slow
def test_baselines_matched_to_iared_cost(demo_out):
    r = json.loads((demo_out / "results.json").read_text())
    target = r["matched_to"]["gflops_per_img"]
    assert target == pytest.approx(r["methods"]["iared"]["gflops_per_img"])
    for name in ("ats", "topk", "random", "attention"):
        knob = r["methods"][name]["budget"]
        assert len(knob) == 1 and 0 < next(iter(knob.values())) <= 1
        # The matched budget lies within (or at the end of) the swept budgets.
        swept = [next(iter(p["budget"].values())) for p in r["sweep"][name]]
        assert min(swept) - 1e-9 <= next(iter(knob.values())) <= max(swept) + 1e-9


@pytest.mark.slow
def test_report_mentions_every_method_and_figure(demo_out):
    text = (demo_out / "report.md").read_text()
    r = json.loads((demo_out / "results.json").read_text())
    for name in MATCHED_METHODS:
        assert f"| {name} |" in text
    for png in r["figures"]:
        assert f"]({png})" in text


@pytest.mark.slow
def test_pngs_are_real_images(demo_out):
    r = json.loads((demo_out / "results.json").read_text())
    pngs = sorted(demo_out.glob("*.png"))
    assert {p.name for p in pngs} == set(r["figures"])
    assert "tradeoff.png" in r["figures"] and "heatmaps_methods.png" in r["figures"]
    assert any(n.startswith("heatmaps_iared_") for n in r["figures"])
    for p in pngs:
        with Image.open(p) as im:
            im.verify()
        with Image.open(p) as im:
            arr = np.asarray(im.convert("RGB"), dtype=np.float32)
        assert arr.shape[0] > 50 and arr.shape[1] > 50
        assert arr.std() > 0, f"{p.name} is blank"
    # Nothing half-written is left behind.
    assert not [p for p in demo_out.rglob("*") if p.name.endswith(".tmp")]


@pytest.mark.slow
def test_report_opens_with_the_generated_conclusion(demo_out):
    text = (demo_out / "report.md").read_text()
    r = json.loads((demo_out / "results.json").read_text())
    assert text.splitlines()[2] == " ".join(r["conclusion"])
    for name in MATCHED_METHODS:  # every accuracy in the method table carries its standard error
        assert isinstance(r["methods"][name]["top1_se"], NUMBER)
    assert "± s.e." in text and " ± " in text


def test_conclusion_from_hand_made_numbers():
    from iared.commands.demo import conclusion

    def row(top1, gflops, speedup, keep=1.0, n=1000, **kw):
        return {"top1": top1, "top1_se": (top1 * (100 - top1) / n) ** 0.5, "gflops_per_img": gflops,
                "speedup": speedup, "keep_ratio": keep, "n_images": n, **kw}

    results = {
        "methods": {"original": row(90.0, 0.02, 1.0), "iared": row(89.0, 0.01, 1.6, keep=0.25),
                    "ats": row(70.0, 0.01, 1.3, keep=0.0625, keep_ratio_per_stage=[0.25, 0.125, 0.0625],
                               stage_blocks=[2, 3, 4], policy={"rho": 0.2, "K": None, "min_k": 8}),
                    "random": row(50.0, 0.01, 1.9), "attention": row(60.0, 0.0103, 1.8),
                    "topk": row(80.0, 0.015, 1.4)},
        "training": {"backbone": {"size": {"depth": 6, "embed_dim": 64}, "wall_s": 180.0},
                     "iared": {"groups": 3, "wall_s": 120.0}},
        "speed_batch": 64, "threads": 2,
    }
    first, second, third, ats = conclusion(results, num_patches=64)
    assert "90.0 ± 0.9 % test top-1 (1000 canvases)" in first and "at 89.0 ± 1.0 % (-1.0 points)" in first
    assert "in 3.0 min" in first and "in 2.0 min" in first
    assert "keeps 25 % of the patch tokens" in second and "2.00× fewer GFLOPs and 1.60×" in second
    # gaps to IA-RED² at equal cost (within 5 %), and apart those that could not get as cheap;
    # the s.e. from the largest baseline s.e. (random's 1.58) with IA-RED²'s 0.99
    assert third.startswith("At IA-RED²'s GFLOPs the baselines fall behind it by ATS 19.0, random 39.0 and "
                            "attention 29.0 points; top-K cannot get that cheap within the swept budgets and, "
                            "at 1.50× its GFLOPs, still fall 9.0 points behind (")
    assert "about 1.9)" in third
    # K = round(0.2 * 65) = 13 samples; 0.25 * 64 = 16 distinct tokens, then 8, then 4
    assert "K = 13 samples" in ats and "16.0, 8.0, 4.0 distinct patch tokens in blocks 2, 3, 4" in ats
    assert "draws the same ones again" in ats  # 4 distinct tokens from 13 samples
    results["methods"]["ats"]["keep_ratio_per_stage"] = [0.2, 0.19, 0.18]  # 12.8, 12.2, 11.5 of 13
    assert "seldom repeat" in conclusion(results, num_patches=64)[3]


@pytest.mark.slow
def test_second_run_reuses_trained_models(demo_out, capsys):
    before = {p: p.stat().st_mtime_ns for p in (demo_out / "backbone" / "model.safetensors",
                                                 demo_out / "iared" / "model.safetensors")}
    assert main(["demo", "--quick", "--out", str(demo_out), "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    assert "backbone: reusing" in err and "IA-RED²: reusing" in err
    assert {p: p.stat().st_mtime_ns for p in before} == before


def test_unwritable_out_is_one_line_exit_2(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert main(["demo", "--quick", "--out", str(blocker / "sub"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not writable" in err[0]


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write into read-only folders")
def test_read_only_out_is_exit_2(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        assert main(["demo", "--quick", "--out", str(ro / "x"), "--device", "cpu"]) == 2
    finally:
        ro.chmod(0o700)
