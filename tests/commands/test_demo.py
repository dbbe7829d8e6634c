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
