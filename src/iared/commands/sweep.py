"""Budget sweeps and comparisons at matched cost, on top of `run_eval`.

A sweep runs every method over a range of its budget (`TokenPolicy.budget`) and gives
each a trade-off curve; `matched_eval` then sets every baseline's budget to the one
whose cost, read off its curve, equals IA-RED²'s, and evaluates them all together.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from ..reduction.policy import budget_setting
from .eval import run_eval

MATCHED_METHODS = ("original", "iared", "ats", "topk", "random", "attention")


def match_budget(points: Sequence[tuple[float, float]], target_gflops: float) -> float:
    """The budget knob at which a method's cost equals `target_gflops`, by linear interpolation.

    Args:
        points: (gflops_per_img, knob) of a budget sweep, any order.
        target_gflops: the cost to match.

    Returns:
        The interpolated knob; outside the swept cost range, the knob of the nearest end
        (a method that cannot get as cheap or as expensive stays at its extreme budget).
    """
    if not points:
        raise ValueError("no sweep points to match a budget on")
    pts = sorted(points)
    xs = np.array([p[0] for p in pts], dtype=np.float64)
    ys = np.array([p[1] for p in pts], dtype=np.float64)
    return float(np.interp(target_gflops, xs, ys))


def sweep_points(methods: dict[str, dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Group `run_eval` entries labelled "NAME@KNOB" into per-method sweeps.

    Args:
        methods: the "methods" of a `run_eval` result, keyed by method label.

    Returns:
        method name -> points {"budget": {knob: value} or None, "top1", "top1_se", "top5",
        "gflops_per_img", "keep_ratio"} (order of the input).
    """
    out: dict[str, list[dict[str, Any]]] = {}
    for label, m in methods.items():
        name, _, knob = label.partition("@")
        setting = None if name == "original" else budget_setting(name)
        budget = {setting: float(knob)} if knob else (
            {setting: (m.get("policy") or {}).get(setting)} if setting else None)
        out.setdefault(name, []).append({
            "budget": budget, "top1": m["top1"], "top1_se": m.get("top1_se"), "top5": m["top5"],
            "gflops_per_img": m["gflops_per_img"],
            "keep_ratio": m["keep_ratio"],
        })
    return out


# -- stages -------------------------------------------------------------------------------


def budget_sweep(base: Any, budgets: dict[str, Sequence[float]]
                 ) -> tuple[dict[str, list[dict[str, Any]]], dict[str, Any]]:
    """Every method over its budget range: accuracy and GFLOPs (no timing).

    Args:
        base: an `EvalConfig` naming the data, the IA-RED² model file and the split.
        budgets: method -> budget values (`TokenPolicy.budget`), e.g. {"ats": (0.4, 0.6)}.

    Returns:
        (method -> sweep points sorted by cost, including "original" and "iared" at the
        model's own threshold; that IA-RED² point).
    """
    labels = ["original", "iared"] + [f"{m}@{v:g}" for m, values in budgets.items() for v in values]
    res = run_eval(dataclasses.replace(base, methods=",".join(labels), throughput=False, segmentation=False,
                                       json_path=None))
    default = sweep_points({"iared": res["methods"]["iared"]})["iared"][0]
    sweep = sweep_points(res["methods"])
    for points in sweep.values():  # cheapest first, as the plot and the table read
        points.sort(key=lambda p: p["gflops_per_img"])
    return sweep, default


def matched_headline(methods: dict[str, dict[str, Any]]) -> str:
    """A matched-cost result in a line: the backbone's and IA-RED²'s top-1 and the GFLOPs ratio."""
    o, i = methods["original"], methods["iared"]
    return (f"original {o['top1']:.2f}, IA-RED² {i['top1']:.2f} "
            f"at {o['gflops_per_img'] / i['gflops_per_img']:.2f}x fewer GFLOPs")


def matched_eval(base: Any, sweep: dict[str, list[dict[str, Any]]], target: float,
                 methods: Sequence[str] = MATCHED_METHODS, segmentation: bool = True) -> dict[str, Any]:
    """`methods` with every baseline's budget set to cost `target` GFLOPs, timed, as `iared eval` results.

    Args:
        base: an `EvalConfig` (data, IA-RED² model file, split, command, ...).
        sweep: the `budget_sweep` that the budgets are interpolated on.
        target: GFLOPs per image to match (IA-RED²'s).
        methods: method names; "original" and "iared" are run as they are.
        segmentation: add the heatmap segmentation metrics (data with masks).

    Returns:
        The `run_eval` results with methods keyed by plain name, each baseline carrying
        its "budget", and "matched_to".
    """
    budgets: dict[str, float] = {}
    for name in methods:
        if name in ("original", "iared"):
            continue
        setting = budget_setting(name)
        pts = [(p["gflops_per_img"], p["budget"][setting]) for p in sweep.get(name, []) if p["budget"]]
        budgets[name] = round(match_budget(pts, target), 3)
    labels = [n if n not in budgets else f"{n}@{budgets[n]:g}" for n in methods]
    res = run_eval(dataclasses.replace(base, methods=",".join(labels), throughput=True, segmentation=segmentation))
    named: dict[str, Any] = {}
    for label, entry in res["methods"].items():
        name = label.partition("@")[0]
        if name in budgets:
            entry["budget"] = {budget_setting(name): budgets[name]}
        elif name == "iared":
            entry["budget"] = {"threshold": (entry.get("policy") or {}).get("threshold")}
        named[name] = entry
    res["methods"] = named
    res["matched_to"] = {"method": "iared", "gflops_per_img": target,
                         "how": "each baseline's budget knob interpolated linearly on its sweep to IA-RED²'s GFLOPs"}
    return res
