"""Model files (`iared.save_model` / `load_model`) and policy files (`save_policy` / `load_policy` /
`with_policy`: trained IA-RED² interpreters without the backbone, and `--policy` in the commands)."""

import json
import os

import pytest
import torch

import iared
from iared.backbones import CheckpointError, create_model
from iared.backbones.checkpoint import save_safetensors
from iared.cli import main

from helpers import tiny


def test_model_file_writes_are_checked_and_leave_nothing_behind(tmp_path):
    m = create_model("vit_custom", img_size=16, patch_size=4, embed_dim=8, depth=2, num_heads=2, num_classes=3)
    with pytest.raises(ValueError, match="unknown arch"):  # load_model could not rebuild it
        iared.save_model(m, tmp_path / "m.safetensors", arch="no_such_arch")
    with pytest.raises(IsADirectoryError):
        iared.save_model(m, tmp_path, arch="vit_custom")
    assert list(tmp_path.iterdir()) == []  # no temporary file left next to the folder or in it
    iared.save_model(m, tmp_path / "sub" / "m.safetensors", arch="vit_custom")
    path = tmp_path / "sub" / "m.safetensors"
    mask = os.umask(0)
    os.umask(mask)
    assert [p.name for p in path.parent.iterdir()] == ["m.safetensors"]
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask  # an ordinary file, not mkstemp's 0600
    assert torch.equal(iared.load_model(path).pos_embed, m.pos_embed)


def test_model_file_round_trip(tmp_path):
    torch.manual_seed(0)
    m = iared.patch(create_model("vit_custom", img_size=16, patch_size=4, in_chans=1, embed_dim=16, depth=4,
                                 num_heads=2, num_classes=3), "iared", groups=2, threshold=0.4).eval()
    iared.save_model(m, tmp_path / "m.safetensors", arch="vit_custom", data={"kind": "toy"})
    back = iared.load_model(tmp_path / "m.safetensors")
    x = torch.randn(3, 1, 16, 16)
    assert torch.equal(back(x), m(x))
    assert back.policy.threshold == 0.4 and back.model_meta["data"] == {"kind": "toy"}
    with pytest.raises(CheckpointError, match="no iared metadata|not an iared model"):
        from safetensors.torch import save_file

        save_file({"a": torch.zeros(1)}, str(tmp_path / "plain.safetensors"))
        iared.load_model(tmp_path / "plain.safetensors")


def _small_tiny(**kw):
    return iared.create_model("vit_tiny_patch16_224", depth=1, **kw)


def test_model_file_with_bad_metadata_is_a_checkpoint_error(tmp_path):
    m = _small_tiny()
    for meta, says in (({"iared": "{not json"}, "not JSON"), ({"iared": '{"arch": 3}'}, "lacks the arch"),
                       ({"iared": '{"arch": "vit_custom", "config": {"avtn_scale": 1}}'}, "cannot build the model"),
                       ({"iared": '{"arch": "vit_nope", "config": {}}'}, "cannot build the model")):
        save_safetensors(m.state_dict(), tmp_path / "m.safetensors", metadata=meta)
        with pytest.raises(iared.CheckpointError, match=says):
            iared.load_model(tmp_path / "m.safetensors")


def _trained(seed=3):
    m = iared.patch(tiny(depth=6), policy="iared", groups=3, threshold=[0.4, 0.5, 0.6])
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in m.policy.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return m.eval()


def test_policy_file_round_trip_gives_the_same_model(tmp_path):
    m = _trained()
    backbone_file = tmp_path / "bb.safetensors"
    iared.save_model(iared.unpatch(_trained()), backbone_file, arch="vit_custom")
    iared.save_policy(m, tmp_path / "p.safetensors", arch="vit_custom", backbone_file=backbone_file)
    policy = iared.load_policy(tmp_path / "p.safetensors")
    assert policy.file_meta["backbone"]["arch"] == "vit_custom"
    assert len(policy.file_meta["backbone"]["sha256"]) == 64
    other = iared.patch(tiny(depth=6), policy=policy)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        a, ia = m(x, return_info=True)
        b, ib = other(x, return_info=True)
    assert torch.equal(a, b)
    assert other.policy.threshold == [0.4, 0.5, 0.6]
    assert [s.keep.sum().item() for s in ia.stages] == [s.keep.sum().item() for s in ib.stages]
    # only the interpreters are stored
    from iared.backbones.checkpoint import read_checkpoint

    assert all(k.startswith("interpreters.") for k in read_checkpoint(tmp_path / "p.safetensors"))


def test_policy_refuses_a_backbone_it_does_not_fit(tmp_path):
    iared.save_policy(_trained(), tmp_path / "p.safetensors", arch="vit_custom")
    with pytest.raises(ValueError, match="width 32 and depth 6"):
        iared.patch(tiny(depth=4), policy=iared.load_policy(tmp_path / "p.safetensors"))
    with pytest.raises(ValueError, match="needs a model patched"):
        iared.save_policy(tiny(), tmp_path / "q.safetensors", arch="vit_custom")
    iared.save_model(tiny(), tmp_path / "model.safetensors", arch="vit_custom")
    with pytest.raises(iared.CheckpointError, match="not an iared policy file"):
        iared.load_policy(tmp_path / "model.safetensors")


def _photos_with_labels(root, n=6):
    from PIL import Image

    root.mkdir()
    g = torch.Generator().manual_seed(0)
    lines = []
    for i in range(n):
        arr = (torch.rand(32, 32, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(arr).save(root / f"{i}.png")
        lines.append(f"{i}.png\t{i % 10}")
    (root / "labels.tsv").write_text("\n".join(lines) + "\n")
    return root


def test_eval_and_interpret_take_a_policy_file(tmp_path, capsys):
    backbone = iared.unpatch(_trained())
    backbone.pretrained_cfg.update(input_size=(3, 32, 32), crop_pct=1.0)
    iared.save_model(backbone, tmp_path / "bb.safetensors", arch="vit_custom")
    iared.save_policy(_trained(), tmp_path / "p.safetensors", arch="vit_custom",
                      backbone_file=tmp_path / "bb.safetensors")
    photos = _photos_with_labels(tmp_path / "photos")
    out = tmp_path / "r.json"
    assert main(["eval", "--data", f"imagefolder:{photos}", "--checkpoint", str(tmp_path / "bb.safetensors"),
                 "--policy", str(tmp_path / "p.safetensors"), "--methods", "original,iared,random",
                 "--json", str(out), "--no-throughput", "--device", "cpu"]) == 0
    res = json.loads(out.read_text())["methods"]
    assert res["iared"]["policy"]["name"] == "iared" and res["iared"]["keep_ratio"] < 1.0
    assert res["original"]["keep_ratio"] == 1.0
    assert main(["interpret", "-p", str(photos / "0.png"), "-o", str(tmp_path / "maps"),
                 "--checkpoint", str(tmp_path / "bb.safetensors"), "--policy", str(tmp_path / "p.safetensors"),
                 "--device", "cpu", "--no-progress"]) == 0
    assert list((tmp_path / "maps").rglob("*.png"))
    # a file that is not a policy: one line, exit code 2
    capsys.readouterr()
    assert main(["eval", "--data", f"imagefolder:{photos}", "--checkpoint", str(tmp_path / "bb.safetensors"),
                 "--policy", str(tmp_path / "bb.safetensors"), "--json", str(out), "--device", "cpu"]) == 2
    assert "not an iared policy file" in capsys.readouterr().err


def test_committed_policy_fits_the_shared_imagenet_vit(shared_dir):
    """The policy file in benchmarks/models loads on the weights it was trained on (sha256 recorded)."""
    from pathlib import Path

    from iared.models import load_model_file, sha256_of, with_policy

    weights = shared_dir / "models" / "vit_tiny_patch16_224_augreg_in1k.safetensors"
    policy_file = Path(__file__).resolve().parents[1] / "benchmarks" / "models" / \
        "iared_vit_tiny_patch16_224_augreg.safetensors"
    if not weights.is_file():
        pytest.skip("needs the shared ViT-Tiny")
    policy = iared.load_policy(policy_file)
    assert policy.file_meta["backbone"]["sha256"] == sha256_of(weights)
    model = with_policy(load_model_file(weights), policy_file, weights)
    with torch.no_grad():
        _, info = model.eval()(torch.zeros(1, 3, 224, 224), return_info=True)
    assert len(info.stages) == 3 and model.model_meta["policy"]["name"] == "iared"
