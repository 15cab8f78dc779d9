"""``make bench-serve``: every serving setup under the same locust load, side by side.

Setups: (a) ``in-process`` onnxruntime, (b) ``service`` (ours, adaptive batching on),
(f) ``service-nobatch`` (ours, batching off), (c) ``naive-fastapi`` and (d) ``naive-bentoml``
(``loadtest/baselines/``), (e) ``do-nothing`` (the load generator's own ceiling).

Per HTTP setup, one server at a time on 127.0.0.1, single-image ``/predict``:
  sweep    closed loop at each ``--users`` count (saturation throughput and its latencies)
  fixed    ``constant_throughput`` at each ``--fixed-rps`` offered load, below saturation
  batch64  closed loop with 64-image requests, JSON (and raw float32 where the server takes it): img/s
recording req/s, img/s, p50/p95/p99, errors and the server's CPU (psutil, whole process tree).
Writes ``results.json``, ``results.csv``, ``results.md`` (README table + goals), two PNG plots and
every locust CSV under ``--out``. One setup at a time holds ``--lock`` (flock), so the benchmark
never overlaps another CPU benchmark on a shared machine.

    python -m loadtest.bench_serve            # ~9 min: users 1,8,32,64, 12 s steps
    python -m loadtest.bench_serve --quick    # ~3.5 min: users 8,32, 5 s steps
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import fcntl
import io
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

from tqdm import tqdm

from loadtest import servers
from loadtest.checks import parse_duration
from loadtest.data import BATCH_SIZE, DEFAULT_DATA_DIR
from loadtest.harness import LocustRun, run_locust, summarize
from loadtest.plots import plot_latency, plot_throughput

ALL_SETUPS = ("in-process", "service", "service-nobatch", "naive-fastapi", "naive-bentoml", "do-nothing",
              "do-nothing-fastapi")
SATURATION_USERS = 32
# issue 4/5 goals, checked in results.md
GOALS = {"vs_fastapi": 1.2, "vs_bentoml": 2.0, "vs_ceiling": 0.7, "p99_fixed_ms": 50.0, "fixed_rps": 240.0,
         "batch64_img_s": 15000.0}


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m loadtest.bench_serve", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="users 8,32 and 5 s steps (~3.5 min)")
    ap.add_argument("--setups", default=",".join(ALL_SETUPS), help="comma list from: " + ", ".join(ALL_SETUPS))
    ap.add_argument("--users", default=None, help="closed-loop user counts (default 1,8,32,64; quick 8,32)")
    ap.add_argument("--step-time", default=None, help="seconds per measured step (default 12s; quick 5s)")
    ap.add_argument("--fixed-rps", default="240", help="offered loads for the fixed-load step, comma list ('' = none)")
    ap.add_argument("--warmup", default=None, help="closed-loop warm-up per server before measuring (0 = none)")
    ap.add_argument("--fixed-users", type=int, default=SATURATION_USERS, help="users sharing the fixed load")
    ap.add_argument("--batch-users", type=int, default=8, help="closed-loop users for the batch-64 step")
    ap.add_argument("--processes", type=int, default=2, help="locust processes (master/worker when > 1)")
    ap.add_argument("--model", default="artifacts/model.onnx")
    ap.add_argument("--data-dir", default=os.environ.get("DATA_DIR", DEFAULT_DATA_DIR))
    ap.add_argument("--base-port", type=int, default=3100, help="setups listen on base-port + index")
    ap.add_argument("--profile", action="store_true",
                    help=f"py-spy our service during its {SATURATION_USERS}-user step -> profile_service.md")
    ap.add_argument("--lock", default="", help="flock this file around each setup (e.g. /tmp/cpu-bench.lock)")
    ap.add_argument("--out", type=Path, default=Path("artifacts/bench_serve"))
    args = ap.parse_args(argv)
    args.setups = [s.strip() for s in args.setups.split(",") if s.strip()]
    unknown = set(args.setups) - set(ALL_SETUPS)
    if unknown:
        ap.error(f"unknown setup(s) {sorted(unknown)}; choose from {', '.join(ALL_SETUPS)}")
    try:
        users = args.users or ("8,32" if args.quick else "1,8,32,64")
        args.users = sorted({int(u) for u in users.split(",")})
        args.fixed_rps = [float(r) for r in args.fixed_rps.split(",") if r.strip()]
    except ValueError:
        ap.error("--users and --fixed-rps take comma-separated numbers")
    if any(not 1 <= u <= 256 for u in args.users) or any(r <= 0 for r in args.fixed_rps):
        ap.error("users must be 1..256 and fixed loads > 0")
    args.step_time = args.step_time or ("5s" if args.quick else "12s")
    if args.warmup is None:
        args.warmup = "2s" if args.quick else "4s"
    if SATURATION_USERS not in args.users:
        tqdm.write(f"note: --users has no {SATURATION_USERS}; the table reports the largest count instead")
    return args


def saturation_users(args) -> int:
    """The user count the table and goals call saturation: 32, or the largest one measured."""
    return SATURATION_USERS if SATURATION_USERS in args.users else max(args.users)


@contextlib.contextmanager
def cpu_lock(path: str):
    """Hold an exclusive flock on ``path`` (no-op for an empty path)."""
    if not path:
        yield
        return
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            tqdm.write(f"waiting for {path} (another benchmark holds it)")
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def spec_for(setup: str, model: str, port: int) -> servers.ServerSpec:
    if setup == "service":
        return servers.service_spec(model, port, batching=True)
    if setup == "service-nobatch":
        return servers.service_spec(model, port, batching=False, name="service-nobatch")
    if setup == "naive-fastapi":
        return servers.naive_fastapi_spec(model, port)
    if setup == "naive-bentoml":
        return servers.naive_bentoml_spec(model, port)
    if setup in ("do-nothing", "do-nothing-fastapi"):
        return servers.do_nothing_spec(port, fastapi=setup == "do-nothing-fastapi")
    raise ValueError(setup)


def plan_steps(args, spec: servers.ServerSpec) -> list[dict]:
    steps = [{"kind": "sweep", "users": u, "offered_rps": 0.0, "tags": ["single"], "time": args.step_time}
             for u in args.users]
    steps += [{"kind": "fixed", "users": args.fixed_users, "offered_rps": r, "tags": ["single"], "time": args.step_time}
              for r in args.fixed_rps]
    for kind in ("batch64", "batch64raw"):
        if kind in spec.endpoints:
            steps.append({"kind": kind, "users": args.batch_users, "offered_rps": 0.0, "tags": [kind],
                          "time": args.step_time})
    return steps


def measure_setup(args, setup: str, port: int, bar: tqdm) -> list[dict]:
    spec = spec_for(setup, args.model, port)
    setup_dir = args.out / "locust" / setup
    model = args.model if spec.answers_labels else None
    rows = []
    load_before = os.getloadavg()[0]  # other work on the machine skews every number; record it
    with servers.ManagedServer(spec, setup_dir / "server.log") as server, servers.TreeSampler(server.pid) as meter:
        if parse_duration(args.warmup) > 0:
            warm = LocustRun(spec.url, users=8, run_time=args.warmup, csv_prefix=setup_dir / "warmup",
                             tags=["single"], processes=args.processes, model=model, data_dir=args.data_dir)
            run_locust(warm)
        for step in plan_steps(args, spec):
            label = f"{step['kind']}_u{step['users']}" + (f"_r{step['offered_rps']:g}" if step["offered_rps"] else "")
            bar.set_postfix_str(f"{setup} {label}")
            run = LocustRun(spec.url, users=step["users"], run_time=step["time"], csv_prefix=setup_dir / label,
                            tags=step["tags"], processes=args.processes, model=model, data_dir=args.data_dir,
                            user_rps=step["offered_rps"] / step["users"] if step["offered_rps"] else 0.0)
            result = run_locust(run)
            if args.profile and setup == "service" and step["kind"] == "sweep" and step["users"] == SATURATION_USERS:
                profile_step(run, server.pid, setup_dir, args.out / "profile_service.md", label)
            per_request = BATCH_SIZE if step["kind"].startswith("batch64") else 1
            row = {"setup": setup, "kind": step["kind"], "users": step["users"], "offered_rps": step["offered_rps"],
                   **summarize(result, per_request)}
            cpu_s = meter.cpu_seconds(result.measured_from, result.measured_to)
            window = result.measured_to - result.measured_from
            row["server_cpu_pct"] = 100.0 * cpu_s / window if window > 0 else math.nan
            row["cpu_ms_per_req"] = 1000.0 * cpu_s / (row["rps"] * window) if row["rps"] > 0 and window > 0 else math.nan
            row["locust_exit"] = result.returncode
            row["loadavg_1m_before"] = round(load_before, 2)
            row["csv"] = str(Path(f"{run.csv_prefix}_stats.csv"))
            if not result.rows:
                tqdm.write(f"{setup} {label}: locust produced no stats (exit {result.returncode}):\n"
                           + result.log[-1500:])
            rows.append(row)
            bar.update(1)
    return rows


def profile_step(run: LocustRun, pid: int, setup_dir: Path, out_md: Path, label: str) -> None:
    """Repeat ``run`` under py-spy: a separate, unrecorded run, since the sampler costs CPU too."""
    from loadtest.profile import profile_markdown, start_py_spy

    raw = setup_dir / "profile_raw.txt"
    run = LocustRun(**{**run.__dict__, "csv_prefix": setup_dir / f"profiled_{label}"})
    spy = start_py_spy(pid, parse_duration(run.run_time) + 2, raw)
    if spy is None:
        tqdm.write("py-spy not found; no profile")
        return
    run_locust(run)
    try:
        _, err = spy.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        spy.kill()
        _, err = spy.communicate()
    if spy.returncode != 0 or not raw.exists():
        tqdm.write(f"py-spy failed (exit {spy.returncode}): {(err or '').strip()[-500:]}")
        return
    write_atomic(out_md, profile_markdown(raw, f"service, {label}: where the server's CPU goes"))


# --- reporting ------------------------------------------------------------------------------------
def _find(rows, setup, kind, users=None, offered=None):
    for r in rows:
        if r["setup"] == setup and r["kind"] == kind and (users is None or r["users"] == users) \
                and (offered is None or r["offered_rps"] == offered):
            return r
    return None


def _fmt(x, digits=0):
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:,.{digits}f}"


def goals_report(rows: list[dict], users: int = SATURATION_USERS) -> list[str]:
    """Lines comparing our service with the goals of issues 4/5 (only what was measured)."""
    sat = {s: _find(rows, s, "sweep", users) for s in ALL_SETUPS}
    ours = sat.get("service")
    lines = []

    def ratio_line(name, other, goal):
        if ours and sat.get(other) and sat[other]["rps"] > 0:
            r = ours["rps"] / sat[other]["rps"]
            verdict = "met" if r >= goal else "SHORT"
            lines.append(f"- saturation ({users} users) vs {name}: {r:.2f}x (goal ≥{goal}x) — {verdict}")

    ratio_line("naive FastAPI", "naive-fastapi", GOALS["vs_fastapi"])
    ratio_line("naive BentoML", "naive-bentoml", GOALS["vs_bentoml"])
    ratio_line("do-nothing ceiling", "do-nothing", GOALS["vs_ceiling"])
    # The issues' prototype measured its ceiling with a do-nothing *FastAPI* endpoint; both are shown.
    ratio_line("do-nothing FastAPI endpoint", "do-nothing-fastapi", GOALS["vs_ceiling"])
    if ours:
        errs = sum(r["failures"] for r in rows if r["setup"] == "service")
        lines.append(f"- errors in all `service` steps: {int(errs)} (goal 0) — {'met' if errs == 0 else 'SHORT'}")
    fixed = _find(rows, "service", "fixed", offered=GOALS["fixed_rps"])
    if fixed:
        ok = fixed["p99"] <= GOALS["p99_fixed_ms"] and fixed["failures"] == 0
        lines.append(f"- p99 at offered {GOALS['fixed_rps']:g} req/s: {fixed['p99']:.0f} ms at {fixed['rps']:.0f} "
                     f"req/s achieved (goal ≤{GOALS['p99_fixed_ms']:g} ms) — {'met' if ok else 'SHORT'}")
    for kind, what in (("batch64", "JSON"), ("batch64raw", "raw float32")):
        batch = _find(rows, "service", kind)
        if batch:
            ok = batch["img_s"] >= GOALS["batch64_img_s"] and batch["failures"] == 0
            lines.append(f"- batch-64 ({what}): {batch['img_s']:,.0f} img/s (goal ≥{GOALS['batch64_img_s']:,.0f}) — "
                         f"{'met' if ok else 'SHORT'}")
    return lines


def markdown_table(rows: list[dict], args) -> str:
    fixed_rps = args.fixed_rps[0] if args.fixed_rps else None
    users = saturation_users(args)
    head = (f"| setup | req/s @{users} users | p50 / p95 / p99 ms @{users} | errors | "
            f"server CPU % | server CPU ms/req | p99 ms @{_fmt(fixed_rps)} req/s offered (achieved req/s) | "
            "batch-64 img/s JSON / raw | load avg before |")
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for setup in args.setups:
        sat = _find(rows, setup, "sweep", 1 if setup == "in-process" else users)
        fixed = _find(rows, setup, "fixed", offered=fixed_rps)
        batch = _find(rows, setup, "batch64")
        raw = _find(rows, setup, "batch64raw")
        errs = sum(r["failures"] for r in rows if r["setup"] == setup)
        if setup == "in-process":
            cells = [f"{_fmt(sat['rps'])} (1 caller, no HTTP)" if sat else "–",
                     f"{_fmt(sat['p50'], 2)} / {_fmt(sat['p95'], 2)} / {_fmt(sat['p99'], 2)}" if sat else "–"]
        else:
            cells = [_fmt(sat["rps"]) if sat else "–",
                     f"{_fmt(sat['p50'])} / {_fmt(sat['p95'])} / {_fmt(sat['p99'])}" if sat else "–"]
        cells += [str(int(errs)), _fmt(sat["server_cpu_pct"]) if sat else "–",
                  _fmt(sat["cpu_ms_per_req"], 2) if sat else "–",
                  f"{_fmt(fixed['p99'])} ({_fmt(fixed['rps'])})" if fixed else "–",
                  (_fmt(batch["img_s"]) if batch else "–") + (f" / {_fmt(raw['img_s'])}" if raw else ""),
                  _fmt(sat.get("loadavg_1m_before"), 1) if sat else "–"]
        lines.append(f"| {setup} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_reports(rows: list[dict], args, elapsed: float, command: str) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"command": command, "elapsed_s": round(elapsed, 1), "cpus": os.cpu_count(), "users": args.users,
            "step_time": args.step_time, "fixed_rps": args.fixed_rps, "processes": args.processes,
            "model": args.model, "setups": args.setups}
    write_atomic(args.out / "results.json", json.dumps({"meta": meta, "rows": rows}, indent=2))
    columns = ["setup", "kind", "users", "offered_rps", "requests", "failures", "rps", "img_s", "p50", "p95", "p99",
               "server_cpu_pct", "cpu_ms_per_req", "locust_exit", "loadavg_1m_before", "csv"]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(args.out / "results.csv", buf.getvalue())
    title = f"single-image /predict, {os.cpu_count()} cores shared by server and locust ({args.processes} proc)"
    plot_throughput(rows, args.out / "throughput_vs_users.png", title)
    plot_latency(rows, args.out / "latency_vs_users.png", title)
    md = [f"Command: `{command}` ({elapsed / 60:.1f} min, {os.cpu_count()} cores, locust --processes "
          f"{args.processes}, {args.step_time} per step)", "", markdown_table(rows, args), "", "Goals:",
          *goals_report(rows, saturation_users(args)), "",
          "![throughput](throughput_vs_users.png) ![latency](latency_vs_users.png)", ""]
    write_atomic(args.out / "results.md", "\n".join(md))


def main(argv=None) -> int:
    args = parse_args(argv)
    if not Path(args.model).is_file():
        print(f"error: model not found: {args.model} (run `make export` first)", file=sys.stderr)
        return 2
    command = "python -m loadtest.bench_serve " + " ".join(argv if argv is not None else sys.argv[1:])
    started = time.monotonic()
    http_setups = [s for s in args.setups if s != "in-process"]
    total_steps = sum(len(plan_steps(args, spec_for(s, args.model, 0))) for s in http_setups)
    rows: list[dict] = []
    failed: list[str] = []
    with tqdm(total=total_steps + ("in-process" in args.setups), desc="bench-serve", unit="step") as bar:
        if "in-process" in args.setups:
            from loadtest.inprocess import bench_inprocess

            bar.set_postfix_str("in-process")
            with cpu_lock(args.lock):
                rows += bench_inprocess(args.model, args.data_dir, seconds=2.0 if args.quick else 4.0)
            bar.update(1)
        for index, setup in enumerate(http_setups):
            try:
                with cpu_lock(args.lock):
                    rows += measure_setup(args, setup, args.base_port + index, bar)
            except servers.ServerError as e:
                tqdm.write(f"{setup}: skipped, server did not run: {e}")
                failed.append(setup)
            write_reports(rows, args, time.monotonic() - started, command)  # partial results survive a crash
    write_reports(rows, args, time.monotonic() - started, command)
    print((args.out / "results.md").read_text())
    print(f"results, plots and locust CSVs in {args.out}/")
    if failed:
        print(f"error: setups that could not run: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
