"""``make soak``: hold ~80% of measured capacity for a long time; watch errors and memory.

Starts our service on its own port, offers ``--fraction`` of its capacity (closed-loop req/s at
32 users, read from ``make bench-serve``'s results or measured here for 10 s) as a fixed load
(``constant_throughput``) for ``--warmup`` and then ``--time`` more, and samples the server's RSS
(all its processes) every second. Fails (exit 1) on any non-4xx error, during warm-up included, or
when RSS grows more than ``--max-rss-growth`` from the end of warm-up to the end of the run.

The warm-up comes on top of ``--time`` because a server's RSS legitimately climbs to a plateau
under its first ~100k requests (allocator arenas, caches; our service: ~110 MiB in ~60 s at
~1.6k req/s, flat afterwards), and a short soak that counted that climb would cry leak. Writes ``soak.json``, ``soak.png`` (RSS and latency over
time) and locust's CSVs under ``--out``.

    python -m loadtest.soak --time 10m
    python -m loadtest.soak --time 1m --capacity 600
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

from loadtest import servers
from loadtest.bench_serve import SATURATION_USERS, cpu_lock, write_atomic
from loadtest.checks import LoadTargetError, parse_duration
from loadtest.data import DEFAULT_DATA_DIR
from loadtest.harness import LocustRun, run_locust, summarize
from loadtest.plots import plot_soak

# RSS is compared as medians over this many seconds, so one sample taken mid-allocation cannot
# decide the verdict.
RSS_WINDOW_S = 5.0


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m loadtest.soak", description=__doc__.splitlines()[0])
    ap.add_argument("--time", default="10m", help="how long to hold the load, e.g. 10m, 1m")
    ap.add_argument("--fraction", type=float, default=0.8, help="fraction of capacity to offer")
    ap.add_argument("--capacity", type=float, default=0.0, help="req/s; 0 = from --bench-results, else measured")
    ap.add_argument("--bench-results", type=Path, default=Path("artifacts/bench_serve/results.json"))
    ap.add_argument("--users", type=int, default=SATURATION_USERS)
    ap.add_argument("--warmup", default="90s", help="load before --time starts, excluded from the RSS check")
    ap.add_argument("--max-rss-growth", type=float, default=0.05)
    ap.add_argument("--tags", nargs="*", default=["single"], help="scenarios (default single-image /predict)")
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--port", type=int, default=3190)
    ap.add_argument("--model", default="artifacts/model.onnx")
    ap.add_argument("--data-dir", default=os.environ.get("DATA_DIR", DEFAULT_DATA_DIR))
    ap.add_argument("--lock", default="", help="flock this file while measuring")
    ap.add_argument("--out", type=Path, default=Path("artifacts/soak"))
    args = ap.parse_args(argv)
    try:
        args.seconds = parse_duration(args.time)
        args.warmup_s = parse_duration(args.warmup)
    except ValueError as e:
        ap.error(str(e))
    if not 2 * RSS_WINDOW_S <= args.seconds <= 2 * 3600:
        ap.error(f"--time must be between {2 * RSS_WINDOW_S:.0f}s and 2h")
    if not 0 <= args.warmup_s <= 3600:
        ap.error("--warmup must be between 0 and 1h")
    if not 0 < args.fraction <= 1:
        ap.error("--fraction must be in (0, 1]")
    return args


def capacity_from_bench(path: Path) -> float | None:
    """Our service's closed-loop req/s at 32 users from a ``make bench-serve`` results.json."""
    try:
        rows = json.loads(path.read_text())["rows"]
    except (OSError, ValueError, KeyError):
        return None
    for row in rows:
        if row.get("setup") == "service" and row.get("kind") == "sweep" and row.get("users") == SATURATION_USERS:
            rps = float(row.get("rps", 0))
            return rps if rps > 0 and row.get("failures", 1) == 0 else None
    return None


def rss_growth(times: list[float], rss: list[float], warmup_end: float, end: float) -> tuple[float, float, float]:
    """(baseline, final, growth): median RSS just after warm-up vs over the last seconds."""
    base = [r for t, r in zip(times, rss) if warmup_end <= t <= warmup_end + RSS_WINDOW_S]
    last = [r for t, r in zip(times, rss) if end - RSS_WINDOW_S <= t <= end]
    if not base or not last:
        raise ValueError("not enough RSS samples around the warm-up end and the run end")
    b, f = statistics.median(base), statistics.median(last)
    return b, f, f / b - 1.0


def latency_series(history_csv: Path, t0_wall: float):
    """(seconds, p50, p99, req/s) of the Aggregated rows of locust's stats history."""
    import csv

    t, p50, p99, rps = [], [], [], []
    if not history_csv.exists():
        return t, p50, p99, rps
    with open(history_csv, newline="") as f:
        for row in csv.DictReader(f):
            if row["Name"] != "Aggregated" or row["50%"] in ("N/A", ""):
                continue
            t.append(float(row["Timestamp"]) - t0_wall)
            p50.append(float(row["50%"]))
            p99.append(float(row["99%"]))
            rps.append(float(row["Requests/s"]))
    return t, p50, p99, rps


def main(argv=None) -> int:
    args = parse_args(argv)
    if not Path(args.model).is_file():
        print(f"error: model not found: {args.model} (run `make export` first)", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    spec = servers.service_spec(args.model, args.port)
    try:
        with cpu_lock(args.lock), servers.ManagedServer(spec, args.out / "server.log") as server:
            capacity, source = args.capacity, "--capacity"
            if capacity <= 0:
                capacity, source = capacity_from_bench(args.bench_results) or 0.0, str(args.bench_results)
            if capacity <= 0:
                probe_run = LocustRun(spec.url, users=SATURATION_USERS, run_time="10s",
                                      csv_prefix=args.out / "capacity", tags=list(args.tags),
                                      processes=args.processes, model=args.model, data_dir=args.data_dir)
                capacity, source = summarize(run_locust(probe_run))["rps"], "measured: 10 s closed loop, 32 users"
            if not capacity or math.isnan(capacity) or capacity <= 0:
                print("error: could not establish the service's capacity", file=sys.stderr)
                return 2
            offered = args.fraction * capacity
            print(f"capacity {capacity:.0f} req/s ({source}); offering {offered:.0f} req/s with {args.users} "
                  f"users for {args.warmup_s:.0f} s warm-up + {args.time}", file=sys.stderr)
            run_time = f"{args.warmup_s + args.seconds:.0f}s"
            run = LocustRun(spec.url, users=args.users, run_time=run_time, csv_prefix=args.out / "soak",
                            tags=list(args.tags), processes=args.processes, model=args.model,
                            data_dir=args.data_dir, user_rps=offered / args.users, reset_stats=False,
                            full_history=True, html=args.out / "report.html")
            with servers.TreeSampler(server.pid, interval=1.0) as meter:
                mono0, wall0 = time.monotonic(), time.time()
                result = run_locust(run, echo=False)
    except (servers.ServerError, LoadTargetError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    # Time axis: seconds since all users were spawned (the load's start).
    start = result.measured_from
    seconds = [t - start for t in meter.times]
    rss_mib = [r / 2**20 for r in meter.rss]
    end = result.measured_to - start
    verdict = result.verdict or {"ok": False, "reasons": ["locust produced no verdict"], "server_failures": -1}
    reasons = list(verdict.get("reasons", []))
    try:
        base, final, growth = rss_growth(seconds, rss_mib, args.warmup_s, end)
        if growth > args.max_rss_growth:
            reasons.append(f"RSS grew {growth:.1%} after warm-up (limit {args.max_rss_growth:.0%})")
    except ValueError as e:
        base = final = growth = math.nan
        reasons.append(str(e))
    lat_t, p50, p99, rps = latency_series(Path(f"{run.csv_prefix}_stats_history.csv"), wall0 + (start - mono0))
    total = summarize(result)
    report = {
        "ok": not reasons, "reasons": reasons, "time": args.time, "capacity_rps": capacity,
        "capacity_source": source, "offered_rps": offered, "achieved_rps": total["rps"],
        "requests": total["requests"], "failures": total["failures"],
        "server_failures": verdict.get("server_failures"), "client_errors": verdict.get("client_errors"),
        "p50_ms": total["p50"], "p99_ms": total["p99"], "warmup_s": args.warmup_s,
        "rss_baseline_mib": base, "rss_final_mib": final, "rss_growth": growth,
        "rss_series": {"seconds": seconds, "mib": rss_mib},
        "latency_series": {"seconds": lat_t, "p50": p50, "p99": p99, "rps": rps},
    }
    write_atomic(args.out / "soak.json", json.dumps(report, indent=2))
    plot_soak(seconds, rss_mib, lat_t, p50, p99, rps, args.warmup_s, args.out / "soak.png",
              f"soak: {offered:.0f} req/s offered ({args.fraction:.0%} of {capacity:.0f}), "
              f"{args.warmup_s:.0f} s warm-up + {args.time}")
    status = "PASS" if not reasons else "FAIL: " + "; ".join(reasons)
    print(f"{status} | {int(total['requests'])} requests at {total['rps']:.0f} req/s, "
          f"{verdict.get('server_failures')} non-4xx failures, p99 {total['p99']:.0f} ms, "
          f"RSS {base:.0f} -> {final:.0f} MiB ({growth:+.1%}) | {args.out}/soak.json, soak.png")
    return 0 if not reasons else 1


if __name__ == "__main__":
    sys.exit(main())
