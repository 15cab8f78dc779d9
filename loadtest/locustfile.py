"""Locust scenarios for the Fashion-MNIST service, one task per endpoint, every answer checked.

Scenarios (select with locust's ``--tags``; no tags = the weighted default mix):

==========  ======  ===========================================================================
tag         weight  request
==========  ======  ===========================================================================
single      8       ``POST /predict`` JSON, one image
batch64     1       ``POST /predict`` JSON, 64 images
batch64raw  1       ``POST /predict`` 64 images as raw little-endian float32 (octet-stream)
png         2       ``POST /classify`` multipart PNG upload
oip         2       ``POST /v2/models/fashion-mnist/infer`` (Open Inference Protocol v2)
==========  ======  ===========================================================================

Each response is checked for status, shape and, since every sample is a real test image the
reference model classifies confidently and correctly (see ``loadtest.data``), the expected label.
Closed loop by default (no think time); ``--user-rps R`` paces each user with
``constant_throughput(R)`` to offer a fixed load of ``R * users`` req/s.

On quitting, the master (or the single process) judges the run: any failure other than a 4xx, or
p99 over ``--p99-ms``, sets a non-zero exit code.

Run it directly (``python -m loadtest.run`` wraps this and starts the service when needed)::

    locust -f loadtest/locustfile.py --headless -H http://127.0.0.1:3000 -u 16 -r 16 -t 30s \\
        --processes 2 --tags single
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import logging
import os
import random
import sys
from pathlib import Path

import gevent
from locust import FastHttpUser, constant, constant_throughput, events, tag, task
from locust.exception import StopUser
from locust.runners import MasterRunner, WorkerRunner
from locust.stats import PERCENTILES_TO_REPORT, StatsCSV

# locust puts this file's folder on sys.path, not the repository root that holds the package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from loadtest.checks import CLIENT_ERROR_TAG, LoadTargetError, judge, require_local_host  # noqa: E402
from loadtest.data import DEFAULT_DATA_DIR, DataError, Workload, build_workload  # noqa: E402

log = logging.getLogger("loadtest")
OIP_MODEL = "fashion-mnist"
WORKLOAD: Workload | None = None


@events.init_command_line_parser.add_listener
def _add_arguments(parser):
    group = parser.add_argument_group("Fashion-MNIST load test")
    group.add_argument("--model", default=os.environ.get("MODEL_PATH", "artifacts/model.onnx"),
                       help="ONNX model the server serves; the answer key for label checks")
    group.add_argument("--data-dir", default=os.environ.get("DATA_DIR", DEFAULT_DATA_DIR),
                       help="folder with the Fashion-MNIST IDX files")
    group.add_argument("--user-rps", type=float, default=0.0,
                       help="requests/s per user (constant_throughput); 0 = closed loop")
    group.add_argument("--p99-ms", type=float, default=0.0, help="fail the run when p99 exceeds this; 0 = off")
    group.add_argument("--no-label-check", action="store_true",
                       help="check status and shape only (the do-nothing ceiling cannot classify)")
    group.add_argument("--max-requests-per-user", type=int, default=200_000,
                       help="a user stops after this many requests (bounds the load)")
    group.add_argument("--verdict-file", default="", help="write the pass/fail verdict here as JSON")


@events.init.add_listener
def _build_workload(environment, **_kwargs):
    global WORKLOAD
    opts = environment.parsed_options
    if opts is None or isinstance(environment.runner, MasterRunner):
        return  # the master only aggregates; workers generate the load
    try:
        model = None if opts.no_label_check else opts.model
        WORKLOAD = build_workload(opts.data_dir, model)
    except DataError as e:
        log.error("cannot build the load: %s", e)
        environment.process_exit_code = 2
        if environment.runner is not None:
            environment.runner.quit()


@events.test_start.add_listener
def _refuse_remote(environment, **_kwargs):
    if isinstance(environment.runner, WorkerRunner):
        return
    try:
        require_local_host(environment.host or "")
    except LoadTargetError as e:
        log.error("%s", e)
        environment.process_exit_code = 2
        environment.runner.quit()


@events.quitting.add_listener
def _judge(environment, **_kwargs):
    if isinstance(environment.runner, WorkerRunner) or environment.process_exit_code == 2:
        return
    opts = environment.parsed_options
    total = environment.stats.total
    errors = [(str(e.error), e.occurrences) for e in environment.stats.errors.values()]
    limit = opts.p99_ms if opts and opts.p99_ms > 0 else None
    p99 = float(total.get_response_time_percentile(0.99)) if total.num_requests else float("nan")
    verdict = judge(total.num_requests, errors, p99, limit)
    for text, n in errors:
        log.warning("failure x%d: %s", n, text)
    if verdict.ok:
        log.info("PASS: %d requests, %d 4xx, p99 %.0f ms", verdict.requests, verdict.client_errors, p99)
    else:
        log.error("FAIL: %s", "; ".join(verdict.reasons))
    # Set explicitly: locust would otherwise exit 1 on any failure, 4xx included.
    environment.process_exit_code = 0 if verdict.ok else 1
    if opts and opts.csv_prefix:
        _write_final_csv(environment, opts.csv_prefix)
    if opts and opts.verdict_file:
        _write_atomic(Path(opts.verdict_file), json.dumps({**verdict.__dict__, "errors": errors}, indent=2))


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _write_final_csv(environment, prefix: str) -> None:
    """Rewrite ``<prefix>_stats.csv`` / ``_failures.csv`` from the final stats.

    Locust's own CSV writer snapshots once a second, so its last snapshot misses up to a second of
    the run; the stats here are final (workers have reported). Replacing the file atomically leaves
    locust's writer appending to the old, unlinked inode.
    """
    writer = StatsCSV(environment, PERCENTILES_TO_REPORT)
    for suffix, write in (("_stats.csv", writer.requests_csv), ("_failures.csv", writer.failures_csv)):
        buf = io.StringIO()
        write(csv.writer(buf))
        _write_atomic(Path(prefix + suffix), buf.getvalue())


class FashionMNISTUser(FastHttpUser):
    # Connections are kept alive; a closed-loop user sends its next request as soon as one returns.
    connection_timeout = 10.0
    network_timeout = 30.0

    def wait_time(self):
        return self._pace(self)

    def on_start(self):
        if WORKLOAD is None:
            raise StopUser()
        try:
            require_local_host(self.host or "")  # again per user: workers never ran test_start's check
        except LoadTargetError:
            raise StopUser() from None
        opts = self.environment.parsed_options
        self._check_labels = not opts.no_label_check
        self._budget = opts.max_requests_per_user
        if opts.user_rps > 0:
            self._pace = constant_throughput(opts.user_rps)
            # Random phase, so a fixed offered load does not arrive in lock-step waves.
            gevent.sleep(random.random() / opts.user_rps)
        else:
            self._pace = constant(0)  # closed loop: next request as soon as the last one returns
        offset = random.randrange(1 << 16)
        self._single = itertools.islice(itertools.cycle(WORKLOAD.single), offset % len(WORKLOAD.single), None)
        self._batch = itertools.cycle(WORKLOAD.batch)
        self._batch_raw = itertools.cycle(WORKLOAD.batch_raw)
        self._png = itertools.cycle(WORKLOAD.png)
        self._oip = itertools.cycle(WORKLOAD.oip)

    def _spend(self):
        self._budget -= 1
        if self._budget < 0:
            raise StopUser()

    def _post(self, path, name, sample, check):
        self._spend()
        headers = {"Content-Type": sample.content_type}
        with self.client.post(path, data=sample.body, headers=headers, name=name, catch_response=True) as resp:
            status = resp.status_code or 0
            if status >= 400 or status == 0:
                tag_ = CLIENT_ERROR_TAG + " " if 400 <= status < 500 else ""
                detail = (resp.text or "")[:200] if status else repr(resp.error)
                resp.failure(f"{tag_}HTTP {status}: {detail}")
                return
            try:
                problem = check(json.loads(resp.content), sample.expected)
            except (ValueError, KeyError, TypeError, IndexError) as e:
                problem = f"unreadable answer: {type(e).__name__}: {e}"
            if problem:
                resp.failure(problem)

    # --- answer checks: return None when fine, else what is wrong -------------------------------
    def _check_predictions(self, answer, expected):
        preds = answer["predictions"]
        if len(preds) != len(expected):
            return f"{len(preds)} predictions for {len(expected)} images"
        for i, (pred, want) in enumerate(zip(preds, expected)):
            if len(pred["probabilities"]) != 10:
                return f"prediction {i}: {len(pred['probabilities'])} probabilities, expected 10"
            if self._check_labels and (pred["class_id"] != want or pred["label"] != WORKLOAD.labels[want]):
                return f"wrong label at {i}: got {pred['class_id']}/{pred['label']!r}, expected {want}"
        return None

    def _check_single(self, answer, expected):
        if "predictions" in answer:  # /predict
            return self._check_predictions(answer, expected)
        return self._check_predictions({"predictions": [answer]}, expected)  # /classify

    def _check_oip(self, answer, expected):
        out = answer["outputs"][0]
        if answer.get("model_name") != OIP_MODEL:
            return f"model_name {answer.get('model_name')!r}, expected {OIP_MODEL!r}"
        n = len(expected)
        if out["shape"] != [n, 10] or len(out["data"]) != n * 10 or out["datatype"] != "FP32":
            return f"output shape {out['shape']} / {len(out['data'])} values, expected [{n}, 10] FP32"
        if self._check_labels:
            for i, want in enumerate(expected):
                row = out["data"][10 * i : 10 * i + 10]
                got = max(range(10), key=row.__getitem__)
                if got != want:
                    return f"wrong label at {i}: got {got}, expected {want}"
        return None

    # --- scenarios -----------------------------------------------------------------------------
    @tag("single")
    @task(8)
    def predict_single(self):
        self._post("/predict", "/predict [1 image]", next(self._single), self._check_single)

    @tag("batch64")
    @task(1)
    def predict_batch64(self):
        self._post("/predict", "/predict [64 images]", next(self._batch), self._check_predictions)

    @tag("batch64raw")
    @task(1)
    def predict_batch64_raw(self):
        self._post("/predict", "/predict [64 images, raw f32]", next(self._batch_raw), self._check_predictions)

    @tag("png")
    @task(2)
    def classify_png(self):
        self._post("/classify", "/classify [png]", next(self._png), self._check_single)

    @tag("oip")
    @task(2)
    def oip_infer(self):
        self._post(f"/v2/models/{OIP_MODEL}/infer", "/v2 infer [1 image]", next(self._oip), self._check_oip)
