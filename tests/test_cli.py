"""The command line as a user meets it: help, one clear line for a bad checkpoint, usage errors."""

import os
import subprocess
import sys

import pytest
import torch

from iared.cli import main


COMMANDS = ["demo", "train-backbone", "train", "eval", "interpret", "bench"]
DATA = "cluttered-digits"


def test_help_lists_every_spec_command(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert name in out


def test_console_script_runs():
    exe = os.path.join(os.path.dirname(sys.executable), "iared")
    res = subprocess.run([exe, "bench", "--help"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and "speed" in res.stdout


class _Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def _bad_checkpoints(tmp_path):
    good = tmp_path / "ok.pth"
    from iared import create_model

    torch.save(create_model("vit_custom", img_size=48, patch_size=8, in_chans=1, embed_dim=16, depth=3,
                            num_heads=2, num_classes=10).state_dict(), good)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[:500])
    evil = tmp_path / "evil.pth"
    torch.save({"x": _Payload()}, evil)
    wrong = tmp_path / "wrong.pth"  # a real checkpoint of another architecture
    torch.save(create_model("deit_tiny_patch16_224", depth=1).state_dict(), wrong)
    return {"truncated": truncated, "code payload": evil, "wrong architecture": wrong}


def _argv(command, ckpt, tmp_path, image):
    if command == "train":
        return ["train", "--data", "cluttered-digits", "--checkpoint", str(ckpt), "--arch", "vit_custom",
                "--groups", "3", "--out", str(tmp_path / "run"), "--limit-batches", "1", "--epochs", "1"]
    if command == "eval":
        return ["eval", "--data", "cluttered-digits", "--checkpoint", str(ckpt), "--arch", "vit_custom",
                "--methods", "original", "--json", str(tmp_path / "e.json"), "--limit-batches", "1"]
    return ["interpret", "-p", str(image), "-o", str(tmp_path / "interp"), "--checkpoint", str(ckpt)]


@pytest.mark.parametrize("command", ["train", "eval", "interpret"])
def test_bad_checkpoint_is_exit_2_and_one_line(tmp_path, capfd, command):
    from PIL import Image

    image = tmp_path / "img.png"
    Image.new("L", (48, 48), 128).save(image)
    for what, ckpt in _bad_checkpoints(tmp_path).items():
        code = main(_argv(command, ckpt, tmp_path, image))
        captured = capfd.readouterr()
        lines = [ln for ln in captured.err.strip().splitlines() if ln.strip()]
        assert code == 2, f"{command} with a {what} checkpoint: exit {code}"
        assert len(lines) == 1, f"{command} with a {what} checkpoint printed: {captured.err!r}"
        assert "Traceback" not in captured.err
        assert ckpt.name in lines[0] or "checkpoint" in lines[0] or "fit" in lines[0], lines[0]
        assert "pwned" not in captured.out
        assert not (tmp_path / "e.json").exists()


def test_bench_speed_choices_are_the_library_s():
    # The CLI spells its choice lists out (building the parser imports no torch); they must
    # stay the library's.
    from iared.backbones.kernels import KERNELS
    from iared.cli import build_parser
    from iared.commands.speed import DTYPES

    speed = build_parser()._subparsers._group_actions[0].choices["bench"]._subparsers._group_actions[0].choices["speed"]
    choices = {a.dest: tuple(a.choices) for a in speed._actions if a.choices}
    assert choices["kernels"] == tuple(KERNELS)
    assert choices["dtype"] == tuple(DTYPES)
    assert choices["allocator"] == ("steady", "system")


@pytest.mark.parametrize("argv, flag", [
    (["train-backbone", "--data", "cluttered-digits", "--arch", "vit_custom", "--out", "x", "--epochs", "-1"],
     "--epochs"),
    (["train", "--data", "d", "--checkpoint", "c", "--out", "x", "--lr", "0"], "--lr"),
    (["train", "--data", "d", "--checkpoint", "c", "--out", "x", "--lr", "nan"], "--lr"),
    (["train", "--data", "d", "--checkpoint", "c", "--out", "x", "--label-smoothing", "1"], "--label-smoothing"),
    (["train-backbone", "--data", "d", "--arch", "a", "--out", "x", "--weight-decay", "-0.1"], "--weight-decay"),
    (["eval", "--data", "d", "--checkpoint", "c", "--json", "j", "--threshold", "2"], "--threshold"),
])
def test_numbers_out_of_range_are_usage_errors(argv, flag, capsys):
    # Before any work: a negative epoch count used to train one step, a threshold of 2 to
    # evaluate a model that keeps nothing.
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}: expected a number in" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1  # one line, as every user error (no usage text)


def test_readme_data_table_names_every_data_kind():
    """The README's DATA table documents each registered kind, and nothing that is not one."""
    import re
    from pathlib import Path

    from iared.data import DATASETS

    readme = Path(__file__).resolve().parents[1] / "README.md"
    table = readme.read_text(encoding="utf-8").split("`DATA` is `KIND[:PATH]`:")[1].split("\n\n")[1]
    first_cells = [row.split("|")[1] for row in table.splitlines()[2:]]
    documented = {kind for cell in first_cells for kind in re.findall(r"`([a-z0-9-]+)[\[:`]", cell)}
    assert documented == set(DATASETS)


@pytest.mark.parametrize("command", ["train-backbone", "eval"])
def test_negative_workers_is_a_usage_error(command, capsys):
    argv = {"train-backbone": ["train-backbone", "--data", DATA, "--arch", "vit_custom", "--out", "x"],
            "eval": ["eval", "--data", DATA, "--checkpoint", "c", "--json", "j"]}[command]
    with pytest.raises(SystemExit) as e:
        main(argv + ["--workers", "-1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "--workers: expected a non-negative integer" in err[0], err
