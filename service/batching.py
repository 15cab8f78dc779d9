"""Requests coalesce into model calls: one call at a time per worker, and whatever arrived while it
ran forms the next one (issue 25; docs/service.md, "Batching").

No timer: a lone request waits for nothing, and under load a call grows with the load, up to
`max_batch` inputs (from the latency budget, service/tuning.py). Where a call runs depends on its
size: up to `inline_max` inputs (a call that takes at most INLINE_BUDGET_MS) on the event loop
itself, where a thread hop would cost more than the call; anything bigger in the worker's inference
thread, so the loop keeps reading bodies, answering probes and shedding while the model works.
`started(waited)` is told, for every request of a call as the call starts, how long it waited since
the server admitted it: that is the queue delay load shedding judges (service/guard.py).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from concurrent.futures import Executor
from typing import Callable, Sequence

import numpy as np

Outputs = Sequence[np.ndarray]


class Batcher:
    """infer(batch) returns the model's outputs, each with one row per input; every caller gets
    its own rows of every output."""

    def __init__(self, infer: Callable[[np.ndarray], Outputs], max_batch: int, inline_max: int,
                 executor: Executor | None = None, started: Callable[[float], None] | None = None,
                 seconds_per_input: float = 0.0) -> None:
        self._infer = infer
        self.max_batch = max(1, max_batch)
        self.inline_max = inline_max if executor is not None else max(inline_max, 1 << 30)
        self._executor = executor
        self.started = started
        self._pending: deque[tuple[np.ndarray, asyncio.Future, float | None]] = deque()
        self._busy = False  # a call is running (or scheduled to run) in the thread
        self._scheduled = False
        self.calls = self.inputs = self.threaded = 0
        self.queued_inputs = 0  # waiting, or in the running call
        self.seconds_per_input = seconds_per_input  # a running average of what calls really cost

    def stats(self) -> dict:
        return {"max_batch": self.max_batch, "inline_max": self.inline_max, "onnx_calls": self.calls,
                "calls_in_thread": self.threaded, "inputs": self.inputs, "queued_requests": len(self._pending),
                "queued_inputs": self.queued_inputs, "ms_per_input": round(1000 * self.seconds_per_input, 4),
                "mean_batch": round(self.inputs / self.calls, 3) if self.calls else 0.0}

    def backlog_s(self) -> float:
        """How long the inputs already here will keep the model busy, at what calls have cost."""
        return self.queued_inputs * self.seconds_per_input

    def _measured(self, count: int, seconds: float) -> None:
        per_input = seconds / count
        self.seconds_per_input = per_input if not self.seconds_per_input else 0.8 * self.seconds_per_input + 0.2 * per_input

    async def __call__(self, batch: np.ndarray, admitted: float | None = None) -> Outputs:
        """batch: validated [n, ...]; admitted: time.monotonic() when the server admitted the request."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._pending.append((batch, future, admitted))
        self.queued_inputs += batch.shape[0]
        self._kick(loop)
        return await future

    def _kick(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._pending and not self._busy and not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._flush, loop)  # after the handlers ready in this loop pass: they join

    def _take(self) -> tuple[list, int]:
        """The oldest requests that fit max_batch inputs (at least one: a big request runs alone)."""
        items, count = [], 0
        while self._pending:
            batch, future, admitted = self._pending[0]
            if future.done():  # its client went away: nothing to compute
                self._pending.popleft()
                self.queued_inputs -= batch.shape[0]
                continue
            if items and count + batch.shape[0] > self.max_batch:
                break
            items.append(self._pending.popleft())
            count += batch.shape[0]
        return items, count

    def _flush(self, loop: asyncio.AbstractEventLoop) -> None:
        self._scheduled = False
        items, count = self._take()
        if not items:
            return
        now = time.monotonic()
        if self.started is not None:
            for _, _, admitted in items:
                if admitted is not None:
                    self.started(now - admitted)
        self.calls += 1
        self.inputs += count
        batch = items[0][0] if len(items) == 1 else np.concatenate([b for b, _, _ in items])
        if count <= self.inline_max:
            try:
                outputs, seconds = self._timed(batch)
            except Exception as exc:  # a model failure fails this call's requests, not the loop
                self._deliver(items, None, exc)
            else:
                self._measured(count, seconds)
                self._deliver(items, outputs, None)
            self.queued_inputs -= count
            self._kick(loop)
            return
        self._busy = True
        self.threaded += 1
        call = loop.run_in_executor(self._executor, self._timed, batch)
        call.add_done_callback(lambda done: self._finished(loop, items, count, done))

    def _timed(self, batch: np.ndarray) -> tuple[Outputs, float]:
        start = time.monotonic()
        return self._infer(batch), time.monotonic() - start

    def _finished(self, loop: asyncio.AbstractEventLoop, items: list, count: int, done: asyncio.Future) -> None:
        self._busy = False
        self.queued_inputs -= count
        exc = done.exception()
        if exc is None:
            outputs, seconds = done.result()
            self._measured(count, seconds)
        self._deliver(items, None if exc else outputs, exc)
        self._kick(loop)

    @staticmethod
    def _deliver(items: list, outputs: Outputs | None, exc: BaseException | None) -> None:
        start = 0
        for batch, future, _ in items:
            stop = start + batch.shape[0]
            if not future.done():  # the client may have gone away
                if exc is not None:
                    future.set_exception(exc)
                else:
                    future.set_result(outputs if len(items) == 1 else [output[start:stop] for output in outputs])
            start = stop
