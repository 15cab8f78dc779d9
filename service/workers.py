"""Connections spread over the workers, whatever the clients do (issue 25; docs/service.md, "Workers").

BentoML's workers share one listening socket. asyncio accepts every queued connection at once
(up to the backlog) when its socket turns readable, so a burst of connections lands on whichever
worker woke first, and keep-alive clients stay there: in 3 of 15 runs one worker carried every
connection while the other idled (ResNet-50 at 0.50x of the in-process ceiling).

Here, each worker keeps one slot of a small table in shared memory (pid, open connections, loaded,
heartbeat, paused), and its event loop (`GatedLoop`) accepts a connection only while this worker
holds at most `slack(least)` more connections than the least-loaded live worker (exact balance
below 64 connections a worker, within 1/8 beyond, so a storm of new connections is taken in batches
rather than one connection per hand-over); otherwise it stops watching the listening socket until
that changes: every TICK_S, whenever one of its connections closes, and at once when a peer pauses
(the peer sends a byte to this worker's wake socket, a unix datagram socket beside the table). A
worker over that bound by more than one connection answers its next response with
`Connection: close` (service/routing.py), so clients that keep their connections for hours move,
on their next request, to a worker that takes connections. A worker counts as live while its
process exists and its event loop beat within STALE_S (a dead or stuck worker is left out: its
peers take its share).

Readiness: every worker slot is live and loaded (a worker still loading its model is not ready,
so no client connects in that gap and stays on the first worker).
"""

from __future__ import annotations

import errno
import mmap
import os
import socket
import tempfile
import time
from asyncio import SelectorEventLoop
from pathlib import Path


TICK_S = 0.05  # heartbeat, and how often a paused worker looks whether it may accept again
STALE_S = 0.5  # a worker whose loop has not beaten for this long is not live (dead, stuck or gone)
FIELDS = ("pid", "connections", "loaded", "beat_ns", "paused")
PID, CONNECTIONS, LOADED, BEAT, PAUSED = range(len(FIELDS))
ACCEPT_ERRORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)  # asyncio's: retry in a second


def table_path(supervisor_pid: int) -> Path:
    """One table per `bentoml serve` (its arbiter is every worker's parent)."""
    base = Path("/dev/shm") if Path("/dev/shm").is_dir() and os.access("/dev/shm", os.W_OK) else Path(tempfile.gettempdir())
    return base / f"bnfold-workers-{supervisor_pid}"


SLACK_FROM = 64  # connections a worker: exact balance below (even 18/14 of 32 clients cost seed-cnn ~20%)


def slack(least: int) -> int:
    """How many connections a worker may hold beyond the least-loaded live one and still accept: none
    below SLACK_FROM (keep-alive clients split evenly), an eighth beyond (a storm is taken in batches)."""
    return least // 8 if least >= SLACK_FROM else 0


def alive(pid: int) -> bool:
    """The process exists and is not a zombie (a killed worker stays one until the arbiter reaps it)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return True


class WorkerTable:
    """This worker's slot (index 0..workers-1) in the shared table, and what the others say.

    Counts are read fresh from shared memory at every decision; which peers are live is decided
    at each heartbeat (`refresh`, every TICK_S), so a decision costs no system call."""

    def __init__(self, path: Path, workers: int, index: int) -> None:
        if not 0 <= index < workers:
            raise ValueError(f"worker index {index} outside 0..{workers - 1}")
        self.path, self.workers, self.index = path, workers, index
        size = workers * len(FIELDS) * 8
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if os.fstat(fd).st_size < size:
                os.ftruncate(fd, size)  # zero-filled; concurrent creators agree on the size
            self._map = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        # aligned int64 words: a reader never sees half a write (x86-64, arm64)
        self.words = memoryview(self._map).cast("q")
        self._me = index * len(FIELDS)
        self._set(PID, os.getpid())
        self._set(CONNECTIONS, 0)
        self._set(LOADED, 0)
        self._set(PAUSED, 0)
        self.beat()
        self.peers: list[int] = []  # live peers, as of the last refresh

    def _get(self, worker: int, field: int) -> int:
        return self.words[worker * len(FIELDS) + field]

    def _set(self, field: int, value: int) -> None:
        self.words[self._me + field] = value

    # --- this worker ------------------------------------------------------------------------

    def beat(self) -> None:
        self._set(BEAT, time.monotonic_ns())

    def set_loaded(self) -> None:
        self._set(LOADED, 1)
        self.refresh()

    def add(self, n: int) -> None:
        self._set(CONNECTIONS, max(0, self.words[self._me + CONNECTIONS] + n))

    @property
    def connections(self) -> int:
        return self.words[self._me + CONNECTIONS]

    # --- all workers ------------------------------------------------------------------------

    def is_live(self, worker: int, now_ns: int) -> bool:
        """Running, loaded and beating (a dead, stuck or still-loading worker is not)."""
        if worker == self.index:
            return True
        pid = self._get(worker, PID)
        return (pid > 0 and self._get(worker, LOADED) == 1 and now_ns - self._get(worker, BEAT) < STALE_S * 1e9
                and alive(pid))

    def refresh(self) -> None:
        """Beat, and decide which peers are live (at each heartbeat)."""
        self.beat()
        now = time.monotonic_ns()
        self.peers = [w for w in range(self.workers) if w != self.index and self.is_live(w, now)]

    def least(self) -> int | None:
        """The fewest connections a live peer holds (None: no live peer)."""
        return min((self._get(w, CONNECTIONS) for w in self.peers), default=None)

    def may_accept(self) -> bool:
        """Take a new connection? Only while at most slack(least) ahead of every live peer (ties take)."""
        least = self.least()
        return least is None or self.connections <= least + slack(least)

    def over_share(self) -> bool:
        """More than one connection beyond what may_accept lets a worker reach: one should move."""
        least = self.least()
        return least is not None and self.connections > least + slack(least) + 1

    def set_paused(self, paused: bool) -> None:
        self._set(PAUSED, int(paused))

    def paused_peers(self) -> list[int]:
        return [w for w in self.peers if self._get(w, PAUSED)]

    def all_ready(self) -> bool:
        now = time.monotonic_ns()
        return all(self.is_live(w, now) for w in range(self.workers)) and self._get(self.index, LOADED) == 1

    def describe(self) -> list[dict]:
        now = time.monotonic_ns()
        return [{"worker": w + 1, "pid": self._get(w, PID), "connections": self._get(w, CONNECTIONS),
                 "loaded": bool(self._get(w, LOADED)), "live": self.is_live(w, now)} for w in range(self.workers)]

    def close(self) -> None:
        """This worker is leaving; the last one out removes the table."""
        self._set(LOADED, 0)
        self._set(PID, 0)
        if not any(self._get(w, PID) and alive(self._get(w, PID)) for w in range(self.workers)):
            self.path.unlink(missing_ok=True)


def wake_path(table: Path, worker: int) -> str:
    return f"{table}-w{worker}.sock"


class Gate:
    """The accept policy of one worker's loop: a WorkerTable, the paused listening socket, and the
    wake socket through which a peer that pauses tells this worker to look again."""

    def __init__(self, table: WorkerTable) -> None:
        self.table = table
        self.resume = None  # set while paused: re-registers the listening socket
        self.pauses = 0
        self.moved = 0  # connections asked to move (Connection: close) for balance
        self.woken = 0
        self.watching = False  # the wake socket is registered with the loop
        self.wake = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.wake.setblocking(False)
        path = wake_path(table.path, table.index)
        try:
            Path(path).unlink(missing_ok=True)  # left by an earlier worker in this slot
            self.wake.bind(path)
        except OSError:  # path too long, or not ours: the heartbeat alone resumes this worker
            self.wake.close()
            self.wake = None

    def tick(self) -> None:
        self.table.refresh()
        self.look()

    def look(self) -> None:
        if self.resume is not None and self.table.may_accept():
            self.resume()

    def closed(self) -> None:
        """One of this worker's connections closed."""
        self.table.add(-1)
        self.look()

    def on_wake(self) -> None:
        try:
            while True:
                self.wake.recv(64)
        except OSError:  # drained (BlockingIOError) or closed
            pass
        self.woken += 1
        self.look()

    def paused(self) -> None:
        """This worker stopped accepting: its paused peers may be the ones to take the next connections."""
        self.pauses += 1
        self.table.set_paused(True)
        for w in self.table.paused_peers() if self.wake is not None else ():
            try:
                self.wake.sendto(b"!", wake_path(self.table.path, w))
            except OSError:  # gone, or its queue is full (it has been told already)
                pass

    def close(self) -> None:
        if self.wake is not None:
            self.wake.close()
            Path(wake_path(self.table.path, self.table.index)).unlink(missing_ok=True)
        self.table.close()

    def stats(self) -> dict:
        return {"accepting": self.resume is None, "pauses": self.pauses, "woken_by_peers": self.woken,
                "moved_for_balance": self.moved, "workers": self.table.describe()}


class GatedLoop(SelectorEventLoop):
    """asyncio's selector loop whose accept asks the worker's Gate first (module docstring).

    Without a gate (no table: a single process, tests) it is asyncio's loop unchanged."""

    gate: Gate | None = None

    def _accept_connection(self, protocol_factory, sock, sslcontext=None, server=None, backlog=100, *timeouts):
        gate = GatedLoop.gate
        if gate is None:
            return super()._accept_connection(protocol_factory, sock, sslcontext, server, backlog, *timeouts)
        for _ in range(backlog):
            if not gate.table.may_accept():
                self._pause(gate, protocol_factory, sock, sslcontext, server, backlog, *timeouts)
                return
            try:
                conn, addr = sock.accept()
                conn.setblocking(False)
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError as exc:
                if exc.errno not in ACCEPT_ERRORS:
                    raise
                self._remove_reader(sock.fileno())  # as asyncio does: out of descriptors, try again in a second
                self.call_later(1.0, self._start_serving, protocol_factory, sock, sslcontext, server, backlog, *timeouts)
                return
            gate.table.add(1)  # counted now, so the next decision of this loop pass sees it
            self.create_task(self._accept_connection2(protocol_factory, conn, {"peername": addr}, sslcontext, server,
                                                      *timeouts))

    def _pause(self, gate: Gate, *args) -> None:
        sock: socket.socket = args[1]
        self._remove_reader(sock.fileno())
        if not gate.watching and gate.wake is not None:
            self._add_reader(gate.wake.fileno(), gate.on_wake)
            gate.watching = True

        def resume() -> None:
            gate.resume = None
            gate.table.set_paused(False)
            if sock.fileno() >= 0 and not self.is_closed():  # uvicorn may have closed it meanwhile
                self._add_reader(sock.fileno(), self._accept_connection, *args)

        gate.resume = resume
        gate.paused()
