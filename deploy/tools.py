"""What the container targets need on the machine, installed and started when missing (as root),
the way scripts/ensure_browser.py does it for the page test:

    python3 -m deploy.tools docker haproxy debootstrap

- docker: Debian's docker.io (client + dockerd). When no daemon answers, dockerd is started in
  the background (log /var/log/bnfold-dockerd.log) and LEFT RUNNING: later targets use it, and
  `kill $(cat /run/bnfold-dockerd.pid)` stops it (docs/deploy.md).
- haproxy, debootstrap: Debian's packages.
Anything that cannot be had: one line saying what is missing and how to get it, exit 2.
Standard library only.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

DOCKERD_LOG = Path("/var/log/bnfold-dockerd.log")
DOCKERD_PID = Path("/run/bnfold-dockerd.pid")
PACKAGES = {"docker": "docker.io", "dockerd": "docker.io", "haproxy": "haproxy", "debootstrap": "debootstrap"}


class Missing(SystemExit):
    """One line on stderr, exit 2."""

    def __init__(self, message: str) -> None:
        print(message, file=sys.stderr)
        super().__init__(2)


def docker_client() -> str:
    """Debian's 20.10 client when there (a newer client without buildx refuses BentoML's BuildKit
    build; we build with DOCKER_BUILDKIT=0 anyway), else whatever `docker` is on PATH."""
    return "/usr/bin/docker" if os.access("/usr/bin/docker", os.X_OK) else (shutil.which("docker") or "docker")


def apt_install(*packages: str) -> None:
    if os.geteuid() != 0:
        raise Missing(f"{', '.join(packages)} missing: run `sudo apt-get install -y {' '.join(packages)}`")
    print(f"tools: installing {' '.join(packages)} with apt-get", flush=True)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *packages]):
        if subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL).returncode != 0:
            raise Missing(f"`{' '.join(cmd)}` failed: install {' '.join(packages)} yourself")


def need(binary: str) -> str:
    found = shutil.which(binary) or next((p for p in (f"/usr/sbin/{binary}", f"/usr/bin/{binary}") if os.access(p, os.X_OK)), None)
    if found is None:
        apt_install(PACKAGES[binary])
        found = shutil.which(binary) or f"/usr/sbin/{binary}"
    return found


def docker_answers(client: str) -> bool:
    try:
        return subprocess.run([client, "info"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def ensure_docker() -> str:
    """A docker client whose daemon answers; starts dockerd when it is installed but not running."""
    if not (os.access("/usr/bin/docker", os.X_OK) or shutil.which("dockerd")):
        apt_install("docker.io")
    client = docker_client()
    if docker_answers(client):
        return client
    dockerd = need("dockerd")
    if os.geteuid() != 0:
        raise Missing("no docker daemon answers: start one (`sudo dockerd &`, or `systemctl start docker`)")
    DOCKERD_LOG.parent.mkdir(parents=True, exist_ok=True)
    with open(DOCKERD_LOG, "ab") as log:
        proc = subprocess.Popen([dockerd], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    DOCKERD_PID.write_text(f"{proc.pid}\n")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if docker_answers(client):
            print(f"tools: started dockerd (pid {proc.pid}, log {DOCKERD_LOG}); it stays running: "
                  f"kill $(cat {DOCKERD_PID}) stops it", flush=True)
            return client
        if proc.poll() is not None:
            break
        time.sleep(0.5)
    tail = DOCKERD_LOG.read_text(errors="replace").strip().splitlines()[-1:] or ["(empty log)"]
    raise Missing(f"dockerd does not start on this machine ({tail[0][:200]}); a container engine needs a kernel "
                  f"that allows it (cgroups, overlayfs): run on a VM or a host with Docker")


def main(argv: list[str]) -> int:
    wanted = argv or ["docker"]
    for name in wanted:
        if name == "docker":
            print(f"tools: docker client {ensure_docker()}, daemon answers")
        elif name in PACKAGES:
            print(f"tools: {need(name)}")
        else:
            raise Missing(f"tools: unknown tool {name!r}; choose from docker, haproxy, debootstrap")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
