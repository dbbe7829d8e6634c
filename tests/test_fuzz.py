"""The fuzz targets of tests/fuzz/targets.py: every corpus input replayed (the inputs that
once crashed a parser among them), then a short coverage-guided run of each target.

The long runs (minutes per target) are `benchmarks/fuzz.py`, recorded in
benchmarks/results/fuzz.json.
"""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FUZZ = ROOT / "tests" / "fuzz"
CORPUS = FUZZ / "corpus"
SECONDS = 3  # per target in the bounded run


def _targets():
    spec = importlib.util.spec_from_file_location("iared_fuzz_targets", FUZZ / "targets.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.TARGETS


TARGETS = _targets()


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_corpus_replays_without_a_crash(name):
    files = sorted((CORPUS / name).glob("*")) if (CORPUS / name).is_dir() else []
    for f in files:
        TARGETS[name](f.read_bytes())  # a result or a UserError: anything else fails the test


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_bounded_fuzz_run(name, tmp_path):
    pytest.importorskip("atheris")
    seeds = [str(CORPUS / name)] if (CORPUS / name).is_dir() else []
    (tmp_path / "corpus").mkdir()  # new inputs go here, never into the committed corpus
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    # -seed=1: the same input sequence on every run, so CI is not at the mercy of a lucky draw
    r = subprocess.run([sys.executable, str(FUZZ / "targets.py"), name, f"-max_total_time={SECONDS}", "-seed=1",
                        "-timeout=20", "-rss_limit_mb=4096", str(tmp_path / "corpus"), *seeds],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    crashes = list(tmp_path.glob("crash-*")) + list(tmp_path.glob("timeout-*")) + list(tmp_path.glob("oom-*"))
    assert r.returncode == 0 and not crashes, r.stderr[-3000:]
    assert "Done" in r.stderr
