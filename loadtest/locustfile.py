"""Locust scenarios (workload.SCENARIOS, by --tags) for any served contract model, every answer checked; exit 1 on a
non-4xx failure or p99 over --p99-ms, 2 when the load cannot be built (docs/loadtest.md: `python -m loadtest run`
wraps this; plain `locust -f loadtest/locustfile.py ...` from the repository root works too)."""
import itertools
import json
import logging
import random
import sys
from pathlib import Path

import gevent
from locust import FastHttpUser, constant, constant_throughput, events, tag
from locust.exception import StopUser
from locust.runners import MasterRunner, WorkerRunner

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # locust adds only this folder

from common.files import write_json  # noqa: E402
from loadtest.core import CLIENT_ERROR_TAG, LoadTargetError, judge, require_local_host  # noqa: E402
from loadtest.workload import (DEFAULT_DATA_DIR, SCENARIOS, DataError, build, check, describe,  # noqa: E402
                               fetch_metadata, load, uploads)
from service.contract import ModelLoadError  # noqa: E402

log = logging.getLogger("loadtest")
STATE: dict = {}  # this process's target and samples, set on test_start


@events.init_command_line_parser.add_listener
def _options(parser):
    g = parser.add_argument_group("bnfold load test")
    g.add_argument("--model", default="", help="the served ONNX file: label checks against it (default: none)")
    g.add_argument("--workload", default="", help="a load saved by workload.save (default: built from GET /metadata)")
    g.add_argument("--data-dir", default=DEFAULT_DATA_DIR, help="Fashion-MNIST IDX folder (default: %(default)s)")
    g.add_argument("--user-rps", type=float, default=0.0, help="req/s per user; 0 = closed loop (default: 0)")
    g.add_argument("--p99-ms", type=float, default=0.0, help="fail when p99 exceeds this; 0 = off (default: 0)")
    g.add_argument("--max-requests-per-user", type=int, default=200_000, help="bounds the load (default: 200000)")
    g.add_argument("--verdict-file", default="", help="write the verdict and totals here as JSON (default: none)")


def _fail(environment, message: str) -> None:
    log.error("%s", message)
    environment.process_exit_code = 2
    environment.runner.quit()


def _prepare(environment) -> None:
    """Load or build this process's load once: at init (the host is known from -H), or at the first
    test start for a worker started by hand (it learns the host from the master)."""
    opts = environment.parsed_options
    if "work" in STATE or isinstance(environment.runner, MasterRunner) or not environment.host:
        return  # the master only aggregates; workers (or the single process) make the load
    try:
        if opts.workload:
            doc, work = load(opts.workload)
        else:
            doc = fetch_metadata(environment.host)
            work = build(doc, opts.model or None, opts.data_dir)
        STATE.update(target=(target := describe(doc)), work=work)
    except (DataError, ModelLoadError, OSError, KeyError, ValueError, TypeError) as e:
        return _fail(environment, f"cannot build the load: {type(e).__name__}: {e}")
    if not uploads(target):  # /classify takes image uploads only
        ModelUser.tasks = [t for t in ModelUser.tasks if "png" not in t.locust_tag_set]
        if not ModelUser.tasks:
            _fail(environment, f"only the png scenario was asked for and {target.name} is not an image model")


@events.init.add_listener
def _on_init(environment, **_kwargs):
    if environment.parsed_options is not None:
        _prepare(environment)
        gevent.get_hub().loop.update_now()  # else timers set next (--run-time) start the build's time early


@events.test_start.add_listener
def _on_test_start(environment, **_kwargs):
    try:
        require_local_host(environment.host or "")
    except LoadTargetError as e:
        return _fail(environment, str(e))
    _prepare(environment)


@events.quitting.add_listener
def _judge(environment, **_kwargs):
    if isinstance(environment.runner, WorkerRunner) or environment.process_exit_code == 2:
        return
    opts, total = environment.parsed_options, environment.stats.total
    errors = [(str(e.error), e.occurrences) for e in environment.stats.errors.values()]
    pct = {f"p{p}": float(total.get_response_time_percentile(p / 100)) if total.num_requests else float("nan")
           for p in (50, 95, 99)}
    verdict = judge(total.num_requests, errors, pct["p99"], opts.p99_ms if opts.p99_ms > 0 else None)
    for text, n in errors:
        log.warning("failure x%d: %s", n, text)
    log.info("%s: %d requests, %d 4xx, p99 %.0f ms", "PASS" if verdict["ok"] else "FAIL: " + "; ".join(
        verdict["reasons"]), total.num_requests, verdict["client_errors"], pct["p99"])
    environment.process_exit_code = 0 if verdict["ok"] else 1  # locust's own rule would fail on a 4xx
    if opts.verdict_file:
        write_json(opts.verdict_file, {**verdict, **pct, "failures": total.num_failures, "rps": total.total_rps,
                                       "start": total.start_time, "end": total.last_request_timestamp,
                                       "errors": errors})


class ModelUser(FastHttpUser):
    tasks = {tag(s)(lambda user, s=s: user.post(s)): weight for s, (weight, _, _) in SCENARIOS.items()}
    connection_timeout = 10.0  # kept-alive connections; a closed-loop user sends as soon as one returns
    network_timeout = 30.0

    def wait_time(self):
        return self._pace(self)

    def on_start(self):
        opts = self.environment.parsed_options
        if "work" not in STATE:
            raise StopUser()
        self._budget = opts.max_requests_per_user
        self._pace = constant_throughput(opts.user_rps) if opts.user_rps > 0 else constant(0)
        if opts.user_rps > 0:
            gevent.sleep(random.random() / opts.user_rps)  # random phase: no lock-step waves
        offset = random.randrange(1 << 16)
        self._next = {k: itertools.islice(itertools.cycle(v), offset % len(v) if v else 0, None)
                      for k, v in STATE["work"].items()}

    def post(self, scenario: str) -> None:
        self._budget -= 1
        if self._budget < 0:
            raise StopUser()
        _, path, name = SCENARIOS[scenario]
        sample = next(self._next[scenario])
        with self.client.post(path.format(name=STATE["target"].name), data=sample.body, name=name,
                              headers={"Content-Type": sample.content_type}, catch_response=True) as resp:
            status = resp.status_code or 0
            if not 200 <= status < 400:
                detail = (resp.text or "")[:200] if status else repr(resp.error)
                return resp.failure(f"{CLIENT_ERROR_TAG + ' ' if 400 <= status < 500 else ''}HTTP {status}: {detail}")
            try:
                problem = check(STATE["target"], json.loads(resp.content), sample, oip=scenario == "oip")
            except (ValueError, KeyError, TypeError, IndexError) as e:
                problem = f"unreadable answer: {type(e).__name__}: {e}"
            if problem:
                resp.failure(problem)
