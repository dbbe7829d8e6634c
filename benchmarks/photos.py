"""The interpreter tool on real photos: ImageNet validation photos of CIFAR-10's classes.

No photo-scale IA-RED² model can be trained on 2 CPU cores, but the CIFAR-10 reference
run (`benchmarks/cifar10.py`) trains one on natural 32x32 images. This script takes the
photos of `../shared/data/imagenet_val_subset` whose ImageNet class is one of CIFAR-10's
(dogs, cats, birds, cars, trucks, ships, planes, horses, frogs; no deer in the subset),
runs the model's interpreters on them exactly as `iared interpret` does (the photo
resized and centre-cropped as the checkpoint's data config says), and draws one figure:
a row per photo with the heatmap of every group (scores on a fixed 0-1 scale; tokens
dropped by an earlier group score 0).

    .venv/bin/python benchmarks/photos.py            # after benchmarks/cifar10.py

Writes `benchmarks/results/photos_cifar10.json` (with the command: per photo its
ImageNet class, the CIFAR-10 class it belongs to, the prediction and kept ratios) and
`benchmarks/results/photos_cifar10.png`.
"""

from __future__ import annotations

import argparse
import csv
import json
import shlex
import sys
from pathlib import Path

from iared.evaluation.figures import method_grid, save_figure
from iared.fileio import write_json
from iared.commands.interpret import load_interpreter, prepare_image, run_interpreters

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = ROOT.parent / "shared" / "data" / "imagenet_val_subset"
CIFAR_RESULTS = ROOT / "benchmarks" / "results" / "cifar10.json"

# ImageNet-1k class indices of CIFAR-10's classes (WordNet hyponyms; deer has none in ImageNet-1k).
CIFAR_OF_IMAGENET: dict[str, list[int]] = {
    "airplane": [404, 895], "automobile": [436, 468, 511, 656, 751, 817], "bird": list(range(7, 25))
    + list(range(80, 101)) + list(range(127, 147)), "cat": list(range(281, 286)), "dog": list(range(151, 269)),
    "frog": [30, 31, 32], "horse": [339], "ship": [510, 628, 724, 833], "truck": [555, 569, 675, 717, 867],
}


def note(checkpoint: str, cifar: dict) -> str:
    """What the figure shows, with the model's CIFAR-10 test accuracy when cifar10.json is about it."""
    acc = ""
    if cifar.get("checkpoint") and Path(ROOT / cifar["checkpoint"]).resolve() == Path(checkpoint).resolve():
        m = cifar["methods"]
        acc = (f" (`benchmarks/cifar10.py`: CIFAR-10 test top-1 {m['original']['top1']:.1f} % for the backbone, "
               f"{m['iared']['top1']:.1f} % with IA-RED²)")
    return (f"Heatmaps of the interpreters of a CIFAR-10 IA-RED² model{acc} on ImageNet photos of CIFAR-10's "
            "classes, resized to 32 x 32. Scores on a fixed 0-1 scale; tokens dropped by an earlier group score 0.")


def pick_photos(root: Path, per_class: int) -> list[tuple[str, int, str]]:
    """(file, ImageNet index, CIFAR-10 class) for the first `per_class` photos of each class."""
    with open(root / "labels.tsv", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    picked: dict[str, list[tuple[str, int, str]]] = {}
    for row in rows:
        idx = int(row["class_index"])
        for name, members in CIFAR_OF_IMAGENET.items():
            if idx in members and len(picked.setdefault(name, [])) < per_class:
                picked[name].append((row["file"], idx, name))
    return [p for name in CIFAR_OF_IMAGENET for p in picked.get(name, [])]


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default=None,
                    help="IA-RED² model file (default: the one benchmarks/results/cifar10.json was made with)")
    ap.add_argument("--photos", default=str(PHOTOS))
    ap.add_argument("--per-class", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "photos_cifar10"))
    args = ap.parse_args(argv)
    cifar_doc = json.loads(CIFAR_RESULTS.read_text()) if CIFAR_RESULTS.is_file() else {}
    if args.checkpoint is None:
        if not cifar_doc.get("checkpoint"):
            raise SystemExit(f"photos: no --checkpoint and no {CIFAR_RESULTS}: run benchmarks/cifar10.py first")
        args.checkpoint = str(ROOT / cifar_doc["checkpoint"])
    model, cfg = load_interpreter(args.checkpoint)
    root = Path(args.photos)
    photos = pick_photos(root, args.per_class)
    names = cfg.class_names
    shown, rows, heat = [], [], {}
    for file, idx, cifar in photos:
        x, img = prepare_image(str(root / file), cfg)
        out = run_interpreters(model, x)
        pred = int(out["probs"].argmax())
        rows.append({"file": file, "imagenet_class": idx, "cifar10_class": cifar,
                     "predicted": names[pred] if names else pred, "probability": float(out["probs"][pred]),
                     "keep_ratio_per_group": [float(k.float().mean()) for k in out["keep"]]})
        shown.append(img)
        for j, s in enumerate(out["scores"]):
            heat.setdefault(f"group {j + 1}", []).append(s)
    grid_hw = tuple(model.patch_embed.grid_size)
    labels = [f"{r['cifar10_class']}->{r['predicted']}" for r in rows]
    fig = method_grid(shown, heat, grid_hw, row_labels=labels, fixed_range=tuple(heat),
                      title=f"IA-RED² (CIFAR-10 model, {cfg.img_size[0]}px) on ImageNet photos: true->predicted")
    save_figure(fig, Path(args.out).with_suffix(".png"))
    correct = sum(r["cifar10_class"] == r["predicted"] for r in rows)
    doc = {"task": "interpret on real photos", "command": shlex.join([".venv/bin/python", "benchmarks/photos.py", *argv]),
           "checkpoint": args.checkpoint, "rows": rows, "correct": correct, "n": len(rows),
           "note": note(args.checkpoint, cifar_doc),
           "figure": Path(args.out).with_suffix(".png").name}
    write_json(Path(args.out).with_suffix(".json"), doc)
    print(f"{correct}/{len(rows)} photos predicted as their CIFAR-10 class -> {Path(args.out).with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
