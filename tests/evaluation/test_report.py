"""Report rendering (tables, trade-off plot, report.md) and the README table generator."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from iared.evaluation.report import (fmt, md_table, method_table, metric_table, render_report, save_tradeoff_plot,
                                     tradeoff_figure, write_report)

ROOT = Path(__file__).resolve().parents[2]  # the repository


def _make_readme():
    spec = importlib.util.spec_from_file_location("make_readme", ROOT / "benchmarks" / "make_readme.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


METHODS = {
    "original": {"top1": 90.0, "top5": 99.5, "gflops_per_img": 0.2, "img_per_s": 300.0, "keep_ratio": 1.0},
    "iared": {"top1": 89.25, "top5": 99.0, "gflops_per_img": 0.1, "img_per_s": 500.0, "keep_ratio": 0.4,
              "keep_ratio_per_group": [0.9, 0.6, 0.4], "budget": {"threshold": 0.5}},
    "random": {"top1": 70.0, "gflops_per_img": 0.1, "keep_ratio": 0.45, "budget": {"keep_ratio": 0.45}},
}
SWEEP = {
    "original": [{"budget": None, "top1": 90.0, "gflops_per_img": 0.2, "keep_ratio": 1.0}],
    "iared": [{"budget": {"threshold": t}, "top1": 90 - 5 * t, "gflops_per_img": 0.2 - 0.1 * t, "keep_ratio": 1 - t}
              for t in (0.3, 0.5, 0.7)],
    "random": [{"budget": {"keep_ratio": r}, "top1": 50 + 40 * r, "gflops_per_img": 0.2 * r, "keep_ratio": r}
               for r in (0.3, 0.6)],
}


def test_fmt_cells():
    assert fmt(None) == "–"
    assert fmt(3) == "3"
    assert fmt(1.23456) == "1.23"
    assert fmt(0.0004, 2) == "0.0004"   # small values keep significant digits instead of printing 0.00
    assert fmt([0.91, 0.5], 2) == "0.91 / 0.50"
    assert fmt({"keep_ratio": 0.5}) == "keep_ratio=0.500"
    assert fmt("a|b") == "a\\|b"          # a pipe would split the markdown cell
    assert fmt(float("nan")) == "–"


def test_md_table_shape():
    t = md_table(["a", "b"], [["1", "2"], ["3", "4"]]).splitlines()
    assert t == ["| a | b |", "|---|---|", "| 1 | 2 |", "| 3 | 4 |"]


def test_method_table_delta_and_columns():
    lines = method_table(METHODS).splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header[0] == "method" and header[-1] == "Δtop-1"
    assert "keep per group" in header and "budget" in header
    rows = {ln.split("|")[1].strip(): [c.strip() for c in ln.strip("|").split("|")] for ln in lines[2:]}
    assert set(rows) == {"original", "iared", "random"}
    assert rows["iared"][-1] == "-0.75"
    assert rows["random"][-1] == "-20.00"
    assert rows["original"][-1] == "0.00"
    # A column a row lacks is a dash, not an empty cell or a crash.
    assert rows["random"][header.index("img/s")] == "–"


def test_metric_table_rows():
    t = metric_table({"iared": {"pixel_acc": 80.0, "mAcc": 70.0, "mIoU": 60.0}, "attention": {}}).splitlines()
    assert len(t) == 3  # an empty entry (method not run) gets no row
    assert "| iared | 80.00 | 70.00 | 60.00 |" == t[2]


def _png_stats(path: Path) -> tuple[tuple[int, int], float]:
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        arr = np.asarray(im.convert("RGB"), dtype=np.float32)
    return arr.shape[:2], float(arr.std())


def test_tradeoff_plot_has_one_curve_per_method(tmp_path):
    fig = tradeoff_figure(SWEEP, matched={"iared": SWEEP["iared"][1]})
    ax = fig.axes[0]
    labels = [h.get_label() for h in ax.get_legend().legend_handles]
    assert labels == ["original", "iared", "random"]
    iared_line = [ln for ln in ax.get_lines() if ln.get_label() == "iared"][0]
    # Points are drawn sorted by cost, so the curve reads left to right.
    assert list(iared_line.get_xdata()) == sorted(p["gflops_per_img"] for p in SWEEP["iared"])
    path = save_tradeoff_plot(SWEEP, tmp_path / "tradeoff.png", title="t")
    (h, w), std = _png_stats(path)
    assert h > 100 and w > 100 and std > 0
    assert not list(tmp_path.glob("*.tmp"))


def test_render_report_mentions_everything(tmp_path):
    results = {"data": "cluttered-digits", "checkpoint": "x.safetensors", "command": "iared demo", "methods": METHODS,
               "segmentation": {"iared": {"pixel_acc": 1.0, "mAcc": 2.0, "mIoU": 3.0}}}
    text = render_report(results, sweep=SWEEP, figures=[("Trade-off", "tradeoff.png")],
                         training={"iared": {"groups": 3, "val": {"top1": 88.0, "keep_ratio_per_group": [0.9, 0.5, 0.3]},
                                             "per_stage": [{"stage": "policy-1", "val_top1": 89.0,
                                                            "keep_ratio_per_group": [0.9, 1.0, 1.0]}]}},
                         notes=["a note"])
    for name in METHODS:
        assert f"| {name} |" in text
    assert "![Trade-off](tradeoff.png)" in text
    assert "mIoU" in text and "a note" in text and "policy-1" in text and "`iared demo`" in text
    path = write_report(tmp_path / "report.md", results)
    assert path.read_text().startswith("# iared demo")


# -- make_readme ----------------------------------------------------------------------------

README = """# x

intro stays

<!-- results:speed -->
old speed
<!-- /results:speed -->

middle stays

<!-- results:cluttered_fashion -->
old
<!-- /results:cluttered_fashion -->

<!-- results:cifar10 -->
old
<!-- /results:cifar10 -->

<!-- results:offshelf -->
<!-- /results:offshelf -->

end stays
"""


@pytest.fixture()
def fake_results(tmp_path):
    res = tmp_path / "results"
    res.mkdir()
    (res / "speed_deit_small_b64.json").write_text(json.dumps({
        "arch": "deit_small_patch16_224", "img_size": 224, "batch_size": 64, "device": "cpu", "threads": 2,
        "command": "iared bench speed --arch deit_small_patch16_224 --json x",
        "methods": {"original": {"img_per_s": 10.0, "gflops_per_img": 4.6, "keep_ratio": 1.0, "speedup": 1.0,
                                 "flops_ratio": 1.0},
                    "iared": {"img_per_s": 15.0, "gflops_per_img": 3.0, "keep_ratio": 0.6, "speedup": 1.5,
                              "speedup_paired": 1.52, "flops_ratio": 1.6, "reduction_cost_pct": 0.04}}}))
    (res / "cluttered_fashion.json").write_text(json.dumps({
        "command": "benchmarks/cluttered_fashion.py", "data": "cluttered-fashion", "methods": METHODS,
        "segmentation": {"iared": {"pixel_acc": 80.0, "mAcc": 75.0, "mIoU": 61.5},
                         "attention": {"pixel_acc": 70.0, "mAcc": 65.0, "mIoU": 50.0}},
        "attention_blocks": {"0": {"mIoU": 40.0}, "1": {"mIoU": 50.0}, "2": {"mIoU": 45.0}}}))
    (res / "offshelf.json").write_text(json.dumps({
        "command": "offshelf", "models": {"vit_mnist": {"checkpoint": "m.pth", "methods": {"ats": {"top1": 97.0}}}}}))
    readme = tmp_path / "README.md"
    readme.write_text(README)
    return readme, res


def test_make_readme_fills_markers_and_keeps_prose(fake_results, capsys):
    readme, res = fake_results
    mr = _make_readme()
    assert mr.main(["--readme", str(readme), "--results", str(res)]) == 0
    text = readme.read_text()
    for keep in ("# x\n\nintro stays", "middle stays", "end stays"):
        assert keep in text
    speed = mr.marker_pattern("speed").search(text).group(2)
    assert "old speed" not in speed
    # speedup / flops_ratio = 1.5 / 1.6 and paired 1.52 / 1.6 for iared
    assert "| deit_small_patch16_224 @224 | 64 | iared | 15.0 | 3.000 | 1.50 | 0.94 | 0.95 | 0.04 | cpu/2/fp32/aten/system |" in speed
    cf = mr.marker_pattern("cluttered_fashion").search(text).group(2)
    assert "Table 2" in cf and "Table 1" in cf and "Table 5" in cf and "| block 1 |" in cf and "61.50" in cf
    assert mr.marker_pattern("cifar10").search(text).group(2).strip() == "not run yet"
    off = mr.marker_pattern("offshelf").search(text).group(2)
    assert "vit_mnist" in off and "97.00" in off
    out = capsys.readouterr().out
    # Markers the README lacks are named, and no section is added for them.
    for name in ("threshold_sweep", "moving_fashion", "pruning"):
        assert f"results:{name}" in out
        assert f"results:{name}" not in text
    # Running again changes nothing.
    assert mr.main(["--readme", str(readme), "--results", str(res)]) == 0
    assert readme.read_text() == text


def test_make_readme_speed_ceiling_sentence(tmp_path):
    """The speed summary quotes the range of the blocks' ceilings from block_times.py, when run."""
    mr = _make_readme()
    assert mr._ceiling(tmp_path) == ""
    rows = {"original": {"total_ms": 10.0}, "iared": {"ceiling": 0.884}, "random": {"ceiling": 0.912}}
    (tmp_path / "block_times_vit_tiny_patch16_224.json").write_text(json.dumps(
        {"device_name": "CPU AMD EPYC", "kernels": {"onednn": {}, "native": rows}}))
    assert "reach 0.88-0.91 of their FLOPs ratio (AMD EPYC" in mr._ceiling(tmp_path)


def test_make_readme_missing_results_folder_says_not_run(tmp_path):
    mr = _make_readme()
    readme = tmp_path / "README.md"
    readme.write_text(README)
    assert mr.main(["--readme", str(readme), "--results", str(tmp_path / "nothing")]) == 0
    text = readme.read_text()
    for name in ("speed", "cluttered_fashion", "cifar10", "offshelf"):
        assert mr.marker_pattern(name).search(text).group(2).strip() == "not run yet"


def test_make_readme_renders_points_and_curves(tmp_path):
    mr = _make_readme()
    res = tmp_path / "results"
    res.mkdir()
    (res / "threshold_sweep.json").write_text(json.dumps({
        "command": "sweep", "points": [{"target_keep_ratio": 0.5, "b1": {"img_per_s": 12.5}},
                                       {"target_keep_ratio": 0.25, "b1": {"img_per_s": 20.0}}]}))
    (res / "pruning.json").write_text(json.dumps({
        "command": "prune", "notes": "no fine-tuning",
        "curves": {"pruning": [{"reduction": 0.1, "top1": 90.0}], "iared": [{"reduction": 0.3, "top1": 89.0}]}}))
    readme = tmp_path / "README.md"
    readme.write_text("<!-- results:threshold_sweep -->\n<!-- /results:threshold_sweep -->\n"
                      "<!-- results:pruning -->\n<!-- /results:pruning -->\n")
    assert mr.main(["--readme", str(readme), "--results", str(res)]) == 0
    text = readme.read_text()
    assert "| target_keep_ratio | b1.img_per_s |" in text and "| 0.250 | 20.000 |" in text
    assert "| curve | reduction | top1 |" in text and "| iared | 0.300 | 89.000 |" in text
    assert "no fine-tuning" in text


def test_readme_summaries_render_the_committed_results_or_say_not_run(tmp_path):
    mr = _make_readme()
    for name, render in mr.SUMMARIES.items():
        assert render(tmp_path) == mr.NOT_RUN, name
        table = render(ROOT / "benchmarks" / "results")
        assert table.startswith("| ") and "\n\n" in table, name  # a table, then its conclusion
