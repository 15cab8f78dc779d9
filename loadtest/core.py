"""The rules (localhost only, bounds, 4xx vs the rest), headless locust as a subprocess and a psutil meter of a
server's process tree (docs/loadtest.md). No locust import here: locust monkey-patches the interpreter."""
import ipaddress
import json
import math
import re
import socket
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import psutil
from tqdm import tqdm

from common.procs import ProcessError, ServerProcess, free_port

LOCUSTFILE = Path(__file__).resolve().parent / "locustfile.py"
CLIENT_ERROR_TAG = "[4xx]"  # a 4xx is the server rightly refusing us: recorded, never fails a run
MAX_USERS = 512
MAX_RUN_SECONDS = 2 * 3600


class LoadTargetError(ValueError):
    """The requested load test is outside what this harness may do."""


def require_local_host(url: str) -> str:
    """``url`` if it is http(s) to this machine (every address its host name has is a loopback one)."""
    parts = urlsplit(url)
    try:
        local = parts.scheme in ("http", "https") and all(
            ipaddress.ip_address(a[4][0]).is_loopback for a in socket.getaddrinfo(parts.hostname, None))
    except (OSError, ValueError):  # no host, or one that does not resolve
        local = False
    if not local:
        raise LoadTargetError(f"refusing to load {url!r}: load tests only target localhost, e.g. http://127.0.0.1:3000")
    return url


def parse_duration(text) -> float:
    """Seconds in a locust-style duration: ``90``, ``90s``, ``10m``, ``1h30m``."""
    text = str(text).strip().lower()
    try:
        return float(text)
    except ValueError:
        match = re.fullmatch(r"(?:([\d.]+)h)?(?:([\d.]+)m)?(?:([\d.]+)s)?", text)
    if not text or not match:
        raise ValueError(f"bad duration {text!r}; use e.g. 30s, 10m, 1h")
    return sum(float(g or 0) * unit for g, unit in zip(match.groups(), (3600, 60, 1)))


def judge(requests: int, errors: list[tuple[str, int]], p99_ms: float, p99_limit_ms: float | None) -> dict:
    """Pass/fail of a run from its totals and ``(error text, occurrences)`` pairs."""
    server = sum(n for text, n in errors if CLIENT_ERROR_TAG not in text)
    reasons = (["no request was made"] if requests == 0 else []) + \
        ([f"{server} non-4xx failure(s)"] if server else []) + \
        ([f"p99 {p99_ms:.0f} ms > limit {p99_limit_ms:g} ms"]
         if p99_limit_ms is not None and (math.isnan(p99_ms) or p99_ms > p99_limit_ms) else [])
    return {"ok": not reasons, "reasons": reasons, "requests": requests, "server_failures": server,
            "client_errors": sum(n for _, n in errors) - server, "p99_ms": p99_ms}


def run_locust(host: str, users: int, run_time: str, prefix: Path, tags=(), processes: int = 1, spawn_rate=0.0,
               user_rps=0.0, p99_ms=0.0, workload: str | None = None, report=False, progress=False) -> dict:
    """Headless locust to the end (`report`: its HTML report and history too; else measured once all users run):
    the verdict the locustfile wrote, ``<prefix>_verdict.json``, with ``exit`` and ``log``."""
    require_local_host(host)
    if not 1 <= users <= MAX_USERS or not 0 < (seconds := parse_duration(run_time)) <= MAX_RUN_SECONDS:
        raise LoadTargetError(f"users must be 1..{MAX_USERS} and the run time at most {MAX_RUN_SECONDS} s")
    port, verdict = str(free_port()), Path(f"{prefix}_verdict.json")  # locust's 5557 would collide between runs
    argv = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--only-summary", "-H", host,
            "-u", str(users), "-r", f"{spawn_rate or users:g}", "-t", run_time, "--stop-timeout", "5",
            "--csv", str(prefix), "--verdict-file", str(verdict), "--user-rps", f"{user_rps:.6g}", "--p99-ms",
            f"{p99_ms:g}", *(["--tags", *tags] if tags else []), *(["--workload", workload] if workload else []),
            *(["--processes", str(processes), "--master-bind-port", port, "--master-port", port] if processes > 1
              else []), *(["--html", f"{prefix}_report.html", "--csv-full-history"] if report else ["--reset-stats"])]
    verdict.unlink(missing_ok=True)
    t0 = time.monotonic()
    with ServerProcess(argv, 0, f"{prefix}.log", name="locust") as proc, \
            tqdm(total=int(seconds), desc="locust", unit="s", disable=not progress, leave=False) as bar:
        while proc.proc.poll() is None and time.monotonic() - t0 < seconds + 60:  # then it is stopped
            time.sleep(0.25)
            bar.update(min(int(time.monotonic() - t0), bar.total) - bar.n)
    if not verdict.exists():
        raise ProcessError(f"locust ended (exit {proc.proc.returncode}) without a verdict:\n{proc.log_tail(30)}")
    return {**json.loads(verdict.read_text()), "exit": proc.proc.returncode, "log": proc.log()}


class TreeSampler(threading.Thread):
    """Samples (wall-clock time, CPU seconds, RSS bytes) of a process and all its children in the background,
    every `interval` s while it is entered; the CPU used over any window is read off the samples afterwards."""

    def __init__(self, pid: int, interval: float = 0.25):
        super().__init__(daemon=True)
        self.pid, self.interval, self.done = pid, interval, threading.Event()
        self.times, self.cpu, self.rss = [], [], []

    def sample(self) -> None:
        cpu = rss = 0
        try:
            root = psutil.Process(self.pid)
            for p in [root, *root.children(recursive=True)]:
                with p.oneshot():
                    cpu, rss = cpu + sum(p.cpu_times()[:2]), rss + p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
        self.times.append(time.time())
        self.cpu.append(cpu)
        self.rss.append(rss)

    def run(self) -> None:
        while not self.done.wait(self.interval):
            self.sample()
        self.sample()

    def __enter__(self) -> "TreeSampler":
        self.sample()
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.done.set()
        self.join()

    def cpu_seconds(self, t0: float, t1: float) -> float:
        return float(np.interp(t1, self.times, self.cpu) - np.interp(t0, self.times, self.cpu))
