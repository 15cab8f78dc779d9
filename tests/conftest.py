"""Shared fixtures: real Fashion-MNIST (no network), and a real exported model made by the
pipeline's own code (a short seeded seed-cnn run, folded, exported, verified)."""
import os
from pathlib import Path

import numpy as np
import pytest

DATA_DIR = Path(os.environ.get("FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not (DATA_DIR / "t10k-images-idx3-ubyte.gz").exists() and not (DATA_DIR / "t10k-images-idx3-ubyte").exists():
        pytest.fail(f"Fashion-MNIST not found in {DATA_DIR}: run `make data` (or set FASHION_MNIST_DIR)")
    return DATA_DIR


@pytest.fixture(scope="session")
def test_images(data_dir) -> tuple[np.ndarray, np.ndarray]:
    """The first 256 real test images, float32 [256,1,28,28] in [0,1], and their labels."""
    from training.data import load_split

    images, labels = load_split(data_dir, "test")
    return images[:256].copy(), labels[:256].copy()


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, data_dir) -> Path:
    """A seeded seed-cnn trained for one epoch on 6,000 images (about 84% test accuracy)."""
    from training.__main__ import main as train_main

    run_dir = tmp_path_factory.mktemp("run") / "seed-cnn"
    assert train_main(["--arch", "seed-cnn", "--epochs", "1", "--subset", "6000", "--val-size", "1000",
                       "--data-dir", str(data_dir), "--out", str(run_dir), "--quiet"]) == 0
    return run_dir


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory, trained_run, data_dir) -> Path:
    """A directory with model.onnx + model.onnx.sha256 (and the unfolded reference and report),
    exported by `python -m export` from `trained_run`."""
    from export.__main__ import main as export_main

    out = tmp_path_factory.mktemp("artifacts")
    assert export_main(["--run", str(trained_run), "--out", str(out), "--data-dir", str(data_dir)]) == 0
    return out


@pytest.fixture(scope="session")
def int8_dir(tmp_path_factory, trained_run, data_dir) -> Path:
    """`python -m export --run trained_run --int8`: model.onnx, model_int8.onnx and its fingerprint, verified."""
    from export.__main__ import main as export_main

    out = tmp_path_factory.mktemp("int8")
    assert export_main(["--run", str(trained_run), "--out", str(out), "--data-dir", str(data_dir), "--int8"]) == 0
    return out
