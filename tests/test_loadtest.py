"""The load-test harness, run for real: locust headless against served models on 127.0.0.1.

Each locust run lasts a few seconds with a few users (the whole module stays well under a minute).
The runs prove the checks can fail too: a server that answers with the wrong label must fail the
run, a 4xx must not, a p99 over the limit must.
"""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from loadtest import servers
from loadtest.bench_serve import goals_report, markdown_table, parse_args as bench_args
from loadtest.checks import CLIENT_ERROR_TAG, LoadTargetError, judge, parse_duration, require_local_host
from loadtest.data import BATCH_SIZE, DataError, build_workload, load_test_set
from loadtest.harness import LocustRun, run_locust
from loadtest.soak import capacity_from_bench, rss_growth

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = os.environ.get("DATA_DIR", "/usr/share/datasets/fashion-mnist")
LABELS = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
SCENARIO_NAMES = {"/predict [1 image]", "/predict [64 images]", "/predict [64 images, raw f32]", "/classify [png]",
                  "/v2 infer [1 image]"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def model_path(model_dir) -> str:
    """The really exported model (tests/conftest.py: seeded seed-cnn, folded, via `python -m export`)."""
    return str(Path(model_dir) / "model.onnx")


# --- pure rules ------------------------------------------------------------------------------------
def test_only_localhost_is_loaded():
    assert require_local_host("http://127.0.0.1:3000") == "http://127.0.0.1:3000"
    assert require_local_host("http://localhost:3000")
    assert require_local_host("http://[::1]:3000")
    for bad in ("http://10.1.2.3:3000", "http://8.8.8.8", "ftp://127.0.0.1", "127.0.0.1:3000", ""):
        with pytest.raises(LoadTargetError):
            require_local_host(bad)
    with pytest.raises(LoadTargetError):
        LocustRun("http://192.168.1.10:3000", users=2, run_time="2s", csv_prefix=Path("x")).argv()
    with pytest.raises(LoadTargetError):  # users and time are bounded too
        LocustRun("http://127.0.0.1:3000", users=100_000, run_time="2s", csv_prefix=Path("x")).argv()


def test_parse_duration():
    assert parse_duration("90") == 90
    assert parse_duration("30s") == 30
    assert parse_duration("10m") == 600
    assert parse_duration("1h30m") == 5400
    for bad in ("", "ten", "5x", "3m5"):
        with pytest.raises(ValueError):
            parse_duration(bad)


def test_judge_tolerates_4xx_only():
    ok = judge(100, [(f"{CLIENT_ERROR_TAG} HTTP 413: too big", 3)], p99_ms=20, p99_limit_ms=50)
    assert ok.ok and ok.client_errors == 3 and ok.server_failures == 0
    bad = judge(100, [("HTTP 500: boom", 1), (f"{CLIENT_ERROR_TAG} HTTP 400: x", 2)], p99_ms=20, p99_limit_ms=None)
    assert not bad.ok and bad.server_failures == 1 and "non-4xx" in bad.reasons[0]
    slow = judge(100, [], p99_ms=80, p99_limit_ms=50)
    assert not slow.ok and "p99" in slow.reasons[0]
    assert not judge(0, [], p99_ms=float("nan"), p99_limit_ms=None).ok


def test_rss_growth_and_capacity(tmp_path):
    t = [float(i) for i in range(60)]
    flat = [100.0] * 60
    assert rss_growth(t, flat, 10, 59)[2] == pytest.approx(0.0)
    leaking = [100.0 + 0.5 * i for i in range(60)]  # +0.5 MiB/s
    base, final, growth = rss_growth(t, leaking, 10, 59)
    assert growth == pytest.approx(final / base - 1) and growth > 0.05
    with pytest.raises(ValueError):
        rss_growth(t, flat, 100, 120)
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"rows": [
        {"setup": "naive-fastapi", "kind": "sweep", "users": 32, "rps": 500.0, "failures": 0},
        {"setup": "service", "kind": "sweep", "users": 8, "rps": 700.0, "failures": 0},
        {"setup": "service", "kind": "sweep", "users": 32, "rps": 900.0, "failures": 0}]}))
    assert capacity_from_bench(results) == 900.0
    assert capacity_from_bench(tmp_path / "missing.json") is None


def test_soak_arguments():
    from loadtest.soak import parse_args as soak_args

    args = soak_args(["--time", "1m"])
    assert args.seconds == 60 and args.warmup_s == 90 and args.fraction == 0.8
    for bad in (["--time", "5s"], ["--time", "10m", "--fraction", "1.5"], ["--time", "soon"]):
        with pytest.raises(SystemExit):
            soak_args(bad)


# --- the workload ------------------------------------------------------------------------------------
def test_workload_is_real_test_images_with_correct_answers(model_path):
    import onnxruntime as ort
    from PIL import Image
    import io

    work = build_workload(DATA_DIR, model_path, n_samples=64, n_batches=2)
    images_u8, labels = load_test_set(DATA_DIR, limit=2000)
    session = ort.InferenceSession(model_path, providers=["CPUExecutionProvider"])
    for sample in work.single[:16]:
        pixels = np.asarray(json.loads(sample.body)["images"], np.float32)
        assert pixels.shape == (1, 28, 28) and 0 <= pixels.min() and pixels.max() <= 1
        # The expected label is the true label of that very test image, and the model agrees.
        match = np.flatnonzero(np.abs(images_u8 / 255.0 - pixels[0]).max(axis=(1, 2)) < 1e-3)
        assert len(match) >= 1 and labels[match[0]] == sample.expected[0]
        logits = session.run(None, {"image": pixels[:, None]})[0]
        assert int(logits.argmax()) == sample.expected[0]
    for sample, raw in zip(work.batch, work.batch_raw):
        pixels = np.asarray(json.loads(sample.body)["images"], np.float32)
        assert pixels.shape == (BATCH_SIZE, 28, 28) and len(sample.expected) == BATCH_SIZE
        logits = session.run(None, {"image": pixels[:, None]})[0]
        assert logits.argmax(axis=1).tolist() == sample.expected
        # The raw float32 body carries exactly the same pixels and answers.
        assert raw.expected == sample.expected and raw.content_type == "application/octet-stream"
        np.testing.assert_array_equal(np.frombuffer(raw.body, "<f4").reshape(BATCH_SIZE, 28, 28), pixels)
    body = work.oip[0].body
    req = json.loads(body)["inputs"][0]
    assert req["shape"] == [1, 1, 28, 28] and len(req["data"]) == 784 and req["datatype"] == "FP32"
    png = work.png[0].body
    start = png.index(b"\x89PNG")
    decoded = np.asarray(Image.open(io.BytesIO(png[start:])))
    assert decoded.shape == (28, 28) and decoded.dtype == np.uint8


def test_untrained_model_is_refused(tmp_path):
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("Flatten", ["image"], ["flat"], axis=1),
         helper.make_node("Gemm", ["flat", "w", "b"], ["logits"], transB=1)],
        "constant",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 1, 28, 28])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        initializer=[numpy_helper.from_array(np.zeros((10, 784), np.float32), "w"),
                     numpy_helper.from_array(np.arange(10, dtype=np.float32), "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    entry = model.metadata_props.add()
    entry.key, entry.value = "labels", json.dumps(LABELS)
    path = tmp_path / "model.onnx"
    path.write_bytes(model.SerializeToString())
    with pytest.raises(DataError, match="confidently and correctly"):
        build_workload(DATA_DIR, path)  # always answers "Ankle boot": ~10% right, not a usable answer key


# --- locust for real ---------------------------------------------------------------------------------
def _stats(prefix: Path) -> dict[str, dict[str, str]]:
    with open(f"{prefix}_stats.csv", newline="") as f:
        return {row["Name"]: row for row in csv.DictReader(f)}


@pytest.mark.timeout(120)
def test_make_loadtest_runner_full_mix_against_the_service(model_path, tmp_path):
    """``python -m loadtest.run`` starts our service, runs every scenario in master/worker mode
    (``--processes 2``), gets 0 failures with every label checked, and stops the service."""
    port = _free_port()
    out = tmp_path / "loadtest"
    cmd = [sys.executable, "-m", "loadtest.run", "--port", str(port), "--users", "4", "--run-time", "5s",
           "--processes", "2", "--p99-ms", "5000", "--model", model_path, "--data-dir", DATA_DIR, "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=110)
    tail = (proc.stdout + proc.stderr)[-4000:]
    assert proc.returncode == 0, tail
    stats = _stats(out / "loadtest")
    assert SCENARIO_NAMES <= set(stats), tail
    for name in SCENARIO_NAMES:
        assert int(stats[name]["Request Count"]) > 0, name
        assert int(stats[name]["Failure Count"]) == 0, (name, tail)
    assert int(stats["Aggregated"]["Request Count"]) >= 40
    verdict = json.loads((out / "loadtest_verdict.json").read_text())
    assert verdict["ok"] and verdict["server_failures"] == 0 and verdict["client_errors"] == 0
    assert (out / "report.html").stat().st_size > 10_000
    assert "worker" in tail.lower()  # master/worker mode really ran
    assert not servers.probe(f"http://127.0.0.1:{port}/readyz")  # what it started, it stopped
    assert not servers.port_in_use(port)


@pytest.mark.timeout(90)
def test_wrong_labels_and_slow_p99_fail_the_run(model_path, tmp_path):
    """The do-nothing server always answers class 0: with label checks on, that must fail.

    It is told to take 30 ms per answer, so a 10 ms p99 limit must fail too. (Without the delay it
    answers in well under a millisecond, which locust rounds to a p99 of 0 ms: no limit can trip.)
    """
    spec = servers.do_nothing_spec(_free_port(), delay_ms=30)
    with servers.ManagedServer(spec, tmp_path / "server.log"):
        result = run_locust(LocustRun(spec.url, users=2, run_time="3s", csv_prefix=tmp_path / "wrong",
                                      tags=["single"], model=model_path, data_dir=DATA_DIR, p99_ms=10))
    assert result.returncode == 1, result.log[-3000:]
    verdict = result.verdict
    assert not verdict["ok"] and verdict["server_failures"] > 0
    assert any("non-4xx" in r for r in verdict["reasons"]) and any("p99" in r for r in verdict["reasons"])
    assert any("wrong label" in text for text, _ in verdict["errors"])
    assert verdict["p99_ms"] >= 30
    # Test images of class 0 are answered right even by this server; every other one is a failure.
    total = result.total
    assert 0 < total["Failure Count"] < total["Request Count"]


@pytest.mark.timeout(90)
def test_4xx_answers_do_not_fail_the_run(model_path, tmp_path):
    """The naive FastAPI baseline has no /classify: its 404s are counted but tolerated."""
    spec = servers.naive_fastapi_spec(model_path, _free_port())
    with servers.ManagedServer(spec, tmp_path / "server.log"):
        result = run_locust(LocustRun(spec.url, users=2, run_time="3s", csv_prefix=tmp_path / "png",
                                      tags=["single", "png"], model=model_path, data_dir=DATA_DIR))
    assert result.returncode == 0, result.log[-3000:]
    verdict = result.verdict
    assert verdict["ok"] and verdict["client_errors"] > 0 and verdict["server_failures"] == 0
    assert all(CLIENT_ERROR_TAG in text and "404" in text for text, _ in verdict["errors"])
    assert result.rows["/predict [1 image]"]["Failure Count"] == 0
    assert result.rows["/predict [1 image]"]["Request Count"] > 0


def test_bench_report_table_and_goals():
    args = bench_args(["--setups", "service,naive-fastapi,naive-bentoml,do-nothing"])
    row = dict(kind="sweep", users=32, offered_rps=0.0, failures=0.0, p50=10.0, p95=20.0, p99=30.0,
               server_cpu_pct=150.0, cpu_ms_per_req=1.0)
    rows = [dict(row, setup="service", rps=900.0, img_s=900.0),
            dict(row, setup="naive-fastapi", rps=600.0, img_s=600.0),
            dict(row, setup="naive-bentoml", rps=500.0, img_s=500.0),
            dict(row, setup="do-nothing", rps=2000.0, img_s=2000.0),
            dict(row, setup="service", kind="fixed", offered_rps=240.0, rps=239.0, p99=35.0),
            dict(row, setup="service", kind="batch64", users=8, rps=100.0, img_s=6400.0)]
    table = markdown_table(rows, args)
    assert "| service | 900 | 10 / 20 / 30 | 0 | 150 | 1.00 | 35 (239) | 6,400 | – |" in table
    goals = "\n".join(goals_report(rows))
    assert "vs naive FastAPI: 1.50x (goal ≥1.2x) — met" in goals
    assert "vs naive BentoML: 1.80x (goal ≥2.0x) — SHORT" in goals
    assert "vs do-nothing ceiling: 0.45x (goal ≥0.7x) — SHORT" in goals
    assert "p99 at offered 240 req/s: 35 ms" in goals and "batch-64 (JSON): 6,400 img/s" in goals


@pytest.mark.timeout(90)
def test_bench_serve_end_to_end_tables_and_plots_match_csvs(model_path, tmp_path):
    """A miniature ``make bench-serve``: results.csv, results.md and the plots come from the
    very locust CSVs each step wrote."""
    from loadtest.bench_serve import main as bench_main

    out = tmp_path / "bench"
    rc = bench_main(["--setups", "do-nothing", "--users", "4", "--fixed-rps", "60", "--step-time", "2s",
                     "--warmup", "0", "--base-port", str(_free_port()), "--model", model_path,
                     "--data-dir", DATA_DIR, "--out", str(out)])
    assert rc == 0
    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["setup"], r["kind"], r["users"], r["offered_rps"]) for r in rows] == [
        ("do-nothing", "sweep", "4", "0.0"), ("do-nothing", "fixed", "32", "60.0")]
    for row in rows:
        locust_total = _stats(Path(row["csv"][: -len("_stats.csv")]))["Aggregated"]
        assert float(row["rps"]) == pytest.approx(float(locust_total["Requests/s"]))
        assert float(row["p99"]) == float(locust_total["99%"]) and float(row["failures"]) == 0
        assert float(row["requests"]) == float(locust_total["Request Count"]) > 0
        assert float(row["server_cpu_pct"]) > 0
    assert float(rows[1]["rps"]) < 90  # a fixed offered load of 60 req/s is not a closed loop
    md = (out / "results.md").read_text()
    assert f"| do-nothing | {float(rows[0]['rps']):,.0f} |" in md
    assert f"{float(rows[1]['p99']):,.0f} ({float(rows[1]['rps']):,.0f})" in md
    for png in ("throughput_vs_users.png", "latency_vs_users.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_inprocess_setup(model_path):
    from loadtest.inprocess import bench_inprocess

    rows = {r["kind"]: r for r in bench_inprocess(model_path, DATA_DIR, seconds=0.3)}
    assert rows["sweep"]["img_s"] == rows["sweep"]["rps"] > 0
    assert rows["batch64"]["img_s"] == pytest.approx(64 * rows["batch64"]["rps"])
    assert 0 < rows["sweep"]["p50"] <= rows["sweep"]["p99"]
