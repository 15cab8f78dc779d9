"""``make loadtest``: run the locust scenarios against the service and fail on a broken threshold.

Uses the service already answering on ``--port`` when there is one; otherwise starts
``bentoml serve service.service:FashionMNISTClassifier`` there and stops it afterwards. Writes
locust's CSVs, the HTML report and a verdict JSON under ``--out``; exits 1 when a threshold fails
(any non-4xx failure, p99 over ``--p99-ms``), 2 when the run could not happen at all.

    python -m loadtest.run --users 16 --run-time 30s --processes 2 --p99-ms 500
    python -m loadtest.run --tags single oip --target-rps 240     # selected scenarios, fixed load
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

from loadtest.checks import LoadTargetError, check_bounds, parse_duration
from loadtest.harness import LocustRun, run_locust
from loadtest.servers import ManagedServer, ServerError, probe, service_spec

SCENARIOS = ("single", "batch64", "batch64raw", "png", "oip")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m loadtest.run", description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, default=3000, help="service port on 127.0.0.1")
    ap.add_argument("--users", type=int, default=16)
    ap.add_argument("--spawn-rate", type=float, default=None, help="users started per second (default: all at once)")
    ap.add_argument("--run-time", default="30s", help="e.g. 30s, 5m")
    ap.add_argument("--processes", type=int, default=2,
                    help="locust processes (master + N workers when > 1); one gevent process saturates a core")
    ap.add_argument("--tags", nargs="*", default=[], choices=SCENARIOS, help="scenarios to run (default: weighted mix)")
    ap.add_argument("--p99-ms", type=float, default=1000.0, help="fail when p99 over all requests exceeds this; 0 = off")
    ap.add_argument("--target-rps", type=float, default=0.0,
                    help="offer this many req/s in total (constant_throughput); 0 = closed loop")
    ap.add_argument("--model", default="artifacts/model.onnx", help="model served (answer key for label checks)")
    ap.add_argument("--data-dir", default=None, help="Fashion-MNIST folder (default: locustfile's)")
    ap.add_argument("--out", type=Path, default=Path("artifacts/loadtest"))
    ap.add_argument("--ready-timeout", type=float, default=180.0)
    args = ap.parse_args(argv)
    if args.spawn_rate is not None and args.spawn_rate <= 0:
        ap.error("--spawn-rate must be > 0")
    if args.processes < 1 or args.processes > 16:
        ap.error("--processes must be 1..16")
    try:
        check_bounds(args.users, parse_duration(args.run_time))
    except (ValueError, LoadTargetError) as e:
        ap.error(str(e))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not Path(args.model).is_file():
        print(f"error: model not found: {args.model} (run `make export` first)", file=sys.stderr)
        return 2
    spec = service_spec(args.model, args.port)
    args.out.mkdir(parents=True, exist_ok=True)
    already_up = probe(spec.url + spec.ready_path)
    try:
        with contextlib.ExitStack() as stack:
            if already_up:
                print(f"using the service already running at {spec.url}", file=sys.stderr)
            else:
                print(f"starting the service on {spec.url} (log: {args.out / 'server.log'})", file=sys.stderr)
                stack.enter_context(ManagedServer(spec, args.out / "server.log", args.ready_timeout))
            run = LocustRun(
                host=spec.url, users=args.users, spawn_rate=args.spawn_rate, run_time=args.run_time,
                csv_prefix=args.out / "loadtest", tags=list(args.tags), processes=args.processes,
                user_rps=args.target_rps / args.users if args.target_rps > 0 else 0.0, p99_ms=args.p99_ms,
                model=args.model, data_dir=args.data_dir, html=args.out / "report.html", reset_stats=False,
                full_history=True,
            )
            result = run_locust(run, echo=True)
    except (ServerError, LoadTargetError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    verdict = result.verdict
    if not verdict:
        print(f"error: locust ended (code {result.returncode}) without a verdict; see output above", file=sys.stderr)
        return 2
    status = "PASS" if verdict["ok"] else "FAIL: " + "; ".join(verdict["reasons"])
    total = result.total
    print(f"{status} | {int(total.get('Request Count', 0))} requests, {total.get('Requests/s', 0):.0f} req/s, "
          f"p50 {total.get('50%', 0):.0f} ms, p99 {total.get('99%', 0):.0f} ms, "
          f"{verdict['server_failures']} non-4xx failures, {verdict['client_errors']} 4xx | "
          f"CSV + HTML in {args.out}/", file=sys.stderr)
    return result.returncode if result.returncode in (0, 1) else 2


if __name__ == "__main__":
    sys.exit(main())
