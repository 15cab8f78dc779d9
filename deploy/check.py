"""`make deploy-check`: a rolling replace of two replicas under load, behind a real balancer.

    python -m deploy.check [--container artifacts/container.json] [--rate 100]

What a cluster would do, with the image `make container` built (artifacts/container.json) and
the numbers of deploy/k8s/bnfold.yaml (deploy.k8s.pod_spec):
  - two containers of the image on a docker network of their own, each run as the Deployment runs
    a pod (non-root, no capabilities, its CPU/memory limit, SERVICE_WORKERS from the CPU request,
    DRAIN_S, the grace period as docker's stop timeout);
  - HAProxy (Debian's) on 127.0.0.1 in front, health-checking /readyz every 0.5 s (the readiness
    probe), retrying only connections that failed before a request was sent (its default);
  - an open-loop load of --rate req/s through HAProxy: real test images when the model is a
    Fashion-MNIST classifier, and every answer's label checked;
  - each replica replaced in turn: start a new one, wait until it is ready and HAProxy has it up,
    then what the kubelet does to the old one: preStop (`sleep`), then SIGTERM with the grace
    period (`docker stop`). The balancer learns about the old one only through /readyz.
    Goal: 0 failed requests, 0 wrong answers.
  - then one replica SIGKILLed under the same load: what HAProxy and the clients see, in numbers;
  - and, without a balancer, what clients that open a connection per request see when one replica
    gets SIGTERM: as a pod (non-root, no capabilities), as root with CAP_NET_ADMIN (the guard's
    listening-socket filter allowed), and behind `docker run -p` (docker's userland proxy).
Report: artifacts/deploy/deploy_check.json (exit 1 when a goal is missed, 2 when it cannot run).
Everything it starts (containers, network, HAProxy) is removed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import dataclasses
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from common.files import write_json
from common.machine import cpu_summary
from common.procs import free_port
from deploy import k8s, tools
from deploy.container import container_ip, http, run, run_args
from loadtest import workload
from loadtest.faults import Load, Stats, http_request

SUBNET = "172.29.71.0/24"
SLOTS = {f"r{i}": f"172.29.71.{10 + i}" for i in range(1, 5)}  # r1 r2 first, r3 r4 replace them
MAX_RATE = 400.0


def haproxy_config(port: int, stats_socket: Path) -> str:
    servers = "\n".join(f"    server {name} {ip}:3000 check" for name, ip in SLOTS.items())
    return f"""global
    maxconn 2000
    stats socket {stats_socket} mode 600 level admin
    log stdout format raw local0
defaults
    mode http
    log global
    option httplog
    option dontlog-normal  # only requests that went wrong are logged (with their termination state)
    timeout connect 1s
    timeout client 30s
    timeout server 30s
    timeout check 1s
    retries 2
    option redispatch 1
    # retry-on stays at its default, conn-failure: only requests that were never sent are retried
frontend api
    bind 127.0.0.1:{port}
    default_backend replicas
backend replicas
    balance roundrobin
    option httpchk GET /readyz
    http-check expect status 200
    default-server inter 500ms fastinter 500ms downinter 500ms fall 1 rise 1
{servers}
"""


class Balancer:
    """HAProxy in the foreground (-db), its stats socket polled for each server's state."""

    def __init__(self, out: Path) -> None:
        out = out.resolve()
        self.port, self.socket = free_port(), out / "haproxy.sock"
        self.cfg = out / "haproxy.cfg"
        self.cfg.write_text(haproxy_config(self.port, self.socket))
        self.log = open(out / "haproxy.log", "wb")
        self.proc = subprocess.Popen([tools.need("haproxy"), "-db", "-f", str(self.cfg)], stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self.events: list[tuple[float, str, str]] = []  # (time, server, new status)
        self.status: dict[str, str] = {}

    async def stats(self) -> dict[str, dict]:
        reader, writer = await asyncio.open_unix_connection(str(self.socket))
        writer.write(b"show stat\n")
        data = await reader.read()
        writer.close()
        rows = csv.DictReader(io.StringIO(data.decode().lstrip("# ")))
        return {r["svname"]: r for r in rows if r["pxname"] == "replicas" and r["svname"] in SLOTS}

    async def watch(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                for name, row in (await self.stats()).items():
                    status = row["status"].split()[0]
                    if self.status.get(name) != status:
                        self.status[name] = status
                        self.events.append((time.monotonic(), name, status))
            except OSError:
                pass
            await asyncio.sleep(0.05)

    async def until(self, server: str, status: str, timeout: float = 30.0) -> float | None:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.status.get(server) == status:
                return time.monotonic()
            if self.proc.poll() is not None:
                raise SystemExit(f"deploy-check: haproxy exited ({self.proc.returncode}); see {self.cfg.with_name('haproxy.log')}")
            await asyncio.sleep(0.02)
        return None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()


class Traffic:
    """Open-loop requests at `rate` through the balancer until stopped; answers' labels checked."""

    def __init__(self, port: int, bodies: list[bytes], labels: list[int] | None, rate: float) -> None:
        self.port, self.bodies, self.labels, self.rate = port, bodies, labels, rate
        self.stats, self.wrong, self.stop = Stats(), 0, asyncio.Event()

    async def one(self, load: Load, i: int, scheduled: float) -> None:
        k = i % len(self.bodies)
        status, _, body = await load.request(self.bodies[k], self.stats, scheduled)
        if status == 200 and self.labels is not None:
            if json.loads(body)["predictions"][0]["class_id"] != self.labels[k]:
                self.wrong += 1

    async def run(self) -> None:
        async with Load(self.port, timeout=15) as load:
            await load.open_loop(b"", self.rate, float("inf"), self.stats, until=self.stop,
                                 send=lambda i, scheduled: self.one(load, i, scheduled))


def timeline(stats: Stats, t0: float) -> list[list]:
    """[second since t0, requests done in it, their p99 ms, failed] for every second of the run."""
    by_second: dict[int, list] = {}
    for t, status, _, latency, _, _ in stats.rows:
        by_second.setdefault(int(t - t0), []).append((latency, status != 200))
    return [[sec, len(v), round(1000 * sorted(x for x, _ in v)[int(0.99 * (len(v) - 1))], 1), sum(f for _, f in v)]
            for sec, v in sorted(by_second.items())]


def failed(summary: dict) -> int:
    return sum(summary["errors"].values()) + sum(n for s, n in summary["statuses"].items() if s != "200")


class Replicas:
    def __init__(self, docker: str, image: str, spec: dict, network: str) -> None:
        self.docker, self.image, self.spec, self.network = docker, image, spec, network
        self.names: dict[str, str] = {}  # slot -> container name

    def start(self, slot: str) -> float:
        name = f"bnfold-deploy-{os.getpid()}-{slot}"
        t0 = time.monotonic()
        done = run([self.docker, *run_args(self.image, name, self.spec, "--network", self.network, "--ip", SLOTS[slot])])
        if done.returncode != 0:
            raise SystemExit(f"deploy-check: docker run failed: {done.stderr.strip()[-300:]}")
        self.names[slot] = name
        while time.monotonic() - t0 < 60:
            if http(f"http://{SLOTS[slot]}:3000/readyz", timeout=1)[0] == 200:
                return time.monotonic() - t0
            time.sleep(0.1)
        raise SystemExit(f"deploy-check: {name} not ready after 60 s:\n{run([self.docker, 'logs', '--tail', '20', name]).stderr}")

    def terminate(self, slot: str) -> dict:
        """What the kubelet does: preStop, then SIGTERM with the grace period (docker stop)."""
        name, t0 = self.names[slot], time.monotonic()
        if self.spec["pre_stop_s"]:
            run([self.docker, "exec", name, "sleep", f"{self.spec['pre_stop_s']:g}"])
        t_term = time.monotonic()
        run([self.docker, "stop", name], timeout=self.spec["grace_s"] + 30)
        state = json.loads(run([self.docker, "inspect", "-f", "{{json .State}}", name]).stdout or "{}")
        return {"pre_stop_s": round(t_term - t0, 2), "sigterm_to_exit_s": round(time.monotonic() - t_term, 2),
                "exit_code": state.get("ExitCode"), "t_sigterm": t_term}

    def memory_mib(self, slot: str) -> float | None:
        out = run([self.docker, "stats", "--no-stream", "--format", "{{.MemUsage}}", self.names[slot]]).stdout.split("/")[0].strip()
        units = {"KiB": 1 / 1024, "MiB": 1, "GiB": 1024}
        return next((round(float(out[: -len(u)]) * f, 1) for u, f in units.items() if out.endswith(u)), None)

    def remove_all(self) -> None:
        for name in self.names.values():
            run([self.docker, "rm", "-f", name])


def requests_for(port: int, model: Path, data_dir: Path, n: int = 64):
    """Single-image /predict bodies and the labels to expect (real test images for a Fashion-MNIST
    classifier, confidently right in-process; seeded random inputs, labels unchecked, otherwise)."""
    status, body = http(f"http://127.0.0.1:{port}/metadata")
    if status != 200:
        raise SystemExit(f"deploy-check: GET /metadata through HAProxy answered {status}")
    target = workload.describe(json.loads(body))
    try:
        x, _, truth = workload.inputs(target, n, model=model if model.is_file() else None, data_dir=data_dir)
    except (workload.DataError, OSError):  # no test set here: seeded random inputs, labels not checked
        x, _, truth = workload.inputs(dataclasses.replace(target, labels=[]), n)
    bodies = [http_request("POST", "/predict", workload.json_body(target, x[i:i + 1])) for i in range(len(x))]
    return bodies, (truth.tolist() if truth is not None else None), target


def sweep_leftovers(docker: str) -> None:
    """Containers and networks of an earlier run that was killed before it could clean up (ours by name)."""
    names = run([docker, "ps", "-aq", "--filter", "name=^bnfold-(deploy|late|smoke)-"]).stdout.split()
    if names:
        run([docker, "rm", "-f", *names])
    for network in run([docker, "network", "ls", "-q", "--filter", "name=^bnfold-deploy-"]).stdout.split():
        run([docker, "network", "rm", network])


async def scenario(docker: str, image: str, spec: dict, out: Path, rate: float, model: Path, data_dir: Path) -> dict:
    sweep_leftovers(docker)
    network = f"bnfold-deploy-{os.getpid()}"
    made = run([docker, "network", "create", "--subnet", SUBNET, network])
    if made.returncode != 0:
        raise SystemExit(f"deploy-check: cannot create docker network {network} ({SUBNET}): {made.stderr.strip()}")
    replicas, balancer, watch_stop = Replicas(docker, image, spec, network), None, asyncio.Event()
    try:
        ready = {slot: await asyncio.to_thread(replicas.start, slot) for slot in ("r1", "r2")}
        balancer = Balancer(out)
        watcher = asyncio.ensure_future(balancer.watch(watch_stop))
        for slot, status in (("r1", "UP"), ("r2", "UP"), ("r3", "DOWN"), ("r4", "DOWN")):  # empty slots start UP
            if await balancer.until(slot, status) is None:
                raise SystemExit(f"deploy-check: HAProxy never saw {slot} {status} (log {out / 'haproxy.log'})")
        bodies, labels, target = requests_for(balancer.port, model, data_dir)
        traffic = Traffic(balancer.port, bodies, labels, rate)
        loading = asyncio.ensure_future(traffic.run())
        t_start = time.monotonic()
        await asyncio.sleep(3)
        steps = []
        for old, new in (("r1", "r3"), ("r2", "r4")):
            t_new = time.monotonic()
            ready[new] = await asyncio.to_thread(replicas.start, new)
            t_up = await balancer.until(new, "UP")
            memory = await asyncio.to_thread(replicas.memory_mib, old)  # docker stats takes ~1-2 s: not on the loop
            stopped = await asyncio.to_thread(replicas.terminate, old)
            down = next((t for t, s, st in balancer.events if s == old and st == "DOWN" and t >= stopped["t_sigterm"]), None)
            steps.append({"old": old, "new": new, "new_started_at_s": round(t_new - t_start, 2),
                          "sigterm_at_s": round(stopped["t_sigterm"] - t_start, 2),
                          "new_ready_s": round(ready[new], 2), "new_in_balancer": t_up is not None,
                          "old_memory_mib_under_load": memory, **{k: v for k, v in stopped.items() if k != "t_sigterm"},
                          "sigterm_to_balancer_down_s": round(down - stopped["t_sigterm"], 2) if down else None})
        t_rolled = time.monotonic()
        await asyncio.sleep(2)
        in_flight = int((await balancer.stats())["r3"]["scur"])
        t_kill = time.monotonic()
        await asyncio.to_thread(run, [docker, "kill", "-s", "KILL", replicas.names["r3"]])
        down = await balancer.until("r3", "DOWN", timeout=15)
        await asyncio.sleep(5)
        traffic.stop.set()
        await loading
        t_end = time.monotonic()
        counters = {name: {k: row.get(k) for k in ("status", "stot", "hrsp_2xx", "hrsp_5xx", "econ", "eresp", "wretr", "wredis", "chkfail", "chkdown")}
                    for name, row in (await balancer.stats()).items()}
        rolling = traffic.stats.window(t_start, t_rolled + 2).summary()
        steady = traffic.stats.window(t_start, t_start + 3).summary()
        killed = traffic.stats.window(t_kill, t_end).summary()
        failures = [(round(t - t_start, 2), status or error, round(1000 * latency, 1))
                    for t, status, error, latency, _, _ in traffic.stats.rows if status != 200]
        return {"image": image, "rate_rps": rate, "pod": spec, "first_ready_s": {k: round(v, 2) for k, v in ready.items()},
                "model": target.name, "labels_checked": labels is not None, "wrong_labels": traffic.wrong,
                "steady_first_3s": steady,
                "rolling": {"seconds": round(t_rolled + 2 - t_start, 1), "steps": steps, **rolling, "failed": failed(rolling)},
                "kill": {"at_s": round(t_kill - t_start, 2), "balancer_down_after_s": round(down - t_kill, 2) if down else None,
                         "seconds": round(t_end - t_kill, 1),
                         "victim_sessions_in_flight": in_flight, **killed, "failed": failed(killed)},
                "failures": failures, "timeline": timeline(traffic.stats, t_start),
                "balancer_events": [(round(t - t_start, 2), s, st) for t, s, st in balancer.events],
                "haproxy_counters": counters}
    finally:
        watch_stop.set()
        if balancer is not None:
            balancer.stop()
        replicas.remove_all()
        run([docker, "network", "rm", network])


LATE_VARIANTS = {
    # name: (docker run options, what it stands for)
    "pod (non-root, no capabilities), own network namespace": (["--network", "host"], "a pod: no proxy in front"),
    "root + CAP_NET_ADMIN, own network namespace": (["--network", "host", "--user", "0", "--cap-add", "NET_ADMIN",
                                                     "--cap-add", "DAC_OVERRIDE"],
                                                    "where the listening-socket filter is allowed"),
    "pod behind `docker run -p` (docker-proxy)": (["-p"], "docker's userland proxy in front"),
}


async def late_connections(docker: str, image: str, spec: dict, conns: int = 8) -> dict:
    """No balancer: `conns` clients each sending one request per new connection straight at one
    replica while it gets SIGTERM (no preStop), until it exited; outcomes after the SIGTERM."""
    results = {}
    for variant, (options, meaning) in LATE_VARIANTS.items():
        port, name = free_port(), f"bnfold-late-{os.getpid()}"
        net = ["-p", f"127.0.0.1:{port}:3000"] if options == ["-p"] else [*options, "-e", f"PORT={port}"]
        done = run([docker, *run_args(image, name, spec, *net)])
        if done.returncode != 0:
            raise SystemExit(f"deploy-check: docker run failed: {done.stderr.strip()[-300:]}")
        try:
            t0 = time.monotonic()
            while http(f"http://127.0.0.1:{port}/readyz", timeout=1)[0] != 200:
                if time.monotonic() - t0 > 60:
                    raise SystemExit(f"deploy-check: {variant}: not ready after 60 s:\n"
                                     + run([docker, "logs", "--tail", "10", name]).stderr)
                await asyncio.sleep(0.1)
            raw = http_request("GET", "/metadata", close=True)
            stop, stats = asyncio.Event(), Stats()
            async with Load(port, timeout=10, connect_timeout=3) as load:
                loading = asyncio.ensure_future(load.closed_loop(raw, conns, 120, stats, until=stop))
                await asyncio.sleep(2)
                t_term = time.monotonic()
                await asyncio.to_thread(run, [docker, "stop", name], timeout=spec["grace_s"] + 30)
                exit_s = time.monotonic() - t_term
                await asyncio.sleep(1)
                stop.set()
                await loading
            after = stats.window(t_term, float("inf")).summary()
            logs = run([docker, "logs", name])
            results[variant] = {"stands_for": meaning, "answered_200": after["statuses"].get("200", 0),
                                "other_answers": {k: v for k, v in after["statuses"].items() if k != "200"},
                                "refused": after["errors"].get("refused", 0),
                                "lost_after_sending": after["errors"].get("reset", 0) + after["errors"].get("timeout", 0),
                                "connect_timeouts": after["errors"].get("connect_timeout", 0), "exit_s": round(exit_s, 2),
                                "socket_filter": "refused (EPERM)" if "cannot filter" in logs.stdout + logs.stderr else "attached"}
        finally:
            run([docker, "rm", "-f", name])
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m deploy.check", description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--container", type=Path, default=Path("artifacts/container.json"), help="make container's report")
    ap.add_argument("--rate", type=float, default=100.0, help=f"requests a second through the balancer (<= {MAX_RATE:g})")
    ap.add_argument("--data-dir", type=Path, default=Path(workload.DEFAULT_DATA_DIR), help="Fashion-MNIST IDX files")
    ap.add_argument("--out", type=Path, default=Path("artifacts/deploy"), help="report directory")
    args = ap.parse_args(argv)
    if not 0 < args.rate <= MAX_RATE:
        ap.error(f"--rate must be in (0, {MAX_RATE:g}]")
    if not args.container.is_file():
        print(f"deploy-check: {args.container} is missing: run `make container` first", file=sys.stderr)
        return 2
    built = json.loads(args.container.read_text())
    docker = tools.ensure_docker()
    if run([docker, "image", "inspect", built["image"]]).returncode != 0:
        print(f"deploy-check: image {built['image']} is gone: run `make container`", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    load_before = [round(x, 2) for x in os.getloadavg()]
    t0 = time.monotonic()
    figures = asyncio.run(scenario(docker, built["image"], k8s.pod_spec(), args.out, args.rate,
                                   Path(built.get("model", "")), args.data_dir))
    figures["late_connections"] = asyncio.run(late_connections(docker, built["image"], k8s.pod_spec()))
    goals = {"rolling replace: failed requests": (figures["rolling"]["failed"], 0),
             "rolling replace: wrong labels": (figures["wrong_labels"], 0),
             "old replicas exit 0 within the grace period": (
                 [s["exit_code"] for s in figures["rolling"]["steps"]], [0, 0]),
             "balancer marked each old replica down": (
                 [s["sigterm_to_balancer_down_s"] is not None for s in figures["rolling"]["steps"]], [True, True])}
    report = {"command": "python -m deploy.check " + " ".join(sys.argv[1:] if argv is None else argv),
              "date": time.strftime("%Y-%m-%d %H:%M:%S"), "load_average_before": load_before, "cpu": cpu_summary(),
              "load_average_after": [round(x, 2) for x in os.getloadavg()], "wall_s": round(time.monotonic() - t0, 1),
              **figures, "goals": {k: {"value": v, "goal": g, "pass": v == g} for k, (v, g) in goals.items()}}
    report["passed"] = all(g["pass"] for g in report["goals"].values())
    write_json(args.out / "deploy_check.json", report)
    r, k = figures["rolling"], figures["kill"]
    print(f"rolling replace of 2 replicas under {args.rate:g} req/s: {r['requests']} requests in {r['seconds']} s, "
          f"{r['failed']} failed, {figures['wrong_labels']} wrong labels, p99 {r['p99_ms']} ms, max {r['max_ms']} ms")
    for s in r["steps"]:
        print(f"  {s['old']} -> {s['new']}: new ready {s['new_ready_s']} s; old: preStop {s['pre_stop_s']} s, "
              f"SIGTERM -> balancer DOWN {s['sigterm_to_balancer_down_s']} s, -> exit {s['sigterm_to_exit_s']} s (code {s['exit_code']})")
    print(f"SIGKILL of one replica ({k['victim_sessions_in_flight']} requests in flight on it): "
          f"HAProxy marked it down after {k['balancer_down_after_s']} s; "
          f"{k['requests']} requests in the {k['seconds']} s after: {k['failed']} failed {k['errors'] or ''} "
          f"statuses {k['statuses']}, p99 {k['p99_ms']} ms, max {k['max_ms']} ms")
    print("no balancer, one replica SIGTERMed under 8 clients opening a connection per request (outcomes after SIGTERM):")
    for variant, v in figures["late_connections"].items():
        print(f"  {variant}: {v['answered_200']} answered, {v['refused']} refused, {v['lost_after_sending']} lost after "
              f"sending, {v['connect_timeouts']} connect timeouts; filter {v['socket_filter']}; exit after {v['exit_s']} s")
    for name, g in report["goals"].items():
        print(f"  {'PASS' if g['pass'] else 'FAIL'}  {name}: {g['value']} (goal {g['goal']})")
    print(f"report {args.out / 'deploy_check.json'}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
