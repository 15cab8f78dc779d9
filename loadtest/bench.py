"""`python -m loadtest bench` (`make bench-serve`): one serving benchmark for any contract model (docs/loadtest.md):
the in-process ceiling, ours, ours@REF and loadtest/baselines.py's servers, one at a time, with issue 25's goals."""
import base64
import fcntl
import itertools
import json
import math
import multiprocessing as mp
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from common.files import write_json, write_text
from common.machine import cpu_summary, cpu_text
from common.procs import REPO, ProcessError, ServerProcess, free_port, probe
from loadtest import plots
from loadtest.core import TreeSampler
from loadtest.faults import HOST, Load, Stats, http_request, run as run_async
from loadtest.workload import describe, fetch_metadata, inputs, metadata_of, npy_body

PEERS = {  # name: its venv's requirements (besides our onnxruntime); TorchServe's worker imports torch and yaml
    "triton": ["nvidia-pytriton==0.7.0"], "kserve": ["kserve==0.21.0"], "litserve": ["litserve==0.2.19"],
    "torchserve": ["torchserve==0.12.0", "torch-model-archiver==0.12.0", "torch==2.13.0", "pyyaml"]}
# setup: (readiness path, request format) of `python -m loadtest.baselines SETUP`
SERVERS = {"naive-fastapi": ("/openapi.json", "npy"), "triton": ("/v2/models/{name}/ready", "oip"),
           "torchserve": ("/ping", "torchserve"), "kserve": ("/v2/models/{name}/ready", "oip"),
           "litserve": ("/health", "b64json"), "do-nothing": ("/", "npy")}
SETUPS = tuple(SERVERS)
PROBES = ("/livez", "/readyz")
JUDGED_FROM = 4  # clients: goals on throughput, CPU and probes are judged from here up (2 workers are busy)
TIMEOUT_S = 60.0  # no answer by then counts as an error


def peer_python(name: str) -> str:
    """The interpreter of a peer's own venv, made on first use (pinned, with the same onnxruntime as ours)."""
    import onnxruntime

    root = REPO / ".venv-peers" / name
    want = [*PEERS[name], f"onnxruntime=={onnxruntime.__version__}"]
    stamp, py = root / ".installed", root / "bin" / "python"
    if not stamp.exists() or stamp.read_text() != " ".join(want):
        tqdm.write(f"{name}: installing {' '.join(want)} into {root} (first use, a few minutes)")
        subprocess.run([sys.executable, "-m", "venv", str(root)], check=True)
        done = subprocess.run([str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", *want],
                              capture_output=True, text=True)
        if done.returncode:
            raise ProcessError(f"pip could not install {' '.join(want)}: "
                               + " | ".join(done.stderr.strip().splitlines()[-3:]))
        stamp.write_text(" ".join(want))
    return str(py)


def server_of(setup: str, model: str, port: int, layout: tuple[int, int] | None, log: Path, env: dict,
              name: str = "") -> tuple:
    """(ServerProcess, request format): ours (or ours@REF, from `git archive REF`) with `env`, or a baseline at
    `layout` (workers, threads)."""
    if setup.startswith("ours"):
        cwd = REPO
        if "@" in setup:
            cwd = log.parent / "tree"
            cwd.mkdir(parents=True, exist_ok=True)
            subprocess.run(f"git -C {REPO} archive {setup.split('@', 1)[1]} service bentofile.yaml | tar -x -C {cwd}",
                           shell=True, check=True)
        argv = [sys.executable, "-m", "bentoml", "serve", ".", "--host", HOST, "--port", str(port)]
        env = {"MODEL_PATH": str(Path(model).resolve()), **env}
        return ServerProcess(argv, port, log, env, cwd=cwd, name=setup), "npy"
    ready, fmt = SERVERS[setup]
    argv = [peer_python(setup) if setup in PEERS else sys.executable, "-m", "loadtest.baselines", setup, "--model",
            model, "--port", str(port), "--workers", str(layout[0]), "--threads", str(layout[1]),
            *(["--work", str(log.parent.resolve())] if setup == "torchserve" else [])]  # KServe parses argv: --work=--workers
    return ServerProcess(argv, port, log, ready_path=ready.format(name=name), name=setup), fmt  # (Triton: the model's)


def request(fmt: str, t, x: np.ndarray) -> bytes:
    """One HTTP/1.1 request carrying `x` as .npy (to /predict, TorchServe's to /predictions), binary OIP v2 or
    LitServe's JSON."""
    if fmt == "oip":
        head = json.dumps({"inputs": [{"name": t.input_name, "shape": list(x.shape), "datatype": "FP32",
                                       "parameters": {"binary_data_size": x.nbytes}}],
                           "parameters": {"binary_data_output": True}}).encode()
        raw = http_request("POST", f"/v2/models/{t.name}/infer", head + x.astype("<f4").tobytes(),
                           "application/octet-stream")
        return raw.replace(b"\r\n\r\n", f"\r\nInference-Header-Content-Length: {len(head)}\r\n\r\n".encode(), 1)
    if fmt == "b64json":
        return http_request("POST", "/predict", json.dumps({"npy": base64.b64encode(npy_body(x)).decode()}).encode())
    return http_request("POST", "/predictions/model" if fmt == "torchserve" else "/predict", npy_body(x),
                        "application/x-npy")


def _ceiling_worker(model: str, served: str, threads: int, x, barrier, conn) -> None:
    from service.contract import load_contract
    from service.model import Model

    # the service's own session (options, CPU provider) on the file it serves
    sess = Model(load_contract(model)[0], Path(served).read_bytes(), "cpu", threads, timed_runs=0).session
    feed, end = {sess.get_inputs()[0].name: x}, time.perf_counter() + 1.0
    while time.perf_counter() < end:  # warm: the first calls allocate
        sess.run(None, feed)
    conn.send("ready")
    while (seconds := conn.recv()) is not None:
        barrier.wait()
        lat, cpu0, t0 = [], time.process_time(), time.perf_counter()
        while (start := time.perf_counter()) - t0 < seconds:
            sess.run(None, feed)
            lat.append(time.perf_counter() - start)
        conn.send((len(lat), time.process_time() - cpu0, time.perf_counter() - t0, lat))


class Ceiling:
    """W processes x T threads calling onnxruntime on `x` together, started once and idle between measurements:
    `measure(seconds)` between ours' steps times the box as it is in that minute (docs/loadtest.md)."""

    def __init__(self, model: str, served: str, layout: tuple[int, int], x: np.ndarray):
        ctx, self.images = mp.get_context("spawn"), len(x)
        barrier, pipes = ctx.Barrier(layout[0]), [ctx.Pipe() for _ in range(layout[0])]
        self.conns = [a for a, _ in pipes]
        self.procs = [ctx.Process(target=_ceiling_worker, args=(model, served, layout[1], x, barrier, b), daemon=True)
                      for _, b in pipes]
        for p in self.procs:
            p.start()
        for c in self.conns:
            if not c.poll(300) or c.recv() != "ready":
                raise ProcessError("the in-process ceiling did not start")

    def measure(self, seconds: float) -> dict:
        """img/s, latency per call, CPU ms per image over `seconds`."""
        for c in self.conns:
            c.send(seconds)
        done = [c.recv() for c in self.conns]
        n, cpu, lat = sum(d[0] for d in done), sum(d[1] for d in done), [v for d in done for v in d[3]]
        return {"img_s": sum(d[0] / d[2] for d in done) * self.images, "p50_ms": 1000 * float(np.percentile(lat, 50)),
                "p99_ms": 1000 * float(np.percentile(lat, 99)),
                "server_cpu_ms_per_img": 1000 * cpu / (n * self.images),
                "server_cpu_pct": 100 * cpu / max(d[2] for d in done), "requests": n}

    def close(self) -> None:
        for c in self.conns:
            c.send(None)
        for p in self.procs:
            p.join(10)


def timed_ceiling(ceil: Ceiling, seconds: float, meter: TreeSampler) -> dict:
    """The ceiling over `seconds`, and the CPU our idle server took meanwhile (% of a core)."""
    wall = time.time()
    return {**ceil.measure(seconds), "idle_server_cpu_pct": 100 * meter.cpu_seconds(wall, time.time()) / seconds}


def ceiling_row(rnd: int, procs: int, timed: list[dict]) -> dict:
    """The round's ceiling: the mean of its measurements between ours' steps, with their range."""
    row = {k: float(np.mean([t[k] for t in timed])) for k in timed[0]}
    return {"round": rnd, "setup": "ceiling", "kind": "ceiling", "clients": procs, "loadavg": os.getloadavg()[0],
            **row, "requests": sum(t["requests"] for t in timed), "times": len(timed),
            "img_s_range": [min(t["img_s"] for t in timed), max(t["img_s"] for t in timed)]}


async def drive(port: int, raw: bytes, seconds: float, clients: int = 1, rate: float = 0.0, settle: float = 0.0):
    """Closed loop (`clients` keep-alive connections, `settle` s before the measured `seconds`) or open loop (`rate`
    req/s): (Stats of the measured window, its wall-clock start, requests sent, the generator's own CPU seconds)."""
    async with Load(port, timeout=TIMEOUT_S) as load:
        if not seconds:
            return await load.request(raw)
        await load.closed_loop(raw, clients, settle)
        stats, start, wall, cpu = Stats(), time.monotonic(), time.time(), time.thread_time()
        await (load.open_loop(raw, rate, seconds, stats) if rate else load.closed_loop(raw, clients, seconds, stats))
        return stats if rate else stats.window(start, start + seconds), wall, len(stats.rows), time.thread_time() - cpu


class Prober:
    """GET /livez and /readyz in turn every 0.25 s, each on a new connection (as a kubelet does), 2 s timeout, from a
    process of its own: neither the load generator's event loop nor its GIL delays a probe (docs/loadtest.md)."""

    def __init__(self, port: int):
        ctx = mp.get_context("fork")  # (started in milliseconds; it runs urllib only)
        self.done, (self.rows, out) = ctx.Event(), ctx.Pipe(duplex=False)
        self.proc = ctx.Process(target=self.run, args=(port, out), daemon=True)
        self.proc.start()

    def run(self, port: int, out) -> None:
        rows = []
        for path in itertools.cycle(PROBES):
            if self.done.wait(0.25):
                return out.send(rows)
            start = time.monotonic()
            ok = probe(f"http://{HOST}:{port}{path}", timeout=2.0)
            rows.append((time.monotonic() - start, ok))

    def stop(self) -> dict:
        self.done.set()
        rows = self.rows.recv() if self.rows.poll(10) else []
        self.proc.join(5)
        return probe_summary(rows)


def probe_summary(rows: list) -> dict:
    """Probes in ms; one that got no answer, or not 2xx, counts as its 2 s timeout."""
    ms = [1000 * s if ok else 2000.0 for s, ok in rows]
    return {"probes": len(ms), "probe_p99_ms": float(np.percentile(ms, 99, method="higher")), "probe_max_ms": max(ms),
            "probes_over_1s": sum(v > 1000 for v in ms)} if ms else {}


def measure(setup: str, args, x: np.ndarray, t, rnd: int, bar, meta: dict) -> list[dict]:
    """Every step of one setup on its own server; ours also sets `meta`'s layout and served file (its /metadata)."""
    out, ours = args.out / "servers" / f"{setup.replace('@', '-')}-r{rnd}", setup.startswith("ours")
    proc, fmt = server_of(setup, str(args.model) if ours else meta["served"], free_port(), meta.get("layout"),
                          out / "server.log", args.env, t.name)
    if ours and not t.classifier:  # its tensors both ways in OIP v2 binary, as Triton and KServe get them
        fmt = "oip"  # (YOLOv8n's answers are ~7 MB as JSON)
    raw, rows = request(fmt, t, x), []

    def step(kind: str, clients: int, seconds: float, rate: float = 0.0) -> None:
        prober = Prober(proc.port) if setup == "ours" and kind == "closed" else None
        stats, wall, sent, client_cpu = run_async(drive(proc.port, raw, seconds, clients, rate, args.settle))
        probes = prober.stop() if prober else {}
        s, cpu_s = stats.summary(), meter.cpu_seconds(wall, wall + seconds)
        ok = s["statuses"].get("200", 0)
        rows.append({"round": rnd, "setup": setup, "kind": kind, "clients": clients, "loadavg": os.getloadavg()[0],
                     "requests": s["requests"], "ok": ok, "shed": s["shed"], "errors": s["requests"] - ok - s["shed"],
                     "shed_frac": s["shed"] / max(s["requests"], 1), "rps": ok / seconds,
                     "img_s": ok * len(x) / seconds,
                     "p50_ms": s["ok_p50_ms"], "p99_ms": s["ok_p99_ms"], "statuses": s["statuses"],
                     "server_cpu_ms_per_img": 1000 * cpu_s / (ok * len(x)) if ok else None, "failures": s["errors"],
                     "server_cpu_pct": 100 * cpu_s / seconds, "client_cpu_ms_per_req": 1000 * client_cpu / max(sent, 1),
                     **({"rate": rate} if rate else {}), **probes})
        bar.update()

    with proc, TreeSampler(proc.wait_ready(args.start_timeout).pid) as meter:
        status, _, body = run_async(drive(proc.port, raw, 0))
        if status != 200:
            raise ProcessError(f"{setup} answered {status or body} to a first request")
        if setup == "ours":
            run = fetch_metadata(proc.url)["runtime"]
            layout, precision = (int(run["workers"]), int(run["intra_op_threads"])), run.get("precision") or {}
            int8 = isinstance(precision, dict) and precision.get("what") == "int8"  # the others serve that file too
            meta.update(layout=layout, layout_text=f"{layout[0]} workers x {layout[1]} intra-op thread(s)",
                        served=str(Path(args.model).with_name("model_int8.onnx") if int8 else args.model),
                        runtime={k: v for k, v in run.items() if k not in ("guard", "batching", "pid")})
        ceil = Ceiling(str(args.model), meta["served"], meta["layout"], x) if setup == "ours" else None
        try:
            run_async(drive(proc.port, raw, 0.001, max(args.clients), settle=args.warmup))
            timed = [timed_ceiling(ceil, args.step_time / 2, meter)] if ceil else []
            for c in args.clients:
                bar.set_postfix_str(f"round {rnd}: {setup}, {c} clients")
                step("closed", c, args.step_time)
                if ceil:  # each step against the box of its own minute: the ceiling's halves before and after it
                    timed.append(timed_ceiling(ceil, args.step_time / 2, meter))
                    rows[-1].update({f"ceiling_{k}": (timed[-2][k] + timed[-1][k]) / 2
                                     for k in ("img_s", "server_cpu_ms_per_img")})
        finally:
            if ceil:
                ceil.close()
        if setup == "ours" and args.open_fraction > 0:
            rate = args.open_fraction * max(r["rps"] for r in rows)
            bar.set_postfix_str(f"round {rnd}: ours, open loop at {rate:.1f} req/s")
            step("open", 0, args.open_time, rate)
        if ceil:
            rows.append(ceiling_row(rnd, meta["layout"][0], timed))
            bar.update()
    return rows


def goals_of(rows: list[dict], g) -> list[tuple[str, bool]]:
    """(line, met) per goal and round; only what was measured."""
    lines = []
    for rnd in sorted({r["round"] for r in rows}):
        at = {(r["setup"], r["kind"], r["clients"]): r for r in rows if r["round"] == rnd}
        ceil = next((r for (s, k, _), r in at.items() if k == "ceiling"), None)
        ours = sorted((r for (s, k, _), r in at.items() if s == "ours" and k == "closed"), key=lambda r: r["clients"])
        busy, tag = [r for r in ours if r["clients"] >= JUDGED_FROM], f"round {rnd}: "
        for key, goal, what, sign in (("img_s", g.goal_ceiling, "throughput", "≥"),
                                      ("server_cpu_ms_per_img", g.goal_cpu, "server CPU per image", "≤")):
            if goal and ceil and busy and all(r[key] for r in busy):
                ratios = {r["clients"]: r[key] / r.get(f"ceiling_{key}", ceil[key]) for r in busy}
                short = [f"{c}: {v:.2f}x" for c, v in ratios.items() if (v < goal if sign == "≥" else v > goal)]
                lines.append((f"{tag}ours' {what} ÷ in-process at {JUDGED_FROM}–{max(ratios)} clients: "
                              f"{min(ratios.values()):.2f}–{max(ratios.values()):.2f}x (goal {sign} {goal}x at each)"
                              + ("; short at " + ", ".join(short) if short else ""), not short))
        if (op := at.get(("ours", "open", 0))) is not None:
            lines.append((f"{tag}open loop at {op['rate']:.1f} req/s ({g.open_fraction}x capacity): {op['ok']} of "
                          f"{op['requests']} answers 200, statuses {op['statuses']}, p99 {op['p99_ms']} ms "
                          "(goal: all 200)",
                          op["ok"] == op["requests"] > 0))
        if g.goal_probe_ms and busy and all("probes" in r for r in busy):
            p99, worst = max(r["probe_p99_ms"] for r in busy), max(r["probe_max_ms"] for r in busy)
            over = sum(r["probes_over_1s"] for r in busy)
            lines.append((f"{tag}/livez + /readyz while ours is busy ({sum(r['probes'] for r in busy)} probes at "
                          f"{JUDGED_FROM}+ clients): worst step p99 {p99:.0f} ms, max {worst:.0f} ms, {over} over 1 s "
                          f"(goal p99 ≤ {g.goal_probe_ms:g} ms, none over 1 s)", p99 <= g.goal_probe_ms and over == 0))
        for other in sorted({s for s, k, _ in at if k == "closed" and s not in ("ours", "do-nothing")}):
            pairs = [(a, b) for a in ours if (b := at.get((other, "closed", a["clients"]))) and b["ok"]]
            if not pairs:
                continue
            if other.startswith("ours@"):  # no regression: within the spread of identical runs (docs/loadtest.md)
                rule, worse = "≥ 0.95x its img/s and p99 ≤ 1.1x its p99 at every client count", \
                    lambda a, b: a["img_s"] < 0.95 * b["img_s"] or (a["p99_ms"] or math.inf) > 1.1 * b["p99_ms"]
            else:
                rule, worse = "at least its img/s at a lower p99, at every client count", \
                    lambda a, b: a["img_s"] < b["img_s"] or a["errors"] or (a["p99_ms"] or math.inf) >= b["p99_ms"]
            bad = [f"{a['clients']}: {a['img_s']:.1f} vs {b['img_s']:.1f} img/s, p99 {a['p99_ms'] or math.inf:.0f} vs "
                   f"{b['p99_ms']:.0f} ms" for a, b in pairs if worse(a, b)]
            ratio = [a["img_s"] / b["img_s"] for a, b in pairs]
            lines.append((f"{tag}ours vs {other}: {min(ratio):.2f}–{max(ratio):.2f}x its img/s (goal {rule})"
                          + (f"; short at {'; '.join(bad)}" if bad else ""), not bad))
    return lines


def table(rows: list[dict]) -> str:
    fmt = lambda v, d=0: "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:,.{d}f}"  # noqa: E731
    head = ["| round | setup | clients | img/s | × ceiling | p50 / p99 ms | server CPU ms/img (× in-process) | shed | "
            "errors | client CPU ms/req | probes p99 / max ms |", "|" + "---|" * 11]
    ceil = {r["round"]: r for r in rows if r["kind"] == "ceiling"}
    for r in rows:
        c = ceil.get(r["round"])
        x = lambda key: f" ({r[key] / r.get('ceiling_' + key, c[key]):.2f}x)" if c and r.get(key) and r is not c \
            else ""  # noqa: E731 (ours: against the ceiling measured around that step)
        shed = f"{r['shed']} ({r['shed'] / r['requests']:.1%})" if r.get("shed") else "0"
        who = {"open": f"open {r.get('rate', 0):.1f} req/s", "ceiling": f"{r['clients']} proc"}
        head.append(f"| {r['round']} | {r['setup']} | {who.get(r['kind'], r['clients'])} | {fmt(r['img_s'], 1)}"
                    + (" ({:,.1f}–{:,.1f})".format(*r["img_s_range"]) if "img_s_range" in r else "")
                    + f" | {x('img_s').strip(' ()') or '–'} | "
                    f"{fmt(r['p50_ms'], 1)} / {fmt(r['p99_ms'], 1)} | {fmt(r.get('server_cpu_ms_per_img'), 2)}"
                    f"{x('server_cpu_ms_per_img')} | {shed} | {r.get('errors', 0)} | "
                    f"{fmt(r.get('client_cpu_ms_per_req'), 3)} | "
                    + (f"{fmt(r['probe_p99_ms'])} / {fmt(r['probe_max_ms'])} |" if "probes" in r else "– |"))
    return "\n".join(head)


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def report(rows, meta, failed, args, started: float) -> list[tuple[str, bool]]:
    """results.json, results.md and the plot of what is measured so far; the goals."""
    goals, meta = goals_of(rows, args), {**meta, "minutes": round((time.monotonic() - started) / 60, 1),
                                         "uptime_after": uptime()}
    write_json(args.out / "results.json", {"meta": meta, "rows": rows, "failed": failed,
                                           "goals": [{"goal": text, "met": ok} for text, ok in goals]})
    plots.bench(rows, args.out / "bench_serve.png", f"{meta['model_name']}: {meta['layout_text']}, "
                f"{args.images} input(s) per request, {meta['date']}")
    write_text(args.out / "results.md", "\n".join([
        f"`{meta['command']}` ({meta['date']}, {meta['minutes']} min, {cpu_text(meta['cpu'])}; load before: "
        f"{meta['uptime_before']}; after: {meta['uptime_after']})", "",
        f"Model {meta['model_name']} ({meta['served']}, sha256 {meta['sha256'][:12]}…), "
        f"served as {meta['layout_text']}; "
        f"{args.images} input(s) per request, {args.step_time:g} s per step after {args.settle:g} s settling.", "",
        table(rows), "", "Goals:", *(f"- {text} — {'met' if ok else 'SHORT'}" for text, ok in goals),
        *(f"- {f} — NOT MEASURED" for f in failed), "", "![bench-serve](bench_serve.png)", ""]))
    return goals


def bench(args, command: str) -> int:
    started, t = time.monotonic(), describe(metadata_of(args.model))
    x = inputs(t, args.images, None, args.data_dir)[0]
    meta = {"command": command, "date": time.strftime("%Y-%m-%d %H:%M"), "cpu": cpu_summary(),
            "model": str(args.model), "model_name": t.name, "env": args.env, "served": str(args.model),
            "sha256": t.sha256, "layout_text": "?"}
    rows, failed = [], []
    for peer in [s for s in args.setups if s in PEERS]:  # installed before the lock is taken
        try:
            peer_python(peer)
        except (ProcessError, OSError, subprocess.CalledProcessError) as e:
            failed.append(f"{peer}: {str(e).splitlines()[0]}")
            args.setups.remove(peer)
    steps = len(args.clients) * (1 + len(args.setups)) + (args.open_fraction > 0) + 1
    with open(args.lock or os.devnull, "w") as lock, \
            tqdm(total=args.rounds * steps, desc="bench-serve", unit="step") as bar:
        if args.lock:
            bar.set_postfix_str(f"waiting for {args.lock}")
            fcntl.flock(lock, fcntl.LOCK_EX)  # held to the end: nothing else measures meanwhile
        meta["uptime_before"] = uptime()
        for rnd, setup in itertools.product(range(1, args.rounds + 1), ["ours", *args.setups]):
            try:
                rows += measure(setup, args, x, t, rnd, bar, meta)
            except (ProcessError, OSError, KeyError, subprocess.CalledProcessError) as e:
                failed.append(f"round {rnd}: {setup}: {str(e).splitlines()[0]}")
                tqdm.write(f"{setup}: could not run: {e}")
                if setup == "ours":  # nothing to compare with
                    break
                bar.update(len(args.clients))
            report(rows, meta, failed, args, started)  # partial results survive a crash
    goals = report(rows, meta, failed, args, started)
    print((args.out / "results.md").read_text() + f"\nresults.json, results.md, bench_serve.png, logs: {args.out}/")
    return 0 if rows and all(ok for _, ok in goals) and not failed else 1
