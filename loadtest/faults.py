"""`make faults`: our service under faults, on 127.0.0.1, each figure against its goal (issue 10).

    python -m loadtest.faults --model artifacts/model.onnx             # ~3 min, all scenarios
    python -m loadtest.faults --only overload --overload-time 10s
    python -m loadtest.faults --image bnfold-classifier:TAG             # the same against the image

Scenarios (each on its own `bentoml serve` with SERVICE_WORKERS workers; requests are built from
the server's /metadata, so any contract model works):
  kill            SIGKILL one worker under a steady load (--kill-rate, at most 0.4x the capacity
                  the model's cost allows, so one worker alone keeps up): lost requests <= that
                  worker's open connections (at most one in flight on each), a new worker
                  answering within 3 s + 6 calls of one input (respawn_goal_s)
  kill-container  the same with BENTOML_CONTAINERIZED=true
  sigterm         SIGTERM to `bentoml serve` under load: readiness 503 before the socket closes,
                  0 accepted requests lost (refused connections are fine), exit within 30 s
  overload        open loop at 3x the measured capacity for 30 s: 0 timeouts, 0 resets, the excess
                  shed with 503 + Retry-After, p99 of the accepted requests <= 2x the shedding
                  threshold the service derived (/metadata), goodput >= 0.9x capacity, p99 in the
                  second after the left-over queue drained (the threshold) back to normal
  stalled         200 connections stalled mid-headers: all closed by the server within 15 s
  oversize        a declared 1 GB body and a 30 MB JSON body: 413, connection closed, body not read

With --image, each scenario runs on a container of that image instead (`make container` builds
it), started as its pod runs it (non-root, no capabilities, no new privileges) on the host's
network: the worker killed is one inside the container, SIGTERM goes to the container's init
process (what `docker stop` and the kubelet send), and kill-container is kill itself.

The load generator is ours (asyncio protocols, no locust): bounded in connections, time and rate,
and it only talks to 127.0.0.1. Exit 1 when a figure misses its goal, 2 when the run could not
happen. JSON report written atomically to --out/faults.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil

from common.files import write_json
from common.machine import cpu_summary
from common.procs import ProcessError, ServerProcess, free_port
from loadtest.core import parse_duration

HOST = "127.0.0.1"
SCENARIOS = ("kill", "kill-container", "sigterm", "overload", "stalled", "oversize")
MAX_CONNECTIONS = 2048  # the generator never opens more (bounded load)
# A connection idle this long is not used again (httpx's keepalive_expiry): the service closes one idle for
# HEADER_TIMEOUT_S (10 s), and a request sent as that close crosses it is reset before the server reads it.
KEEPALIVE_EXPIRY_S = 5.0
MAX_RATE = 50_000.0  # req/s, ditto
TARGET = "service.service:Classifier"


# --- a small HTTP/1.1 load generator ---------------------------------------------------------


def http_request(method: str, path: str, body: bytes = b"", content_type: str = "application/json",
                 close: bool = False) -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: {HOST}\r\n"
    if body or method == "POST":
        head += f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
    if close:
        head += "Connection: close\r\n"
    return head.encode() + b"\r\n" + body


class HttpConn(asyncio.Protocol):
    """One client connection: send a request, get (status, headers, body) back, keep-alive aware."""

    def __init__(self) -> None:
        self.transport = None
        self.buf = bytearray()
        self.waiter: asyncio.Future | None = None
        self.head = None
        self.need = 0
        self.keep = True
        self.sent_at = 0.0

    def connection_made(self, transport) -> None:
        self.transport = transport

    def send(self, raw: bytes) -> asyncio.Future:
        self.buf.clear()
        self.head = None
        self.waiter = asyncio.get_running_loop().create_future()
        self.sent_at = time.monotonic()
        self.transport.write(raw)
        return self.waiter

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.head is None:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            lines = bytes(self.buf[:end]).split(b"\r\n")
            headers = {}
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                headers[name.strip().lower()] = value.strip()
            self.head = (int(lines[0].split(b" ", 2)[1]), headers)
            self.need = end + 4 + int(headers.get(b"content-length", b"0"))
        chunked = self.head[1].get(b"transfer-encoding", b"").lower() == b"chunked"
        body = self._chunks(self.need) if chunked else None  # (KServe's binary answers are chunked)
        if (body is not None or not chunked and len(self.buf) >= self.need) and self.waiter is not None \
                and not self.waiter.done():
            status, headers = self.head
            self.keep = headers.get(b"connection", b"").lower() != b"close"
            body_start = self.need - int(headers.get(b"content-length", b"0"))
            self.waiter.set_result((status, headers, body if chunked else bytes(self.buf[body_start:self.need])))

    def _chunks(self, pos: int) -> bytes | None:
        """The body of a chunked answer starting at `pos`, or None while its last chunk is on its way."""
        parts = []
        while (eol := self.buf.find(b"\r\n", pos)) >= 0:
            size = int(bytes(self.buf[pos:eol]).split(b";")[0], 16)
            if size == 0:
                return b"".join(parts) if self.buf.find(b"\r\n\r\n", eol) >= 0 else None
            if len(self.buf) < eol + 4 + size:
                return None
            parts.append(bytes(self.buf[eol + 2:eol + 2 + size]))
            pos = eol + 4 + size
        return None

    def connection_lost(self, exc) -> None:
        self.keep = False
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionResetError(str(exc)) if exc else EOFError("closed before the answer"))

    def fail(self, exc: Exception) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(exc)
        self.keep = False
        self.transport.abort()


@dataclass
class Stats:
    """Outcomes: (t_done, status (0 = no answer), error kind or '', latency s, has Retry-After,
    seconds spent connecting (0 on a reused connection))."""

    rows: list = field(default_factory=list)

    def add(self, t: float, status: int, error: str, latency: float, retry_after: bool, connect_s: float = 0.0) -> None:
        self.rows.append((t, status, error, latency, retry_after, connect_s))

    def window(self, start: float, end: float) -> "Stats":
        return Stats([r for r in self.rows if start <= r[0] < end])

    def summary(self) -> dict:
        statuses: dict[str, int] = {}
        errors: dict[str, int] = {}
        for _, status, error, _, _, _ in self.rows:
            if status:
                statuses[str(status)] = statuses.get(str(status), 0) + 1
            else:
                errors[error] = errors.get(error, 0) + 1
        answered = [r[3] for r in self.rows if r[1]]
        ok = [r[3] for r in self.rows if r[1] == 200]
        shed = [r for r in self.rows if r[1] == 503]
        connects = [r[5] for r in self.rows if r[5]]

        def pct(values, q):
            return round(1000 * float(np.percentile(values, q)), 2) if values else None

        return {"requests": len(self.rows), "statuses": statuses, "errors": errors,
                "p50_ms": pct(answered, 50), "p99_ms": pct(answered, 99), "max_ms": pct(answered, 100),
                "ok_p50_ms": pct(ok, 50), "ok_p99_ms": pct(ok, 99),
                "shed_with_retry_after": sum(1 for r in shed if r[4]), "shed": len(shed),
                "new_connections": len(connects), "connect_p99_ms": pct(connects, 99), "connect_max_ms": pct(connects, 100)}


class Load:
    """Bounded keep-alive connection pool to 127.0.0.1:port; a sweeper enforces `timeout`."""

    def __init__(self, port: int, timeout: float = 10.0, connect_timeout: float = 5.0) -> None:
        self.port, self.timeout, self.connect_timeout = port, timeout, connect_timeout
        self.idle: list[HttpConn] = []
        self.inflight: set[HttpConn] = set()
        self.opened = 0
        self._sweeper: asyncio.Task | None = None

    async def __aenter__(self) -> "Load":
        self._sweeper = asyncio.create_task(self._sweep())
        return self

    async def __aexit__(self, *exc) -> None:
        self._sweeper.cancel()
        for conn in self.idle + list(self.inflight):
            conn.transport.abort()
        self.idle.clear()

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(0.05)
            now = time.monotonic()
            for conn in [c for c in self.inflight if now - c.sent_at > self.timeout]:
                conn.fail(TimeoutError("no answer in time"))

    def _idle(self) -> HttpConn | None:
        now = time.monotonic()
        while self.idle:
            conn = self.idle.pop()  # LIFO: the most recently used connection is the least likely closed
            if conn.keep and not conn.transport.is_closing() and now - conn.sent_at < KEEPALIVE_EXPIRY_S:
                return conn
            self._drop(conn)
        return None

    def _drop(self, conn: HttpConn) -> None:
        self.opened -= 1
        conn.transport.abort()

    async def request(self, raw: bytes, stats: Stats | None = None, started: float | None = None):
        """One request; returns (status, headers, body) or (0, error kind, None); records into stats.
        Errors: refused / connect_timeout / connect_error (no request sent), reset / timeout (sent,
        no answer), client_limit (MAX_CONNECTIONS in use: the generator refuses to grow)."""
        loop = asyncio.get_running_loop()
        started = time.monotonic() if started is None else started
        connect_s = 0.0
        conn = self._idle()
        if conn is None:
            if self.opened >= MAX_CONNECTIONS:
                return self._record(stats, started, 0, "client_limit", None, connect_s)
            self.opened += 1
            t_connect = time.monotonic()
            try:
                _, conn = await asyncio.wait_for(loop.create_connection(HttpConn, HOST, self.port), self.connect_timeout)
            except (ConnectionRefusedError, asyncio.TimeoutError, OSError) as exc:
                self.opened -= 1
                kind = "refused" if isinstance(exc, ConnectionRefusedError) else (
                    "connect_timeout" if isinstance(exc, asyncio.TimeoutError) else "connect_error")
                return self._record(stats, started, 0, kind, None, time.monotonic() - t_connect)
            connect_s = time.monotonic() - t_connect
        self.inflight.add(conn)
        try:
            status, headers, body = await conn.send(raw)
        except TimeoutError:
            self._drop(conn)
            return self._record(stats, started, 0, "timeout", None, connect_s)
        except (ConnectionResetError, EOFError, OSError, RuntimeError):
            self._drop(conn)
            return self._record(stats, started, 0, "reset", None, connect_s)
        finally:
            self.inflight.discard(conn)
        if conn.keep:
            self.idle.append(conn)
        else:
            self._drop(conn)
        return self._record(stats, started, status, "", headers, connect_s, body)

    def _record(self, stats, started, status, error, headers, connect_s, body=None):
        now = time.monotonic()
        if stats is not None:
            stats.add(now, status, error, now - started, bool(headers and b"retry-after" in headers), connect_s)
        return (status, headers, body) if status else (0, error, None)

    async def closed_loop(self, raw: bytes, conns: int, seconds: float, stats: Stats | None = None,
                          until: asyncio.Event | None = None) -> Stats:
        stats = stats or Stats()
        end = time.monotonic() + seconds

        async def user() -> None:
            while time.monotonic() < end and not (until and until.is_set()):
                status, error, _ = await self.request(raw, stats)
                if not status and error in ("refused", "connect_error", "connect_timeout"):
                    await asyncio.sleep(0.05)

        await asyncio.gather(*(user() for _ in range(conns)))
        return stats

    async def open_loop(self, raw: bytes, rate: float, seconds: float, stats: Stats | None = None,
                        until: asyncio.Event | None = None, send=None) -> Stats:
        """Requests at a fixed rate whatever the answers, for `seconds` or until `until` is set;
        latency counts from the scheduled time. `send(i, scheduled)`, when given, makes request i
        (an awaitable) instead of sending `raw` (deploy/check.py checks each answer's label)."""
        if not 0 < rate <= MAX_RATE:
            raise ValueError(f"rate must be in (0, {MAX_RATE:g}] req/s")
        stats = stats or Stats()
        send = send or (lambda i, scheduled: self.request(raw, stats, scheduled))
        start = time.monotonic()
        fired = 0
        tasks: set[asyncio.Task] = set()
        while (now := time.monotonic()) < start + seconds and not (until and until.is_set()):
            due = int((now - start) * rate) - fired
            for i in range(fired, fired + due):
                task = asyncio.ensure_future(send(i, start + i / rate))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            fired += due
            await asyncio.sleep(0.001)
        if tasks:
            await asyncio.wait(tasks)
        return stats


def run(coro):
    """asyncio.run on uvloop when present (the generator must cost the shared CPU little)."""
    try:
        import uvloop

        return uvloop.run(coro)
    except ImportError:
        return asyncio.run(coro)


# --- the server under test -------------------------------------------------------------------


def start_server(model: Path, log: Path, workers: int = 2, **env: str) -> ServerProcess:
    port = free_port()
    argv = [sys.executable, "-m", "bentoml", "serve", TARGET, "--host", HOST, "--port", str(port)]
    return ready(ServerProcess(argv, port, log, env={"MODEL_PATH": str(model), "MODEL_TAG": "",
                                                     "SERVICE_WORKERS": str(workers), **env}, name="bentoml serve"))


def ready(server: ServerProcess) -> ServerProcess:
    """Start `server` and wait until /readyz answers; stopped again when it does not."""
    server.start()
    try:
        return server.wait_ready(120)
    except BaseException:
        server.stop()
        raise


class ContainerServer(ServerProcess):
    """A container of `image` in the foreground (`docker run --rm`: the client exits when the
    container does, with its exit code), the pod's restrictions, on the host's network at `port`.
    `pid` is the container's init process as the host sees it (BentoML's arbiter), so signals,
    worker lookups and kills work as they do for `bentoml serve`."""

    def __init__(self, docker: str, image: str, port: int, log: Path, workers: int) -> None:
        self.docker, self.container = docker, f"bnfold-faults-{os.getpid()}-{port}"
        super().__init__([docker, "run", "--rm", "--name", self.container, "--network", "host", "--cap-drop", "ALL",
                          "--security-opt", "no-new-privileges", "-e", f"PORT={port}", "-e", f"SERVICE_WORKERS={workers}",
                          image], port, log, name=f"container of {image}")
        self._pid: int | None = None

    @property
    def pid(self) -> int:
        if self._pid is None:
            out = subprocess.run([self.docker, "inspect", "-f", "{{.State.Pid}}", self.container],
                                 capture_output=True, text=True).stdout.strip()
            if not out.isdigit() or out == "0":
                raise ProcessError(f"{self.container} is not running")
            self._pid = int(out)
        return self._pid

    def signal(self, signum: int) -> None:
        os.kill(self.pid, signum)

    @staticmethod
    def inner_pid(pid: int) -> int:
        """A host pid as the container sees it (what the service's /metadata reports)."""
        try:
            line = next(ln for ln in Path(f"/proc/{pid}/status").read_text().splitlines() if ln.startswith("NSpid:"))
            return int(line.split()[-1])
        except (OSError, StopIteration, ValueError):
            return pid

    def stop(self, timeout: float = 20.0) -> int | None:
        subprocess.run([self.docker, "rm", "-f", self.container], capture_output=True)
        return super().stop(timeout)


def docker_client() -> str:
    """A docker client whose daemon answers (Debian's /usr/bin/docker first: it builds without buildx)."""
    client = "/usr/bin/docker" if os.access("/usr/bin/docker", os.X_OK) else shutil.which("docker")
    if client is None:
        raise ProcessError("no docker client: `make container` installs docker.io and starts dockerd")
    if subprocess.run([client, "info"], capture_output=True).returncode != 0:
        raise ProcessError("no docker daemon answers: `make container` (or `python -m deploy.tools docker`) starts one")
    return client


def start_container(docker: str, image: str, log: Path, workers: int) -> ContainerServer:
    return ready(ContainerServer(docker, image, free_port(), log, workers))


def worker_pids(server: ServerProcess) -> list[int]:
    try:
        return sorted(p.pid for p in psutil.Process(server.pid).children()
                      if "_bentoml_impl.worker.service" in " ".join(p.cmdline()))
    except psutil.Error:
        return []


def open_connections(pid: int, port: int) -> int:
    try:
        return sum(1 for c in psutil.Process(pid).net_connections("tcp")
                   if c.status == psutil.CONN_ESTABLISHED and c.laddr and c.laddr.port == port)
    except psutil.Error:
        return 0


def metadata(port: int) -> dict:
    async def get():
        async with Load(port) as load:
            status, _, body = await load.request(http_request("GET", "/metadata", close=True))
            if status != 200:
                raise ProcessError(f"GET /metadata answered {status}")
            return json.loads(body)

    return run(get())


def guard_counts(port: int) -> dict[str, float]:
    """The service's bnfold_guard_total counters (all workers) from /metrics."""

    async def get():
        async with Load(port, timeout=10) as load:
            return await load.request(http_request("GET", "/metrics", close=True))

    status, _, body = run(get())
    counts: dict[str, float] = {}
    for line in (body or b"").decode().splitlines() if status == 200 else []:
        if line.startswith("bnfold_guard_total{"):
            reason = line.split('reason="', 1)[1].split('"', 1)[0]
            counts[reason] = counts.get(reason, 0.0) + float(line.rsplit(" ", 1)[1])
    return counts


def sample_request(meta: dict, count: int = 1) -> bytes:
    """POST /predict with `count` inputs of the model's own shape, mid-range values, as raw float32
    (a real model's input as JSON costs the server more to parse than some models take to run)."""
    shape = [count, *meta["input"]["shape"][1:]]
    lo, hi = meta["input"]["range"] or (0.0, 1.0)
    body = np.full(shape, (lo + hi) / 2, np.float32).tobytes()
    return http_request("POST", "/predict", body, content_type="application/octet-stream")


def model_costs(meta: dict, workers: int) -> dict:
    """What the served model costs, as its /metadata says (service/tuning.py): the goals that depend
    on it scale with it (docs/service.md, "make faults")."""
    derived = meta["runtime"].get("derived") or {}
    calls = {int(b): ms for b, ms in (derived.get("ms_per_call") or {}).items()} or {1: meta["runtime"]["ms_per_input"]}
    per_input_s = min(ms / b for b, ms in calls.items()) / 1000
    return {"ms_per_input": calls[1], "capacity_estimate_rps": workers / per_input_s,
            "queue_delay_ms": derived.get("queue_delay_ms", 250.0)}


def respawn_goal_s(costs: dict) -> float:
    """A new worker answers within 3 s of interpreter, BentoML and session start-up, plus its warm-up
    (three inputs: batches of 2 and 1) and as much again for the session's own build."""
    return 3.0 + 6 * costs["ms_per_input"] / 1000


@dataclass
class Check:
    name: str
    value: object
    goal: str
    ok: bool

    def row(self) -> dict:
        return {"figure": self.name, "value": self.value, "goal": self.goal, "pass": self.ok}


# --- scenarios -------------------------------------------------------------------------------


def kill_worker(server: ServerProcess, raw: bytes, rate: float = 200.0, seconds: float = 8.0,
                kill_at: float = 2.0, respawn_s: float = 3.0) -> tuple[dict, list[Check]]:
    """SIGKILL one worker under a steady open-loop load (below what one worker can serve alone);
    find when a new worker answers."""

    async def main():
        before = worker_pids(server)
        if len(before) < 2:
            raise ProcessError(f"need 2 workers to kill one, found {before}")
        async with Load(server.port, timeout=10) as load, Load(server.port, timeout=5) as probe:
            stats = Stats()
            loading = asyncio.ensure_future(load.open_loop(raw, rate, seconds, stats))
            await asyncio.sleep(kill_at)
            seen = {getattr(server, "inner_pid", lambda p: p)(p) for p in before}  # the pids /metadata reports
            victim = before[0]
            victim_conns = open_connections(victim, server.port)
            os.kill(victim, signal.SIGKILL)
            t_kill = time.monotonic()
            new_pid, t_new = None, None
            while time.monotonic() - t_kill < 15:
                status, _, body = await probe.request(http_request("GET", "/metadata", close=True))
                if status == 200 and json.loads(body)["runtime"]["pid"] not in seen:
                    new_pid, t_new = json.loads(body)["runtime"]["pid"], time.monotonic()
                    break
                await asyncio.sleep(0.05)
            await loading
            return stats, victim, victim_conns, new_pid, (t_new - t_kill) if t_new else None

    stats, victim, victim_conns, new_pid, back_s = run(main())
    summary = stats.summary()
    lost = sum(summary["errors"].values()) + sum(n for s, n in summary["statuses"].items() if s != "200")
    figures = {"victim_pid": victim, "victim_connections": victim_conns, "new_pid": new_pid,
               "new_worker_answers_s": round(back_s, 2) if back_s else None, "workers_after": len(worker_pids(server)),
               "lost": lost, **summary}
    checks = [Check("lost requests", lost, f"<= the killed worker's open connections ({victim_conns})", lost <= victim_conns),
              Check("new worker answering after", figures["new_worker_answers_s"], f"<= {respawn_s:.1f} s",
                    back_s is not None and back_s <= respawn_s),
              Check("workers afterwards", figures["workers_after"], "2", figures["workers_after"] == 2)]
    return figures, checks


def sigterm(server: ServerProcess, raw: bytes, conns: int = 8, settle: float = 2.0) -> tuple[dict, list[Check]]:
    """SIGTERM to `bentoml serve` under closed-loop load; classify every outcome until it exits."""

    async def main():
        stop = asyncio.Event()
        ready_log: list[tuple[float, object]] = []
        async with Load(server.port, timeout=30) as load, Load(server.port, timeout=2, connect_timeout=2) as probe:
            stats = Stats()
            loading = asyncio.ensure_future(load.closed_loop(raw, conns, 120, stats, until=stop))

            async def prober():
                while not stop.is_set():
                    status, error, _ = await probe.request(http_request("GET", "/readyz", close=True))
                    ready_log.append((time.monotonic(), status or error))
                    await asyncio.sleep(0.1)

            probing = asyncio.ensure_future(prober())
            await asyncio.sleep(settle)
            t_term = time.monotonic()
            server.signal(signal.SIGTERM)
            loop = asyncio.get_running_loop()
            code = await loop.run_in_executor(None, lambda: server.proc.wait(timeout=60))
            t_exit = time.monotonic()
            await asyncio.sleep(1.0)
            stop.set()
            await asyncio.gather(loading, probing)
            return stats, ready_log, t_term, t_exit, code

    stats, ready_log, t_term, t_exit, code = run(main())
    after = stats.window(t_term, float("inf")).summary()
    lost = sum(n for e, n in after["errors"].items() if e in ("reset", "timeout"))
    other = sum(n for s, n in after["statuses"].items() if s != "200")
    first_503 = next((t - t_term for t, s in ready_log if t > t_term and s == 503), None)
    first_refusal = next((t - t_term for t, s in ready_log if t > t_term and s in ("refused", "connect_timeout")), None)
    figures = {"exit_s": round(t_exit - t_term, 2), "exit_code": code, "after_sigterm": after, "lost": lost,
               "non_200_answers": other, "readiness_503_after_s": round(first_503, 2) if first_503 is not None else None,
               "first_refused_probe_after_s": round(first_refusal, 2) if first_refusal is not None else None}
    checks = [Check("accepted requests lost (reset/timeout)", lost, "0", lost == 0),
              Check("answers other than 200 after SIGTERM", other, "0", other == 0),
              Check("readiness 503 after SIGTERM", figures["readiness_503_after_s"], "before the socket stops accepting",
                    first_503 is not None and (first_refusal is None or first_503 < first_refusal)),
              Check("exit after SIGTERM", figures["exit_s"], "<= 30 s", t_exit - t_term <= 30)]
    return figures, checks


def overload(server: ServerProcess, raw: bytes, seconds: float = 30.0, factor: float = 3.0,
             capacity_conns: int = 16, capacity_s: float = 8.0, queue_delay_ms: float = 250.0) -> tuple[dict, list[Check]]:
    """Capacity (closed loop, `capacity_conns` connections: enough to keep both workers busy, few
    enough not to queue into the shedding), then `factor` x capacity open-loop for `seconds`,
    then half the capacity again to see latency come back: the queue left by the overload is at
    most the shedding threshold long, so it is judged in the second after that (drain_s)."""
    drain_s = queue_delay_ms / 1000

    async def main():
        async with Load(server.port, timeout=10) as load:
            await load.closed_loop(raw, capacity_conns, 2.0)  # warm-up
            cap = await load.closed_loop(raw, capacity_conns, capacity_s)
            capacity = cap.summary()["statuses"].get("200", 0) / capacity_s
            base = await load.open_loop(raw, capacity / 2, 5.0)
            me = psutil.Process()
            cpu0 = sum(me.cpu_times()[:2])
            t0 = time.monotonic()
            over = await load.open_loop(raw, capacity * factor, seconds)
            elapsed = time.monotonic() - t0
            generator_cpu = (sum(me.cpu_times()[:2]) - cpu0) / elapsed
            t_after = time.monotonic()
            after = await load.open_loop(raw, capacity / 2, drain_s + 3.0)
            return capacity, cap, base, over, elapsed, generator_cpu, after, t_after

    capacity, cap, base, over, elapsed, generator_cpu, after, t_after = run(main())
    guard = guard_counts(server.port)
    o, b = over.summary(), base.summary()
    first = after.window(t_after + drain_s, t_after + drain_s + 1.0).summary()
    ok = o["statuses"].get("200", 0)
    goodput = ok / elapsed / capacity if capacity else 0.0
    timeouts = o["errors"].get("timeout", 0) + o["errors"].get("connect_timeout", 0)
    unsent = o["errors"].get("client_limit", 0)  # the generator's own connection cap, not the server's doing
    resets = sum(n for e, n in o["errors"].items() if e not in ("timeout", "connect_timeout", "client_limit"))
    other = sum(n for s, n in o["statuses"].items() if s not in ("200", "503"))
    back_goal = max(2 * (b["p99_ms"] or 0), 50.0)
    figures = {"capacity_rps": round(capacity, 1), "offered_rps": round(capacity * factor, 1),
               "sent_rps": round((o["requests"] - unsent) / elapsed, 1),
               "seconds": round(elapsed, 1), "goodput_rps": round(ok / elapsed, 1), "goodput_x_capacity": round(goodput, 3),
               "generator_cpu_cores": round(generator_cpu, 2), "capacity_run": cap.summary(),
               "baseline_half_capacity": b, "overload": o, "server_guard_counts": guard,
               "after_first_second": first, "after": after.summary()}
    checks = [Check("client timeouts", timeouts, "0", timeouts == 0),
              Check("resets / refused / connection errors", resets, "0", resets == 0),
              Check(f"requests not sent (generator at its {MAX_CONNECTIONS}-connection cap: offered load fell short)",
                    unsent, "0", unsent == 0),
              Check("answers other than 200/503", other, "0", other == 0),
              Check("503s carrying Retry-After", f"{o['shed_with_retry_after']}/{o['shed']}", "all, and > 0",
                    o["shed"] > 0 and o["shed_with_retry_after"] == o["shed"]),
              Check("p99 of the accepted requests", o["ok_p99_ms"],
                    f"<= {2 * queue_delay_ms:.0f} ms (2x the shedding threshold of {queue_delay_ms:.0f} ms)",
                    o["ok_p99_ms"] is not None and o["ok_p99_ms"] <= 2 * queue_delay_ms),
              Check("goodput", f"{goodput:.2f}x capacity", ">= 0.9x capacity", goodput >= 0.9),
              Check(f"p99 in the second after the queue drained ({drain_s:.2f} s: the shedding threshold)", first["p99_ms"],
                    f"<= {back_goal:.0f} ms (2x the {b['p99_ms']} ms before, at least 50)",
                    first["p99_ms"] is not None and first["p99_ms"] <= back_goal)]
    return figures, checks


def stalled(server: ServerProcess, count: int = 200, limit_s: float = 15.0) -> tuple[dict, list[Check]]:
    """`count` connections send half a request line of headers and stop; when does the server close them?"""

    async def main():
        t0 = time.monotonic()
        streams = []
        for _ in range(count):
            reader, writer = await asyncio.open_connection(HOST, server.port)
            writer.write(f"POST /predict HTTP/1.1\r\nHost: {HOST}\r\nContent-Ty".encode())
            streams.append((reader, writer))

        async def closed_after(reader) -> float | None:
            try:
                while await asyncio.wait_for(reader.read(65536), limit_s + 10):
                    pass
            except (asyncio.TimeoutError, ConnectionError):
                return None if time.monotonic() - t0 > limit_s + 10 else time.monotonic() - t0
            return time.monotonic() - t0

        async with Load(server.port, timeout=5) as probe:
            probes = Stats()

            async def prober():
                while time.monotonic() - t0 < limit_s:
                    await probe.request(http_request("GET", "/readyz"), probes)
                    await asyncio.sleep(0.2)

            times, _ = await asyncio.gather(asyncio.gather(*(closed_after(r) for r, _ in streams)), prober())
        for _, writer in streams:
            writer.close()
        return times, probes

    times, probes = run(main())
    closed = [t for t in times if t is not None]
    figures = {"connections": count, "closed": len(closed), "last_closed_s": round(max(closed), 2) if closed else None,
               "first_closed_s": round(min(closed), 2) if closed else None, "probes_meanwhile": probes.summary()}
    checks = [Check("stalled connections closed by the server", f"{len(closed)}/{count}", "all", len(closed) == count),
              Check("last one closed after", figures["last_closed_s"], f"<= {limit_s:g} s",
                    bool(closed) and max(closed) <= limit_s),
              Check("/readyz meanwhile", probes.summary()["statuses"], "all 200",
                    probes.summary()["statuses"].get("200", 0) == len(probes.rows) > 0)]
    return figures, checks


def send_oversize(port: int, head: bytes, body_chunk, total: int, limit_s: float = 10.0) -> dict:
    """Send `head`, then `total` body bytes (`body_chunk(offset, n)`) while reading the answer;
    stop when the server closes the connection or `limit_s` passes."""
    sock = socket.create_connection((HOST, port))
    sock.setblocking(False)
    out, in_body, sent, answer, closed = memoryview(head), False, 0, b"", False
    t0 = time.monotonic()
    while time.monotonic() - t0 < limit_s:
        want_write = len(out) > 0 or sent < total
        readable, writable, _ = select.select([sock], [sock] if want_write else [], [], 0.2)
        if readable:
            try:
                data = sock.recv(65536)
            except ConnectionError:
                data = b""
            if not data:
                closed = True
                break
            answer += data
        if writable:
            if not len(out):
                out, in_body = memoryview(body_chunk(sent, min(1 << 20, total - sent))), True
            try:
                n = sock.send(out)
            except (BrokenPipeError, ConnectionError):
                closed = True
                break
            sent += n if in_body else 0
            out = out[n:]
    elapsed = time.monotonic() - t0
    sock.close()
    status = int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else None
    return {"status": status, "body_bytes_sent": sent, "declared": total, "connection_closed": closed,
            "seconds": round(elapsed, 2), "answer": answer.split(b"\r\n\r\n", 1)[-1][:200].decode(errors="replace")}


def post_head(path: str, length: int) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: {HOST}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {length}\r\n\r\n").encode()


def oversize(server: ServerProcess, meta: dict) -> tuple[dict, list[Check]]:
    """A declared 1 GB body, then a real 30 MB JSON body: 413, closed, not read, no memory growth."""
    pids = worker_pids(server)
    rss_before = {p: psutil.Process(p).memory_info().rss for p in pids}
    gigabyte = 10**9
    chunk = b"0" * (1 << 20)
    big = send_oversize(server.port, post_head("/predict", gigabyte), lambda offset, n: chunk[:n], gigabyte)
    per_image = json.dumps(np.full(meta["input"]["shape"][1:], 0.5).tolist(), separators=(",", ":")).encode()
    count = 30_000_000 // (len(per_image) + 1) + 1
    body = b'{"images":[' + b",".join([per_image] * count) + b"]}"
    json30 = send_oversize(server.port, post_head("/predict", len(body)), lambda offset, n: body[offset:offset + n], len(body))
    rss_after = {p: psutil.Process(p).memory_info().rss for p in pids if psutil.pid_exists(p)}
    growth = max((rss_after.get(p, 0) - rss_before[p]) / 2**20 for p in pids) if pids else None
    figures = {"declared_1GB": big, "json_30MB": json30, "worker_rss_growth_mib": round(growth, 1) if growth is not None else None}
    checks = []
    for name, r in (("declared 1 GB", big), ("30 MB JSON", json30)):
        checks += [Check(f"{name}: status", r["status"], "413", r["status"] == 413),
                   Check(f"{name}: connection closed by the server", r["connection_closed"], "true", r["connection_closed"]),
                   Check(f"{name}: body bytes the client got to send", r["body_bytes_sent"],
                         "< 16 MiB (socket buffers, not read by the app)", r["body_bytes_sent"] < 16 * 2**20)]
    checks.append(Check("worker RSS growth", f"{growth:.1f} MiB" if growth is not None else None, "< 32 MiB",
                        growth is not None and growth < 32))
    return figures, checks


# --- the battery -----------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m loadtest.faults", description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--model", type=Path, default=Path("artifacts/model.onnx"), help="the exported model.onnx to serve")
    ap.add_argument("--image", default=None, help="run each scenario on a container of this image instead "
                                                   "(its own model; --model is not used)")
    ap.add_argument("--out", type=Path, default=Path("artifacts/faults"), help="report directory (faults.json, server logs)")
    ap.add_argument("--only", default=",".join(SCENARIOS), help="comma list from: " + ", ".join(SCENARIOS))
    ap.add_argument("--workers", type=int, default=2, help="SERVICE_WORKERS of the served service")
    ap.add_argument("--overload-time", default="30s", help="how long the open-loop overload lasts")
    ap.add_argument("--overload-factor", type=float, default=3.0, help="offered load as a multiple of the measured capacity")
    ap.add_argument("--stalled", type=int, default=200, help="connections stalled mid-headers")
    ap.add_argument("--kill-rate", type=float, default=200.0, help="open-loop req/s while a worker is killed")
    ap.add_argument("--sigterm-conns", type=int, default=8, help="closed-loop connections while SIGTERM arrives")
    args = ap.parse_args(argv)
    args.only = [s.strip() for s in args.only.split(",") if s.strip()]
    if set(args.only) - set(SCENARIOS):
        ap.error(f"unknown scenario(s) {sorted(set(args.only) - set(SCENARIOS))}; choose from {', '.join(SCENARIOS)}")
    try:
        args.overload_time = parse_duration(args.overload_time)
    except ValueError:
        ap.error("--overload-time takes seconds, e.g. 30s or 1m")
    if not 1 <= args.stalled <= 1000 or not 1 <= args.workers <= 8 or not 0 < args.overload_time <= 600:
        ap.error("bounds: --stalled 1..1000, --workers 1..8, --overload-time <= 10m")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    docker = None
    if args.image:
        try:
            docker = docker_client()
        except ProcessError as exc:
            print(f"faults: {exc}", file=sys.stderr)
            return 2
        args.only = [s for s in args.only if s != "kill-container"]  # in the image, kill is kill-container
    elif not args.model.is_file():
        print(f"faults: {args.model} not found; run `make export` (or pass --model)", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"command": "python -m loadtest.faults " + " ".join(sys.argv[1:] if argv is None else argv),
              "date": time.strftime("%Y-%m-%d %H:%M:%S"), "load_average_before": os.getloadavg(), "cpu": cpu_summary(),
              "workers": args.workers, **({"image": args.image} if args.image else {}), "scenarios": {}}
    checks_all: list[tuple[str, Check]] = []
    for name in args.only:
        env = {"BENTOML_CONTAINERIZED": "true"} if name == "kill-container" else {}
        log = args.out / f"server_{name}.log"
        try:
            server = (start_container(docker, args.image, log, args.workers) if args.image
                      else start_server(args.model, log, args.workers, **env))
        except ProcessError as exc:
            print(f"faults: cannot start the service for {name}: {exc}", file=sys.stderr)
            return 2
        try:
            meta = metadata(server.port)
            raw = sample_request(meta)
            costs = report["model_costs"] = model_costs(meta, args.workers)
            print(f"--- {name} ({meta['model']['name']}, {args.workers} workers, port {server.port})", flush=True)
            if name in ("kill", "kill-container"):
                rate = min(args.kill_rate, 0.4 * costs["capacity_estimate_rps"])  # one worker alone keeps up
                figures, checks = kill_worker(server, raw, rate=rate, respawn_s=respawn_goal_s(costs))
            elif name == "sigterm":
                figures, checks = sigterm(server, raw, conns=args.sigterm_conns)
            elif name == "overload":
                figures, checks = overload(server, raw, seconds=args.overload_time, factor=args.overload_factor,
                                           queue_delay_ms=costs["queue_delay_ms"])
            elif name == "stalled":
                figures, checks = stalled(server, args.stalled)
            else:
                figures, checks = oversize(server, meta)
        finally:
            server.stop()
        report["scenarios"][name] = {"figures": figures, "checks": [c.row() for c in checks]}
        for c in checks:
            checks_all.append((name, c))
            print(f"  {'PASS' if c.ok else 'FAIL'}  {c.name}: {c.value}  (goal {c.goal})", flush=True)
    failed = [f"{n}: {c.name}" for n, c in checks_all if not c.ok]
    report["passed"] = not failed
    report["failed"] = failed
    write_json(args.out / "faults.json", report)
    print(f"{'PASS' if not failed else 'FAIL'}: {len(checks_all) - len(failed)}/{len(checks_all)} goals met; "
          f"report {args.out / 'faults.json'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
