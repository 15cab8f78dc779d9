"""Helpers for the service tests: a stand-in model, real test images, a `bentoml serve` process.

The stand-in is a small seeded CNN built directly with onnx.helper (no torch, so it is fast and
the service tests never depend on training); it follows docs/onnx-contract.md exactly. When the
lead's `model_dir` fixture (a really exported model) exists, the tests use that instead.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("DATA_DIR", "/usr/share/datasets/fashion-mnist"))
LABELS = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def build_standin_model(out_dir: Path, seed: int = 0) -> Path:
    """conv3x3(1->8) -> relu -> maxpool2 -> flatten -> gemm(10), normalization in the graph."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    mean, std = 0.2860, 0.3530
    inits = [
        numpy_helper.from_array(np.array(mean, np.float32), "mean"),
        numpy_helper.from_array(np.array(std, np.float32), "std"),
        numpy_helper.from_array((rng.standard_normal((8, 1, 3, 3)) * 0.5).astype(np.float32), "conv_w"),
        numpy_helper.from_array((rng.standard_normal(8) * 0.1).astype(np.float32), "conv_b"),
        numpy_helper.from_array((rng.standard_normal((10, 8 * 13 * 13)) * 0.05).astype(np.float32), "fc_w"),
        numpy_helper.from_array((rng.standard_normal(10) * 0.1).astype(np.float32), "fc_b"),
    ]
    nodes = [
        helper.make_node("Sub", ["image", "mean"], ["centered"]),
        helper.make_node("Div", ["centered", "std"], ["normalized"]),
        helper.make_node("Conv", ["normalized", "conv_w", "conv_b"], ["conv"], kernel_shape=[3, 3]),
        helper.make_node("Relu", ["conv"], ["relu"]),
        helper.make_node("MaxPool", ["relu"], ["pool"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Flatten", ["pool"], ["flat"], axis=1),
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"], transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "standin",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 1, 28, 28])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    metadata = {
        "labels": json.dumps(LABELS),
        "input_name": "image",
        "output_name": "logits",
        "input_layout": "NCHW",
        "input_shape": json.dumps([None, 1, 28, 28]),
        "input_range": json.dumps([0.0, 1.0]),
        "normalization": json.dumps({"mean": mean, "std": std}),
        "arch": "standin-cnn",
        "test_accuracy": "0.1000",
        "weights_sha256": "0" * 64,
        "torch_version": "none",
        "onnx_version": onnx.__version__,
        "fold_report": json.dumps({}),
        "folded": "true",
    }
    for key, value in metadata.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(model)
    out_dir.mkdir(parents=True, exist_ok=True)
    data = model.SerializeToString()
    path = out_dir / "model.onnx"
    atomic_write_bytes(path, data)
    atomic_write_bytes(out_dir / "model.onnx.sha256", f"{hashlib.sha256(data).hexdigest()}  model.onnx\n".encode())
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def service_env(model_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MODEL_TAG",)}
    env.update({"MODEL_PATH": str(model_path), "BENTOML_DO_NOT_TRACK": "true", **extra})
    return env


class ServeProcess:
    """`bentoml serve` in its own process group on 127.0.0.1:port; stop() kills the whole group."""

    def __init__(self, model_path: Path, port: int, log_path: Path, **env: str) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bentoml", "serve", "service.service:FashionMNISTClassifier",
             "--host", "127.0.0.1", "--port", str(port)],
            cwd=REPO, env=service_env(model_path, **env), stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 60.0) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"bentoml serve exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            try:
                if httpx.get(self.url + "/readyz", timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"bentoml serve not ready after {timeout}s:\n{self.log()[-3000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=5)
        self._log.close()
