"""Checkpoint loading (`iared.backbones.checkpoint`): wrappers and prefixes, safetensors, position
embeddings resampled, damaged and hostile files, a new head, foreign checkpoints on real data."""

import gzip
import io
import os
import zipfile

import numpy as np
import pytest
import torch

from iared.backbones import CheckpointError, create_model, load_pretrained, resample_pos_embed
from iared.backbones.checkpoint import read_checkpoint


def _save(obj, path):
    torch.save(obj, path)
    return path


@pytest.mark.parametrize("wrap", ["plain", "model", "state_dict", "module_prefix"])
def test_wrappers_and_prefixes_load_strict(tmp_path, wrap):
    src = create_model("deit_tiny_patch16_224", depth=2)
    sd = src.state_dict()
    obj = {"plain": sd, "model": {"model": sd, "epoch": 3}, "state_dict": {"state_dict": sd},
           "module_prefix": {f"module.{k}": v for k, v in sd.items()}}[wrap]
    dst = load_pretrained(create_model("deit_tiny_patch16_224", depth=2), _save(obj, tmp_path / "c.pth"))
    for k, v in dst.state_dict().items():
        assert torch.equal(v, sd[k])


def test_safetensors_round_trip(tmp_path):
    from safetensors.torch import save_file

    src = create_model("vit_tiny_patch16_224", depth=1)
    save_file(src.state_dict(), str(tmp_path / "m.safetensors"))
    dst = load_pretrained(create_model("vit_tiny_patch16_224", depth=1), tmp_path / "m.safetensors")
    assert torch.equal(dst.pos_embed, src.pos_embed)


def test_pos_embed_resampled_224_to_384(tmp_path):
    src = create_model("deit_base_patch16_224", depth=1)
    dst = load_pretrained(create_model("deit_base_patch16_384", depth=1), _save(src.state_dict(), tmp_path / "c.pth"))
    assert dst.pos_embed.shape == (1, 1 + 24 * 24, 768)
    assert torch.equal(dst.pos_embed[:, 0], src.pos_embed[:, 0])  # CLS embedding kept as is
    # A grid resampled to its own size is unchanged; a constant grid stays constant.
    pe = torch.randn(1, 1 + 14 * 14, 8)
    assert torch.equal(resample_pos_embed(pe, (14, 14), 1), pe)
    const = torch.ones(1, 1 + 4, 3)
    assert torch.allclose(resample_pos_embed(const, (5, 5), 1), torch.ones(1, 26, 3), atol=1e-5)


class _Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_bad_checkpoints_are_one_clear_error(tmp_path):
    model = create_model("deit_tiny_patch16_224", depth=1)
    good = _save(model.state_dict(), tmp_path / "good.pth")
    truncated = tmp_path / "trunc.pth"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    evil = _save({"x": _Payload()}, tmp_path / "evil.pth")
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    text = tmp_path / "notes.pth"
    text.write_text("hello")
    cases = {truncated: "truncated", evil: "refusing", empty: "empty", text: "cannot read",
             tmp_path / "missing.pth": "not found"}
    for path, words in cases.items():
        with pytest.raises(CheckpointError, match=words) as e:
            load_pretrained(create_model("deit_tiny_patch16_224", depth=1), path)
        assert "\n" not in str(e.value)
    with pytest.raises(CheckpointError, match="missing .*unexpected|wrong shape"):
        load_pretrained(create_model("deit_small_patch16_224", depth=1), good)


def test_random_bytes_are_always_a_checkpoint_error(tmp_path):
    # Damaged files fail in many places inside the unpickler (KeyError, IndexError, ...).
    rng = torch.Generator().manual_seed(0)
    for i in range(30):
        n = int(torch.randint(1, 3000, (1,), generator=rng))
        path = tmp_path / f"r{i}.pth"
        path.write_bytes(bytes(torch.randint(0, 256, (n,), generator=rng, dtype=torch.uint8).tolist()))
        with pytest.raises(CheckpointError, match="cannot read|refusing"):
            read_checkpoint(path)


def test_wrong_architecture_lists_what_is_wrong(tmp_path):
    path = _save(create_model("deit_tiny_patch16_224", depth=2).state_dict(), tmp_path / "c.pth")
    with pytest.raises(CheckpointError) as e:
        load_pretrained(create_model("deit_tiny_patch16_224", depth=3), path)
    assert "missing" in str(e.value) and "blocks.2" in str(e.value)
    with pytest.raises(CheckpointError) as e:
        load_pretrained(create_model("deit_tiny_patch16_224", depth=2, num_classes=10), path)
    assert "wrong shape" in str(e.value) and "head.weight" in str(e.value)


def test_read_checkpoint_never_executes_code(tmp_path, capfd):
    evil = _save({"x": _Payload()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError):
        read_checkpoint(evil)
    assert "pwned" not in capfd.readouterr().out


def _idx(path, offset):
    with gzip.open(path) as f:
        return np.frombuffer(f.read(), np.uint8, offset=offset)


def test_foreign_mnist_vit_on_real_mnist(shared_dir):
    m = load_pretrained(create_model("vit_mnist_patch7_28"), shared_dir / "models/vit_mnist_gauravpbhagwat.pth").eval()
    images = _idx(shared_dir / "data/mnist/t10k-images-idx3-ubyte.gz", 16).reshape(-1, 1, 28, 28)
    labels = torch.from_numpy(_idx(shared_dir / "data/mnist/t10k-labels-idx1-ubyte.gz", 8).astype(np.int64))
    x = (torch.from_numpy(images.copy()).float() / 255 - 0.1307) / 0.3081
    with torch.no_grad():
        pred = torch.cat([m(x[i:i + 2000]).argmax(1) for i in range(0, len(x), 2000)])
    acc = (pred == labels).float().mean().item()
    assert acc == pytest.approx(0.9794, abs=0.003)  # SOURCES.md: 97.94 % measured elsewhere


def test_foreign_cifar_vit_on_real_cifar(shared_dir):
    from PIL import Image

    m = load_pretrained(create_model("vit_tiny8_patch4_32"), shared_dir / "models/vit_tiny8_cifar10_yihsiu7893.pt").eval()
    z = zipfile.ZipFile(shared_dir / "data/cifar10_jpg/cifar10_jpg_test.zip")
    names = sorted(n for n in z.namelist() if n.endswith(".jpg"))
    classes = sorted({n.split("/")[-2] for n in names})
    images = torch.stack([torch.from_numpy(np.array(Image.open(io.BytesIO(z.read(n))).convert("RGB"))) for n in names])
    x = images.permute(0, 3, 1, 2).float() / 255
    labels = torch.tensor([classes.index(n.split("/")[-2]) for n in names])
    with torch.no_grad():
        pred = torch.cat([m(x[i:i + 2500]).argmax(1) for i in range(0, len(x), 2500)])
    assert (pred == labels).float().mean().item() == pytest.approx(0.480, abs=0.01)  # SOURCES.md: 48.0 %


def test_new_head_for_another_number_of_classes(tmp_path):
    torch.manual_seed(0)
    src = create_model("deit_tiny_distilled_patch16_224", img_size=32, num_classes=1000)
    torch.save({"model": src.state_dict()}, tmp_path / "in1k.pth")
    dst = create_model("deit_tiny_distilled_patch16_224", img_size=32, num_classes=10)
    with pytest.raises(CheckpointError, match="wrong shape 4: head.weight"):
        load_pretrained(dst, tmp_path / "in1k.pth")
    head = {k: v.clone() for k, v in dst.state_dict().items() if k.startswith(("head.", "head_dist."))}
    load_pretrained(dst, tmp_path / "in1k.pth", new_head=True)
    theirs, ours = src.state_dict(), dst.state_dict()
    assert all(torch.equal(ours[k], head[k]) for k in head) and len(head) == 4  # its own, untouched
    assert all(torch.equal(ours[k], theirs[k]) for k in ours if k not in head)  # everything else loaded
