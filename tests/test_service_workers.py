"""Issue 25: connections spread over the workers (service/workers.py), settings from the model's
measured cost (service/tuning.py), probes that do not wait behind the model.

Unit tests drive the worker table and the gated event loop directly (two slots of one table, a
real listening socket); the end-to-end test serves a stand-in whose calls cost what a real model's
do (tests/service_helpers.py `build_slow_model`) with two workers and checks, black-box, that a
burst of keep-alive connections is split evenly, that probes answer while every worker is busy,
and what /metadata says it derived."""

from __future__ import annotations

import asyncio
from contextlib import contextmanager
import json
import os
import socket
import time
from dataclasses import dataclass

import numpy as np
import pytest

from service.tuning import TuningError, decode, derive, encode
from service.workers import BEAT, PID, Gate, GatedLoop, WorkerTable, slack

# --- the worker table --------------------------------------------------------------------------


def two_workers(tmp_path):
    path = tmp_path / "table"
    me, peer = WorkerTable(path, 2, 0), WorkerTable(path, 2, 1)
    me.set_loaded()
    peer.set_loaded()
    me.refresh()
    return me, peer


def stale(worker: WorkerTable) -> None:
    """As if its event loop had not beaten for 10 s."""
    worker.words[worker._me + BEAT] -= int(10e9)


def test_table_accepts_only_while_not_ahead_and_moves_connections_over_the_share(tmp_path):
    me, peer = two_workers(tmp_path)
    assert me.may_accept() and me.all_ready()
    me.add(1)
    assert not me.may_accept()  # the peer has fewer: the next connection is the peer's
    peer.add(1)
    assert me.may_accept() and peer.may_accept()  # ties: both take
    me.add(5)
    assert me.over_share() and not peer.over_share()  # 6 vs 1: fair share is ceil(7 / 2) = 4
    peer.add(3)
    assert me.over_share()  # 6 vs 4: ceil(10 / 2) = 5 < 6: still over
    peer.add(1)
    assert not me.over_share() and not peer.over_share()  # 6 vs 5


def test_many_connections_are_balanced_within_an_eighth_and_moved_only_beyond_that(tmp_path):
    me, peer = two_workers(tmp_path)
    assert slack(16) == slack(63) == 0 and slack(64) == 8  # keep-alive clients split evenly: 16/16, not 18/14
    peer.add(64)
    me.add(64 + slack(64))
    assert me.may_accept()  # 72 vs 64: within 64 // 8, so a storm is taken in batches
    me.add(1)
    assert not me.may_accept() and not me.over_share()  # 73: what accepting can reach; nothing moves
    me.add(1)
    assert me.over_share() and not peer.over_share()  # 74 vs 64: one should move
    assert peer.may_accept()


def test_a_dead_or_stuck_peer_is_left_out(tmp_path):
    me, peer = two_workers(tmp_path)
    me.add(3)
    assert not me.may_accept()
    stale(peer)
    me.refresh()
    assert me.may_accept() and not me.over_share() and not me.all_ready()
    peer.beat()
    me.refresh()
    assert not me.may_accept() and me.all_ready()
    peer._set(PID, 2 ** 22 + 12345)  # a pid that does not exist
    me.refresh()
    assert me.may_accept() and not me.all_ready()


def test_a_worker_still_loading_takes_nothing_and_is_not_ready(tmp_path):
    path = tmp_path / "table"
    me, loading = WorkerTable(path, 2, 0), WorkerTable(path, 2, 1)
    me.set_loaded()
    me.add(4)
    assert me.may_accept() and not me.over_share()  # nobody else can take it
    assert not me.all_ready() and [w["loaded"] for w in me.describe()] == [True, False]
    loading.set_loaded()
    me.refresh()
    assert me.all_ready() and me.over_share() and not me.may_accept()


@contextmanager
def gated_loop(table: WorkerTable, connections: int = 6):
    """A GatedLoop with `table`'s Gate serving on 127.0.0.1, `connections` clients queued in its backlog."""
    loop = GatedLoop()
    GatedLoop.gate = gate = Gate(table)
    sock = socket.create_server(("127.0.0.1", 0))
    clients = []
    try:
        server = loop.run_until_complete(loop.create_server(asyncio.Protocol, sock=sock))
        clients = [socket.create_connection(sock.getsockname()) for _ in range(connections)]
        yield loop, gate
        server.close()
    finally:
        GatedLoop.gate = None
        for c in clients:
            c.close()
        gate.close()
        loop.close()


def test_gated_loop_pauses_the_listening_socket_and_resumes(tmp_path):
    me, peer = two_workers(tmp_path)
    with gated_loop(me) as (loop, gate):
        loop.run_until_complete(asyncio.sleep(0.1))
        assert me.connections == 1 and gate.resume is not None  # one, then paused: the peer has none
        peer.add(3)
        gate.tick()
        loop.run_until_complete(asyncio.sleep(0.1))
        assert me.connections == 4 and gate.resume is not None  # caught up with the peer (ties accept), paused again
        stale(peer)  # the peer died: everything is ours
        gate.tick()
        loop.run_until_complete(asyncio.sleep(0.1))
        assert me.connections == 6 and gate.pauses >= 2


def test_a_peer_that_pauses_wakes_this_worker_at_once(tmp_path):
    """The peer pausing (it is ahead) resumes this paused worker through its wake socket, without
    waiting for a heartbeat: no tick() is called here."""
    me, peer = two_workers(tmp_path)
    peer_gate = Gate(peer)
    with gated_loop(me) as (loop, gate):
        loop.run_until_complete(asyncio.sleep(0.05))
        assert me.connections == 1 and gate.resume is not None and gate.woken == 0
        peer.add(3)
        peer.refresh()
        assert peer.paused_peers() == [0]
        peer_gate.paused()  # as GatedLoop._pause does in the peer's process
        loop.run_until_complete(asyncio.sleep(0.05))  # less than a heartbeat
        assert gate.woken == 1 and me.connections == 4  # woken, caught up with the peer, paused again
        peer_gate.close()
    assert not (tmp_path / "table").exists()  # the last worker out removes the table


def test_without_a_gate_the_loop_is_asyncios():
    loop = GatedLoop()
    GatedLoop.gate = None
    sock = socket.create_server(("127.0.0.1", 0))
    try:
        accepted = []

        class Count(asyncio.Protocol):
            def connection_made(self, transport):
                accepted.append(transport)

        loop.run_until_complete(loop.create_server(Count, sock=sock))
        clients = [socket.create_connection(sock.getsockname()) for _ in range(5)]
        loop.run_until_complete(asyncio.sleep(0.1))
        assert len(accepted) == 5
        for c in clients:
            c.close()
    finally:
        loop.close()


# --- settings from the measured cost -------------------------------------------------------------


@dataclass
class Knobs:
    latency_budget_ms: float | None = None
    batch_max_images: int | None = None
    queue_delay_ms: float | None = None
    shed_pace_ms: float | None = None
    inline_budget_ms: float = 2.0
    max_images: int = 1024
    request_timeout_s: int = 60


def test_derived_settings_for_a_tiny_and_a_slow_model():
    tiny = derive({1: 0.0001, 2: 0.00015, 4: 0.0002, 8: 0.0004, 16: 0.0008, 32: 0.0016, 64: 0.0032}, Knobs())
    assert tiny.batch_max == 64 and tiny.inline_max == 32 and tiny.queue_delay_s == pytest.approx(1.0)
    assert tiny.window_s == pytest.approx(0.1)
    slow = derive({1: 0.08, 2: 0.15, 4: 0.31}, Knobs())  # ResNet-50-like: 500 ms fits 4, not 8
    assert slow.batch_max == 4 and slow.inline_max == 0
    assert slow.queue_delay_s == pytest.approx(8 * 0.31) and slow.window_s == pytest.approx(0.62)
    # batch 2 costs 8% more CPU per input than batch 1 (YOLOv8n here): no coalescing past 1
    assert derive({1: 0.026, 2: 0.056, 4: 0.11}, Knobs(), cpu={1: 0.026, 2: 0.0562, 4: 0.1112}).batch_max == 1
    mnv2 = derive({1: 0.0086, 2: 0.0164, 4: 0.036}, Knobs(), cpu={1: 0.0086, 2: 0.0164, 4: 0.0359})
    assert mnv2.batch_max == 2 and mnv2.describe()["best_batch"] == 2  # 4 is 9% dearer per input than 2
    huge = derive({1: 1.2}, Knobs())  # one call over the default budget: no batching, no refusal
    assert huge.batch_max == 1 and huge.latency_budget_s == pytest.approx(1.2) and "not batched" in huge.why["latency_budget"]
    # The threshold does not follow the batch cap's noisy pick: ResNet-50's cap came out 4 or 2 from one start to
    # the next (per-input CPU within 10% or just over), and its threshold with it (2.5 or 1.25 s): 32 keep-alive
    # clients (1.3 s of queue a worker) were shed on some starts. Both picks now give 8 calls of batch 4.
    calm = derive({1: 0.077, 2: 0.156, 4: 0.316}, Knobs(), cpu={1: 0.077, 2: 0.156, 4: 0.316})
    noisy = derive({1: 0.077, 2: 0.156, 4: 0.316}, Knobs(), cpu={1: 0.077, 2: 0.160, 4: 0.344})
    assert (calm.batch_max, noisy.batch_max) == (4, 2)
    assert calm.queue_delay_s == noisy.queue_delay_s == pytest.approx(8 * 0.316)
    assert noisy.queue_delay_s > 16 * 0.077  # 32 clients over 2 workers are not shed
    fixed = derive({1: 0.08, 2: 0.15, 4: 0.31}, Knobs(latency_budget_ms=200, batch_max_images=3, queue_delay_ms=900,
                                                      shed_pace_ms=0))
    assert (fixed.batch_max, fixed.queue_delay_s) == (3, 0.9) and fixed.why["queue_delay"] == "QUEUE_DELAY_MS"
    # a shed answer is paced at one call of one input: nothing on a tiny model, 80 ms on ResNet-50
    assert (tiny.shed_pace_s, slow.shed_pace_s, fixed.shed_pace_s) == (0.0001, 0.08, 0.0)
    assert slow.describe()["shed_pace_ms"] == 80.0 and fixed.why["shed_pace"] == "SHED_PACE_MS"
    assert tiny.max_images == 1024 and slow.max_images == 400  # 30 s at its cheapest 75 ms per input (batch 2)
    assert "REQUEST_TIMEOUT_S" in slow.why["max_images"] and huge.max_images == 25
    with pytest.raises(TuningError, match=r"LATENCY_BUDGET_MS=50 is below one call of the model: 80.0 ms"):
        derive({1: 0.08}, Knobs(latency_budget_ms=50))


def test_figures_handed_to_workers_are_only_used_for_the_same_model():
    text = encode("ab" * 32, {1: 0.08, 2: 0.15}, {1: 0.079, 2: 0.16})
    assert decode(text, "ab" * 32) == ({1: 0.08, 2: 0.15}, {1: 0.079, 2: 0.16})
    assert decode(text, "cd" * 32) is None and decode(None, "ab" * 32) is None and decode("{", "x") is None


# --- end to end: two workers, a model that costs what real ones do -------------------------------


def test_workers_share_a_burst_of_keepalive_connections_and_probes_stay_fast(tmp_path):
    import httpx

    from tests.service_helpers import build_slow_model, serve

    model = build_slow_model(tmp_path / "slow", layers=4)
    x = np.random.default_rng(0).random((1, 8, 64, 64), dtype=np.float32)
    with serve(model, tmp_path / "serve.log", SERVICE_WORKERS="2") as server:
        server.wait_ready(180)
        meta = httpx.get(server.url + "/metadata").json()
        derived = meta["runtime"]["derived"]
        call_ms = derived["ms_per_call"]["1"]
        assert derived["inline_max_inputs"] == 0 and derived["batch_max_inputs"] >= 1 and call_ms > 2
        assert [w["loaded"] for w in meta["runtime"]["guard"]["balance"]["workers"]] == [True, True]

        async def burst_and_probe():
            limits = httpx.Limits(max_connections=8, max_keepalive_connections=8)
            async with httpx.AsyncClient(base_url=server.url, limits=limits, timeout=60) as clients, \
                    httpx.AsyncClient(base_url=server.url, timeout=10) as probes:
                # 8 connections at once, each kept: which worker holds each?
                pids = await asyncio.gather(*(clients.get("/metadata") for _ in range(8)))
                split = sorted(np.unique([r.json()["runtime"]["pid"] for r in pids], return_counts=True)[1].tolist())
                stop = time.monotonic() + 4 * max(call_ms / 1000, 0.05) * 8
                answers, probe_s = [], []

                async def user():
                    while time.monotonic() < stop:
                        t0 = time.monotonic()
                        r = await clients.post("/predict", content=x.tobytes(),
                                               headers={"content-type": "application/octet-stream"})
                        answers.append((r.status_code, time.monotonic() - t0))

                async def prober():
                    await asyncio.sleep(0.2)
                    while time.monotonic() < stop:
                        for path in ("/livez", "/readyz"):
                            t0 = time.monotonic()
                            r = await probes.get(path, headers={"connection": "close"})
                            probe_s.append((path, r.status_code, time.monotonic() - t0))
                        await asyncio.sleep(0.05)

                await asyncio.gather(prober(), *(user() for _ in range(8)))
                return split, answers, probe_s

        split, answers, probe_s = asyncio.run(burst_and_probe())
        meta = httpx.get(server.url + "/metadata").json()
    assert split == [4, 4], f"8 keep-alive connections split {split} over the 2 workers"
    assert answers and {status for status, _ in answers} == {200}
    assert all(status == 200 for _, status, _ in probe_s) and len(probe_s) >= 4
    # Probes do not queue behind the model: none near a second (the 448-px ResNet-50 left 8 of
    # 21 unanswered within 1 s), and typically faster than a model request, whose call waits its turn.
    # (Not a latency bound in ms: the machine may be shared; tests/test_service_units.py shows the
    # loop keeps running while a call is in the inference thread.)
    probe_ms = sorted(1000 * s for _, _, s in probe_s)
    request_ms = sorted(1000 * t for _, t in answers)
    assert probe_ms[-1] < 1000, f"a probe took {probe_ms[-1]:.0f} ms"
    assert np.median(probe_ms) < np.median(request_ms), (np.median(probe_ms), np.median(request_ms))
    batching = meta["runtime"]["batching"]
    assert batching["calls_in_thread"] == batching["onnx_calls"] > 0


@pytest.mark.parametrize("env, words", [
    ({"LATENCY_BUDGET_MS": "0.5"}, "LATENCY_BUDGET_MS=0.5 is below one call of the model"),
    ({"SERVICE_WORKERS": "64"}, "SERVICE_WORKERS=64 x ORT_INTRA_OP_THREADS=1 = 64 onnxruntime threads on"),
])
def test_settings_that_cannot_work_are_refused_in_one_line(tmp_path, env, words):
    import subprocess
    import sys

    from tests.service_helpers import REPO, build_slow_model

    model = build_slow_model(tmp_path / "slow", layers=1)
    done = subprocess.run([sys.executable, "-m", "bentoml", "serve", "service.service:Classifier", "--port", "1"],
                          cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "MODEL_PATH": str(model), "MODEL_TAG": "", **env})
    lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
    assert done.returncode != 0 and words in lines[-1], done.stderr[-2000:]
    assert "Traceback" not in done.stderr
