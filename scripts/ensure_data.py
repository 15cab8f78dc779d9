"""Make sure the Fashion-MNIST IDX files are there; install the Debian package when we can.

Standard library only: `make data` runs before the virtual environment exists.
"""
import argparse
import os
import subprocess
import sys
from pathlib import Path

DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
NAMES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]


def missing(data_dir: Path) -> list[str]:
    return [n for n in NAMES if not (data_dir / n).exists() and not (data_dir / f"{n}.gz").exists()]


def main() -> int:
    parser = argparse.ArgumentParser(prog="python3 scripts/ensure_data.py", description=__doc__,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data-dir", default=DEFAULT_DIR, help="directory that must hold the four IDX files")
    data_dir = Path(parser.parse_args().data_dir)
    if not missing(data_dir):
        print(f"data: Fashion-MNIST found in {data_dir}")
        return 0
    if str(data_dir) != DEFAULT_DIR:
        print(f"data: {data_dir} lacks {', '.join(missing(data_dir))} (IDX files, optionally .gz): give DATA_DIR a "
              f"directory that holds all four, or leave DATA_DIR out to use {DEFAULT_DIR} (docs/troubleshooting.md)",
              file=sys.stderr)
        return 1
    if os.geteuid() != 0:
        print("data: Fashion-MNIST is missing; run `sudo apt-get install -y dataset-fashion-mnist` "
              "or pass DATA_DIR=/path/with/idx/files", file=sys.stderr)
        return 1
    print("data: installing dataset-fashion-mnist with apt-get")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "dataset-fashion-mnist"]):
        if subprocess.run(cmd, env=env).returncode != 0:
            print(f"data: `{' '.join(cmd)}` failed", file=sys.stderr)
            return 1
    if missing(data_dir):
        print(f"data: still missing after install: {', '.join(missing(data_dir))}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
