"""python -m loadtest {run,bench,soak,examples}: load tests of the served model, a mode each (docs/loadtest.md)."""
import argparse
import csv
import json
import statistics
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import numpy as np

from common.files import sha256_file, write_bytes, write_json
from common.procs import ProcessError, port_open, probe
from loadtest import plots
from loadtest.bench import SETUPS, bench, server_of
from loadtest.core import MAX_USERS, LoadTargetError, TreeSampler, parse_duration, run_locust
from loadtest.workload import (BATCH, DEFAULT_DATA_DIR, SCENARIOS, DataError, describe, fetch_metadata, fashion_mnist,
                               image_bytes, inputs, json_body, metadata_of, npy_body, oip_body, save, uploads)
from service.contract import ModelLoadError

SATURATION_USERS = 32
RSS_WINDOW_S = 5.0  # RSS is compared as medians over this many seconds


def our_service(args):
    return server_of("ours", args.model, args.port, None, args.out / "server.log", {})[0]


def running_service(url: str, model: str | None) -> dict:
    """The /metadata of the server already on `url`, refused unless it is our service serving `model`."""
    try:
        doc = fetch_metadata(url, timeout=5)
        name, sha = doc["model"]["name"], doc["model"]["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        raise LoadTargetError(f"{url} is taken by a server that is not this service (no GET /metadata): stop it "
                              "or use another port (PORT=… with make, --port otherwise)") from None
    if model and sha != sha256_file(model):
        raise LoadTargetError(f"the service on {url} serves {name} (sha256 {sha[:12]}…), not {model}: stop it, give "
                              "its file (MODEL_PATH=… with make, --model otherwise) or use another port (PORT=…)")
    return doc


def run(args) -> int:
    url = f"http://127.0.0.1:{args.port}"
    model = args.model if Path(args.model).is_file() else None
    with ExitStack() as stack:
        if port_open(args.port):
            doc = running_service(url, model)
            print(f"using the service already running at {url}: {doc['model']['name']}, sha256 "
                  f"{doc['model']['sha256'][:12]}…{' = ' + model if model else ''}", file=sys.stderr)
        else:
            print(f"starting the service on {url} (log: {args.out / 'server.log'})", file=sys.stderr)
            stack.enter_context(our_service(args)).wait_ready(180)
        path, work = save(args.out / "workload.json", fetch_metadata(url), model, args.data_dir)
        v = run_locust(url, args.users, args.run_time, args.out / "loadtest", args.tags, args.processes,
                       args.spawn_rate, args.target_rps / args.users, args.p99_ms, path, report=True, progress=True)
    print(outcome(v["reasons"], v) + f" | label checks {'off' if work['single'][0].expected is None else 'on'} | "
          f"CSV + HTML in {args.out}/", file=sys.stderr)
    return 0 if v["ok"] else 1


def outcome(reasons: list[str], v: dict) -> str:
    return ("PASS" if not reasons else "FAIL: " + "; ".join(reasons)) + f" | {v['requests']} requests at " \
        f"{v['rps']:.0f} req/s, p50 {v['p50']:.0f} ms, p99 {v['p99']:.0f} ms, {v['server_failures']} non-4xx " \
        f"failures, {v['client_errors']} 4xx"


def capacity_from_bench(path: Path) -> float | None:
    """Our service's best closed-loop req/s without errors, from a bench results.json (None if unusable)."""
    try:
        rows = [r["rps"] for r in json.loads(path.read_text())["rows"]
                if r["setup"] == "ours" and r["kind"] == "closed" and r["errors"] == r["shed"] == 0]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return max(rows, default=0.0) or None


def rss_growth(times: list[float], rss: list[float], warmup_end: float, end: float) -> tuple[float, float, float]:
    """(baseline, final, growth): median RSS just after warm-up vs over the last seconds."""
    base = [r for t, r in zip(times, rss) if warmup_end <= t <= warmup_end + RSS_WINDOW_S]
    last = [r for t, r in zip(times, rss) if end - RSS_WINDOW_S <= t <= end]
    if not base or not last:
        raise ValueError("not enough RSS samples around the warm-up end and the run end")
    b, f = statistics.median(base), statistics.median(last)
    return b, f, f / b - 1.0


def soak(args, command: str) -> int:
    with our_service(args) as server:
        server.wait_ready(180)
        load = dict(processes=args.processes, tags=args.tags,
                    workload=save(args.out / "workload.json", fetch_metadata(server.url), args.model, args.data_dir)[0])
        capacity, source = args.capacity, "--capacity"
        if capacity <= 0:
            capacity, source = capacity_from_bench(args.bench_results) or 0.0, str(args.bench_results)
        if capacity <= 0:
            capacity = run_locust(server.url, SATURATION_USERS, "10s", args.out / "capacity", **load)["rps"]
            source = f"measured: 10 s closed loop, {SATURATION_USERS} users"
        if not capacity > 0:
            raise ProcessError("could not establish the service's capacity")
        offered = args.fraction * capacity
        print(f"capacity {capacity:.0f} req/s ({source}); offering {offered:.0f} req/s with {args.users} users "
              f"for {args.warmup_s:.0f} s warm-up + {args.time}", file=sys.stderr)
        with TreeSampler(server.pid, interval=1.0) as meter:
            v = run_locust(server.url, args.users, f"{args.warmup_s + args.seconds:.0f}s", args.out / "soak",
                           user_rps=offered / args.users, report=True, progress=True, **load)
    with open(args.out / "soak_stats_history.csv", newline="") as f:  # locust's own per-second history
        hist = [r for r in csv.DictReader(f) if r["Name"] == "Aggregated"]
    start = next((float(r["Timestamp"]) for r in hist if int(r["User Count"]) > 0), v["start"])  # load began
    hist = [r for r in hist if r["50%"] not in ("N/A", "")]
    series = {"seconds": [float(r["Timestamp"]) - start for r in hist], "p50": [float(r["50%"]) for r in hist],
              "p99": [float(r["99%"]) for r in hist], "rps": [float(r["Requests/s"]) for r in hist]}
    seconds, rss_mib = [t - start for t in meter.times], [r / 2**20 for r in meter.rss]
    reasons = list(v["reasons"])
    try:
        base, final, growth = rss_growth(seconds, rss_mib, args.warmup_s, (v["end"] or start) - start)
        if growth > args.max_rss_growth:
            reasons.append(f"RSS grew {growth:.1%} after warm-up (limit {args.max_rss_growth:.0%})")
    except ValueError as e:
        base = final = growth = float("nan")
        reasons.append(str(e))
    write_json(args.out / "soak.json", {
        "command": command, "date": time.strftime("%Y-%m-%d %H:%M:%S"), "ok": not reasons, "reasons": reasons, "time": args.time,
        "capacity_rps": capacity, "capacity_source": source, "offered_rps": offered, "achieved_rps": v["rps"],
        **{k: v[k] for k in ("requests", "failures", "server_failures", "client_errors")}, "p50_ms": v["p50"],
        "p99_ms": v["p99"], "warmup_s": args.warmup_s, "rss_baseline_mib": base, "rss_final_mib": final,
        "rss_growth": growth, "rss_series": {"seconds": seconds, "mib": rss_mib}, "latency_series": series})
    plots.soak(seconds, rss_mib, series, args.warmup_s, args.out / "soak.png",
               f"soak: {offered:.0f} req/s offered ({args.fraction:.0%} of {capacity:.0f}), "
               f"{args.warmup_s:.0f} s warm-up + {args.time}")
    print(outcome(reasons, v) + f" | RSS {base:.0f} -> {final:.0f} MiB ({growth:+.1%}) | {args.out}/soak.json, "
          "soak.png")
    return 0 if not reasons else 1


def examples(args) -> int:
    t = describe(metadata_of(args.model))
    x, u8, truth = inputs(t, BATCH, args.model, args.data_dir)
    files = {"predict.json": json_body(t, x[:2]), "batch64.f32": np.ascontiguousarray(x, "<f4").tobytes(),
             "batch8.npy": npy_body(x[:8]), "v2_infer.json": oip_body(t, x[:2])}
    if uploads(t):
        name = "image" if truth is None else t.labels[truth[0]].lower().replace(" ", "_").replace("/", "_")
        files[f"{name}.png"] = image_bytes(u8[0])
        if fashion_mnist(t):  # as a phone photo of a garment on white would look: inverted, enlarged, RGB
            files["photo_dark_on_light.jpg"] = image_bytes(255 - u8[0], "JPEG", (300, 300))
    for name, data in files.items():
        write_bytes(args.out / name, data)
    print(f"wrote {', '.join(files)} to {args.out}/ ({t.name}, input {list(t.sample_shape)})")
    return 0


def duration(text: str) -> str:
    """argparse type: a locust duration (90, 30s, 10m, 1h30m), kept as text."""
    parse_duration(text)
    return text


def clients(text: str) -> list[int]:
    """argparse type: a comma list of client counts."""
    return sorted({int(c) for c in text.split(",")})


def parse_args(argv=None) -> argparse.Namespace:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    ap = argparse.ArgumentParser(prog="python -m loadtest", description=__doc__.split("\n\n")[0], formatter_class=fmt)
    sub = ap.add_subparsers(dest="mode", required=True)
    model = argparse.ArgumentParser(add_help=False)
    model.add_argument("--model", default="artifacts/model.onnx", help="the exported contract ONNX file")
    model.add_argument("--data-dir", default=DEFAULT_DATA_DIR, help="Fashion-MNIST IDX folder (labelled load)")
    load = argparse.ArgumentParser(add_help=False, parents=[model])
    load.add_argument("--processes", type=int, default=2, help="locust processes (master + workers when > 1)")

    def mode(name, parents, out, text):
        p = sub.add_parser(name, parents=parents, formatter_class=fmt, help=text, description=text)
        p.add_argument("--out", type=Path, default=Path(out), help="output folder")
        return p

    r = mode("run", [load], "artifacts/loadtest", "locust scenarios against the service, thresholds -> exit code")
    r.add_argument("--port", type=int, default=3000, help="service port on 127.0.0.1 (started there if free)")
    r.add_argument("--users", type=int, default=16, help="concurrent users")
    r.add_argument("--spawn-rate", type=float, default=0, help="users started per second; 0 = all at once")
    r.add_argument("--run-time", type=duration, default="30s", help="how long, e.g. 30s, 5m")
    r.add_argument("--tags", nargs="*", default=[], choices=SCENARIOS, help="scenarios (none: the weighted mix)")
    r.add_argument("--p99-ms", type=float, default=1000.0, help="fail when p99 over all requests exceeds it; 0 = off")
    r.add_argument("--target-rps", type=float, default=0.0, help="offered req/s in total; 0 = closed loop")
    b = mode("bench", [model], "artifacts/bench_serve", "one benchmark for any model: the in-process ceiling, ours, "
             "naive FastAPI and the peers at the same layout and clients; goals -> exit code")
    b.add_argument("--clients", type=clients, default="1,2,4,8,16,32", help="keep-alive clients, a step each")
    b.add_argument("--setups", default="naive-fastapi,triton,torchserve,kserve,litserve",
                   help=f"besides ours and the ceiling, from {', '.join(SETUPS)}, ours@GITREF (none: only those)")
    b.add_argument("--images", type=int, default=1, help="inputs per request")
    b.add_argument("--step-time", type=parse_duration, default="10s", help="measured per step")
    b.add_argument("--settle", type=parse_duration, default="2s", help="load before each step's measured window")
    b.add_argument("--warmup", type=parse_duration, default="5s", help="per server, at the most clients, first")
    b.add_argument("--open-fraction", type=float, default=0.9, help="open loop at this x ours' capacity; 0 = none")
    b.add_argument("--open-time", type=parse_duration, default="20s", help="how long the open loop offers its load")
    b.add_argument("--rounds", type=int, default=1, help="the whole sequence this many times (goals: in every run)")
    b.add_argument("--env", nargs="*", default=[], help="KEY=VALUE settings of our service (e.g. PRECISION=int8)")
    b.add_argument("--goal-ceiling", type=float, default=0.95, help="ours ≥ this x the ceiling's img/s; 0 = not judged")
    b.add_argument("--goal-cpu", type=float, default=1.1, help="server CPU/img ≤ this x in-process; 0 = not judged")
    b.add_argument("--goal-probe-ms", type=float, default=100.0, help="probes' p99 while busy ≤ this; 0 = not judged")
    b.add_argument("--lock", default=None, help="a file to flock while measuring (peers are installed before)")
    b.add_argument("--start-timeout", type=float, default=300.0, help="seconds a server may take to become ready")
    b.add_argument("--quick", action="store_true", help="clients 1,8,32, 5 s steps, 10 s open loop, naive FastAPI only")
    s = mode("soak", [load], "artifacts/soak", "a fixed load for a long time; fails on errors or RSS growth")
    s.add_argument("--time", type=duration, default="10m", help="how long to hold the load after the warm-up")
    s.add_argument("--warmup", type=duration, default="90s", help="load before --time, excluded from the RSS check")
    s.add_argument("--fraction", type=float, default=0.8, help="fraction of capacity to offer")
    s.add_argument("--capacity", type=float, default=0.0, help="req/s; 0 = from --bench-results, else measured 10 s")
    s.add_argument("--bench-results", type=Path, default=Path("artifacts/bench_serve/results.json"),
                   help="a bench results.json to take the service's capacity (32 users) from")
    s.add_argument("--users", type=int, default=SATURATION_USERS, help="users sharing the load")
    s.add_argument("--max-rss-growth", type=float, default=0.05, help="fail above this RSS growth after warm-up")
    s.add_argument("--tags", nargs="*", default=["single"], choices=SCENARIOS, help="scenarios")
    s.add_argument("--port", type=int, default=3190, help="service port on 127.0.0.1")
    mode("examples", [model], "/tmp/fmnist", "example request bodies for curl")
    args = ap.parse_args(argv)
    if not Path(args.model).is_file() and not (args.mode == "run" and probe(f"http://127.0.0.1:{args.port}/readyz")):
        ap.exit(2, f"error: {args.model} is missing: run `make pipeline` (or `python -m export --run <run dir> --out "
                f"{Path(args.model).parent}`)\n")
    if args.mode == "bench":
        if args.quick:
            args.clients, args.step_time, args.open_time, args.setups = [1, 8, 32], 5.0, 10.0, "naive-fastapi"
        args.setups = [x.strip() for x in args.setups.split(",") if x.strip() not in ("", "none")]
        args.env = dict(kv.split("=", 1) for kv in args.env if "=" in kv)
        if ({s for s in args.setups if not s.startswith("ours@")} - set(SETUPS) or not 1 <= min(args.clients)
                or max(args.clients) > MAX_USERS or not 1 <= args.images <= 1024 or not 1 <= args.rounds <= 10
                or not 0 < max(args.step_time, args.open_time, args.warmup, args.settle) <= 600):
            ap.error(f"--setups takes {', '.join(SETUPS)} or ours@GITREF; --clients 1..{MAX_USERS}; --images 1..1024; "
                     "--rounds 1..10; times up to 10m")
    if args.mode == "run" and not 1 <= args.users <= MAX_USERS:
        ap.error(f"--users must be 1..{MAX_USERS}")
    if args.mode == "soak":
        args.seconds, args.warmup_s = parse_duration(args.time), parse_duration(args.warmup)
        if args.seconds < 2 * RSS_WINDOW_S or not 0 < args.fraction <= 1:
            ap.error(f"--time must be at least {2 * RSS_WINDOW_S:.0f}s and --fraction in (0, 1]")
    if args.mode in ("run", "soak") and not 1 <= args.processes <= 16:
        ap.error("--processes must be 1..16")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    command = "python -m loadtest " + " ".join(sys.argv[1:] if argv is None else argv)
    try:
        return {"run": run, "examples": examples, "soak": lambda a: soak(a, command),
                "bench": lambda a: bench(a, command)}[args.mode](args)
    except (ProcessError, ModelLoadError, LoadTargetError, DataError, OSError, KeyError, ValueError) as e:
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
