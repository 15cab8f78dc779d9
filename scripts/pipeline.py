"""python3 scripts/pipeline.py: `make pipeline`, one stage after another, each timed.

Each stage is a make target (the Makefile holds the commands; make passes ARCH=, DATA_DIR=, ... on
to them). A stage whose output is unchanged afterwards reused what was there (a current run, a
current export); the table says so. The times are recorded in artifacts/pipeline_times.json
(temp + rename) only by a run that succeeded and did some work: a failed run, or one that reused
everything, leaves the last good record as it was and says so. `make readme-results` shows the
record with its command, date and CPU, and names the stages a partial run reused.
Standard library only: the first stage makes the virtual environment.
"""
import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common.files import write_json  # noqa: E402 -- stdlib only
from common.machine import cpu_summary  # noqa: E402

RECORD = "pipeline_times.json"
GOAL_S = 300  # issue 11: make pipeline in at most 5 minutes from a fresh clone (docs/training.md)


@dataclass
class Stage:
    name: str
    argv: list[str]
    outputs: list[Path]  # a stage ran when one of them changed; none: it always counts as run (a check)


def stamp(paths: list[Path]) -> list:
    """What tells a rewritten file from an untouched one: (mtime_ns, size, inode), None when missing."""
    out = []
    for p in paths:
        try:
            s = p.stat()
            out.append((s.st_mtime_ns, s.st_size, s.st_ino))
        except FileNotFoundError:
            out.append(None)
    return out


def last_record(path: Path) -> str:
    try:
        return f"the run of {json.loads(path.read_text())['date']}"
    except (OSError, ValueError, KeyError):
        return "no record yet"


def run(stages: list[Stage], record: Path, command: str) -> int:
    """Runs the stages in order; returns the first failing stage's exit status (nothing recorded), else 0."""
    rows, started = [], time.strftime("%Y-%m-%d %H:%M")
    load_before = os.getloadavg()
    for stage in stages:
        before = stamp(stage.outputs)
        t0 = time.perf_counter()
        code = subprocess.run(stage.argv).returncode
        seconds = time.perf_counter() - t0
        if code != 0:
            print(f"make pipeline: stage {stage.name} failed (exit {code}) after {seconds:.1f} s; "
                  f"{record} keeps {last_record(record)}", file=sys.stderr)
            return code
        ran = not stage.outputs or stamp(stage.outputs) != before
        rows.append({"stage": stage.name, "seconds": round(seconds, 1), "ran": ran})
    total = sum(r["seconds"] for r in rows)
    print(f"make pipeline, wall seconds per stage:")
    for r in rows:
        print(f"  {r['stage']:14s} {r['seconds']:7.1f}" + ("" if r["ran"] else "  (reused what was there)"))
    print(f"  {'total':14s} {total:7.1f}")
    measured = [r for r in rows if r["ran"] and any(s.name == r["stage"] and s.outputs for s in stages)]
    if not measured:
        print(f"make pipeline: every stage reused what was there, so these are not the pipeline's times; "
              f"{record} keeps {last_record(record)} (make clean, then make pipeline, measures a full run)")
        return 0
    reused = [r["stage"] for r in rows if not r["ran"]]
    write_json(record, {"command": command, "date": started, "stages": rows, "total_s": round(total, 1),
                        "complete": not reused, "goal_s": GOAL_S, "cpu": cpu_summary(),
                        "load_average_before": [round(x, 2) for x in load_before],
                        "load_average_after": [round(x, 2) for x in os.getloadavg()], "commit": commit()})
    print(f"make pipeline: times recorded in {record}"
          + (f" (a partial run: {', '.join(reused)} reused what was there)" if reused else ""))
    return 0


def commit() -> str:
    """The checkout's commit (+ "-dirty" when tracked files changed); "" outside git."""
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True,
                               timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "") if sha.returncode == 0 else ""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python3 scripts/pipeline.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--artifacts", default="artifacts", type=Path, help="make's ARTIFACTS")
    p.add_argument("--run-dir", required=True, type=Path, help="make's RUN_DIR")
    p.add_argument("--venv", default=".venv", type=Path, help="make's VENV")
    p.add_argument("--command", default="make pipeline", help="the command as the user typed it, for the record")
    args = p.parse_args(argv)
    make = [os.environ.get("MAKE", "make"), "--no-print-directory"]
    a = args.artifacts
    stages = [Stage("set-up", [*make, "setup"], [args.venv / ".installed"]),
              Stage("data", [*make, "data"], []),
              Stage("train", [*make, "train"], [args.run_dir / "weights.safetensors"]),
              Stage("export+verify", [*make, "export"], [a / "model.onnx"]),
              Stage("bench-model", [*make, "pipeline-bench"], [a / "bench_model.json"]),
              Stage("report", [*make, "pipeline-report"], [])]
    a.mkdir(parents=True, exist_ok=True)
    return run(stages, a / RECORD, args.command)


if __name__ == "__main__":
    sys.exit(main())
