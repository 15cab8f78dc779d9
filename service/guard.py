"""Fault handling that BentoML and uvicorn have no setting for (docs/service.md, "Faults").

Three pieces, each installed where it has to run:

- `GuardedProtocol` (every worker): uvicorn's httptools protocol plus a bounded queue with load
  shedding (a canned 503 + Retry-After written straight to the socket before any ASGI work, so
  shedding costs a fraction of serving), a header/idle timeout, a body-stall timeout, a header-size
  cap and a connection cap. `install_protocol()` makes it uvicorn's "auto" HTTP protocol; the
  service module runs it at import, which in a worker is before uvicorn loads its config.
- `Guard` (one per worker, owned by the service instance): the settings and counters the protocol
  uses, the once-a-second sweeper that enforces the timeouts, and the SIGTERM drain: readiness
  fails at once, every answer says `Connection: close`, serving goes on for DRAIN_S, then uvicorn's
  own graceful shutdown runs with a deadline of SHUTDOWN_TIMEOUT_S.
- `install_supervisor()` (the `bentoml serve` process): the worker watcher respawns also when
  BENTOML_CONTAINERIZED is set (BentoML turns respawn off there), a dead worker is reaped on
  SIGCHLD instead of at circus' next 10 s check, and on shutdown, when the drain window ends, a
  drop-all socket filter on the shared listening socket stops new handshakes (SYNs) while the
  workers, for ACCEPT_GRACE_S more, still accept and serve what the kernel already queued. Without
  it, connections queued after the last worker stopped accepting are reset when the socket closes;
  with it, a late client's SYN is retried by its kernel and then refused: a clean refusal.
  Where the filter is not allowed (no CAP_NET_ADMIN, e.g. a non-root container), the backlog is cut
  to 0 instead; behind a balancer, readiness (503 from SIGTERM on) is what keeps connections away
  before the socket closes (docs/deploy.md).
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import signal
import socket
import struct
import time

import orjson
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from .workers import TICK_S

logger = logging.getLogger("bentoml.service.guard")

SWEEP_S = 1.0
ACCEPT_GRACE_S = 0.5  # workers accept this long after the listening socket stopped taking SYNs
MAX_HEADER_BYTES = 64 * 1024
ADMITTED = "bnfold.admitted"  # scope key: when the protocol handed the request to the app
PROTOCOL = "bnfold.protocol"  # scope key: the connection's GuardedProtocol
MIN_INFLIGHT = 4  # below this many requests in a worker nothing is shed
WINDOW_S = 0.1  # the queue delay is the smallest wait seen in such a window (CoDel's standing queue)
BODY_WINDOW = 4 * 1024 * 1024  # body bytes buffered per connection before uvicorn pauses reading it
SHED_BODY_MAX = 64 * 1024  # a shed request closing its connection: a body up to this size is read first
PACE_MIN_S = 0.001  # a shed answer due sooner than this goes at once (no timer)
REASONS = ("overload", "connections", "header_timeout", "body_timeout", "header_too_large")


def canned(status: int, reason: str, message: str, close: bool, retry_after: int | None = None) -> bytes:
    """A complete HTTP/1.1 response with a JSON {"error": ...} body."""
    body = orjson.dumps({"error": message})
    head = [f"HTTP/1.1 {status} {reason}", "content-type: application/json", f"content-length: {len(body)}",
            f"connection: {'close' if close else 'keep-alive'}"]
    if retry_after is not None:
        head.append(f"retry-after: {retry_after}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def is_work_default(method: bytes, path: bytes) -> bool:
    """Without the service's route table (a Guard made outside the service): every POST is work."""
    return method == b"POST"


class Guard:
    """Per-worker fault state (owned by the service instance; the protocol finds it through it)."""

    def __init__(self, settings, queue_delay_s: float | None = None, window_s: float = WINDOW_S,
                 is_work=None, gate=None, backlog_s=None, pace_s: float = 0.0) -> None:
        self.settings = settings
        self.protocols: set[GuardedProtocol] = set()
        self.counts = dict.fromkeys(REASONS, 0)
        self.draining = False
        self.drain_started: float | None = None
        # the model's own figures when the service derived them (service/tuning.py), else the setting
        self.delay_limit = queue_delay_s if queue_delay_s is not None else (settings.queue_delay_ms or 250.0) / 1000
        self.window = window_s
        self.is_work = is_work or is_work_default
        self.gate = gate  # service/workers.py: connections spread over the workers (None: one process)
        self.backlog_s = backlog_s or (lambda: 0.0)  # seconds of model work already queued in this worker
        self.pace_s = pace_s  # an overload 503 goes no sooner than this after its request's headers
        self.standing = 0.0  # the shortest queue wait (admission -> its model call starts) in the last full window
        self._window_min = float("inf")
        self._window_end = 0.0
        retry = settings.retry_after_s
        overloaded = (f"overloaded: requests queue longer than {1000 * self.delay_limit:g} ms (or more than "
                      f"{settings.queue_max}) in this worker; retry after {retry} s")
        self.shed_keep = canned(503, "Service Unavailable", overloaded, close=False, retry_after=retry)
        self.shed_close = canned(503, "Service Unavailable", overloaded, close=True, retry_after=retry)
        self.too_many = canned(503, "Service Unavailable",
                               f"too many connections (over {settings.max_connections} in this worker)",
                               close=True, retry_after=retry)
        self.header_timeout = canned(408, "Request Timeout",
                                     f"request headers not complete within {settings.header_timeout_s:g} s", close=True)
        self.body_timeout = canned(408, "Request Timeout",
                                   f"request body stalled for more than {settings.body_timeout_s:g} s", close=True)
        self.header_too_large = canned(431, "Request Header Fields Too Large",
                                       f"request headers over {MAX_HEADER_BYTES} bytes", close=True)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server = None  # uvicorn's Server, found through its SIGTERM handler
        # /metrics: BentoML's Prometheus runs in multiprocess mode, which reads every worker's
        # values from its files; no registry entry needed (and none to collide with in tests).
        from prometheus_client import Counter

        metric = Counter("bnfold_guard", "Requests/connections refused or closed by the guard", ["reason"], registry=None)
        self._metrics = {reason: metric.labels(reason=reason) for reason in REASONS}  # label lookups are slow

    # --- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        """In the worker's event loop: the sweeper, and the SIGTERM drain when uvicorn runs us."""
        try:
            self._loop = asyncio.get_running_loop()
        except RuntimeError:  # constructed outside a server (in-process use): nothing to guard
            return
        self._loop.call_later(SWEEP_S, self._sweep)
        if self.gate is not None:
            self._loop.call_later(TICK_S, self._tick)
        previous = signal.getsignal(signal.SIGTERM)
        server = getattr(previous, "__self__", None)
        if server is not None and hasattr(server, "should_exit") and hasattr(server, "force_exit"):
            self._server = server
            signal.signal(signal.SIGTERM, self._on_sigterm)
        else:
            logger.warning("SIGTERM handler is not uvicorn's (%r): no drain window in this process", previous)

    def _on_sigterm(self, signum, frame) -> None:
        if not self.draining and self._loop is not None:
            self._loop.call_soon_threadsafe(self.drain)

    def drain(self) -> None:
        """Readiness fails now; keep serving (Connection: close) for DRAIN_S, then stop with a deadline."""
        if self.draining:
            return
        self.draining = True
        self.drain_started = time.monotonic()
        s = self.settings
        logger.info("SIGTERM: draining for %.1f s (readiness 503, Connection: close), then stopping "
                    "with a %.1f s deadline; worker pid %d", s.drain_s, s.shutdown_timeout_s, os.getpid())
        self._loop.call_later(s.drain_s + ACCEPT_GRACE_S, self._stop)

    def _stop(self) -> None:
        if self._server is None:
            return
        self._server.should_exit = True  # uvicorn: stop accepting, finish in-flight requests
        self._loop.call_later(self.settings.shutdown_timeout_s, self._force)

    def _force(self) -> None:
        logger.error("shutdown deadline of %.1f s passed: cancelling what is left", self.settings.shutdown_timeout_s)
        self._server.force_exit = True

    def _tick(self) -> None:
        self.gate.tick()
        self._loop.call_later(TICK_S, self._tick)

    def started(self, waited: float) -> None:
        """A request's model call started `waited` s after the protocol admitted it."""
        now = time.monotonic()
        if now >= self._window_end:
            self.standing = 0.0 if self._window_min == float("inf") else self._window_min
            self._window_min, self._window_end = waited, now + self.window
        elif waited < self._window_min:
            self._window_min = waited

    def overloaded(self, inflight: int) -> bool:
        """Shed new work? Past QUEUE_MAX requests in this worker; or, with at least MIN_INFLIGHT, when
        a new request would wait longer than the queue delay limit for its model call: because the
        inputs already queued would take that long at the model's measured cost (`backlog_s`, the
        batcher's running figure), or because even the luckiest request of the last window waited
        that long (a standing queue, as CoDel sees it: it catches what the estimate misses). The limit
        is a few calls of the model (service/tuning.py), so a queue of a few calls is not overload;
        the estimate keeps an accepted request's wait near the limit even when the load jumps to
        several times the capacity (the standing queue alone is seen only once it has formed, and a
        queue up to ~3x the limit long was admitted by then); a slow client's upload does not count
        (the wait starts once the headers are in)."""
        if inflight >= self.settings.queue_max:
            return True
        return inflight >= MIN_INFLIGHT and (self.standing > self.delay_limit or self.backlog_s() > self.delay_limit)

    def count(self, reason: str) -> None:
        self.counts[reason] += 1
        self._metrics[reason].inc()

    def stats(self) -> dict:
        return {"connections": len(self.protocols), "draining": self.draining,
                "queue_delay_ms": round(1000 * self.standing, 2), "queue_delay_limit_ms": round(1000 * self.delay_limit, 1),
                "backlog_ms": round(1000 * self.backlog_s(), 1),
                **self.counts, **({"balance": self.gate.stats()} if self.gate is not None else {})}

    def should_move(self, protocol) -> bool:
        """Ask this connection's client to reconnect (Connection: close on this answer): this worker
        holds more than its share of connections (service/workers.py), and nothing is pipelined
        behind this request on the connection."""
        if self.gate is None or protocol is None or getattr(protocol, "pipeline", None):
            return False
        if self.gate.table.over_share():
            self.gate.moved += 1
            return True
        return False

    def _sweep(self) -> None:
        """Close what waits too long: headers not complete, bodies stalled."""
        now = time.monotonic()
        s = self.settings
        for p in list(self.protocols):
            if p.waiting_since is not None and now - p.waiting_since > s.header_timeout_s:
                p.refuse(self.header_timeout, "header_timeout")
            elif p.body_seen is not None and now - p.body_seen > s.body_timeout_s:
                p.refuse(self.body_timeout if not (p.cycle and p.cycle.response_started) else b"", "body_timeout")
        self._loop.call_later(SWEEP_S, self._sweep)


def current_guard() -> Guard | None:
    import bentoml

    try:
        return getattr(bentoml.get_current_service(), "guard", None)
    except Exception:  # the service isn't instantiated (yet): no guard
        return None


class GuardedProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the Guard's limits (see the module docstring)."""

    guard: Guard | None = None
    waiting_since: float | None = None  # waiting for complete request headers since
    body_seen: float | None = None  # reading a request body; last byte seen at
    header_bytes = 0
    shedding = False  # ignore the rest of this request (it is answered, or being refused)
    over_cap = False  # this connection came over MAX_CONNECTIONS: its first request gets a 503
    pending: bytes | None = None  # a shed answer, sent once the request's body is in and its pace has passed
    pending_close = False
    pending_seq = 0  # which shed answer is held: a timer set for an earlier one must not send it
    answer_at = 0.0
    lost = False

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self.guard = guard = current_guard()
        self.waiting_since = time.monotonic()
        if guard is None:
            return
        guard.protocols.add(self)
        self.over_cap = len(guard.protocols) > guard.settings.max_connections

    def connection_lost(self, exc) -> None:
        if self.guard is not None:
            self.guard.protocols.discard(self)
            if self.guard.gate is not None and not self.lost:
                self.guard.gate.closed()
        self.lost = True
        self.waiting_since = self.body_seen = None
        super().connection_lost(exc)

    def refuse(self, response: bytes, reason: str) -> None:
        """Answer `response` (if any) and close without reading further."""
        self.waiting_since = self.body_seen = None
        self.shedding = True  # ignore whatever the parser still delivers
        if self.transport.is_closing():
            return
        if self.guard is not None:
            self.guard.count(reason)
        if response:
            self.transport.write(response)
        self.transport.close()

    def on_message_begin(self) -> None:
        self.answer_pending()  # a pipelined request read with the shed one: its answer goes first
        super().on_message_begin()
        self.shedding = self.transport.is_closing()
        self.header_bytes = 0
        if self.waiting_since is None:
            self.waiting_since = time.monotonic()

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.shedding:
            return
        self.header_bytes += len(name) + len(value)
        if self.header_bytes > MAX_HEADER_BYTES:
            self.refuse(self.guard.header_too_large if self.guard else b"", "header_too_large")
            return
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self.waiting_since = None
        if self.shedding:
            return
        guard = self.guard
        if guard is not None and (self.cycle is None or self.cycle.response_complete) and (
            self.over_cap or (guard.overloaded(len(self.tasks)) and guard.is_work(self.parser.get_method(), self.url.split(b"?", 1)[0]))
        ):
            self.shed(guard)
            return
        self.body_seen = time.monotonic()
        super().on_headers_complete()
        self.scope[ADMITTED] = self.body_seen
        self.scope[PROTOCOL] = self

    def shed(self, guard: Guard) -> None:
        """Answer 503 + Retry-After without running the app. The body is read and dropped, and the
        answer goes once it is in and, for overload, no sooner than the guard's pace after the
        headers (service/tuning.py): the connection stays open, the client reads a 503 instead of a
        reset, and one that re-sends at once cannot loop faster than it would be served. A connection
        that closes (over the cap, draining, or not keep-alive) with a body over SHED_BODY_MAX, or a
        body over MAX_BODY_BYTES, is answered now and closed without reading it."""
        length = next((v for k, v in self.headers if k == b"content-length"), b"0")
        size = int(length) if length.isdigit() else 0  # chunked: read like a small one, as the app would
        close = self.over_cap or guard.draining or not self.parser.should_keep_alive()
        if self.over_cap:
            answer = guard.too_many
            guard.count("connections")
        else:
            answer = guard.shed_close if close else guard.shed_keep
            guard.count("overload")
        self.shedding = True
        if size > (SHED_BODY_MAX if close else guard.settings.max_body_bytes):
            self.transport.write(answer)
            self.transport.close()
            return
        self.pending = answer
        self.pending_close = close
        self.pending_seq += 1
        self.body_seen = now = time.monotonic()  # the sweeper closes a stalled body
        self.answer_at = now if self.over_cap else now + guard.pace_s

    def answer_pending(self, seq: int | None = None) -> None:
        """Send the shed answer held back (see shed), once; from a timer (`seq`), only the one it was set for."""
        if seq is not None and seq != self.pending_seq:
            return  # that answer went early (a pipelined request after it); this one has its own timer
        answer, self.pending = self.pending, None
        if answer is None or self.transport.is_closing():
            return
        self.transport.write(answer)
        if self.pending_close:
            self.transport.close()
            return
        self.waiting_since = time.monotonic()
        self.flow.resume_reading()

    def on_url(self, url: bytes) -> None:
        if not self.shedding:
            super().on_url(url)

    def on_body(self, body: bytes) -> None:
        self.body_seen = time.monotonic()
        if not self.shedding:
            super().on_body(body)

    def on_message_complete(self) -> None:
        self.body_seen = None
        if self.shedding:
            self.shedding = False
            wait = self.answer_at - time.monotonic()
            if self.pending is not None and wait >= PACE_MIN_S and not self.transport.is_closing():
                self.flow.pause_reading()  # a next request waits in the kernel until this answer is out
                self.loop.call_later(wait, self.answer_pending, self.pending_seq)
            else:
                self.answer_pending()
            return
        super().on_message_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self.waiting_since = time.monotonic()


def install_protocol() -> None:
    """Make GuardedProtocol uvicorn's 'auto' HTTP protocol and asyncio its 'auto' event loop
    (BentoML's worker asks uvicorn for 'auto' of both).

    Why not uvloop: its libuv accepts one connection per loop iteration (strace: one accept4 per
    epoll_pwait, never EAGAIN); with a busy worker that is a few accepts a second, and under
    overload new connections waited in the kernel queue for the whole run (6-10 s, every run with
    800 connections; asyncio's accept loop takes them all). Throughput measured the same
    (docs/service.md, "Request path, event loop")."""
    import uvicorn.loops.auto as loops
    import uvicorn.protocols.http.auto as auto
    import uvicorn.protocols.http.httptools_impl as httptools_impl

    from .workers import GatedLoop

    auto.AutoHTTPProtocol = GuardedProtocol
    loops.auto_loop_factory = lambda use_subprocess=False: GatedLoop
    # uvicorn stops reading a connection once 64 KiB of its body wait for the app; a 3x224x224 input
    # (600 KB) then takes ten pause/resume rounds through the loop. Our routes read the body at once
    # (up to MAX_BODY_BYTES), so a larger window costs no memory that reading would not.
    httptools_impl.HIGH_WATER_LIMIT = max(httptools_impl.HIGH_WATER_LIMIT, BODY_WINDOW)


# --- the supervisor (`bentoml serve` process) -------------------------------------------------

API_SOCKET = "_bento_api_server"  # BentoML's name for the public listening socket
SO_ATTACH_FILTER = 26  # <asm-generic/socket.h>


def install_supervisor(drain_s: float, respawn: bool = True, prepare=None) -> None:
    """Patch BentoML's watcher/arbiter factories before `bentoml serve` calls them (it imports this
    service first): `prepare(env)` once before the first worker starts (the service measures the
    model there and hands the figures to the workers through `env`); with `respawn`, respawn always
    and reap on SIGCHLD; stop listening after the drain window."""
    import bentoml._internal.utils.circus as bento_circus
    import bentoml.serving as serving

    if getattr(serving.create_watcher, "__guarded__", False):
        return
    create_watcher = serving.create_watcher
    create_arbiter = bento_circus.create_standalone_arbiter

    def guarded_watcher(*args, **kwargs):
        if prepare is not None:
            kwargs["env"] = env = dict(kwargs.get("env") or {})
            prepare(env)
        watcher = create_watcher(*args, **kwargs)
        if respawn:
            watcher.respawn = True  # BentoML: `not running_inside_container()`
        return watcher

    def guarded_arbiter(watchers, **kwargs):
        arbiter = create_arbiter(watchers, **kwargs)
        if respawn:
            watch_children(arbiter)
        arbiter.exit_stack.callback(refuse_new_connections_later, arbiter, drain_s)
        return arbiter

    guarded_watcher.__guarded__ = True
    serving.create_watcher = guarded_watcher
    bento_circus.create_standalone_arbiter = guarded_arbiter


def watch_children(arbiter) -> None:
    """On SIGCHLD, let circus reap and respawn now instead of at its next periodic check."""
    from circus.exc import ConflictError

    def manage() -> None:
        if arbiter._stopping:
            return
        try:
            arbiter.manage_watchers()
        except ConflictError:  # circus is busy with another command: try again shortly
            arbiter.loop.call_later(0.1, manage)

    def on_sigchld(signum, frame) -> None:
        loop = getattr(arbiter.loop, "asyncio_loop", None)
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(manage)

    signal.signal(signal.SIGCHLD, on_sigchld)


def drop_all_packets(sock: socket.socket) -> None:
    """Attach a classic BPF filter that returns 0 (drop) to a listening socket: new SYNs are
    ignored, connections already in the accept queue stay acceptable (Linux)."""
    insn = struct.pack("HBBI", 0x06, 0, 0, 0)  # BPF_RET | BPF_K, k = 0
    program = ctypes.create_string_buffer(insn, len(insn))
    fprog = struct.pack("HL", 1, ctypes.addressof(program))  # struct sock_fprog {len; filter*}
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)


def refuse_new_connections_later(arbiter, drain_s: float) -> None:
    """Runs when the arbiter starts stopping (it then sends SIGTERM to the workers, which drain
    for `drain_s`): when the drain window ends, the shared listening socket takes no new SYNs."""

    def refuse() -> None:
        sock = arbiter.sockets.get(API_SOCKET) if arbiter.sockets else None
        if sock is None:
            return
        try:
            drop_all_packets(sock)
            logger.info("drain window over: the listening socket takes no new connections")
        except OSError as exc:
            # Attaching a socket filter needs CAP_NET_ADMIN on some kernels (measured: EPERM as the
            # image's non-root user, and as root without NET_ADMIN; docs/deploy.md). Next best, with
            # no privilege: a backlog of 0, so the kernel drops new SYNs while one connection waits to
            # be accepted (at most that one is reset when the socket closes, instead of all queued).
            try:
                sock.listen(0)
            except OSError:
                pass
            logger.warning("cannot filter the listening socket (%s): its backlog is now 0 instead; a balancer "
                           "must stop sending within DRAIN_S (readiness), or late connections may be reset", exc)

    if arbiter.loop is not None:
        arbiter.loop.call_later(drain_s, refuse)
