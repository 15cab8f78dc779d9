"""Make sure a headless browser for the page tests is there: Debian's chromium + chromium-driver.

Installs them with apt-get when they are missing and we are root (what `make test` does on a fresh
machine, like scripts/ensure_data.py for the dataset); otherwise says in one line how to.
Standard library only: it runs before the virtual environment exists.
"""
import argparse
import os
import shutil
import subprocess
import sys

PACKAGES = ["chromium", "chromium-driver"]
BINARIES = {"chromium": "chromium", "chromedriver": "chromium-driver"}


def missing() -> list[str]:
    return [package for binary, package in BINARIES.items() if shutil.which(binary) is None]


def main() -> int:
    parser = argparse.ArgumentParser(prog="python3 scripts/ensure_browser.py", description=__doc__.splitlines()[0])
    parser.parse_args()
    if not missing():
        print(f"browser: {shutil.which('chromium')} and {shutil.which('chromedriver')} found")
        return 0
    if os.geteuid() != 0:
        print(f"browser: {', '.join(missing())} missing; run `sudo apt-get install -y {' '.join(PACKAGES)}` "
              "(the page tests drive it headless)", file=sys.stderr)
        return 1
    print(f"browser: installing {' '.join(PACKAGES)} with apt-get")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES]):
        if subprocess.run(cmd, env=env).returncode != 0:
            print(f"browser: `{' '.join(cmd)}` failed", file=sys.stderr)
            return 1
    if missing():
        print(f"browser: still missing after install: {', '.join(missing())}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
