"""Adaptive micro-batching: small requests that are in a worker at the same time share one
onnxruntime call. Measured (docs/service.md, "Batching"): two 2026-11-23 runs against
BATCH_MAX_IMAGES=1 disagree (1,409 vs 1,524 and 2,564 vs 2,072 req/s); a quiet-machine run decides.

No timer. A request joins the queue; if no flush is scheduled, one is scheduled on the event loop
and runs after the handlers that are ready in the same loop pass, so a lone request waits for
nothing and under load the batch grows with the load. The batch runs on the event loop itself
(the caller sends only batches that fit the worker's inline budget; bigger ones go to a thread).
"""

from __future__ import annotations

import asyncio
from typing import Callable, Sequence

import numpy as np


class MicroBatcher:
    """infer(batch) returns the model's outputs for it, a sequence of arrays with one row per input
    each; every caller gets its own rows of every output."""

    def __init__(self, infer: Callable[[np.ndarray], Sequence[np.ndarray]], max_batch: int = 32) -> None:
        self._infer = infer
        self.max_batch = max(1, max_batch)
        self._pending: list[tuple[np.ndarray, asyncio.Future]] = []
        self._scheduled = False
        self.calls = 0
        self.inputs = 0

    def stats(self) -> dict:
        return {"max_batch": self.max_batch, "onnx_calls": self.calls, "inputs": self.inputs,
                "mean_batch": round(self.inputs / self.calls, 3) if self.calls else 0.0}

    async def __call__(self, batch: np.ndarray) -> Sequence[np.ndarray]:
        """batch: validated [n, ...] with n <= max_batch; returns infer()'s rows for it, per output."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._pending.append((batch, future))
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._flush)
        return await future

    def _flush(self) -> None:
        self._scheduled = False
        taken, count = 0, 0
        for batch, _ in self._pending:
            if taken and count + batch.shape[0] > self.max_batch:
                break
            taken += 1
            count += batch.shape[0]
        items, self._pending = self._pending[:taken], self._pending[taken:]
        if self._pending:  # the rest: next loop pass
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)
        arrays = [batch for batch, _ in items]
        self.calls += 1
        self.inputs += count
        try:
            outputs = self._infer(arrays[0] if len(arrays) == 1 else np.concatenate(arrays))
        except Exception as exc:  # a model failure fails this batch's requests, not the loop
            for _, future in items:
                if not future.done():
                    future.set_exception(exc)
            return
        if len(items) == 1:  # alone in this pass: the outputs are all its own
            if not items[0][1].done():
                items[0][1].set_result(outputs)
            return
        start = 0
        for batch, future in items:
            stop = start + batch.shape[0]
            if not future.done():  # the client may have gone away
                future.set_result([output[start:stop] for output in outputs])
            start = stop
