"""`iared bench speed` (`iared.commands.speed`) on tiny models: its JSON, the timing rounds, one-line
errors (nothing here is timed)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import iared
from iared.cli import main
from iared.commands.speed import SpeedConfig, bench_speed


TINY = "vit_tiny8_patch4_32"  # dim 8, depth 6, 64 patches: fast enough for tests


def test_bench_speed_layout_and_ratios():
    cfg = SpeedConfig(arch=TINY, batch_size=3, methods=("original", "iared", "random"), warmup=0, repeats=1,
                      calib_images=4, flops_images=3, command="test")
    out = bench_speed(cfg, log=lambda line: None)
    for key in ("arch", "img_size", "batch_size", "device", "threads", "command", "methods", "kernels", "allocator"):
        assert key in out
    # glibc (this project's CI and every Linux wheel of torch) takes the setting; elsewhere it says so
    assert out["allocator"] in ("glibc, no mmap/trim", "system")
    assert out["img_size"] == 32 and out["batch_size"] == 3 and out["threads"] == torch.get_num_threads()
    rows = out["methods"]
    assert set(rows) == {"original", "iared", "random"}
    for r in rows.values():
        assert {"img_per_s", "gflops_per_img", "keep_ratio", "speedup", "flops_ratio"} <= set(r)
    assert rows["original"]["speedup"] == 1.0 and rows["original"]["flops_ratio"] == 1.0
    assert rows["original"]["keep_ratio"] == 1.0
    # with every image counted exactly, GFLOPs equal count_flops of the calibrated model
    model = iared.create_model(TINY).eval()
    counted = iared.evaluation.flops.count_flops(model, torch.randn(3, 3, 32, 32))
    assert rows["original"]["gflops_per_img"] == pytest.approx(float(counted.mean()) / 1e9)
    for name in ("iared", "random"):
        r = rows[name]
        assert r["keep_ratio"] == pytest.approx(0.6, abs=0.1)
        assert r["flops_ratio"] == pytest.approx(rows["original"]["gflops_per_img"] / r["gflops_per_img"])
        assert r["flops_ratio"] > 1.2
    assert rows["iared"]["reduction_gflops_per_img"] > 0  # the interpreters' own cost is counted


def test_bench_speed_times_timms_own_model_beside_ours():
    pytest.importorskip("timm")
    cfg = SpeedConfig(arch=TINY, batch_size=2, methods=("original", "timm", "random"), warmup=0, repeats=2,
                      calib_images=2, flops_images=2, command="test")
    rows = bench_speed(cfg, log=lambda line: None)["methods"]
    assert list(rows) == ["original", "timm", "random"]
    t = rows["timm"]
    assert t["gflops_per_img"] == rows["original"]["gflops_per_img"] and t["keep_ratio"] == 1.0
    assert t["flops_ratio"] == 1.0 and len(t["times_s"]) == 2 and t["img_per_s"] > 0
    assert t["of_limit"] == pytest.approx(t["speedup"])  # its speed relative to our unreduced model
    # asked for without "original", it brings the unreduced model it is compared with
    alone = SpeedConfig(arch=TINY, batch_size=2, methods=("timm",), warmup=0, repeats=1, calib_images=2,
                        flops_images=2, command="test")
    assert list(bench_speed(alone, log=lambda line: None)["methods"]) == ["original", "timm"]


def test_cli_bench_speed_writes_json(tmp_path):
    path = tmp_path / "speed.json"
    rc = main(["bench", "speed", "--arch", TINY, "--batch-size", "2", "--json", str(path), "--methods",
               "original,random", "--warmup", "0", "--repeats", "1", "--calib-images", "2", "--device", "cpu",
               "--allocator", "system"])
    assert rc == 0
    d = json.loads(path.read_text())
    assert d["allocator"] == "system"
    assert d["command"].startswith("iared bench speed --arch " + TINY)
    assert set(d["methods"]) == {"original", "random"}


def test_cli_bench_speed_no_progress_prints_no_bar(tmp_path, capsys):
    rc = main(["bench", "speed", "--arch", TINY, "--batch-size", "2", "--json", str(tmp_path / "s.json"),
               "--methods", "original,random", "--warmup", "0", "--repeats", "1", "--calib-images", "2",
               "--device", "cpu", "--no-progress"])
    assert rc == 0
    err = capsys.readouterr().err
    assert "FLOPs" not in err and "timing" not in err and "\r" not in err


def test_timing_rounds_fixed_or_until_every_method_has_its_time():
    from iared.commands.speed import MAX_ROUNDS, MIN_ROUNDS, _more_rounds

    def rounds(cfg, per_round):  # timed rounds until _more_rounds says stop; per_round: name -> seconds
        times, done = {k: [] for k in per_round}, 0
        while _more_rounds(done, times, cfg):
            for k, t in per_round.items():
                times[k].append(t)
            done += 1
        return done

    fixed = SpeedConfig(arch=TINY, warmup=3, repeats=7)
    assert rounds(fixed, {"a": 10.0}) == 7                                    # exactly --repeats
    auto = SpeedConfig(arch=TINY, warmup=2, min_time_s=2.0)
    assert rounds(auto, {"original": 1.0, "iared": 0.5}) == MIN_ROUNDS       # slow forwards: the minimum
    assert rounds(auto, {"original": 0.03, "iared": 0.02}) == 100            # 2 s of the fastest: 100 rounds
    assert rounds(auto, {"original": 1e-6}) == MAX_ROUNDS                    # bounded
    assert rounds(dataclasses.replace(auto, min_time_s=0.0), {"a": 0.001}) == MIN_ROUNDS


def test_bench_speed_in_bfloat16_records_its_dtype():
    cfg = SpeedConfig(arch=TINY, batch_size=2, methods=("original", "iared"), warmup=0, repeats=1,
                      calib_images=4, flops_images=2, dtype="bfloat16", allocator="system", command="test")
    out = bench_speed(cfg, log=lambda line: None)
    assert out["dtype"] == "bfloat16"
    # the calibration still lands near the budget: scores are compared in float32, not as bf16 ties
    assert out["methods"]["iared"]["keep_ratio"] == pytest.approx(0.6, abs=0.1)
    assert out["methods"]["iared"]["flops_ratio"] > 1.2
    with pytest.raises(ValueError, match="dtype must be one of"):
        bench_speed(dataclasses.replace(cfg, dtype="float16"), log=lambda line: None)


def test_cli_bench_speed_user_errors(tmp_path, capsys):
    path = tmp_path / "x.json"
    assert main(["bench", "speed", "--arch", "nope", "--json", str(path)]) == 2
    assert main(["bench", "speed", "--arch", TINY, "--json", str(path), "--methods", "original,bogus"]) == 2
    assert main(["bench", "speed", "--arch", TINY, "--json", str(path), "--keep-ratio", "1.5"]) == 2
    assert main(["bench", "speed", "--arch", TINY, "--json", str(path), "--methods", " , "]) == 2
    assert main(["bench", "speed", "--arch", TINY, "--json", str(path), "--min-time", "-1"]) == 2
    # a video-only policy on an image backbone: skipped, and with nothing left to time, a user error
    assert main(["bench", "speed", "--arch", TINY, "--json", str(path), "--methods", "tempdiff",
                 "--calib-images", "2", "--batch-size", "1"]) == 2
    assert not path.exists()
    assert "error" in capsys.readouterr().err


@pytest.mark.parametrize("bad", ["json_is_a_folder", "under_a_file", "img_size"])
def test_cli_bench_speed_fails_before_the_work(tmp_path, capsys, monkeypatch, bad):
    # An output that cannot be written, or a size the architecture cannot take, is one line
    # and exit 2 before anything is timed (it used to be a traceback after the whole run).
    import iared.commands.speed as speed

    monkeypatch.setattr(speed, "bench_speed", lambda *a, **k: pytest.fail("the benchmark ran"))
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    json_path = {"json_is_a_folder": tmp_path, "under_a_file": blocker / "x.json"}.get(bad, tmp_path / "x.json")
    extra = ["--img-size", "18"] if bad == "img_size" else []
    assert main(["bench", "speed", "--arch", TINY, "--json", str(json_path), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("iared bench speed: error:"), err
    assert ("patch size" if bad == "img_size" else str(json_path)) in err[0]
    assert blocker.read_text() == "not a folder" and list(tmp_path.iterdir()) == [blocker]
