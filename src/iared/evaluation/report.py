"""Human-readable results: markdown tables, the accuracy-vs-GFLOPs plot, the demo's report.md.

The tables are rendered from the same dicts that go into `results.json` (the layout of docs/results-format.md),
so a report can never disagree with its JSON. `benchmarks/make_readme.py` uses the same
table helpers for the README.

The trade-off plot draws, per method, the budget sweep (one point per budget value, the
knob that sets the method's cost) as accuracy against GFLOPs per image; the unreduced
backbone is one point, with a dashed line at its accuracy so the accuracy lost at each
cost can be read off directly.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

from matplotlib.figure import Figure

from .accuracy import standard_error
from .figures import save_figure
from ..fileio import atomic_write

# A consistent colour and marker per method across every plot.
METHOD_STYLE = {
    "original": ("black", "*"), "iared": ("tab:red", "o"), "ats": ("tab:blue", "s"), "topk": ("tab:cyan", "D"),
    "random": ("tab:gray", "v"), "attention": ("tab:green", "^"), "tempdiff": ("tab:purple", "P"),
}


# -- markdown -------------------------------------------------------------------------------


def fmt(value: Any, digits: int = 2) -> str:
    """A table cell: numbers rounded to `digits`, lists joined with " / ", None as "–"."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return "–"
        if value != 0 and abs(value) < 10 ** -digits:
            return f"{value:.{digits}g}"
        return f"{value:.{digits}f}"
    if isinstance(value, (list, tuple)):
        return " / ".join(fmt(v, digits) for v in value)
    if isinstance(value, dict):
        return ", ".join(f"{k}={fmt(v, max(digits, 3))}" for k, v in value.items())
    return str(value).replace("|", "\\|").replace("\n", " ")


def md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub markdown table from a header and rows of already formatted cells."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


# Columns of a per-method table, shown in this order when any row has them: (key, header, digits).
METHOD_COLUMNS = (
    ("budget", "budget", 3), ("top1", "top-1 %", 2), ("top1_se", "± s.e.", 2), ("top5", "top-5 %", 2),
    ("top5_se", "± s.e. ", 2),
    ("clip1_err", "clip-1 err %", 2), ("video1_err", "video-1 err %", 2),
    ("gflops_per_img", "GFLOPs/img", 4), ("gflops_per_clip", "GFLOPs/clip", 3),
    ("img_per_s", "img/s", 1), ("clips_per_s", "clips/s", 2), ("speedup", "speedup", 2),
    ("img_per_s_b1", "img/s b1", 1), ("speedup_b1", "speedup b1", 2),
    ("flops_ratio", "FLOPs ratio", 2), ("keep_ratio", "keep ratio", 3), ("keep_ratio_per_group", "keep per group", 2),
)


def method_table(methods: Mapping[str, Any], reference: Optional[str] = "original") -> str:
    """One row per method with the `METHOD_COLUMNS` present, plus Δtop-1 against `reference`.

    Args:
        methods: method name -> metrics dict (the "methods" of a results JSON).
        reference: the method the Δtop-1 column is measured against (None: no such column).

    Returns:
        A markdown table.
    """
    rows_in = {k: v for k, v in methods.items() if isinstance(v, Mapping)}
    cols = [c for c in METHOD_COLUMNS if any(c[0] in v for v in rows_in.values())]
    ref_top1 = (rows_in.get(reference) or {}).get("top1") if reference else None
    header = ["method"] + [c[1] for c in cols] + (["Δtop-1"] if ref_top1 is not None else [])
    rows = []
    for name, v in rows_in.items():
        row = [name] + [fmt(v.get(k), d) for k, _, d in cols]
        if ref_top1 is not None:
            row.append(fmt(v["top1"] - ref_top1, 2) if isinstance(v.get("top1"), (int, float)) else "–")
        rows.append(row)
    return md_table(header, rows)


SEGMENTATION_COLUMNS = (("pixel_acc", "pixel acc %"), ("mAcc", "mAcc %"), ("mIoU", "mIoU %"), ("mAP", "mAP %"))


def metric_table(metrics: Mapping[str, Any], first: str = "method") -> str:
    """Segmentation table: one row per key of `metrics`, columns pixel acc / mAcc / mIoU / mAP."""
    rows_in = {k: v for k, v in metrics.items() if isinstance(v, Mapping) and v}
    cols = [c for c in SEGMENTATION_COLUMNS if any(c[0] in v for v in rows_in.values())]
    rows = [[name] + [fmt(v.get(k)) for k, _ in cols] for name, v in rows_in.items()]
    return md_table([first] + [h for _, h in cols], rows)


def sweep_table(sweep: Mapping[str, Sequence[Mapping[str, Any]]]) -> str:
    """Every point of a budget sweep: method, budget, top-1, GFLOPs, keep ratio."""
    rows = []
    for name, points in sweep.items():
        for p in points:
            rows.append([name, fmt(p.get("budget"), 3), fmt(p.get("top1")), fmt(p.get("top1_se")),
                         fmt(p.get("gflops_per_img"), 4), fmt(p.get("keep_ratio"), 3)])
    return md_table(["method", "budget", "top-1 %", "± s.e.", "GFLOPs/img", "keep ratio"], rows)


# -- the trade-off plot -------------------------------------------------------------------


def tradeoff_figure(sweep: Mapping[str, Sequence[Mapping[str, Any]]], title: Optional[str] = None,
                    matched: Optional[Mapping[str, Mapping[str, Any]]] = None, metric: str = "top1",
                    ylabel: str = "top-1 accuracy (%)") -> Figure:
    """Accuracy against GFLOPs per image, one curve per method.

    Args:
        sweep: method -> points, each with "gflops_per_img" and `metric` (a single point
            for "original").
        title: figure title.
        matched: optional method -> metrics at the matched budget, drawn as large hollow
            markers (the operating points of the report's main table).
        metric: the key plotted on the y axis.
        ylabel: its axis label.

    Returns:
        The figure (save it with `figures.save_figure`).
    """
    fig = Figure(figsize=(6.4, 4.4))
    ax = fig.add_subplot(1, 1, 1)
    for name, points in sweep.items():
        pts = sorted((p["gflops_per_img"], p[metric]) for p in points
                     if p.get("gflops_per_img") is not None and p.get(metric) is not None)
        if not pts:
            continue
        color, marker = METHOD_STYLE.get(name, (None, "o"))
        xs, ys = zip(*pts)
        ax.plot(xs, ys, marker=marker, color=color, label=name, linestyle="-" if len(pts) > 1 else "none",
                markersize=9 if name == "original" else 5)
        if name == "original":
            ax.axhline(ys[0], color="black", linestyle="--", linewidth=0.8, alpha=0.6)
    for name, m in (matched or {}).items():
        if m.get("gflops_per_img") is None or m.get(metric) is None or name == "original":
            continue
        color, marker = METHOD_STYLE.get(name, (None, "o"))
        ax.plot([m["gflops_per_img"]], [m[metric]], marker=marker, markersize=12, markerfacecolor="none",
                markeredgewidth=1.5, color=color, linestyle="none")
    ax.set_xlabel("GFLOPs per image (multiply-adds)")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


def save_tradeoff_plot(sweep: Mapping[str, Sequence[Mapping[str, Any]]], path: Union[str, os.PathLike],
                       **kwargs: Any) -> Path:
    """`tradeoff_figure(sweep, **kwargs)` written atomically as a PNG at `path`."""
    return save_figure(tradeoff_figure(sweep, **kwargs), path)


# -- report.md --------------------------------------------------------------------------


def render_report(results: Mapping[str, Any], *, title: str = "iared demo", lead: str = "", intro: str = "",
                  sweep: Optional[Mapping[str, Sequence[Mapping[str, Any]]]] = None,
                  figures: Sequence[tuple[str, str]] = (), training: Optional[Mapping[str, Any]] = None,
                  notes: Sequence[str] = ()) -> str:
    """The markdown text of a report for one results document.

    Args:
        results: a results dict in the layout of docs/results-format.md ("methods", optional "segmentation").
        title: the H1 title.
        lead: the conclusion, first under the title.
        intro: a paragraph after it (what was run).
        sweep: method -> budget sweep points (tabulated in full).
        figures: (caption, relative PNG path) pairs, embedded in order.
        training: optional {"backbone": {...}, "iared": {...}} summaries to show.
        notes: extra paragraphs at the end (how budgets were matched, caveats).

    Returns:
        The markdown text.
    """
    parts = [f"# {title}"]
    if lead:
        parts.append(lead)
    if intro:
        parts.append(intro)
    meta = [f"- data: `{results.get('data', '?')}`", f"- checkpoint: `{results.get('checkpoint', '?')}`"]
    if results.get("command"):
        meta.append(f"- command: `{results['command']}`")
    if results.get("wall_s") is not None:
        meta.append(f"- wall time: {results['wall_s'] / 60:.1f} min on {results.get('device', '?')} "
                    f"({results.get('threads', '?')} threads)")
    parts.append("\n".join(meta))
    if training:
        parts.append("## Training\n\n" + _training_text(training))
    if results.get("methods"):
        parts.append("## Accuracy and cost per method\n\n" + method_table(results["methods"]))
    if results.get("segmentation"):
        parts.append("## Heatmaps as foreground segmentation\n\nEach heatmap is upsampled to the image, "
                     "binarised at its own mean and compared with the item's pixel mask "
                     "(the IA-RED² paper's Table 1 protocol).\n\n" + metric_table(results["segmentation"]))
    if sweep:
        parts.append("## Budget sweep\n\n" + sweep_table(sweep))
    for caption, rel in figures:
        parts.append(f"### {caption}\n\n![{caption}]({rel})")
    parts += list(notes)
    return "\n\n".join(parts) + "\n"


def _val_top1(val: Optional[Mapping[str, Any]]) -> str:
    """"84.21 ± 1.11 % (n = 1080)" from a training summary's validation metrics."""
    val = val or {}
    top1, n = val.get("top1"), val.get("n")
    if not isinstance(top1, (int, float)) or not n:
        return f"{fmt(top1)} %"
    return f"{fmt(top1)} ± {fmt(standard_error(top1, n))} % (n = {n})"


def _training_text(training: Mapping[str, Any]) -> str:
    lines = []
    bb = training.get("backbone") or {}
    if bb:
        lines.append(f"- backbone: {bb.get('arch', '?')} {fmt(bb.get('size'))}, val top-1 "
                     f"{_val_top1(bb.get('val'))}, {fmt(bb.get('wall_s', 0) / 60, 1)} min")
    ia = training.get("iared") or {}
    if ia:
        lines.append(f"- IA-RED² (D = {ia.get('groups', '?')}): val top-1 {_val_top1(ia.get('val'))}, "
                     f"keep per group {fmt((ia.get('val') or {}).get('keep_ratio_per_group'), 3)}, "
                     f"{fmt(ia.get('wall_s', 0) / 60, 1)} min")
        for st in ia.get("per_stage") or []:
            same_val = {"top1": st.get("val_top1"), "n": (ia.get("val") or {}).get("n")}
            lines.append(f"  - after {st.get('stage')}: val top-1 {_val_top1(same_val)}, keep per group "
                         f"{fmt(st.get('keep_ratio_per_group'), 3)}")
    return "\n".join(lines)


def write_text_atomic(path: Union[str, os.PathLike], text: str) -> Path:
    """Write `text` to `path` atomically (see `iared.fileio`)."""
    return atomic_write(path, text)


def write_report(path: Union[str, os.PathLike], results: Mapping[str, Any], **kwargs: Any) -> Path:
    """`render_report(results, **kwargs)` written atomically to `path`."""
    return write_text_atomic(path, render_report(results, **kwargs))


__all__ = ["fmt", "md_table", "method_table", "metric_table", "render_report", "save_tradeoff_plot",
           "sweep_table", "tradeoff_figure", "write_report", "write_text_atomic"]
