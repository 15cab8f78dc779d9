"""`make container`: the served model as a container image (docs/deploy.md).

    python -m deploy.container --model artifacts/model.onnx [--base-image IMAGE]

Steps: the model into BentoML's store (`python -m service.store`), `bentoml build` with that tag,
`bentoml containerize` (DOCKER_BUILDKIT=0, bentofile's dockerfile_template deploy/Dockerfile.j2,
the base image as a build argument), then a smoke test of the image as the Deployment runs it
(non-root, no capabilities, 1 CPU): seconds until /readyz answers, /metadata's sha256 is the
model's, one /predict, `docker stop` seconds and exit code. Report: artifacts/container.json;
the Kubernetes manifests rendered with the new tag beside it: artifacts/k8s/bnfold.yaml.

Base image: --base-image / BASE_IMAGE when given; else python:3.11-slim when it is here or can be
pulled; else bnfold/python:3.11-bookworm, made by deploy/base-image.sh when missing. A base without
Python 3.11 (with venv) is refused. Exit 2 on bad input or a missing tool, 1 when the image fails
its checks (over 500 MB, root, not ready in time, a wrong answer).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from common.files import write_json
from common.machine import cpu_summary
from deploy import k8s, tools

REPO = Path(__file__).resolve().parent.parent
DEFAULT_BASE = "python:3.11-slim"
LOCAL_BASE = "bnfold/python:3.11-bookworm"
MAX_MB = 500
READY_GOAL_S = 10.0


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, text=True, capture_output=True, **kw)


def fail(message: str, code: int = 2) -> SystemExit:
    print(f"container: {message}", file=sys.stderr)
    return SystemExit(code)


def choose_base(docker: str, wanted: str | None) -> str:
    if wanted:
        if run([docker, "image", "inspect", wanted]).returncode != 0 and run([docker, "pull", "-q", wanted], timeout=600).returncode != 0:
            raise fail(f"base image {wanted} is neither here nor pullable")
        return wanted
    if run([docker, "image", "inspect", DEFAULT_BASE]).returncode == 0:
        return DEFAULT_BASE
    try:
        if run([docker, "pull", "-q", DEFAULT_BASE], timeout=120).returncode == 0:
            return DEFAULT_BASE
    except subprocess.TimeoutExpired:
        pass
    if run([docker, "image", "inspect", LOCAL_BASE]).returncode != 0:
        print(f"container: {DEFAULT_BASE} cannot be pulled here; making {LOCAL_BASE} (deploy/base-image.sh)", flush=True)
        tools.need("debootstrap")
        if subprocess.run(["bash", str(REPO / "deploy" / "base-image.sh"), LOCAL_BASE], env={**os.environ, "DOCKER": docker}).returncode:
            raise fail("deploy/base-image.sh failed", 1)
    else:
        print(f"container: {DEFAULT_BASE} cannot be pulled here; using {LOCAL_BASE} (made by `make base-image`)")
    return LOCAL_BASE


def check_python(docker: str, base: str) -> str:
    probe = "import sys, venv, ensurepip; print('%d.%d.%d' % sys.version_info[:3])"
    done = run([docker, "run", "--rm", "--entrypoint", "python3", base, "-c", probe])
    version = done.stdout.strip()
    if done.returncode != 0:
        raise fail(f"base image {base} refused: no python3 with venv/ensurepip in it "
                   f"({(done.stderr.strip().splitlines() or ['?'])[-1][:160]}); it needs Python 3.11")
    if not version.startswith("3.11."):
        raise fail(f"base image {base} refused: it has Python {version}, the image needs 3.11 "
                   "(deploy/requirements.lock is for CPython 3.11)")
    return version


def bentoml(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return run([str(Path(sys.executable).with_name("bentoml")), *args], cwd=REPO, env=env)


def build(model: Path, docker: str, base: str, log: Path) -> tuple[str, str, str]:
    """(model tag, bento tag, image tag)."""
    store = run([sys.executable, "-m", "service.store", str(model)], cwd=REPO)
    if store.returncode != 0:
        raise fail(store.stderr.strip() or "python -m service.store failed")
    model_tag = store.stdout.strip().splitlines()[-1]
    built = bentoml("build", "--arg", f"model_tag={model_tag}", "-o", "tag")
    tag = next((line.split("__tag__:", 1)[1] for line in built.stdout.splitlines() if "__tag__:" in line), None)
    if built.returncode != 0 or tag is None:
        raise fail(f"bentoml build failed:\n{(built.stderr or built.stdout)[-2000:]}", 1)
    print(f"container: model {model_tag}, bento {tag}; bentoml containerize from {base} (log {log})", flush=True)
    # BentoML 1.4.36+ refuses a dockerfile_template outside the working directory at containerize
    # time, and its build context is a temporary directory (bentoml/BentoML#5566): make that
    # temporary directory one under ours.
    tmp = REPO / "artifacts" / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "DOCKER_BUILDKIT": "0", "TMPDIR": str(tmp), "BENTOML_DO_NOT_TRACK": "true",
           "PATH": os.pathsep.join([str(Path(docker).parent), os.environ.get("PATH", "")])}
    cmd = [str(Path(sys.executable).with_name("bentoml")), "containerize", tag, "-t", tag,
           "--opt", f"build-arg=BASE_IMAGE={base}"]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:
            out.write(line)
            if line.startswith(("Step ", "INFO: Step ")):  # the legacy builder's progress, one line a step
                print("  " + line.removeprefix("INFO: ").strip()[:110], flush=True)
        proc.wait()
    if proc.returncode != 0 or run([docker, "image", "inspect", tag]).returncode != 0:
        raise fail(f"bentoml containerize failed (exit {proc.returncode}); the end of {log}:\n"
                   + "".join(log.read_text(errors="replace").splitlines(True)[-15:]), 1)
    return model_tag, tag, tag


def http(url: str, body: bytes | None = None, timeout: float = 5.0) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"} if body else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except OSError:
        return 0, b""


def run_args(image: str, name: str, spec: dict, *extra: str) -> list[str]:
    """`docker run` the way the Deployment runs a pod (deploy.k8s.pod_spec): non-root (the image's
    user), no capabilities, no privilege escalation, its CPU and memory limits, SERVICE_WORKERS as
    the downward API gives it from the CPU request, DRAIN_S/SHUTDOWN_TIMEOUT_S, and the grace
    period as docker's stop timeout."""
    return ["run", "-d", "--name", name, "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
            "--cpus", spec["cpu"], "--memory", spec["memory_docker"], "-e", f"SERVICE_WORKERS={spec['workers']}",
            "-e", f"DRAIN_S={spec['drain_s']:g}", "-e", f"SHUTDOWN_TIMEOUT_S={spec['shutdown_s']:g}",
            "--stop-timeout", str(spec["grace_s"]), *extra, image]


def container_ip(docker: str, name: str) -> str:
    return run([docker, "inspect", "-f", "{{range .NetworkSettings.Networks}}{{.IPAddress}} {{end}}", name]).stdout.split()[0]


def smoke(docker: str, image: str, sha256: str) -> dict:
    spec = k8s.pod_spec()
    name = f"bnfold-smoke-{os.getpid()}"
    t0 = time.monotonic()
    started = run([docker, *run_args(image, name, spec)])
    if started.returncode != 0:
        raise fail(f"docker run {image} failed: {started.stderr.strip()[-300:]}", 1)
    try:
        url = f"http://{container_ip(docker, name)}:3000"
        ready_s = None
        while time.monotonic() - t0 < 60:
            if http(url + "/readyz", timeout=1)[0] == 200:
                ready_s = time.monotonic() - t0
                break
            time.sleep(0.1)
        if ready_s is None:
            raise fail(f"{image} not ready after 60 s; its log:\n{run([docker, 'logs', '--tail', '15', name]).stderr}", 1)
        status, body = http(url + "/metadata")
        meta = json.loads(body) if status == 200 else {}
        shape = [1, *meta.get("input", {}).get("shape", [1])[1:]]
        lo, hi = meta.get("input", {}).get("range") or (0.0, 1.0)
        zeros = json.dumps({"images": _full(shape, (lo + hi) / 2)}).encode()
        p_status, p_body = http(url + "/predict", zeros)
        t_stop = time.monotonic()
        run([docker, "stop", name], timeout=120)  # the container's own stop timeout: the grace period
        stop_s = time.monotonic() - t_stop
        state = json.loads(run([docker, "inspect", "-f", "{{json .State}}", name]).stdout or "{}")
        logs = run([docker, "logs", name])
        return {"ready_s": round(ready_s, 2), "metadata_sha256_matches": meta.get("model", {}).get("sha256") == sha256,
                "predict_status": p_status, "predict_answer": p_body[:200].decode(errors="replace"),
                "stop_s": round(stop_s, 2), "exit_code": state.get("ExitCode"),
                "drain_logged": "SIGTERM: draining" in logs.stdout + logs.stderr}
    finally:
        run([docker, "rm", "-f", name])


def _full(shape: list[int], value: float):
    return [_full(shape[1:], value) for _ in range(shape[0])] if shape else round(value, 3)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.container", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", type=Path, default=Path("artifacts/model.onnx"), help="the exported model.onnx (its .sha256 beside it)")
    parser.add_argument("--base-image", default=os.environ.get("BASE_IMAGE") or None, help="base image (default: see above)")
    parser.add_argument("--out", type=Path, default=Path("artifacts/container.json"), help="the report")
    args = parser.parse_args(argv)
    if not args.model.is_file():
        raise fail(f"{args.model} is missing: run `make pipeline` (or python -m export ... --out {args.model.parent})")
    sha_file = args.model.with_name(args.model.name + ".sha256")
    sha256 = sha_file.read_text().split()[0] if sha_file.is_file() else ""
    t0 = time.monotonic()
    docker = tools.ensure_docker()
    base = choose_base(docker, args.base_image)
    python = check_python(docker, base)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    model_tag, bento, image = build(args.model, docker, base, args.out.with_name("container_build.log"))
    build_s = time.monotonic() - t0
    inspect = json.loads(run([docker, "image", "inspect", image]).stdout)[0]
    size_mb = inspect["Size"] / 1e6
    user = inspect["Config"].get("User") or "root"
    print(f"container: {image}: {size_mb:.0f} MB, user {user}, base {base} (Python {python}), {build_s:.0f} s; smoke test",
          flush=True)
    checks = smoke(docker, image, sha256)
    manifests = k8s.render(image, args.out.parent / "k8s" / "bnfold.yaml")
    report = {"image": image, "bento": bento, "model_tag": model_tag, "model_sha256": sha256, "model": str(args.model),
              "base_image": base, "base_python": python, "size_mb": round(size_mb, 1), "user": user,
              "build_s": round(build_s, 1), "date": time.strftime("%Y-%m-%d %H:%M:%S"), "cpu": cpu_summary(),
              "load_average": [round(x, 2) for x in os.getloadavg()], "manifests": str(manifests),
              "command": "python -m deploy.container " + " ".join(sys.argv[1:] if argv is None else argv), **checks}
    goals = {f"size <= {MAX_MB} MB": size_mb <= MAX_MB, "non-root user": user not in ("", "root", "0"),
             "/metadata sha256 is the model's": checks["metadata_sha256_matches"],
             "/predict answers 200": checks["predict_status"] == 200,
             "docker stop: drained, exit 0": checks["drain_logged"] and checks["exit_code"] == 0}
    # a time on a shared machine: reported against its goal, not a reason to fail the build
    report["ready_goal_met"] = checks["ready_s"] <= READY_GOAL_S
    report["goals"] = goals
    write_json(args.out, report)
    for goal, ok in goals.items():
        print(f"  {'PASS' if ok else 'FAIL'}  {goal}")
    print(f"  {'PASS' if report['ready_goal_met'] else 'SLOW'}  ready <= {READY_GOAL_S:g} s: {checks['ready_s']} s "
          f"(load average {report['load_average'][0]})")
    print(f"container: ready after {checks['ready_s']} s, stopped in {checks['stop_s']} s; report {args.out}; "
          f"manifests {manifests}")
    return 0 if all(goals.values()) else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except subprocess.TimeoutExpired as exc:
        print(f"container: {exc}", file=sys.stderr)
        sys.exit(1)
