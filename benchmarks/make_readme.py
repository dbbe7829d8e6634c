"""Regenerate the results tables of benchmarks/README.md from `benchmarks/results/*.json`.

The README owns its prose; this script only rewrites the text between marker pairs

    <!-- results:NAME -->
    ...generated...
    <!-- /results:NAME -->

Tables are never typed by hand: each is rendered from the JSON files a benchmark wrote
(each records the exact command that made it). A JSON file that does not exist yet
renders as "not run yet"; a marker pair missing from the README is reported on stdout
and nothing is added for it (the README's sections are the lead's to decide).

    .venv/bin/python benchmarks/make_readme.py [--readme benchmarks/README.md] [--results benchmarks/results]

Markers filled (NAME: source files):

    speed              speed_*.json            (`iared bench speed`, one file per arch/batch)
    threshold_sweep    threshold_sweep.json
    cluttered_fashion  cluttered_fashion.json  (benchmarks/cluttered_fashion.py)
    cifar10            cifar10.json            (benchmarks/cifar10.py)
    offshelf           offshelf.json
    imagenet           imagenet_vit_tiny.json  (benchmarks/imagenet.py)
    imagenet_iared     imagenet_iared.json     (benchmarks/imagenet_iared.py)
    davis              davis_segmentation.json (benchmarks/imagenet_iared.py)
    perturbation       imagenet_perturbation.json (benchmarks/imagenet_iared.py)
    moving_fashion     moving_fashion.json
    pruning            pruning.json
    demo_backbone      demo_backbone.json      (benchmarks/demo_backbone.py)
    fuzz               fuzz.json               (benchmarks/fuzz.py)

and, in the top-level README.md, one short table each (SUMMARIES): summary-imagenet,
summary-demo, summary-speed, summary-video.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from iared.evaluation.accuracy import standard_error
from iared.evaluation.report import fmt, md_table as table, method_table, metric_table

NOT_RUN = "not run yet"


def command_line(doc: dict[str, Any], name: str) -> str:
    cmd = doc.get("command")
    trained = doc.get("trained_by") or doc.get("training_command")
    made = f"Made by `{cmd}` (`benchmarks/results/{name}`)." if cmd else f"From `benchmarks/results/{name}`."
    return f"Models trained by `{trained}`. {made}" if trained and trained != cmd else made


# -- one renderer per marker ------------------------------------------------------------------


def render_speed(results: Path) -> str:
    files = sorted(results.glob("speed_*.json"))
    docs = [(f, _load(f)) for f in files]
    docs = [(f, d) for f, d in docs if d is not None]
    if not docs:
        return NOT_RUN
    rows, commands = [], []
    for f, d in docs:
        arch = f"{d.get('arch', '?')} @{d.get('img_size', '?')}"
        alloc = "steady" if str(d.get("allocator", "system")).startswith("glibc") else "system"
        dtype = {"float32": "fp32", "bfloat16": "bf16"}.get(d.get("dtype", "float32"), d.get("dtype"))
        where = _cpu(d["device_name"]) if d.get("device_name") else d.get("device", "?")
        dev = f"{where}/{d.get('threads', '?')}/{dtype}/{d.get('kernels', 'aten')}/{alloc}"
        for name, m in (d.get("methods") or {}).items():
            ratio = m.get("flops_ratio")
            speed_vs_flops = m["speedup"] / ratio if ratio and m.get("speedup") is not None else None
            paired = m.get("speedup_paired")
            paired_vs_flops = paired / ratio if ratio and paired is not None else None
            rows.append([arch, fmt(d.get("batch_size")), name, fmt(m.get("img_per_s"), 1),
                         fmt(m.get("gflops_per_img"), 3), fmt(m.get("speedup"), 2), fmt(speed_vs_flops, 2),
                         fmt(paired_vs_flops, 2), fmt(m.get("reduction_cost_pct"), 2), dev])
        commands.append(f"- `{d['command']}`" if d.get("command") else f"- `{f.name}`")
    header = ["arch", "batch", "method", "img/s", "GFLOPs/img", "speedup", "speedup / FLOPs ratio",
              "paired speedup / FLOPs ratio", "policy cost % of FLOPs", "device/threads/dtype/kernels/allocator"]
    note = ("speedup = median img/s over the original's; paired = median over timing rounds of the "
            "per-round time ratio (every round times every method once, so both see the same load). "
            "Policy cost: the reduction module's own GFLOPs (IA-RED²'s interpreters; negative for ATS and ToMe, "
            "which reduce inside a block) as a share of the backbone's.")
    return table(header, rows) + "\n\n" + note + "\n\nMade by:\n" + "\n".join(commands)


def render_cluttered_fashion(results: Path, name: str = "cluttered_fashion.json") -> str:
    d = _load(results / name)
    if d is None:
        return NOT_RUN
    parts = [command_line(d, name)]
    train = d.get("iared_train") or {}
    if train.get("keep_ratio_per_group") is not None:
        parts.append(f"IA-RED² training (`iared train`): validation top-1 {fmt(train.get('val_top1'), 2)}, "
                     f"keep ratio per group "
                     + " / ".join(fmt(k, 2) for k in train["keep_ratio_per_group"]) + ".")
    control = d.get("control_iared_blocks_keep_all")
    if control:
        parts.append(f"Control: the IA-RED² model's fine-tuned blocks with every token kept (`iared@0`) reach "
                     f"{fmt(control.get('top1'), 2)} % top-1: fine-tuning adapts the blocks to the dropped tokens, "
                     f"it does not add accuracy by itself.")
    if d.get("wall_s") is not None:
        reused = d.get("reused_stages") or {}
        if reused:
            recorded = [s for s in reused.values() if s is not None]
            took = (f"{fmt(d['wall_s'] / 60, 1)} min on {d.get('device', '?')} ({d.get('threads', '?')} threads), "
                    f"reusing the models an earlier run of the same command trained"
                    + (f" ({fmt(sum(recorded) / 60, 0)} min of training as their metrics record)" if recorded else ""))
        else:
            took = (f"Whole benchmark (training included) {fmt(d['wall_s'] / 60, 1)} min on {d.get('device', '?')} "
                    f"({d.get('threads', '?')} threads)")
        parts.append(f"{took[0].upper()}{took[1:]}; Table 2 on {d.get('eval_images', '?')} test images, "
                     f"Tables 1 and 5 on {d.get('seg_images', '?')}."
                     + (" **Quick smoke run: tiny training, not a result.**" if d.get("quick") else ""))
    if d.get("methods"):
        parts.append("**Table 2: accuracy at matched cost** (baselines' budgets chosen to match IA-RED²'s GFLOPs)\n\n"
                     + method_table(d["methods"]))
    if d.get("segmentation"):
        parts.append("**Table 1: heatmaps as foreground segmentation** (heatmap > its mean vs the item's pixel mask)\n\n"
                     + metric_table(d["segmentation"]))
    if d.get("attention_blocks"):
        parts.append("**Table 5: raw attention of block b** (CLS row, mean over heads)\n\n"
                     + metric_table({f"block {k}": v for k, v in d["attention_blocks"].items()}, first="block"))
    if d.get("iared_groups"):
        parts.append("**IA-RED²'s heatmap of each group** (Table 1's `iared` row is group 2, as the paper's "
                     "figures; tokens dropped by an earlier group score 0)\n\n"
                     + metric_table({f"group {k}": v for k, v in d["iared_groups"].items()}, first="group"))
    if d.get("targets"):
        parts.append("Targets: " + "; ".join(f"{k}: {'met' if v else 'not met'}" for k, v in d["targets"].items()))
    return "\n\n".join(parts)


def render_trade_off(file_name: str) -> Callable[[Path], str]:
    """Tables of a task whose JSON has `methods` (and optionally `segmentation`)."""

    def render(results: Path) -> str:
        d = _load(results / file_name)
        if d is None:
            return NOT_RUN
        parts = [command_line(d, file_name)]
        for key in ("note", "notes"):
            if isinstance(d.get(key), str):
                parts.append(d[key])
        parts += _generic_body(d)
        figures = [d["figure"]] if isinstance(d.get("figure"), str) else d.get("figures") or []
        parts += [f"![{Path(f).stem}](results/{Path(f).name})" for f in figures
                  if isinstance(f, str) and (results / Path(f).name).is_file()]
        return "\n\n".join(parts)

    return render


def render_imagenet(results: Path, name: str = "imagenet_vit_tiny.json") -> str:
    """The ImageNet ViT-Tiny rows, accuracy at matched cost, the figures."""
    d = _load(results / name)
    if d is None:
        return NOT_RUN
    parts = [command_line(d, name), d.get("notes", "")]
    if d.get("training"):
        parts.append(training_table(d))
    parts.append(method_table(d["methods"]))
    matched = d.get("matched_cost") or {}
    if matched:
        costs = [k for k in next(iter(matched.values())) if not k.startswith("speedup_")]
        header = ["family"] + [f"top-1 at {c} fewer GFLOPs" for c in costs] + \
                 [f"at {c} measured b64" for c in costs]
        rows = [[fam] + [fmt(v.get(c)) for c in costs] + [fmt(v.get(f"speedup_{c}")) for c in costs]
                for fam, v in matched.items()]
        parts.append("Accuracy at matched cost, read off each family's curve (– : outside its range):\n\n"
                     + table(header, rows))
    if d.get("claims"):
        parts.append(claims_table(d["claims"]))
    for key in ("figure", "figure_kept", "figure_heatmaps"):
        f = d.get(key)
        if isinstance(f, str) and (results / f).is_file():
            parts.append(f"![{Path(f).stem}](results/{f})")
    return "\n\n".join(p for p in parts if p)


def training_table(d: dict[str, Any]) -> str:
    """One row per training variant: settings, wall time, validation after each stage."""
    rows = []
    for name, t in d["training"].items():
        o = t["options"]
        stages = ", ".join(f"{s['stage']} {fmt(s['val_top1'])} / {fmt(s['keep_ratio_per_group'][-1], 3)}"
                           for s in t["per_stage"])
        rows.append([name, o.get("target", "label"), "yes" if o.get("finetune") else "no", fmt(o.get("tau")),
                     fmt(o.get("lr"), 6), fmt(t["train_wall_s"] / 60, 1), fmt(t["backbone_val"]["top1"]), stages])
    return ("Training (Algorithm 1 on Imagenette train; validation on the 10 % carved out, top-1 or agreement "
            "% / share of tokens kept after the last group):\n\n"
            + table(["variant", "correct =", "fine-tune", "tau", "lr", "train min", "backbone val", "after each stage"],
                    rows))


def claims_table(c: dict[str, Any]) -> str:
    """The paper's claims on this model, as met or not: every family's top-1 at 1.4x."""
    fams = c["families"]
    ours = fams.get("iared_label", {})
    keys = ("top1_at_1.4x_gflops", "top1_at_1.4x_speed_b64", "top1_at_1.4x_speed_b1")
    rows = [[fam] + [fmt(v.get(k)) for k in keys]
            + (["–"] if fam == "iared_label" else [_verdict(ours, v, keys)]) for fam, v in fams.items()]
    loss = c.get("loss_at_1.4x_measured")
    head = (f"Original {fmt(c['original_top1'])} %. IA-RED² (label variant, calibrated sweep) at 1.4x measured "
            f"speedup (batch 64): " + (f"{fmt(loss)} points lost, the paper's ≤ 0.7 "
                                       f"{'met' if c.get('loss_at_1.4x_measured_le_0.7') else 'not met'}."
                                       if loss is not None else "outside its measured curve."))
    return (head + " Every family's top-1 at 1.4x fewer GFLOPs / 1.4x measured speedup at batch 64 / at batch 1 "
            "(– : outside its curve), and whether IA-RED² is ahead of it at each:\n\n"
            + table(["family", "at 1.4x GFLOPs", "at 1.4x b64", "at 1.4x b1", "IA-RED² is"], rows))


def _verdict(ours: dict[str, Any], theirs: dict[str, Any], keys: Sequence[str]) -> str:
    pairs = [(ours.get(k), theirs.get(k)) for k in keys]
    known = [(a, b) for a, b in pairs if isinstance(a, (int, float)) and isinstance(b, (int, float))]
    if not known:
        return "–"
    ahead = sum(a > b for a, b in known)
    return "ahead" if ahead == len(known) else "behind" if ahead == 0 else f"ahead at {ahead} of {len(known)}"


def render_segmentation(name: str, key: str = "segmentation") -> Callable[[Path], str]:
    def render(results: Path) -> str:
        d = _load(results / name)
        if d is None:
            return NOT_RUN
        return "\n\n".join([command_line(d, name), d.get("notes", ""), metric_table(d[key])])
    return render


def render_perturbation(results: Path, name: str = "imagenet_perturbation.json") -> str:
    d = _load(results / name)
    if d is None:
        return NOT_RUN
    fr = d["fractions"]
    header = ["heatmap", "AUC positive ↓", "AUC negative ↑"] + [f"−{round(100 * f)} % (pos / neg)" for f in fr[1::2]]
    rows = [[m, fmt(v["auc_positive"]), fmt(v["auc_negative"])]
            + [f"{fmt(p)} / {fmt(n)}" for p, n in zip(v["positive"][1::2], v["negative"][1::2])]
            for m, v in d["methods"].items()]
    return "\n\n".join([command_line(d, name), d.get("notes", ""), table(header, rows)])


def _generic_body(d: dict[str, Any]) -> list[str]:
    """Whatever tables a results document supports: methods, segmentation, per-model sections."""
    parts = []
    if isinstance(d.get("methods"), dict) and d["methods"]:
        parts.append(method_table(d["methods"]))
    if isinstance(d.get("segmentation"), dict) and any(d["segmentation"].values()):
        parts.append(metric_table(d["segmentation"]))
    # Several models or settings in one file: {"models": {name: {"methods": ...}}} or a list of such.
    for key in ("models", "runs", "settings"):
        group = d.get(key)
        items = group.items() if isinstance(group, dict) else (
            ((g.get("name") or g.get("arch") or str(i)), g) for i, g in enumerate(group)) if isinstance(group, list) else ()
        for sub_name, sub in items:
            if isinstance(sub, dict):
                body = _generic_body(sub)
                if body:
                    parts.append(f"**{sub_name}**" + (f" ({sub['checkpoint']})" if sub.get("checkpoint") else "")
                                 + "\n\n" + "\n\n".join(body))
    # Curves or points: lists of flat-ish records ({"b64": {"img_per_s": ...}} becomes "b64.img_per_s").
    for key in ("rows", "points"):
        if _records(d.get(key)):
            parts.append(_record_table([_flatten(r) for r in d[key]]))
    curves = d.get("curves")
    if isinstance(curves, dict) and any(_records(c) for c in curves.values()):
        parts.append(_record_table([{"curve": name, **_flatten(r)} for name, c in curves.items() if _records(c)
                                    for r in c]))
    return parts


def _records(x: Any) -> bool:
    return isinstance(x, list) and bool(x) and all(isinstance(r, dict) for r in x)


def _flatten(record: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in record.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        elif k not in ("times_s",):  # raw timing samples: too long for a table cell
            out[f"{prefix}{k}"] = v
    return out


def _record_table(records: list[dict[str, Any]]) -> str:
    keys = list(dict.fromkeys(k for r in records for k in r))
    return table(keys, [[fmt(r.get(k), 3) for k in keys] for r in records])


def render_fuzz(results: Path) -> str:
    """Inputs run and failures found per fuzz target (benchmarks/fuzz.py)."""
    name = "fuzz.json"
    d = _load(results / name)
    if d is None:
        return NOT_RUN
    rows = [[t, fmt(r.get("inputs")), fmt(r.get("seconds"), 0), fmt(r.get("failures_found")),
             fmt(r.get("failures_fixed"))] for t, r in d.get("targets", {}).items()]
    commands = sorted({r.get("command") for r in d.get("targets", {}).values() if r.get("command")})
    made = "Made by " + ", ".join(f"`{c}`" for c in commands) + f" (`benchmarks/results/{name}`)." if commands \
        else command_line(d, name)
    return "\n\n".join([made, d.get("notes", ""),
                        table(["target", "inputs", "seconds", "failures found", "fixed"], rows)])


def render_demo_backbone(results: Path) -> str:
    name = "demo_backbone.json"
    d = _load(results / name)
    if d is None:
        return NOT_RUN
    rows = [[k, str(v["patch_overlap"]), str(v["epochs"]), f"{fmt(v['val']['top1'])} ± {fmt(v['val']['top1_se'])}",
             f"{fmt(v['test']['top1'])} ± {fmt(v['test']['top1_se'])}", fmt(v["train_wall_s"] / 60, 1)]
            for k, v in d["variants"].items()]
    return "\n\n".join([command_line(d, name), table(
        ["variant", "patch overlap", "epochs", "val top-1 %", "test top-1 %", "train min"], rows)])


RENDERERS: dict[str, Callable[[Path], str]] = {
    "demo_backbone": render_demo_backbone,
    "fuzz": render_fuzz,
    "speed": render_speed,
    "threshold_sweep": render_trade_off("threshold_sweep.json"),
    "cluttered_fashion": render_cluttered_fashion,
    "cluttered_fashion_tau2": lambda results: render_cluttered_fashion(results, "cluttered_fashion_tau2.json"),
    "cifar10": render_trade_off("cifar10.json"),
    "offshelf": render_trade_off("offshelf.json"),
    "imagenet": render_imagenet,
    "imagenet_iared": lambda results: render_imagenet(results, "imagenet_iared.json"),
    "davis": render_segmentation("davis_segmentation.json"),
    "perturbation": render_perturbation,
    "moving_fashion": render_trade_off("moving_fashion.json"),
    "pruning": render_trade_off("pruning.json"),
    "photos": render_trade_off("photos_cifar10.json"),
    "demo": render_trade_off("demo_cluttered_digits.json"),
}


# -- the top-level README: one short table per task, with its conclusion --------------------

MATCHED = ("1.3x", "1.5x", "2.0x")
NAMES = {"iared": "IA-RED²", "ats": "ATS", "topk": "top-K", "random": "random", "attention": "attention",
         "tome": "ToMe", "evit": "EViT", "tempdiff": "temporal difference", "ours": "IA-RED²", "timm": "timm"}


def summary_imagenet(results: Path) -> str:
    d, t = _load(results / "imagenet_vit_tiny.json"), _load(results / "imagenet_iared.json")
    if d is None:
        return NOT_RUN
    rows = {NAMES[k]: v for k, v in d["matched_cost"].items() if k in NAMES}
    if t is not None:
        rows["IA-RED² (trained here)"] = t["matched_cost"]["iared_label"]
    best = max(rows, key=lambda k: rows[k].get("1.5x") or 0)
    original = d["methods"]["original"]["top1"]
    lines = [table(["top-1 (%) at fewer GFLOPs", *MATCHED],
                   [[k, *(fmt(v.get(c), 1) for c in MATCHED)] for k, v in rows.items()]),
             f"ViT-Tiny, {original:.2f} % unreduced on {d['n_images']} ImageNet validation photos; each method's "
             f"accuracy read off its budget sweep. At 1.5x fewer GFLOPs {best} keeps most "
             f"({rows[best]['1.5x']:.1f} %)" + (f"; IA-RED² trained here {rows['IA-RED² (trained here)']['1.5x']:.1f} %."
                                                if t is not None else ".")]
    return "\n\n".join(lines)


def summary_demo(results: Path) -> str:
    d = _load(results / "demo_cluttered_digits.json")
    if d is None:
        return NOT_RUN
    m = d["methods"]
    rows = [[NAMES.get(k, k), fmt(r["top1"], 1), fmt(r.get("top1_se") or standard_error(r["top1"], r["n_images"]), 1),
             fmt(r.get("flops_ratio"), 2), fmt(r.get("speedup"), 2)] for k, r in m.items()]
    o, i = m["original"], m["iared"]
    others = [r["top1"] for k, r in m.items() if k not in ("original", "iared")]
    # The demo's own generated conclusion, when the run recorded one (its first three sentences).
    text = " ".join(d["conclusion"][:3]) if d.get("conclusion") else (
        f"IA-RED² at {i['flops_ratio']:.1f}x fewer GFLOPs: {i['top1'] - o['top1']:+.1f} points against the backbone; "
        f"the baselines at its cost {min(others) - o['top1']:+.1f} to {max(others) - o['top1']:+.1f}.")
    return "\n\n".join([table(["`make demo`", "top-1 (%)", "± s.e.", "fewer GFLOPs", "speedup"], rows), text])


def _cpu(device_name: str) -> str:
    """"CPU Intel(R) Xeon(R) Processor" -> "Intel Xeon"."""
    words = device_name.replace("(R)", "").replace("(TM)", "").split()
    return " ".join(w for w in words if w not in ("CPU", "Processor")) or device_name


def summary_speed(results: Path) -> str:
    docs = [(label, b, _load(results / f"speed_{arch}_b{b}.json"))
            for label, arch in (("ViT-Tiny", "vit_tiny_patch16_224"), ("DeiT-S", "deit_small_patch16_224"))
            for b in (64, 1)]
    docs = [(label, b, d) for label, b, d in docs if d is not None]
    if not docs:
        return NOT_RUN
    names = []
    for _, _, d in docs:
        names += [k for k in d["methods"] if k != "original" and k not in names]
    rows = [[f"{label}, batch {b}", *(fmt(d["methods"][k]["of_limit"], 2) if k in d["methods"] else "–"
                                      for k in names), _cpu(d["device_name"])] for label, b, d in docs]
    return "\n\n".join([
        table(["measured speedup / FLOPs ratio", *(NAMES.get(k, k) for k in names), "CPU"], rows),
        f"Every method calibrated to keep 60 % of the tokens ({docs[0][2]['threads']} threads; ratios compare "
        f"within a row, each run on one machine): near the FLOPs ratio at batch 64 on DeiT-S, a fixed cost per block "
        f"and per stage below it at batch 1 and on the narrower ViT-Tiny.{_ceiling(results)} The timm column is "
        f"timm's own unreduced model on the same weights, timed in the same rounds: its speed over ours."])


def _ceiling(results: Path) -> str:
    """A sentence on the batch-1 ceiling of ViT-Tiny's blocks (`benchmarks/block_times.py`), or ""."""
    d = _load(results / "block_times_vit_tiny_patch16_224.json")
    if d is None:
        return ""
    rows = d["kernels"].get("native") or d["kernels"]["onednn"]
    ceilings = [r["ceiling"] for name, r in rows.items() if name != "original"]
    return (f" On ViT-Tiny at batch 1 the blocks alone, run at each method's token counts with nothing scored, reach "
            f"{min(ceilings):.2f}-{max(ceilings):.2f} of their FLOPs ratio ({_cpu(d['device_name'])}, "
            f"`benchmarks/block_times.py`): the ceiling for any policy on that CPU.")


def summary_video(results: Path) -> str:
    d = _load(results / "moving_fashion.json")
    if d is None:
        return NOT_RUN
    m = d["methods"]
    rows = [[NAMES.get(k, k) if "@" not in k else f"IA-RED² at keep {k.split('@')[1]}", fmt(r["clip1_err"], 1),
             fmt(r["video1_err"], 1), fmt(r.get("keep_ratio"), 2), fmt(r.get("speedup"), 2)] for k, r in m.items()]
    return "\n\n".join([
        table(["moving-fashion video", "clip-1 err (%)", "video-1 err (%)", "keep", "speedup"], rows),
        _video_conclusion(m)])


def _video_conclusion(m: dict) -> str:
    """One sentence: IA-RED² at its trained threshold, and at the matched keep against the baselines."""
    base = m["original"]["video1_err"]
    ours = m["ours"]
    text = (f"IA-RED² at its trained threshold keeps {ours['keep_ratio']:.0%} of the tokens, "
            f"{ours['video1_err'] - base:+.1f} video-1 points from the backbone at {ours['speedup']:.1f}x")
    matched = next((r for k, r in m.items() if k.startswith("ours@")), None)
    baselines = [r["video1_err"] - base for k, r in m.items() if k in ("random", "attention", "tempdiff", "ats")]
    if matched is None or not baselines:
        return text + "."
    return (text + f"; at keep {matched['keep_ratio']:.2f} it loses {matched['video1_err'] - base:.1f} points "
            f"at {matched['speedup']:.1f}x, the baselines at about the same keep {min(baselines):.1f} to "
            f"{max(baselines):.1f}.")


SUMMARIES: dict[str, Callable[[Path], str]] = {
    "summary-imagenet": summary_imagenet, "summary-demo": summary_demo,
    "summary-speed": summary_speed, "summary-video": summary_video,
}


def _load(path: Path) -> Optional[dict[str, Any]]:
    """The JSON document at `path`, or None when it does not exist (a damaged file is an error)."""
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise SystemExit(f"make_readme: {path} is not valid JSON: {e}")
    if not isinstance(doc, dict):
        raise SystemExit(f"make_readme: {path} does not hold a JSON object")
    return doc


# -- rewriting the README -------------------------------------------------------------------


def marker_pattern(name: str) -> re.Pattern[str]:
    return re.compile(rf"(<!-- results:{re.escape(name)} -->\n)(.*?)(<!-- /results:{re.escape(name)} -->)", re.S)


def update_readme(text: str, results: Path, renderers: Optional[dict[str, Callable[[Path], str]]] = None
                  ) -> tuple[str, list[str]]:
    """Replace the body of every marker pair with its generated table.

    Args:
        text: the README's text.
        results: the folder of results JSON files.
        renderers: marker name -> renderer (default `RENDERERS`).

    Returns:
        (new text, names of markers that were not found as a pair).
    """
    missing = []
    for name, render in (renderers or RENDERERS).items():
        pattern = marker_pattern(name)
        if not pattern.search(text):
            missing.append(name)
            continue
        body = render(results).rstrip("\n") + "\n"
        text = pattern.sub(lambda m: m.group(1) + body + m.group(3), text, count=1)
    return text, missing


def main(argv: Optional[Sequence[str]] = None) -> int:
    root = Path(__file__).resolve().parents[1]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--readme", default=None,
                        help="one README to update in place with every table (default: benchmarks/README.md, "
                             "and README.md with the summaries)")
    parser.add_argument("--results", default=str(root / "benchmarks" / "results"), help="folder of results JSON")
    args = parser.parse_args(argv)
    targets = ([(Path(args.readme), RENDERERS)] if args.readme else
               [(root / "benchmarks" / "README.md", RENDERERS), (root / "README.md", SUMMARIES)])
    for readme, renderers in targets:
        if not readme.is_file():
            print(f"make_readme: no README at {readme}", file=sys.stderr)
            return 2
        text = readme.read_text()
        new, missing = update_readme(text, Path(args.results), renderers)
        for name in missing:
            print(f"make_readme: marker pair <!-- results:{name} --> ... <!-- /results:{name} --> not in {readme}; "
                  f"table not written")
        if new != text:
            tmp = readme.with_name(readme.name + ".tmp")
            tmp.write_text(new)
            os.replace(tmp, readme)
            print(f"make_readme: updated {readme}")
        else:
            print(f"make_readme: {readme} already up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
