"""Connections spread over the workers, whatever the clients do (issue 25; docs/service.md, "Workers").

BentoML's workers share one listening socket. asyncio accepts every queued connection at once
(up to the backlog) when its socket turns readable, so a burst of connections lands on whichever
worker woke first, and keep-alive clients stay there: in 3 of 15 runs one worker carried every
connection while the other idled (ResNet-50 at 0.50x of the in-process ceiling).

Here, each worker keeps one slot of a small table in shared memory (pid, open connections, loaded,
heartbeat), and its event loop (`GatedLoop`) accepts a connection only while this worker has no
more connections than the least-loaded live worker; otherwise it stops watching the listening
socket until that changes (checked every TICK_S and whenever one of its connections closes). A
worker over its fair share (ceil(connections / live workers)) answers its next response with
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

import numpy as np

TICK_S = 0.05  # heartbeat, and how often a paused worker looks whether it may accept again
STALE_S = 0.5  # a worker whose loop has not beaten for this long is not live (dead, stuck or gone)
FIELDS = ("pid", "connections", "loaded", "beat_ns")
PID, CONNECTIONS, LOADED, BEAT = range(len(FIELDS))
ACCEPT_ERRORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)  # asyncio's: retry in a second


def table_path(supervisor_pid: int) -> Path:
    """One table per `bentoml serve` (its arbiter is every worker's parent)."""
    base = Path("/dev/shm") if Path("/dev/shm").is_dir() and os.access("/dev/shm", os.W_OK) else Path(tempfile.gettempdir())
    return base / f"bnfold-workers-{supervisor_pid}"


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class WorkerTable:
    """This worker's slot (index 0..workers-1) in the shared table, and what the others say."""

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
        self.slots = np.ndarray((workers, len(FIELDS)), np.int64, buffer=self._map)
        self.me = self.slots[index]
        self.me[:] = (os.getpid(), 0, 0, time.monotonic_ns())

    # --- this worker ------------------------------------------------------------------------

    def beat(self) -> None:
        self.me[BEAT] = time.monotonic_ns()

    def set_loaded(self) -> None:
        self.me[LOADED] = 1
        self.beat()

    def add(self, n: int) -> None:
        self.me[CONNECTIONS] = max(0, int(self.me[CONNECTIONS]) + n)

    @property
    def connections(self) -> int:
        return int(self.me[CONNECTIONS])

    # --- all workers ------------------------------------------------------------------------

    def live(self) -> np.ndarray:
        """Which slots belong to a worker that is running, loaded and beating."""
        now = time.monotonic_ns()
        slots = self.slots.copy()
        fresh = (slots[:, PID] > 0) & (slots[:, LOADED] == 1) & (now - slots[:, BEAT] < STALE_S * 1e9)
        fresh[self.index] = True
        return np.array([f and (i == self.index or alive(int(slots[i, PID]))) for i, f in enumerate(fresh)])

    def may_accept(self) -> bool:
        """Take a new connection? Only while no live peer has fewer (ties: both take)."""
        live = self.live()
        live[self.index] = False
        if not live.any():
            return True
        return self.connections <= int(self.slots[live, CONNECTIONS].min())

    def over_share(self) -> bool:
        """More connections than ceil(total / live workers): one should move."""
        live = self.live()
        n = int(live.sum())
        if n < 2:
            return False
        total = int(self.slots[live, CONNECTIONS].sum())
        return self.connections > -(-total // n)

    def all_ready(self) -> bool:
        return bool(self.live().all()) and bool((self.slots[:, LOADED] == 1).all())

    def describe(self) -> list[dict]:
        live = self.live()
        return [{"worker": i + 1, "pid": int(s[PID]), "connections": int(s[CONNECTIONS]), "loaded": bool(s[LOADED]),
                 "live": bool(live[i])} for i, s in enumerate(self.slots)]

    def close(self) -> None:
        self.me[LOADED] = 0
        self.me[PID] = 0


class Gate:
    """The accept policy of one worker's loop: a WorkerTable plus the paused listening socket."""

    def __init__(self, table: WorkerTable) -> None:
        self.table = table
        self.resume = None  # set while paused: re-registers the listening socket
        self.pauses = 0
        self.moved = 0  # connections asked to move (Connection: close) for balance

    def tick(self) -> None:
        self.table.beat()
        if self.resume is not None and self.table.may_accept():
            self.resume()

    def closed(self) -> None:
        """One of this worker's connections closed."""
        self.table.add(-1)
        if self.resume is not None and self.table.may_accept():
            self.resume()

    def stats(self) -> dict:
        return {"accepting": self.resume is None, "pauses": self.pauses, "moved_for_balance": self.moved,
                "workers": self.table.describe()}


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
        gate.pauses += 1

        def resume() -> None:
            gate.resume = None
            if sock.fileno() >= 0 and not self.is_closed():  # uvicorn may have closed it meanwhile
                self._add_reader(sock.fileno(), self._accept_connection, *args)

        gate.resume = resume
