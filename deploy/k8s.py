"""deploy/k8s/bnfold.yaml: read it, render it with an image tag, and the numbers the container
targets take from it (so `make deploy-check` runs the image the way the Deployment would).

    python -m deploy.k8s IMAGE [--out artifacts/k8s/bnfold.yaml]    # render
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
SOURCE = REPO / "deploy" / "k8s" / "bnfold.yaml"
CONTAINER = "service"


def load(path: Path = SOURCE) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def by_kind(docs: list[dict]) -> dict[str, dict]:
    return {doc["kind"]: doc for doc in docs}


def container(docs: list[dict]) -> dict:
    spec = by_kind(docs)["Deployment"]["spec"]["template"]["spec"]
    return next(c for c in spec["containers"] if c["name"] == CONTAINER)


def cpu_cores(quantity: str) -> float:
    text = str(quantity)
    return int(text[:-1]) / 1000 if text.endswith("m") else float(text)


def memory_bytes(quantity: str) -> int:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "K": 10**3, "M": 10**6, "G": 10**9}
    text = str(quantity)
    for suffix, factor in units.items():
        if text.endswith(suffix):
            return int(float(text[: -len(suffix)]) * factor)
    return int(text)


def env_value(c: dict, name: str) -> str | None:
    return next((e.get("value") for e in c.get("env", []) if e["name"] == name), None)


def pod_spec(docs: list[dict] | None = None) -> dict:
    """What `docker run` needs to run the image as one pod of the Deployment."""
    docs = docs or load()
    pod = by_kind(docs)["Deployment"]["spec"]["template"]["spec"]
    c = container(docs)
    requests = c["resources"]["requests"]
    pre_stop = c.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
    return {"grace_s": int(pod["terminationGracePeriodSeconds"]),
            "pre_stop_s": float(pre_stop[1]) if pre_stop[:1] == ["sleep"] else 0.0,
            "drain_s": float(env_value(c, "DRAIN_S") or 5), "shutdown_s": float(env_value(c, "SHUTDOWN_TIMEOUT_S") or 20),
            "workers": math.ceil(cpu_cores(requests["cpu"])),  # what the downward API's requests.cpu / 1 gives
            "cpu": str(cpu_cores(c["resources"]["limits"]["cpu"])),
            "memory_docker": f"{memory_bytes(c['resources']['limits']['memory'])}b",
            "replicas": by_kind(docs)["Deployment"]["spec"]["replicas"]}


def render(image: str, out: Path, source: Path = SOURCE) -> Path:
    """The manifests with the service container's image set to `image` (written atomically)."""
    text = source.read_text()
    current = container(load(source))["image"]
    if text.count(f"image: {current}") != 1:
        raise SystemExit(f"k8s: expected one `image: {current}` line in {source}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(text.replace(f"image: {current}", f"image: {image}", 1))
    tmp.replace(out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.k8s", description="render deploy/k8s/bnfold.yaml with an image")
    parser.add_argument("image", help="the image tag `make container` built (artifacts/container.json)")
    parser.add_argument("--out", type=Path, default=REPO / "artifacts" / "k8s" / "bnfold.yaml")
    args = parser.parse_args(argv)
    print(render(args.image, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
