"""python -m loadtest {run,bench,soak,examples}: load tests of the served model, one runner with modes
(``--help`` of each says what it does; docs/loadtest.md). Every server runs on 127.0.0.1 in its own
process group and is stopped with it; its CPU and RSS are summed over its whole process tree."""
import argparse
import csv
import io
import json
import math
import os
import statistics
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import numpy as np
from tqdm import tqdm

from common.files import write_bytes, write_json, write_text
from common.procs import ProcessError, ServerProcess, probe
from loadtest import plots
from loadtest.core import MAX_USERS, LoadTargetError, LocustRun, TreeSampler, parse_duration, run_locust
from loadtest.workload import (BATCH, DEFAULT_DATA_DIR, SCENARIOS, DataError, describe, fetch_metadata,
                               image_bytes, inputs, json_body, metadata_of, npy_body, oip_body, save, session)

SETUPS = ("in-process", "service", "service-nobatch", "naive-fastapi", "naive-bentoml", "do-nothing", "do-nothing-fastapi")
SATURATION_USERS = 32
GOALS = {"vs_fastapi": 3.0, "vs_bentoml": 2.0, "vs_ceiling": 0.7, "p99_fixed_ms": 50.0, "fixed_rps": 240.0,
         "batch64_img_s": 15000.0}
RSS_WINDOW_S = 5.0  # RSS is compared as medians over this many seconds


def server_for(setup: str, model: str, port: int, log: Path) -> tuple[ServerProcess, tuple[str, ...]]:
    """The server of a setup, and the batch scenarios it takes. Our service is started as
    bentofile.yaml names it (``bentoml serve .``); ``service-nobatch`` runs every request on its own."""
    py, where, env = sys.executable, ["--host", "127.0.0.1", "--port", str(port)], {"MODEL_PATH": model}
    argv, batch_kinds = {
        "service": ([py, "-m", "bentoml", "serve", ".", *where], ("batch64", "batch64raw")),
        "naive-bentoml": ([py, "-m", "bentoml", "serve", "loadtest.baselines.naive_bentoml:NaiveClassifier", *where],
                          ("batch64",)),
        "naive-fastapi": ([py, "-m", "loadtest.baselines.naive_fastapi", "--model", model, *where], ("batch64",)),
        "do-nothing": ([py, "-m", "loadtest.baselines.do_nothing", "--model", model, *where], ()),
        "do-nothing-fastapi": ([py, "-m", "loadtest.baselines.do_nothing", "--fastapi", "--model", model, *where], ()),
    }[setup.replace("service-nobatch", "service")]
    env.update({"BATCH_MAX_IMAGES": "1"} if setup == "service-nobatch" else {})
    ready = "/openapi.json" if setup.endswith("fastapi") else "/readyz"  # FastAPI's own page: it is up
    return ServerProcess(argv, port, log, env, ready_path=ready, name=setup), batch_kinds


def run(args) -> int:
    url = f"http://127.0.0.1:{args.port}"
    model = args.model if Path(args.model).is_file() else None
    with ExitStack() as stack:
        if probe(url + "/readyz"):
            print(f"using the service already running at {url}", file=sys.stderr)
        else:
            print(f"starting the service on {url} (log: {args.out / 'server.log'})", file=sys.stderr)
            stack.enter_context(server_for("service", args.model, args.port, args.out / "server.log")[0]).wait_ready(180)
        path, work = save(args.out / "workload.json", fetch_metadata(url), model, args.data_dir)
        v = run_locust(LocustRun(url, args.users, args.run_time, args.out / "loadtest", args.tags, args.processes,
                                 args.spawn_rate, args.target_rps / args.users, args.p99_ms, path, html=True,
                                 reset_stats=False, history=True), progress=True)
    print(outcome(v["reasons"], v) + f" | label checks {'off' if work['single'][0].expected is None else 'on'} | "
          f"CSV + HTML in {args.out}/", file=sys.stderr)
    return 0 if v["ok"] else 1


def outcome(reasons: list[str], v: dict) -> str:
    return ("PASS" if not reasons else "FAIL: " + "; ".join(reasons)) + f" | {v['requests']} requests at " \
        f"{v['rps']:.0f} req/s, p50 {v['p50']:.0f} ms, p99 {v['p99']:.0f} ms, {v['server_failures']} non-4xx " \
        f"failures, {v['client_errors']} 4xx"


def in_process(model: str, data_dir: str, seconds: float) -> list[dict]:
    """Setup (a): onnxruntime called in this process, one intra-op thread, no HTTP: the floor."""
    t, sess, rows = describe(metadata_of(model)), session(model), []
    for kind, batch in (("sweep", 1), ("batch64", BATCH)):
        feed = {t.input_name: inputs(t, BATCH, None, data_dir)[0][:batch]}
        for _ in range(20):  # the first calls allocate
            sess.run(None, feed)
        lat, cpu0, t0 = [], time.process_time(), time.perf_counter()
        while (start := time.perf_counter()) - t0 < seconds:
            sess.run(None, feed)
            lat.append(1000 * (time.perf_counter() - start))
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        p50, p95, p99 = np.percentile(lat, [50, 95, 99]).tolist()
        rows.append({"setup": "in-process", "kind": kind, "users": 1, "offered_rps": 0.0, "requests": len(lat),
                     "failures": 0, "rps": len(lat) / wall, "img_s": len(lat) * batch / wall, "p50": p50,
                     "p95": p95, "p99": p99, "server_cpu_pct": 100 * cpu / wall, "cpu_ms_per_req": 1000 * cpu / len(lat)})
    return rows


def plan(args, batch_kinds) -> list[dict]:
    steps = [{"kind": "sweep", "users": u, "rps": 0.0, "tags": ["single"]} for u in args.users]
    steps += [{"kind": "fixed", "users": args.fixed_users, "rps": r, "tags": ["single"]} for r in args.fixed_rps]
    return steps + [{"kind": k, "users": args.batch_users, "rps": 0.0, "tags": [k]} for k in batch_kinds]


def measure(args, setup: str, port: int, bar) -> list[dict]:
    out = args.out / "locust" / setup
    server, batch_kinds = server_for(setup, args.model, port, out / "server.log")
    rows, load_before = [], os.getloadavg()[0]  # other work on the machine skews every number: recorded
    with server, TreeSampler(server.wait_ready(180).pid) as meter:
        doc = fetch_metadata(server.url) if setup.startswith("service") else metadata_of(args.model)  # baselines:
        model = None if setup.startswith("do-nothing") else args.model  # no /metadata; do-nothing cannot classify
        common = dict(processes=args.processes, workload=save(out / "workload.json", doc, model, args.data_dir)[0])
        if parse_duration(args.warmup) > 0:
            run_locust(LocustRun(server.url, 8, args.warmup, out / "warmup", ["single"], **common))
        for step in plan(args, batch_kinds):
            name = f"{step['kind']}_u{step['users']}" + (f"_r{step['rps']:g}" if step["rps"] else "")
            bar.set_postfix_str(f"{setup} {name}")
            lr = LocustRun(server.url, step["users"], args.step_time, out / name, step["tags"],
                           user_rps=step["rps"] / step["users"], **common)
            v = run_locust(lr)
            window, csv_path = v["end"] - v["start"] if v["end"] else 0.0, f"{lr.prefix}_stats.csv"  # locust's window
            cpu, n = meter.cpu_seconds(v["start"], v["end"]) if window > 0 else math.nan, v["requests"]
            rows.append({"setup": setup, "kind": step["kind"], "users": step["users"], "offered_rps": step["rps"],
                         "requests": n, "failures": v["failures"], "rps": v["rps"],
                         "img_s": v["rps"] * (BATCH if step["kind"].startswith("batch") else 1),
                         **{p: v[p] for p in ("p50", "p95", "p99")},
                         "server_cpu_pct": 100 * cpu / window if window > 0 else math.nan,
                         "cpu_ms_per_req": 1000 * cpu / n if n else math.nan, "window_s": round(window, 2),
                         "locust_exit": v["exit"], "loadavg_1m_before": round(load_before, 2), "csv": csv_path})
            bar.update(1)
    return rows


def _find(rows, setup, kind, users=None, offered=None):
    return next((r for r in rows if r["setup"] == setup and r["kind"] == kind and users in (None, r["users"])
                 and offered in (None, r["offered_rps"])), None)


def _fmt(x, digits=0):
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:,.{digits}f}"


def goals_report(rows: list[dict], users: int = SATURATION_USERS) -> list[str]:
    """Our service against the goals of issues 4/5 (only what was measured)."""
    sat, lines = {s: _find(rows, s, "sweep", users) for s in SETUPS}, []
    ours, fixed = sat["service"], _find(rows, "service", "fixed", offered=GOALS["fixed_rps"])

    def add(text: str, ok: bool) -> None:
        lines.append(f"- {text} — {'met' if ok else 'SHORT'}")

    for name, other, goal in (("naive FastAPI", "naive-fastapi", "vs_fastapi"), ("naive BentoML", "naive-bentoml",
                              "vs_bentoml"), ("do-nothing ceiling", "do-nothing", "vs_ceiling"),
                              ("do-nothing FastAPI endpoint", "do-nothing-fastapi", "vs_ceiling")):
        if ours and sat[other] and sat[other]["rps"] > 0:
            r = ours["rps"] / sat[other]["rps"]
            add(f"saturation ({users} users) vs {name}: {r:.2f}x (goal ≥{GOALS[goal]}x)", r >= GOALS[goal])
    if ours:
        errs = sum(r["failures"] for r in rows if r["setup"] == "service")
        add(f"errors in all `service` steps: {int(errs)} (goal 0)", errs == 0)
    if fixed:
        add(f"p99 at offered {GOALS['fixed_rps']:g} req/s: {fixed['p99']:.0f} ms at {fixed['rps']:.0f} req/s achieved "
            f"(goal ≤{GOALS['p99_fixed_ms']:g} ms)", fixed["p99"] <= GOALS["p99_fixed_ms"] and not fixed["failures"])
    for kind, what in (("batch64", "JSON"), ("batch64raw", "raw float32")):
        if batch := _find(rows, "service", kind):
            add(f"batch-64 ({what}): {batch['img_s']:,.0f} img/s (goal ≥{GOALS['batch64_img_s']:,.0f})",
                batch["img_s"] >= GOALS["batch64_img_s"] and not batch["failures"])
    return lines


def markdown_table(rows: list[dict], args) -> str:
    fixed_rps, users = (args.fixed_rps or [None])[0], args.saturation
    head = (f"| setup | req/s @{users} users | p50 / p95 / p99 ms @{users} | errors | server CPU % | server CPU "
            f"ms/req | p99 ms @{_fmt(fixed_rps)} req/s offered (achieved req/s) | batch-64 img/s JSON / raw | "
            "load avg before |")
    lines = [head, "|" + "---|" * 9]
    for setup in args.setups:
        sat = _find(rows, setup, "sweep", 1 if setup == "in-process" else users)
        fixed, batch, raw = (_find(rows, setup, "fixed", offered=fixed_rps), _find(rows, setup, "batch64"),
                             _find(rows, setup, "batch64raw"))
        d = 2 if setup == "in-process" else 0
        cells = [(f"{_fmt(sat['rps'])} (1 caller, no HTTP)" if d else _fmt(sat["rps"])) if sat else "–",
                 " / ".join(_fmt(sat[p], d) for p in ("p50", "p95", "p99")) if sat else "–",
                 str(int(sum(r["failures"] for r in rows if r["setup"] == setup))),
                 _fmt(sat["server_cpu_pct"]) if sat else "–", _fmt(sat["cpu_ms_per_req"], 2) if sat else "–",
                 f"{_fmt(fixed['p99'])} ({_fmt(fixed['rps'])})" if fixed else "–",
                 (_fmt(batch["img_s"]) if batch else "–") + (f" / {_fmt(raw['img_s'])}" if raw else ""),
                 _fmt(sat.get("loadavg_1m_before"), 1) if sat else "–"]
        lines.append(f"| {setup} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_reports(rows: list[dict], args, elapsed: float, command: str) -> None:
    meta = {"command": command, "elapsed_s": round(elapsed, 1), "cpus": os.cpu_count(), **vars(args)}
    write_json(args.out / "results.json", {"meta": {**meta, "out": str(args.out)}, "rows": rows})
    buf = io.StringIO()
    writer = csv.DictWriter(buf, list(dict.fromkeys(k for r in rows for k in r)))
    writer.writeheader()
    writer.writerows(rows)
    write_text(args.out / "results.csv", buf.getvalue())
    title = f"single-input /predict, {os.cpu_count()} cores shared by server and locust ({args.processes} proc)"
    plots.sweep(rows, args.out, title)
    write_text(args.out / "results.md", "\n".join([
        f"Command: `{command}` ({elapsed / 60:.1f} min, {time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores, locust "
        f"--processes {args.processes}, {args.step_time} per step)", "", markdown_table(rows, args), "", "Goals:",
        *goals_report(rows, args.saturation), "",
        "![throughput](throughput_vs_users.png) ![latency](latency_vs_users.png)", ""]))


def bench(args, command: str) -> int:
    http = [s for s in args.setups if s != "in-process"]
    rows, failed, started = [], [], time.monotonic()
    with tqdm(total=sum(len(plan(args, server_for(s, args.model, 0, Path())[1])) for s in http)
              + ("in-process" in args.setups), desc="bench", unit="step") as bar:
        if "in-process" in args.setups:
            rows += in_process(args.model, args.data_dir, 2.0 if args.quick else 4.0)
            bar.update(1)
        for i, setup in enumerate(http):
            try:
                rows += measure(args, setup, args.base_port + i, bar)
            except ProcessError as e:
                tqdm.write(f"{setup}: skipped: {e}")
                failed.append(setup)
            write_reports(rows, args, time.monotonic() - started, command)  # partial results survive a crash
    write_reports(rows, args, time.monotonic() - started, command)
    print((args.out / "results.md").read_text() + f"\nresults, plots and locust CSVs in {args.out}/")
    if failed:
        print(f"error: setups that could not run: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


def capacity_from_bench(path: Path) -> float | None:
    """Our service's closed-loop req/s at 32 users, from a bench results.json (None if unusable)."""
    try:
        row = _find(json.loads(path.read_text())["rows"], "service", "sweep", SATURATION_USERS)
    except (OSError, ValueError, KeyError):
        return None
    return row["rps"] if row and row["rps"] > 0 and row.get("failures", 1) == 0 else None


def rss_growth(times: list[float], rss: list[float], warmup_end: float, end: float) -> tuple[float, float, float]:
    """(baseline, final, growth): median RSS just after warm-up vs over the last seconds."""
    base = [r for t, r in zip(times, rss) if warmup_end <= t <= warmup_end + RSS_WINDOW_S]
    last = [r for t, r in zip(times, rss) if end - RSS_WINDOW_S <= t <= end]
    if not base or not last:
        raise ValueError("not enough RSS samples around the warm-up end and the run end")
    b, f = statistics.median(base), statistics.median(last)
    return b, f, f / b - 1.0


def soak(args, command: str) -> int:
    with server_for("service", args.model, args.port, args.out / "server.log")[0] as server:
        server.wait_ready(180)
        load = dict(processes=args.processes,
                    workload=save(args.out / "workload.json", fetch_metadata(server.url), args.model, args.data_dir)[0])
        capacity, source = args.capacity, "--capacity"
        if capacity <= 0:
            capacity, source = capacity_from_bench(args.bench_results) or 0.0, str(args.bench_results)
        if capacity <= 0:
            v = run_locust(LocustRun(server.url, SATURATION_USERS, "10s", args.out / "capacity", args.tags, **load))
            capacity, source = v["rps"], f"measured: 10 s closed loop, {SATURATION_USERS} users"
        if not capacity > 0:
            print("error: could not establish the service's capacity", file=sys.stderr)
            return 2
        offered = args.fraction * capacity
        print(f"capacity {capacity:.0f} req/s ({source}); offering {offered:.0f} req/s with {args.users} users "
              f"for {args.warmup_s:.0f} s warm-up + {args.time}", file=sys.stderr)
        lr = LocustRun(server.url, args.users, f"{args.warmup_s + args.seconds:.0f}s", args.out / "soak", args.tags,
                       user_rps=offered / args.users, html=True, reset_stats=False, history=True, **load)
        with TreeSampler(server.pid, interval=1.0) as meter:
            v = run_locust(lr, progress=True)
    with open(f"{lr.prefix}_stats_history.csv", newline="") as f:  # locust's own per-second history
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
        base = final = growth = math.nan
        reasons.append(str(e))
    write_json(args.out / "soak.json", {
        "command": command, "date": time.strftime("%Y-%m-%d"), "ok": not reasons, "reasons": reasons, "time": args.time, "capacity_rps": capacity, "capacity_source": source,
        "offered_rps": offered, "achieved_rps": v["rps"], "requests": v["requests"], "failures": v["failures"],
        "server_failures": v["server_failures"], "client_errors": v["client_errors"], "p50_ms": v["p50"],
        "p99_ms": v["p99"], "warmup_s": args.warmup_s, "rss_baseline_mib": base, "rss_final_mib": final,
        "rss_growth": growth, "rss_series": {"seconds": seconds, "mib": rss_mib}, "latency_series": series})
    plots.soak(seconds, rss_mib, series, args.warmup_s, args.out / "soak.png",
               f"soak: {offered:.0f} req/s offered ({args.fraction:.0%} of {capacity:.0f}), "
               f"{args.warmup_s:.0f} s warm-up + {args.time}")
    print(outcome(reasons, v) + f" | RSS {base:.0f} -> {final:.0f} MiB ({growth:+.1%}) | {args.out}/soak.json, soak.png")
    return 0 if not reasons else 1


def examples(args) -> int:
    t = describe(metadata_of(args.model))
    x, u8, truth = inputs(t, BATCH, args.model, args.data_dir)
    files = {"predict.json": json_body(t, x[:2]), "batch64.f32": np.ascontiguousarray(x, "<f4").tobytes(),
             "batch8.npy": npy_body(x[:8]), "v2_infer.json": oip_body(t, x[:2])}
    if t.image:
        name = "image" if truth is None else t.labels[truth[0]].lower().replace(" ", "_").replace("/", "_")
        files[f"{name}.png"] = image_bytes(u8[0])
        if t.fashion_mnist:  # as a phone photo of a garment on white would look: inverted, enlarged, RGB
            files["photo_dark_on_light.jpg"] = image_bytes(255 - u8[0], "JPEG", (300, 300))
    for name, data in files.items():
        write_bytes(args.out / name, data)
    print(f"wrote {', '.join(files)} to {args.out}/ ({t.name}, input {list(t.shape)})")
    return 0


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every flag's default in its help, unless the help text says it already."""

    def _get_help_string(self, action):
        return action.help if "default:" in action.help else super()._get_help_string(action)


def duration(text: str) -> str:
    """argparse type: a locust duration (90, 30s, 10m, 1h30m), kept as text."""
    parse_duration(text)
    return text


def numbers(text: str) -> list[float]:
    """argparse type: a comma list of numbers ('' = none)."""
    return sorted({float(x) for x in text.split(",") if x.strip()})


def parse_args(argv=None) -> argparse.Namespace:
    fmt = HelpFormatter
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
    r.add_argument("--spawn-rate", type=float, default=None, help="users started per second (default: all at once)")
    r.add_argument("--run-time", type=duration, default="30s", help="how long, e.g. 30s, 5m")
    r.add_argument("--tags", nargs="*", default=[], choices=SCENARIOS, help="scenarios (default: the weighted mix)")
    r.add_argument("--p99-ms", type=float, default=1000.0, help="fail when p99 over all requests exceeds it; 0 = off")
    r.add_argument("--target-rps", type=float, default=0.0, help="offered req/s in total; 0 = closed loop")
    b = mode("bench", [load], "artifacts/bench_serve", "every serving setup side by side under the same load")
    b.add_argument("--quick", action="store_true", help="users 8,32, 5 s steps, 2 s warm-up (~5 min)")
    b.add_argument("--setups", default=",".join(SETUPS), help="comma list from: " + ", ".join(SETUPS))
    b.add_argument("--users", type=numbers, default=None, help="closed-loop users (default: 1,8,32,64; quick: 8,32)")
    b.add_argument("--step-time", type=duration, default=None, help="per measured step (default: 12s; quick: 5s)")
    b.add_argument("--fixed-rps", type=numbers, default="240", help="offered loads of the fixed step ('' = none)")
    b.add_argument("--warmup", type=duration, default=None, help="warm-up per server, 0 = none (default: 4s; quick: 2s)")
    b.add_argument("--fixed-users", type=int, default=SATURATION_USERS, help="users sharing the fixed load")
    b.add_argument("--batch-users", type=int, default=8, help="closed-loop users of the batch-64 steps")
    b.add_argument("--base-port", type=int, default=3100, help="setups listen on base-port + index")
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
        print(f"error: {args.model} is missing: run `make pipeline` (or `python -m export --run <run dir> --out "
              f"{Path(args.model).parent}`)", file=sys.stderr)
        raise SystemExit(2)
    if args.mode == "bench" and not describe(metadata_of(args.model)).classifier:
        print(f"error: {args.model} is not a classifier: the benchmark's baselines answer class labels; "
              f"load-test it with `make loadtest` (python -m loadtest run)", file=sys.stderr)
        raise SystemExit(2)
    if args.mode == "bench":
        args.setups = [x.strip() for x in args.setups.split(",") if x.strip()]
        args.users = [int(u) for u in args.users or ([8, 32] if args.quick else [1, 8, 32, 64])]
        args.saturation = SATURATION_USERS if SATURATION_USERS in args.users else max(args.users)  # the table's
        args.step_time = args.step_time or ("5s" if args.quick else "12s")
        args.warmup = args.warmup or ("2s" if args.quick else "4s")
        if set(args.setups) - set(SETUPS) or any(x <= 0 for x in args.fixed_rps):
            ap.error(f"--setups takes {', '.join(SETUPS)}; --fixed-rps positive numbers")
    if args.mode == "run" and not 1 <= args.users <= MAX_USERS:
        ap.error(f"--users must be 1..{MAX_USERS}")
    if args.mode == "soak":
        args.seconds, args.warmup_s = parse_duration(args.time), parse_duration(args.warmup)
        if args.seconds < 2 * RSS_WINDOW_S or not 0 < args.fraction <= 1:
            ap.error(f"--time must be at least {2 * RSS_WINDOW_S:.0f}s and --fraction in (0, 1]")
    if args.mode != "examples" and not 1 <= args.processes <= 16:
        ap.error("--processes must be 1..16")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    command = "python -m loadtest " + " ".join(sys.argv[1:] if argv is None else argv)
    try:
        modes = {"run": run, "soak": lambda a: soak(a, command), "examples": examples, "bench": lambda a: bench(a, command)}
        return modes[args.mode](args)
    except (ProcessError, LoadTargetError, DataError, OSError, KeyError, ValueError) as e:
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
