"""Setup (a) of the benchmark: onnxruntime called in-process, no HTTP, no JSON.

The floor under every server: what one process gets from the model itself, sequentially, with the
same session options as our service (one intra-op thread per worker).
"""

from __future__ import annotations

import time

import numpy as np
import psutil

from loadtest.data import BATCH_SIZE, load_test_set, wire_pixels


def _timed_calls(run, seconds: float) -> tuple[np.ndarray, float, float]:
    """Call ``run()`` for ``seconds``; per-call latencies (ms), wall seconds, CPU seconds."""
    me = psutil.Process()
    cpu0, t0 = sum(me.cpu_times()[:2]), time.perf_counter()
    latencies = []
    while True:
        start = time.perf_counter()
        run()
        end = time.perf_counter()
        latencies.append((end - start) * 1000.0)
        if end - t0 >= seconds:
            break
    return np.asarray(latencies), end - t0, sum(me.cpu_times()[:2]) - cpu0


def bench_inprocess(model_path: str, data_dir: str, seconds: float = 3.0, intra_op_threads: int = 1) -> list[dict]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = intra_op_threads
    session = ort.InferenceSession(model_path, opts, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    images_u8, _ = load_test_set(data_dir, limit=BATCH_SIZE * 4)
    pixels = wire_pixels(images_u8)
    rows = []
    for kind, batch in (("single", pixels[:1]), ("batch64", pixels[:BATCH_SIZE])):
        for _ in range(20):  # warm-up: first calls allocate
            session.run(None, {name: batch})
        lat, wall, cpu = _timed_calls(lambda: session.run(None, {name: batch}), seconds)
        rps = len(lat) / wall
        rows.append({
            "setup": "in-process", "kind": "sweep" if kind == "single" else "batch64", "users": 1,
            "offered_rps": 0.0, "requests": float(len(lat)), "failures": 0.0, "rps": rps,
            "img_s": rps * len(batch), "p50": float(np.percentile(lat, 50)), "p95": float(np.percentile(lat, 95)),
            "p99": float(np.percentile(lat, 99)), "server_cpu_pct": 100.0 * cpu / wall,
            "cpu_ms_per_req": 1000.0 * cpu / len(lat),
        })
    return rows
