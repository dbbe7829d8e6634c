"""Coverage-guided fuzz targets for iared's parsers (atheris, libFuzzer underneath).

    python tests/fuzz/targets.py TARGET [libFuzzer flags] [CORPUS_DIR ...]
    python tests/fuzz/targets.py methods -max_total_time=60 tests/fuzz/corpus/methods

Each target hands one input to a parser a user's input reaches and accepts only a result
or one of iared's user-facing errors (`iared.errors.UserError` and its subclasses, which
the CLI prints as one line with exit code 2). Anything else propagates: atheris reports
it as a crash and saves the input as `crash-<sha1>`; such inputs go into
`tests/fuzz/corpus/TARGET/` as regression cases, replayed by `tests/test_fuzz.py`.
Targets read and write only inside a private temporary folder (checked after each input).

TARGETS maps names to functions of the input bytes, so the tests can replay a corpus
without atheris.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch  # imported uninstrumented: only iared's own code guides the fuzzer

torch.set_num_threads(1)

try:
    import atheris
except ImportError:  # replaying a corpus needs no atheris
    atheris = None

import contextlib  # noqa: E402

# Instrument iared's modules (all imported here) when fuzzing; plain imports when replaying.
with (atheris.instrument_imports(include=["iared"]) if atheris is not None and __name__ == "__main__"
      else contextlib.nullcontext()):
    import iared
    import iared.data.video  # noqa: F401
    from iared.backbones.checkpoint import load_pretrained, read_checkpoint
    from iared.data import build_dataset, parse_data_spec
    from iared.data.images import load_image, resize_center_crop, to_tensor
    from iared.errors import UserError
    from iared.commands.eval import parse_methods
    from iared.models import load_model
    from iared.reduction.policy import available_policies

WORK = Path(tempfile.mkdtemp(prefix="iared-fuzz-"))
POLICIES = available_policies()


def _text(data: bytes) -> str:
    return data.decode("utf-8", errors="replace")


def _small_model():
    return iared.create_model("vit_custom", img_size=8, patch_size=4, in_chans=3, embed_dim=8, depth=1,
                              num_heads=2, num_classes=3)


def methods(data: bytes) -> None:
    """`iared eval --methods`."""
    try:
        parse_methods(_text(data), POLICIES)
    except UserError:
        pass


def data_spec(data: bytes) -> None:
    """`--data KIND[:PATH]`, and a file kind built on an empty folder."""
    spec = _text(data)
    try:
        kind, _ = parse_data_spec(spec)
        if kind in ("imagefolder", "cifar10", "mnist", "videofolder"):
            build_dataset(f"{kind}:{WORK / 'empty'}", "test")
    except UserError:
        pass


def labels_tsv(data: bytes) -> None:
    """An `imagefolder` described by a `labels.tsv` (`file<TAB>class` rows)."""
    root = WORK / "flat"
    (root / "labels.tsv").write_bytes(data)
    try:
        ds = build_dataset(f"imagefolder:{root}", "test", img_size=8)
        for i in range(min(len(ds), 2)):
            ds[i]
    except UserError:
        pass


def safetensors_file(data: bytes) -> None:
    """A `.safetensors` model file: header, tensors, iared and timm metadata."""
    path = WORK / "model.safetensors"
    path.write_bytes(data)
    for load in (read_checkpoint, lambda p: load_pretrained(_small_model(), p), load_model):
        try:
            load(path)
        except UserError:
            pass


def pth_file(data: bytes) -> None:
    """A torch pickle through `weights_only` (never executes code from the file)."""
    path = WORK / "weights.pth"
    path.write_bytes(data)
    for load in (read_checkpoint, lambda p: load_pretrained(_small_model(), p)):
        try:
            load(path)
        except UserError:
            pass


def image(data: bytes) -> None:
    """Image decoding as `iared interpret` and the folder loaders do it."""
    try:
        img = load_image(data, mode="RGB", max_pixels=4096 * 4096)
        to_tensor(resize_center_crop(img, (8, 8), 0.875))
    except UserError:
        pass


def video(data: bytes) -> None:
    """Opening and decoding a video container (PyAV)."""
    from iared.data.video import decode_clip

    path = WORK / "clip.mp4"
    path.write_bytes(data)
    try:
        decode_clip(path, 2, 8)
    except UserError:
        pass


TARGETS = {"methods": methods, "data_spec": data_spec, "labels_tsv": labels_tsv,
           "safetensors_file": safetensors_file, "pth_file": pth_file, "image": image, "video": video}


def _prepare() -> None:
    """The fixed files targets read: an empty folder, a flat folder with two images."""
    from PIL import Image

    (WORK / "empty").mkdir(exist_ok=True)
    (WORK / "flat" / "images").mkdir(parents=True, exist_ok=True)
    for i in range(2):
        Image.new("RGB", (12, 10), (80 * i, 40, 0)).save(WORK / "flat" / "images" / f"{i}.png")


def _checked(fn):
    """`fn`, then a check that it left nothing outside its folder (no stray files)."""
    allowed = {"empty", "flat", "model.safetensors", "weights.pth", "clip.mp4"}

    def run(data: bytes) -> None:
        fn(data)
        stray = {p.name for p in WORK.iterdir()} - allowed
        if stray:
            raise AssertionError(f"{fn.__name__} wrote {sorted(stray)}")
    return run


_prepare()
TARGETS = {name: _checked(fn) for name, fn in TARGETS.items()}


def main(argv: list[str]) -> None:
    if len(argv) < 2 or argv[1] not in TARGETS:
        sys.exit(f"usage: {argv[0]} TARGET [libFuzzer flags] [CORPUS_DIR ...]; targets: {', '.join(TARGETS)}")
    if atheris is None:
        sys.exit("fuzzing needs atheris (pip install atheris)")
    target = TARGETS[argv[1]]
    atheris.Setup([argv[0]] + argv[2:], target)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
