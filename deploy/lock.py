"""`make lock`: deploy/requirements.lock, every Python package the image installs, pinned with its sha256.

    .venv/bin/python deploy/lock.py            # rewrites deploy/requirements.lock (~1 min)

Input: bentofile.yaml's `python.packages` (what the service needs) plus `bentoml==` the version in
this venv (the one that builds the bento). Resolved by pip against PyPI alone (this machine's local
wheel folders are left out, so every hash is PyPI's), for this interpreter (CPython 3.11, Linux
x86_64: the image's), wheels only (nothing is compiled in the image), and constrained to the
versions installed in this venv, so the image runs the versions `make test` tested wherever the two
overlap. The image's build installs the file with `pip install --require-hashes` (deploy/Dockerfile.j2).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
LOCK = REPO / "deploy" / "requirements.lock"
INDEX = "https://pypi.org/simple"


def top_level(bentofile: Path) -> list[str]:
    packages = list(yaml.safe_load(bentofile.read_text())["python"]["packages"])
    return packages + [f"bentoml=={metadata.version('bentoml')}"]


def installed_versions() -> list[str]:
    """This venv's distributions as constraints (the project itself, installed editable, left out)."""
    seen = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name and name.lower() != "bnfold":
            seen[name.lower()] = f"{name}=={dist.version}"
    return sorted(seen.values())


def resolve(requirements: list[str], constraints: list[str]) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "constraints.txt").write_text("\n".join(constraints) + "\n")
        report = Path(tmp) / "report.json"
        env = {**os.environ, "PIP_CONFIG_FILE": os.devnull}
        env = {k: v for k, v in env.items() if k not in ("PIP_FIND_LINKS", "PIP_EXTRA_INDEX_URL", "PIP_INDEX_URL")}
        cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--only-binary=:all:",
               "--disable-pip-version-check", "-q", "--index-url", INDEX, "-c", str(Path(tmp) / "constraints.txt"),
               "--report", str(report), *requirements]
        done = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if done.returncode != 0:
            sys.exit(f"lock: pip could not resolve {' '.join(requirements)}:\n{done.stderr.strip()[-2000:]}")
        return json.loads(report.read_text())["install"]


def render(items: list[dict], requirements: list[str]) -> str:
    lines = ["# Every Python package of the container image, pinned with its sha256 (PyPI wheels, CPython 3.11,",
             "# Linux x86_64). Written by `make lock` (deploy/lock.py) on " + time.strftime("%Y-%m-%d") + " from:",
             "#   " + " ".join(requirements), ""]
    for item in sorted(items, key=lambda i: i["metadata"]["name"].lower()):
        sha = item["download_info"]["archive_info"]["hashes"]["sha256"]
        lines.append(f"{item['metadata']['name']}=={item['metadata']['version']} --hash=sha256:{sha}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python deploy/lock.py", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=LOCK, help="the lock file to write")
    args = parser.parse_args(argv)
    if sys.version_info[:2] != (3, 11) or platform.machine() != "x86_64" or sys.platform != "linux":
        print(f"lock: run this with CPython 3.11 on Linux x86_64 (the image's), not {platform.python_version()} "
              f"on {sys.platform} {platform.machine()}", file=sys.stderr)
        return 2
    requirements = top_level(REPO / "bentofile.yaml")
    items = resolve(requirements, installed_versions())
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(render(items, requirements))
    tmp.replace(args.out)
    print(f"lock: {len(items)} packages -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
