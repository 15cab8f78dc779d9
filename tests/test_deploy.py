"""Deployment (docs/deploy.md): the Kubernetes manifests validated offline and checked against the
service's own shutdown timings, the image's lock file, the Dockerfile `bentoml build` renders from
bentofile.yaml + deploy/Dockerfile.j2, and `make container`'s refusals. No docker needed here:
`make container` and `make deploy-check` (run by .ci/run) build and run the image."""
import copy
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # deploy/ is run from the checkout, not installed

from deploy import container, k8s  # noqa: E402

KUBERNETES = ("1.30.0", "1.37.0")


@pytest.fixture(scope="module")
def docs() -> list[dict]:
    return k8s.load()


@pytest.mark.parametrize("version", KUBERNETES)
def test_manifests_validate(docs, version, tmp_path):
    rendered = k8s.load(k8s.render("registry.example/bnfold-classifier:abc123", tmp_path / "bnfold.yaml"))
    assert [d["kind"] for d in docs] == ["Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"]
    for doc in docs + rendered:
        kubernetes_validate.validate(doc, version, strict=True)
    assert k8s.container(rendered)["image"] == "registry.example/bnfold-classifier:abc123"
    broken = copy.deepcopy(docs[0])
    broken["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["periodSecond"] = 10  # a typo
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, version, strict=True)


def test_shutdown_fits_the_grace_period(docs):
    """preStop + DRAIN_S + the guard's accept grace + SHUTDOWN_TIMEOUT_S < terminationGracePeriodSeconds,
    with the values the service really uses (its defaults when the manifest does not set them)."""
    from service.config import Settings
    from service.guard import ACCEPT_GRACE_S

    spec = k8s.pod_spec(docs)
    c = k8s.container(docs)
    drain = float(k8s.env_value(c, "DRAIN_S") or Settings().drain_s)
    shutdown = float(k8s.env_value(c, "SHUTDOWN_TIMEOUT_S") or Settings().shutdown_timeout_s)
    assert spec["pre_stop_s"] >= 2, "endpoints need time to drop the pod before SIGTERM"
    assert spec["pre_stop_s"] + drain + ACCEPT_GRACE_S + shutdown + 2 <= spec["grace_s"]
    readiness = c["readinessProbe"]
    assert readiness["httpGet"]["path"] == "/readyz" and c["startupProbe"]["httpGet"]["path"] == "/readyz"
    # readiness must fail within the drain window: the balancer stops sending before the listener closes
    assert readiness["periodSeconds"] * readiness.get("failureThreshold", 3) + readiness["timeoutSeconds"] < drain


def test_pod_resources_workers_and_probes(docs):
    kinds = k8s.by_kind(docs)
    deployment, c = kinds["Deployment"], k8s.container(docs)
    assert deployment["spec"]["replicas"] >= 2
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert c["resources"]["requests"] == c["resources"]["limits"]
    workers = next(e for e in c["env"] if e["name"] == "SERVICE_WORKERS")["valueFrom"]["resourceFieldRef"]
    assert workers == {"containerName": c["name"], "resource": "requests.cpu", "divisor": "1"}
    live = c["livenessProbe"]
    assert live["httpGet"]["path"] not in ("/readyz", "/v2/health/ready"), "a draining pod must not be restarted"
    assert live["timeoutSeconds"] >= 5 and live["periodSeconds"] * live["failureThreshold"] >= 60
    pod = deployment["spec"]["template"]
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
    labels = pod["metadata"]["labels"]
    for kind in ("Service", "PodDisruptionBudget"):
        selector = kinds[kind]["spec"]["selector"]
        assert (selector.get("matchLabels") or selector).items() <= labels.items(), kind
    assert kinds["PodDisruptionBudget"]["spec"]["minAvailable"] < deployment["spec"]["replicas"]
    hpa = kinds["HorizontalPodAutoscaler"]["spec"]
    assert hpa["scaleTargetRef"]["name"] == deployment["metadata"]["name"] and hpa["minReplicas"] >= 2
    assert hpa["metrics"][0]["resource"]["name"] == "cpu"
    spec = k8s.pod_spec(docs)
    assert spec["workers"] == 1 and spec["cpu"] == "1.0" and spec["memory_docker"] == f"{2**30}b"


def test_lock_pins_every_package_with_a_hash():
    lines = [line for line in (REPO / "deploy" / "requirements.lock").read_text().splitlines()
             if line and not line.startswith("#")]
    pins = {}
    for line in lines:
        requirement, _, digest = line.partition(" --hash=sha256:")
        name, _, version = requirement.partition("==")
        assert version and len(digest) == 64, line
        pins[name.lower().replace("_", "-")] = version
    wanted = yaml.safe_load((REPO / "bentofile.yaml").read_text())["python"]["packages"]
    for spec in map(Requirement, wanted):
        assert spec.name.lower() in pins, f"{spec.name} is not in deploy/requirements.lock: run `make lock`"
        assert spec.specifier.contains(pins[spec.name.lower()]), f"{spec} vs {pins[spec.name.lower()]}"
    assert pins["bentoml"] == metadata.version("bentoml"), "the bento is built by this bentoml: `make lock`"
    assert "uv" not in pins and "setuptools" not in pins


@pytest.fixture(scope="module")
def bento(model_dir, tmp_path_factory):
    """`make bento`'s two steps: the model into a fresh BentoML store, `bentoml build` with its tag."""
    home = tmp_path_factory.mktemp("bentoml")
    env = {**os.environ, "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "true"}
    bentoml = str(Path(sys.executable).with_name("bentoml"))
    tag = subprocess.run([sys.executable, "-m", "service.store", str(model_dir / "model.onnx")], cwd=REPO, env=env,
                         capture_output=True, text=True, check=True).stdout.strip()
    built = subprocess.run([bentoml, "build", "--arg", f"model_tag={tag}", "-o", "tag"], cwd=REPO, env=env,
                           capture_output=True, text=True)
    assert built.returncode == 0, built.stderr[-2000:]
    name, version = built.stdout.strip().split("__tag__:")[1].split(":")
    return {"env": env, "tag": tag, "bento": f"{name}:{version}", "dir": home / "bentos" / name / version}


def test_bento_dockerfile_is_lean(bento):
    """`bentoml build` renders the image's Dockerfile from bentofile.yaml + deploy/Dockerfile.j2."""
    dockerfile = (bento["dir"] / "env" / "docker" / "Dockerfile").read_text()
    assert "ARG BASE_IMAGE=python:3.11-slim\nFROM ${BASE_IMAGE}" in dockerfile
    for absent in ("apt-get", "build-essential", "uv pip", "uv venv", "--mount="):
        assert absent not in dockerfile, absent
    for present in ("--require-hashes", "--no-cache-dir", "STOPSIGNAL SIGTERM", "USER bentoml", "HEALTHCHECK"):
        assert present in dockerfile, present
    assert (bento["dir"] / "src" / "deploy" / "requirements.lock").read_bytes() == (REPO / "deploy" / "requirements.lock").read_bytes()
    assert yaml.safe_load((bento["dir"] / "bento.yaml").read_text())["args"]["model_tag"] == bento["tag"]


def test_the_bento_serves_its_store_model(bento, model_dir, tmp_path):
    """What the image runs: `bentoml serve <bento>` from the bento's own source, the model from the
    store through the bento argument (not MODEL_PATH): measured at start, every worker loaded."""
    import httpx

    from common.procs import ServerProcess, free_port

    port = free_port()
    bentoml = str(Path(sys.executable).with_name("bentoml"))
    env = {k: v for k, v in bento["env"].items() if k not in ("MODEL_PATH", "MODEL_TAG", "PYTHONPATH")}
    server = ServerProcess([bentoml, "serve", bento["bento"], "--host", "127.0.0.1", "--port", str(port)], port,
                           tmp_path / "serve.log", env={**env, "MODEL_PATH": str(tmp_path / "not-there.onnx")},
                           cwd=tmp_path, name="bentoml serve <bento>")
    with server:
        server.wait_ready(180)
        meta = httpx.get(f"{server.url}/metadata").json()
    expected = (model_dir / "model.onnx.sha256").read_text().split()[0]
    assert meta["model"]["sha256"] == expected and meta["model"]["path"].startswith(str(bento["env"]["BENTOML_HOME"]))
    assert meta["runtime"]["derived"]["ms_per_call"]["1"] > 0


def test_container_without_a_model_says_how_to_make_one(tmp_path):
    done = subprocess.run([sys.executable, "-m", "deploy.container", "--model", str(tmp_path / "model.onnx")],
                          cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "make pipeline" in done.stderr


def fake_docker(tmp_path: Path, answer: str, code: int = 0) -> str:
    """A `docker` whose `run` prints `answer` (what `python3 -c ...` in the base image printed)."""
    script = tmp_path / "docker"
    script.write_text(f"#!/bin/sh\necho '{answer}'\nexit {code}\n")
    script.chmod(0o755)
    return str(script)


@pytest.mark.parametrize("answer, code, reason", [("3.12.1", 0, "it has Python 3.12.1, the image needs 3.11"),
                                                  ("", 127, "no python3 with venv/ensurepip")])
def test_base_without_python_311_is_refused(tmp_path, capsys, answer, code, reason):
    with pytest.raises(SystemExit) as exit_:
        container.check_python(fake_docker(tmp_path, answer, code), "some/base:1")
    assert exit_.value.code == 2 and reason in capsys.readouterr().err
    assert container.check_python(fake_docker(tmp_path, "3.11.2"), "some/base:1") == "3.11.2"


def test_no_container_engine_is_one_line(monkeypatch, capsys):
    from deploy import tools

    monkeypatch.setattr(tools, "docker_answers", lambda client: False)
    monkeypatch.setattr(tools.os, "geteuid", lambda: 1000)
    monkeypatch.setattr(tools, "need", lambda binary: "/usr/sbin/dockerd")
    monkeypatch.setattr(tools.os, "access", lambda path, mode: True)
    with pytest.raises(SystemExit) as exit_:
        tools.ensure_docker()
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and "no docker daemon answers" in err
