"""The budget sweep's pure helpers (`iared.commands.sweep`): a budget matched to a cost, labels
grouped into sweeps."""

import pytest

from iared.commands.sweep import match_budget, sweep_points


def test_match_budget_interpolates_and_clamps():
    pts = [(0.4, 0.8), (0.1, 0.2), (0.25, 0.5)]  # (gflops, knob), unordered
    assert match_budget(pts, 0.25) == pytest.approx(0.5)
    assert match_budget(pts, 0.175) == pytest.approx(0.35)
    assert match_budget(pts, 1.0) == pytest.approx(0.8)    # beyond the sweep: its end
    assert match_budget(pts, 0.0) == pytest.approx(0.2)
    with pytest.raises(ValueError):
        match_budget([], 0.1)


def test_sweep_points_groups_labels():
    entry = {"top1": 1.0, "top5": 2.0, "gflops_per_img": 0.1, "keep_ratio": 0.5}
    sweep = sweep_points({"original": entry, "iared": {**entry, "policy": {"threshold": 0.5}},
                          "iared@0.7": entry, "ats@0.4": entry, "random@0.25": entry})
    assert sweep["original"][0]["budget"] is None
    assert [p["budget"] for p in sweep["iared"]] == [{"threshold": 0.5}, {"threshold": 0.7}]
    assert sweep["ats"][0]["budget"] == {"rho": 0.4}
    assert sweep["random"][0]["budget"] == {"keep_ratio": 0.25}
