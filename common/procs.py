"""Servers under test: free ports, readiness probes, and a process started in its own session
and stopped with its whole process group, so no worker it forks (BentoML runs an arbiter plus
worker processes) outlives it."""
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def probe(url: str, timeout: float = 1.0) -> bool:
    """True when `url` answers 2xx."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return 200 <= resp.status < 300
    except (urllib.error.URLError, OSError, ValueError):
        return False


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex((host, port)) == 0


class ProcessError(RuntimeError):
    """A server did not come up, or died."""


class ServerProcess:
    """`argv` in its own session with stdout+stderr to `log_path`; a context manager.

    `start()` returns at once; `wait_ready()` polls `url + ready_path` until it answers 2xx (or the
    process exits, or `timeout` passes); `stop()` sends SIGTERM to the whole group, waits, then
    SIGKILLs whatever is left. The repository root is put on PYTHONPATH."""

    def __init__(self, argv: list[str], port: int, log_path: str | Path, env: dict[str, str] | None = None,
                 cwd: str | Path = REPO, ready_path: str = "/readyz", name: str | None = None):
        self.argv, self.port, self.log_path = list(argv), port, Path(log_path)
        self.extra_env, self.cwd, self.ready_path = dict(env or {}), Path(cwd), ready_path
        self.name = name or Path(argv[0]).name
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None
        self._log = None

    def start(self) -> "ServerProcess":
        if port_open(self.port):
            raise ProcessError(f"port {self.port} is already taken; cannot start {self.name} there")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "BENTOML_DO_NOT_TRACK": "true", **self.extra_env}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.argv, cwd=self.cwd, env=env, stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def wait_ready(self, timeout: float = 120.0) -> "ServerProcess":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ProcessError(f"{self.name} exited with code {self.proc.returncode}; "
                                   f"last log lines:\n{self.log_tail()}")
            if probe(self.url + self.ready_path):
                return self
            time.sleep(0.2)
        raise ProcessError(f"{self.name} not ready after {timeout:.0f} s; last log lines:\n{self.log_tail()}")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 20) -> str:
        return "\n".join(self.log().splitlines()[-lines:]) or "(no log)"

    def signal(self, signum: int) -> None:
        """Send `signum` to the group leader only (e.g. SIGTERM to BentoML's arbiter)."""
        os.kill(self.proc.pid, signum)

    def stop(self, timeout: float = 20.0) -> int | None:
        """Stop the whole group; returns the leader's exit code."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=5)
            except ProcessLookupError:
                pass
        if self.proc is not None:
            try:  # anything of the group still alive (a worker that ignored SIGTERM) goes too
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if self._log and not self._log.closed:
            self._log.close()
        return self.proc.returncode if self.proc else None

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
