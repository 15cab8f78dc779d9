"""Run locust headless as a subprocess and read back what it measured.

A subprocess (not locust as a library) so that ``--processes`` master/worker mode works and the
locust processes never share a Python interpreter, or gevent's monkey-patching, with the runners.
"""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from loadtest.checks import check_bounds, parse_duration, require_local_host

LOCUSTFILE = Path(__file__).resolve().parent / "locustfile.py"
REPO_ROOT = LOCUSTFILE.parent.parent
PERCENTILE_COLUMNS = {"p50": "50%", "p95": "95%", "p99": "99%"}


@dataclass
class LocustRun:
    """One headless locust invocation."""

    host: str
    users: int
    run_time: str
    csv_prefix: Path
    spawn_rate: float | None = None  # None: all users at once
    tags: list[str] = field(default_factory=list)
    processes: int = 1
    user_rps: float = 0.0  # > 0: constant_throughput per user
    p99_ms: float = 0.0
    model: str | None = None  # None: no label check (do-nothing ceiling)
    data_dir: str | None = None
    html: Path | None = None
    reset_stats: bool = True  # exclude the ramp-up from the numbers
    full_history: bool = False

    def argv(self) -> list[str]:
        require_local_host(self.host)
        check_bounds(self.users, parse_duration(self.run_time))
        argv = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--only-summary",
                "-H", self.host, "-u", str(self.users), "-r", str(self.spawn_rate or self.users),
                "-t", self.run_time, "--stop-timeout", "5", "--csv", str(self.csv_prefix),
                "--verdict-file", str(self.verdict_path), "--loglevel", "INFO"]
        if self.processes > 1:
            argv += ["--processes", str(self.processes)]
        if self.tags:
            argv += ["--tags", *self.tags]
        if self.user_rps > 0:
            argv += ["--user-rps", f"{self.user_rps:.6g}"]
        if self.p99_ms > 0:
            argv += ["--p99-ms", f"{self.p99_ms:g}"]
        if self.model:
            argv += ["--model", self.model]
        else:
            argv += ["--no-label-check"]
        if self.data_dir:
            argv += ["--data-dir", self.data_dir]
        if self.html:
            argv += ["--html", str(self.html)]
        if self.reset_stats:
            argv += ["--reset-stats"]
        if self.full_history:
            argv += ["--csv-full-history"]
        return argv

    @property
    def verdict_path(self) -> Path:
        return Path(f"{self.csv_prefix}_verdict.json")


@dataclass
class LocustResult:
    returncode: int
    rows: dict[str, dict[str, float]]  # request name -> stats; "Aggregated" for the total
    verdict: dict
    measured_from: float  # time.monotonic() when the measured window began (all users spawned)
    measured_to: float  # ... and when the run-time limit ended it
    log: str

    @property
    def total(self) -> dict[str, float]:
        return self.rows.get("Aggregated", {})


def read_stats_csv(path: Path) -> dict[str, dict[str, float]]:
    """Locust's ``*_stats.csv`` as ``{name: {column: number}}`` (``N/A`` becomes NaN)."""
    rows = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            numbers = {}
            for key, value in row.items():
                if key in ("Type", "Name"):
                    continue
                try:
                    numbers[key] = float(value)
                except (TypeError, ValueError):
                    numbers[key] = math.nan
            rows[row["Name"]] = numbers
    return rows


def run_locust(run: LocustRun, timeout_slack: float = 60.0, echo: bool = False) -> LocustResult:
    """Run locust to completion; note when the measured window started and ended."""
    run.csv_prefix.parent.mkdir(parents=True, exist_ok=True)
    for stale in (run.verdict_path, Path(f"{run.csv_prefix}_stats.csv")):
        stale.unlink(missing_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    started = time.monotonic()
    # Own process group: with --processes locust forks workers, and all of them must go together.
    proc = subprocess.Popen(run.argv(), cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, bufsize=1, start_new_session=True)
    lines: list[str] = []
    marks: dict[str, float] = {}

    def read_output() -> None:
        for line in proc.stdout:
            lines.append(line)
            if echo:
                sys.stderr.write(line)
            if "All users spawned" in line and "spawned" not in marks:
                marks["spawned"] = time.monotonic()
            elif "run-time limit reached" in line and "stopped" not in marks:
                marks["stopped"] = time.monotonic()

    reader = threading.Thread(target=read_output, daemon=True)
    reader.start()
    try:
        proc.wait(timeout=parse_duration(run.run_time) + timeout_slack)
    except subprocess.TimeoutExpired:  # a hung run: its stats so far are still read below
        _kill_group(proc)
    except BaseException:  # Ctrl-C / SIGTERM of the runner: leave no locust behind
        _kill_group(proc)
        raise
    _kill_group(proc)  # workers that outlived their master
    reader.join(timeout=5)
    ended = time.monotonic()
    stats_path = Path(f"{run.csv_prefix}_stats.csv")
    rows = read_stats_csv(stats_path) if stats_path.exists() else {}
    verdict = json.loads(run.verdict_path.read_text()) if run.verdict_path.exists() else {}
    return LocustResult(proc.returncode, rows, verdict, marks.get("spawned", started),
                        marks.get("stopped", ended), "".join(lines))


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def summarize(result: LocustResult, images_per_request: int = 1) -> dict[str, float]:
    """The numbers the benchmark reports for one locust run."""
    total = result.total
    rps = total.get("Requests/s", math.nan)
    return {
        "requests": total.get("Request Count", 0.0),
        "failures": total.get("Failure Count", 0.0),
        "rps": rps,
        "img_s": rps * images_per_request,
        **{name: total.get(column, math.nan) for name, column in PERCENTILE_COLUMNS.items()},
    }
