"""Long coverage-guided fuzz runs of every target in tests/fuzz/targets.py.

    .venv/bin/python benchmarks/fuzz.py [--seconds 600] [--targets methods,image] [--out runs/fuzz]

Each target runs in its own process for `--seconds` (libFuzzer's -max_total_time), from
the committed corpus (tests/fuzz/corpus/TARGET) into a working corpus under `--out`.
A crash, timeout or out-of-memory input is kept under `--out/TARGET/`. Writes
benchmarks/results/fuzz.json:

    {"command": ..., "targets": {NAME: {"inputs": N, "seconds": S, "failures_found": K, "failures_fixed": K}}}

`failures_found` counts the failing inputs found so far: those of this run plus the
`crash-*` regression inputs kept in the corpus (each was a bug, fixed: `failures_fixed`).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGETS = ("methods", "data_spec", "labels_tsv", "safetensors_file", "pth_file", "image", "video")


def failing_inputs(work: Path) -> set[str]:
    """The inputs libFuzzer kept in `work` because they failed (crash, timeout, out of memory, leak)."""
    return {p.name for p in work.glob("*") if p.name.split("-")[0] in ("crash", "timeout", "oom", "leak")}


def run_target(name: str, seconds: int, out: Path) -> dict:
    work = out / name
    (work / "corpus").mkdir(parents=True, exist_ok=True)
    seeds = ROOT / "tests" / "fuzz" / "corpus" / name
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    earlier = failing_inputs(work)  # an earlier run's, kept for reading, are not this run's findings
    t0 = time.time()
    r = subprocess.run([sys.executable, str(ROOT / "tests" / "fuzz" / "targets.py"), name,
                        f"-max_total_time={seconds}", "-timeout=30", "-rss_limit_mb=6144", "-print_final_stats=1",
                        str(work / "corpus"), str(seeds)], cwd=work, env=env, capture_output=True, text=True)
    (work / "log.txt").write_text(r.stderr)
    done = re.findall(r"Done (\d+) runs in (\d+) second", r.stderr)
    runs = re.findall(r"stat::number_of_executed_units:\s*(\d+)", r.stderr)
    found = sorted(failing_inputs(work) - earlier)
    regressions = sorted(p.name for p in seeds.glob("crash-*")) if seeds.is_dir() else []
    return {"inputs": int(done[-1][0]) if done else int(runs[-1]) if runs else None,
            "seconds": round(time.time() - t0, 1), "exit_code": r.returncode, "corpus_size": len(list((work / "corpus").iterdir())),
            "failures_found": len(found) + len(regressions), "failures_fixed": len(regressions),
            "failing_inputs_this_run": found, "regression_inputs": regressions}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=int, default=600, help="per target")
    ap.add_argument("--targets", default=",".join(TARGETS))
    ap.add_argument("--out", default=str(ROOT / "runs" / "fuzz"))
    ap.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "fuzz.json"))
    args = ap.parse_args(argv)
    names = [t for t in args.targets.split(",") if t]
    unknown = set(names) - set(TARGETS)
    if unknown:
        print(f"fuzz: unknown target(s) {', '.join(sorted(unknown))}", file=sys.stderr)
        return 2
    out = Path(args.out)
    results = {}
    for name in names:
        print(f"fuzzing {name} for {args.seconds} s", flush=True)
        results[name] = run_target(name, args.seconds, out)
        print(f"  {results[name]['inputs']} inputs, {results[name]['failures_found']} failures found", flush=True)
    from importlib.metadata import version

    command = shlex.join(["python", "benchmarks/fuzz.py"] + list(sys.argv[1:] if argv is None else argv))
    for r in results.values():
        r["command"] = command
    # Targets not run this time keep their last record (each says which command made it).
    old = json.loads(Path(args.json).read_text()) if Path(args.json).is_file() else {}
    previous = {name: {"command": old.get("command"), **r} for name, r in old.get("targets", {}).items()}
    targets = {name: results.get(name, previous.get(name)) for name in TARGETS if name in results or name in previous}
    doc = {"command": command,
           "atheris": version("atheris"), "python": sys.version.split()[0], "targets": targets,
           "notes": "inputs: libFuzzer executions in the run; each target accepts only a result or an "
                    "iared.errors.UserError (one line, exit 2 in the CLI). failures_found = failing inputs of this "
                    "run + crash-* regression inputs in tests/fuzz/corpus (found earlier, fixed: failures_fixed)."}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {args.json}")
    return 1 if any(r["failing_inputs_this_run"] for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
