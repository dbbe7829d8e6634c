"""Small models, data and files shared by tests in several folders (tests/<package>/test_<module>.py).

Imported as `helpers` (`from helpers import tiny`): tests/conftest.py puts tests/ on sys.path, so
this works from every subfolder. Only what two or more test files use lives here.
"""

from __future__ import annotations

import gzip
import struct

import numpy as np
import torch
from PIL import Image
from torch import nn

import iared
from iared.backbones.tokens import Tokens, apply_keep
from iared.data.base import DataInfo
from iared.data.video import MovingFashionDataset
from iared.reduction.policy import TokenPolicy


# -- models ---------------------------------------------------------------------------------


def tiny(depth=6, **kw):
    """A 32 px, 8x8-patch-grid ViT (64 patches + CLS) with fixed random weights, in eval mode."""
    torch.manual_seed(0)
    cfg = dict(img_size=32, patch_size=4, embed_dim=32, depth=depth, num_heads=2, num_classes=10)
    return iared.create_model("vit_custom", **{**cfg, **kw}).eval()


def peaked(model, sharpness=8.0):
    """Make attention non-uniform (random init attends almost uniformly, so ATS keeps K' = K)."""
    with torch.no_grad():
        for blk in model.blocks:
            blk.attn.qkv.weight.mul_(sharpness)
    return model


def tiny_model(depth: int = 6, distilled: bool = False) -> nn.Module:
    """A 32 px ViT with 4 heads and 7 classes (the packed-execution and kernel tests), in eval mode."""
    torch.manual_seed(0)
    return iared.create_model("vit_custom", img_size=32, patch_size=4, embed_dim=32, depth=depth, num_heads=4,
                              num_classes=7, distilled=distilled).eval()


def tiny_classifier():
    """A 16 px, 3-block ViT for the 4 classes of `TinyData`, in eval mode."""
    torch.manual_seed(0)
    return iared.create_model("vit_custom", img_size=16, patch_size=4, embed_dim=24, depth=3, num_heads=2,
                              num_classes=4).eval()


def tiny_video(policy=None, **kw):
    """A 2-block JointST video model (8 frames of 48 px) and 12 moving-fashion test clips in 3 views."""
    rng = np.random.default_rng(0)
    items = np.zeros((12, 28, 28), dtype=np.uint8)
    items[:, 6:22, 6:22] = rng.integers(60, 255, size=(12, 16, 16))
    data = MovingFashionDataset(items, "test", 0, views=3, num_fragments=2)
    torch.manual_seed(0)
    model = iared.create_model("jointst_custom", img_size=48, patch_size=8, in_chans=1, num_frames=8, embed_dim=16,
                               depth=2, num_heads=2, num_classes=4)
    if policy:
        iared.patch(model, policy, **kw)
    return model, data


# -- a token policy to test execution with ---------------------------------------------------


class FixedKeep(TokenPolicy):
    """Drops, in front of the given blocks, the grid cells given per image (a test double)."""

    def __init__(self, grid_keep: dict[int, torch.Tensor]):
        super().__init__()
        self.grid_keep = grid_keep  # block -> (B, G) bool on the full grid
        self.rows = None            # which images of the full batch this forward holds

    def forward(self, index, tokens: Tokens, model, mode=None):
        if index not in self.grid_keep:
            return tokens, None
        g = self.grid_keep[index] if self.rows is None else self.grid_keep[index][self.rows]
        keep = g.gather(1, tokens.pos.clamp(min=0))  # per current token, from its grid cell
        return apply_keep(tokens, keep), None


def uneven_keeps(B: int, G: int, blocks: list[int], seed: int = 0) -> dict[int, torch.Tensor]:
    """Nested per-image masks: image b keeps a very different share; image 1 keeps only CLS."""
    gen = torch.Generator().manual_seed(seed)
    share = torch.linspace(1.0, 0.05, B)[torch.randperm(B, generator=gen)]
    rank = torch.rand(B, G, generator=gen).argsort(1).argsort(1)
    out = {}
    for j, blk in enumerate(blocks):
        k = (share[:, None] ** ((j + 1) / len(blocks)) * G).floor()
        m = rank < k
        m[1] = False  # an image that keeps no patch token at all (CLS only)
        out[blk] = m
    return out


# -- data -----------------------------------------------------------------------------------


class TinyData(torch.utils.data.Dataset):
    """12 random 3x16x16 images, 4 classes, with foreground masks."""

    def __init__(self, split, seed, mean=(0.0,) * 3, std=(1.0,) * 3):
        g = torch.Generator().manual_seed(seed + (0 if split == "train" else 1))
        self.x = torch.randn(12, 3, 16, 16, generator=g)
        self.y = torch.randint(0, 4, (12,), generator=g)
        self.m = torch.rand(12, 16, 16, generator=g) > 0.7
        self.info = DataInfo(kind="tiny", num_classes=4, class_names=tuple("abcd"), in_chans=3, img_size=(16, 16),
                             mean=tuple(mean), std=tuple(std), has_masks=True)

    def __len__(self):
        return 12

    def __getitem__(self, i):
        return {"image": self.x[i], "label": int(self.y[i]), "mask": self.m[i]}


# -- files ----------------------------------------------------------------------------------


def write_idx(path, array: np.ndarray, gz: bool = True) -> None:
    """An idx file (MNIST's format) of uint8 `array`, gzipped or not."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if gz:
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


def make_idx_dir(root, n_train=50, n_test=20, gz=True, with_train_images=True):
    """An MNIST-like folder of random 28x28 images, labels 0-9 in turn; returns {prefix: (images, labels)}."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    sfx = ".gz" if gz else ""
    sets = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        if prefix != "train" or with_train_images:
            write_idx(root / f"{prefix}-images-idx3-ubyte{sfx}", images, gz)
        write_idx(root / f"{prefix}-labels-idx1-ubyte{sfx}", labels, gz)
        sets[prefix] = (images, labels)
    return sets


def segfolder(root, n=4, size=(60, 40), labels=False):
    """A segfolder: n flat photos whose left half is foreground in masks.tsv, labelled 0..n-1 or not."""
    (root / "img").mkdir(parents=True)
    (root / "msk").mkdir()
    lines = ["image\tmask\tnote" + ("\tlabel" if labels else "")]
    for i in range(n):
        w, h = size
        Image.fromarray(np.full((h, w, 3), 40 * i, dtype=np.uint8)).save(root / "img" / f"{i}.png")
        m = np.zeros((h, w), dtype=np.uint8)
        m[:, : w // 2] = 7  # any non-zero value is foreground
        Image.fromarray(m).save(root / "msk" / f"{i}.png")
        lines.append(f"img/{i}.png\tmsk/{i}.png\tx" + (f"\t{i}" if labels else ""))
    (root / "masks.tsv").write_text("\n".join(lines) + "\n")
    return root


def labelled_photos(root, labels):
    """An imagefolder of random photos of growing height with labels.tsv holding `labels` (class indices)."""
    (root / "images").mkdir(parents=True)
    rows = ["file\tclass_index"]
    for i, y in enumerate(labels):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (40 + 7 * i, 56, 3), dtype=np.uint8)).save(
            root / "images" / f"{i}.png")
        rows.append(f"images/{i}.png\t{y}")
    (root / "labels.tsv").write_text("\n".join(rows) + "\n")
    return root


CLASSES = ["ant", "bee", "cat", "dog"]


def model_file(path, in_chans=3, img_size=16, patch_size=4, num_classes=4, data=None, policy=True, seed=0):
    """A 3-block model file (IA-RED², 3 groups, unless policy=False) with the data record the interpret tool reads."""
    torch.manual_seed(seed)
    model = iared.create_model("vit_custom", img_size=img_size, patch_size=patch_size, in_chans=in_chans,
                               embed_dim=16, depth=3, num_heads=2, num_classes=num_classes)
    if policy:
        iared.patch(model, "iared", groups=3)
    if data is None:
        data = {"kind": "cluttered-test", "img_size": [img_size, img_size], "in_chans": in_chans,
                "mean": [0.5] * in_chans, "std": [0.25] * in_chans, "class_names": CLASSES[:num_classes],
                "num_classes": num_classes}
    iared.save_model(model, path, arch="vit_custom", data=data)
    return path


def write_png(path, size=(40, 30), mode="RGB", seed=0):
    """A random picture of `size` (width, height) in `mode` saved as PNG; returns its path as a string."""
    rng = np.random.default_rng(seed)
    chans = {"RGB": 3, "RGBA": 4, "L": None}[mode]
    shape = (size[1], size[0]) if chans is None else (size[1], size[0], chans)
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(path)
    return str(path)


def assert_block_swap_round_trip(m, x, ref, path, arch="vit_custom"):
    """A block-swapping policy on `m` survives its model file (same settings, same logits), and
    `unpatch` gives back plain blocks computing `ref`, the logits before patching."""
    from iared.backbones.vit import Block

    patched = m(x)
    iared.save_model(m, path, arch=arch)
    loaded = iared.load_model(path)
    assert loaded.policy.config() == m.policy.config()
    assert torch.equal(loaded(x), patched)
    iared.unpatch(m)
    assert all(type(b) is Block for b in m.blocks)
    assert torch.equal(m(x), ref)
