"""Start, probe, meter and stop the servers under test.

Every server is started in its own process group and stopped with it, so no worker a server forks
(BentoML runs an arbiter plus worker processes) outlives the run. CPU and RSS are summed over the
whole process tree, because that is what the server costs the machine.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from bisect import bisect_left
from dataclasses import dataclass, field
from pathlib import Path

import psutil

SERVICE_TARGET = "service.service:FashionMNISTClassifier"
# Our service coalesces concurrent requests into one onnxruntime call of at most BATCH_MAX_IMAGES
# images (service/config.py); a cap of 1 image is "batching off": every request runs on its own.
BATCH_CAP_ENV = "BATCH_MAX_IMAGES"


class ServerError(RuntimeError):
    """A server did not come up, or died."""


@dataclass
class ServerSpec:
    """How to run one server under test on 127.0.0.1."""

    name: str
    argv: list[str]
    port: int
    ready_path: str = "/readyz"
    env: dict[str, str] = field(default_factory=dict)
    answers_labels: bool = True  # False for the do-nothing ceiling
    endpoints: tuple[str, ...] = ("single", "batch64")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def service_spec(model: str, port: int, batching: bool | None = None, name: str = "service") -> ServerSpec:
    env = {"MODEL_PATH": model}
    if batching is False:
        env[BATCH_CAP_ENV] = "1"
    argv = [sys.executable, "-m", "bentoml", "serve", SERVICE_TARGET, "--host", "127.0.0.1", "--port", str(port)]
    return ServerSpec(name, argv, port, env=env, endpoints=("single", "batch64", "batch64raw", "png", "oip"))


def naive_fastapi_spec(model: str, port: int) -> ServerSpec:
    argv = [sys.executable, "-m", "loadtest.baselines.naive_fastapi", "--model", model, "--port", str(port)]
    return ServerSpec("naive-fastapi", argv, port)


def naive_bentoml_spec(model: str, port: int) -> ServerSpec:
    target = "loadtest.baselines.naive_bentoml:NaiveClassifier"
    argv = [sys.executable, "-m", "bentoml", "serve", target, "--host", "127.0.0.1", "--port", str(port)]
    return ServerSpec("naive-bentoml", argv, port, env={"MODEL_PATH": model})


def do_nothing_spec(port: int, fastapi: bool = False, delay_ms: float = 0.0) -> ServerSpec:
    argv = [sys.executable, "-m", "loadtest.baselines.do_nothing", "--port", str(port)] + (["--fastapi"] if fastapi else [])
    if delay_ms:
        argv += ["--delay-ms", str(delay_ms)]
    name = "do-nothing-fastapi" if fastapi else "do-nothing"
    return ServerSpec(name, argv, port, answers_labels=False, endpoints=("single",))


def probe(url: str, timeout: float = 1.0) -> bool:
    """True when ``url`` answers 2xx."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return 200 <= resp.status < 300
    except (urllib.error.URLError, OSError, ValueError):
        return False


def port_in_use(port: int) -> bool:
    return any(c.laddr and c.laddr.port == port and c.status == psutil.CONN_LISTEN
               for c in psutil.net_connections(kind="tcp"))


class ManagedServer:
    """Context manager: start ``spec``, wait until it is ready, stop its whole process group."""

    def __init__(self, spec: ServerSpec, log_path: Path, ready_timeout: float = 180.0, cwd: Path | None = None):
        self.spec, self.log_path, self.ready_timeout = spec, Path(log_path), ready_timeout
        self.cwd = cwd or Path(__file__).resolve().parent.parent
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "ManagedServer":
        if probe(self.spec.url + self.spec.ready_path) or port_in_use(self.spec.port):
            raise ServerError(f"port {self.spec.port} is already taken; cannot start {self.spec.name} there")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **self.spec.env, "PYTHONUNBUFFERED": "1", "BENTOML_DO_NOT_TRACK": "true"}
        # The repository root must be importable for `service.service` and `loadtest.baselines`.
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(self.cwd), env.get("PYTHONPATH")]))
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.spec.argv, cwd=self.cwd, env=env, stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerError(f"{self.spec.name} exited with code {self.proc.returncode}; "
                                  f"last log lines:\n{self.log_tail()}")
            if probe(self.spec.url + self.spec.ready_path):
                return
            time.sleep(0.25)
        raise ServerError(f"{self.spec.name} not ready after {self.ready_timeout:.0f} s; log:\n{self.log_tail()}")

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            self._close_log()
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=5)
        except ProcessLookupError:
            pass
        # Anything of the group still alive (a worker that ignored SIGTERM) goes too.
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self._close_log()

    def _close_log(self) -> None:
        log = getattr(self, "_log", None)
        if log and not log.closed:
            log.close()

    def __exit__(self, *exc) -> None:
        self.stop()


def process_tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def tree_cpu_seconds(pid: int) -> float:
    total = 0.0
    for p in process_tree(pid):
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def tree_rss_bytes(pid: int) -> int:
    total = 0
    for p in process_tree(pid):
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


class TreeSampler:
    """Background samples of a process tree's cumulative CPU seconds and RSS, with timestamps.

    CPU for a window is read off the samples afterwards (``cpu_percent(t0, t1)``), so a caller can
    choose the window once it knows when the measured part of a run started and ended.
    """

    def __init__(self, pid: int, interval: float = 0.25):
        self.pid, self.interval = pid, interval
        self.times: list[float] = []
        self.cpu: list[float] = []
        self.rss: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def sample(self) -> None:
        now = time.monotonic()
        self.times.append(now)
        self.cpu.append(tree_cpu_seconds(self.pid))
        self.rss.append(tree_rss_bytes(self.pid))

    def __enter__(self) -> "TreeSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    def _cpu_at(self, t: float) -> float:
        i = bisect_left(self.times, t)
        if i <= 0:
            return self.cpu[0]
        if i >= len(self.times):
            return self.cpu[-1]
        t0, t1 = self.times[i - 1], self.times[i]
        f = (t - t0) / (t1 - t0) if t1 > t0 else 1.0
        return self.cpu[i - 1] + f * (self.cpu[i] - self.cpu[i - 1])

    def cpu_seconds(self, t0: float, t1: float) -> float:
        return max(0.0, self._cpu_at(t1) - self._cpu_at(t0))

    def cpu_percent(self, t0: float, t1: float) -> float:
        """Average CPU of the tree over [t0, t1], in % of one core (200% = both cores busy)."""
        return 100.0 * self.cpu_seconds(t0, t1) / (t1 - t0) if t1 > t0 else float("nan")
