"""Helpers for the service tests: contract-v2 stand-in models built with onnx.helper (no torch, so
they are fast and independent of training), and `bentoml serve` as a common.procs.ServerProcess.

Stand-ins (`build_model(out_dir, kind)`), each a small seeded network with the contract's metadata:
- "fmnist-v1": [N,1,28,28] NCHW, 10 Fashion-MNIST labels, logits, no contract_version (version 1);
- "rgb32": [N,3,32,32] NCHW RGB, 10 logits, range [0, 1], image_background unknown;
- "nhwc28": [N,28,28,1] NHWC, Keras-like (Transpose to NCHW inside), ends in Softmax:
  output_kind probabilities, image_background dark, range [0, 255];
- "features": [N,20] NC flat features, 3 classes, range [-5, 5] (/classify refuses it).
Contract version 3 (`outputs` describes every graph output):
- "detector": a detection-style head, not a classifier: [N,3,32,32] NCHW in [0, 1] -> boxes
  [N,4,256] and scores [N,3,256] (a sigmoid per class and anchor), paths "[0]" and "[1]";
- "features-v3": a classifier with a second output: [N,20] -> class scores [N,3] ("scores",
  output_name) and their maximum "top" [N] (a rank-1 output).
A model with a real model's cost (issue 25): `build_slow_model(out_dir, layers)`, [N,8,64,64] ->
`layers` 3x3 convolutions of 64 channels (~150 M multiply-adds each: ~10-20 ms per input and layer
on one core) -> 3 logits.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from common.files import write_with_checksum
from common.procs import REPO, ServerProcess, free_port

LABELS = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
SERVICE_TARGET = "service.service:Classifier"


def _conv_net(rng, in_channels: int, size: int, classes: int, nodes: list, inits: list, x: str, out: str) -> str:
    """conv3x3 -> relu -> maxpool2 -> flatten -> gemm, appended to nodes/inits; returns the output name."""
    from onnx import helper, numpy_helper

    conv_w = (rng.standard_normal((8, in_channels, 3, 3)) * 0.5).astype(np.float32)
    pooled = (size - 2) // 2
    inits += [numpy_helper.from_array(conv_w, "conv_w"),
              numpy_helper.from_array((rng.standard_normal(8) * 0.1).astype(np.float32), "conv_b"),
              numpy_helper.from_array((rng.standard_normal((classes, 8 * pooled * pooled)) * 0.05).astype(np.float32), "fc_w"),
              numpy_helper.from_array((rng.standard_normal(classes) * 0.1).astype(np.float32), "fc_b")]
    nodes += [helper.make_node("Conv", [x, "conv_w", "conv_b"], ["conv"], kernel_shape=[3, 3]),
              helper.make_node("Relu", ["conv"], ["relu"]),
              helper.make_node("MaxPool", ["relu"], ["pool"], kernel_shape=[2, 2], strides=[2, 2]),
              helper.make_node("Flatten", ["pool"], ["flat"], axis=1),
              helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], [out], transB=1)]
    return out


def build_model(out_dir: Path, kind: str = "fmnist-v1", seed: int = 0) -> Path:
    """Write out_dir/model.onnx (+ .sha256) of the given kind (module docstring); returns its path."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    nodes: list = []
    inits: list = []
    meta: dict[str, str] = {"arch": f"standin-{kind}", "folded": "true", "test_accuracy": "0.1000"}
    if kind == "fmnist-v1":
        shape, labels, in_name, out_name = ["batch", 1, 28, 28], LABELS, "image", "logits"
        inits += [numpy_helper.from_array(np.array(0.286, np.float32), "mean"),
                  numpy_helper.from_array(np.array(0.353, np.float32), "std")]
        nodes += [helper.make_node("Sub", ["image", "mean"], ["centered"]),
                  helper.make_node("Div", ["centered", "std"], ["normalized"])]
        last = _conv_net(rng, 1, 28, 10, nodes, inits, "normalized", "logits")
        meta.update(input_layout="NCHW", input_range="[0.0, 1.0]")
    elif kind == "rgb32":
        shape, labels, in_name, out_name = ["n", 3, 32, 32], [f"class_{i}" for i in range(10)], "pixels", "logits"
        last = _conv_net(rng, 3, 32, 10, nodes, inits, "pixels", "logits")
        meta.update(contract_version="2", name="cifar-standin", input_layout="NCHW", input_range="[0.0, 1.0]")
    elif kind == "nhwc28":
        shape, labels, in_name, out_name = ["N", 28, 28, 1], LABELS, "input_1", "output_0"
        inits.append(numpy_helper.from_array(np.array(1 / 255, np.float32), "scale"))
        nodes += [helper.make_node("Mul", ["input_1", "scale"], ["scaled"]),
                  helper.make_node("Transpose", ["scaled"], ["nchw"], perm=[0, 3, 1, 2])]
        logits = _conv_net(rng, 1, 28, 10, nodes, inits, "nchw", "scores")
        last = "output_0"
        nodes.append(helper.make_node("Softmax", [logits], ["output_0"], axis=-1))
        meta.update(contract_version="2", name="keras-nhwc", input_layout="NHWC", input_range="[0.0, 255.0]",
                    image_background="dark", output_kind="probabilities")
    elif kind in ("detector", "features-v3"):
        return _build_v3(out_dir, kind, rng)
    elif kind == "features":
        shape, labels, in_name, out_name = ["batch", 20], ["low", "mid", "high"], "x", "scores"
        inits += [numpy_helper.from_array((rng.standard_normal((20, 3))).astype(np.float32), "w"),
                  numpy_helper.from_array(np.zeros(3, np.float32), "b")]
        nodes += [helper.make_node("MatMul", ["x", "w"], ["xw"]), helper.make_node("Add", ["xw", "b"], ["scores"])]
        last = "scores"
        meta.update(contract_version="2", name="tabular", input_layout="NC", input_range="[-5.0, 5.0]")
    else:
        raise ValueError(f"unknown stand-in kind {kind!r}")
    assert last == out_name
    graph = helper.make_graph(nodes, f"standin_{kind}", [helper.make_tensor_value_info(in_name, TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info(out_name, TensorProto.FLOAT, [shape[0], len(labels)])],
                              initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    meta.update(labels=json.dumps(labels), input_name=in_name, output_name=out_name,
                input_shape=json.dumps([None, *shape[1:]]))
    return _save(model, meta, out_dir)


def build_slow_model(out_dir: Path, layers: int = 2, seed: int = 0) -> Path:
    """A classifier that costs what real models cost per input (module docstring)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array((rng.standard_normal((64, 8, 3, 3)) * 0.2).astype(np.float32), "w0"),
             numpy_helper.from_array((rng.standard_normal((3, 64)) * 0.2).astype(np.float32), "fc_w"),
             numpy_helper.from_array(np.zeros(3, np.float32), "fc_b")]
    nodes = [helper.make_node("Conv", ["image", "w0"], ["h0"], kernel_shape=[3, 3], pads=[1, 1, 1, 1])]
    for i in range(1, layers + 1):
        inits.append(numpy_helper.from_array((rng.standard_normal((64, 64, 3, 3)) * 0.05).astype(np.float32), f"w{i}"))
        nodes += [helper.make_node("Conv", [f"h{i - 1}", f"w{i}"], [f"c{i}"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
                  helper.make_node("Relu", [f"c{i}"], [f"h{i}"])]
    nodes += [helper.make_node("GlobalAveragePool", [f"h{layers}"], ["pooled"]),
              helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
              helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"], transB=1)]
    graph = helper.make_graph(nodes, "standin_slow", [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["n", 8, 64, 64])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 3])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    meta = {"contract_version": "2", "name": "slow", "arch": "standin-slow", "folded": "true", "input_layout": "NCHW",
            "input_range": "[0.0, 1.0]", "input_name": "image", "output_name": "logits",
            "input_shape": json.dumps([None, 8, 64, 64]), "labels": json.dumps(["a", "b", "c"])}
    return _save(model, meta, out_dir)


def _save(model, meta: dict[str, str], out_dir: Path) -> Path:
    import onnx

    for key, value in meta.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(model)
    path = Path(out_dir) / "model.onnx"
    write_with_checksum(path, model.SerializeToString())
    return path


def _build_v3(out_dir: Path, kind: str, rng) -> Path:
    """The contract-version-3 stand-ins (module docstring)."""
    from onnx import TensorProto, helper, numpy_helper

    def init(name: str, array, dtype=np.float32) -> None:
        inits.append(numpy_helper.from_array(np.asarray(array, dtype), name))

    nodes: list = []
    inits: list = []
    meta = {"contract_version": "3", "arch": f"standin-{kind}", "folded": "true"}
    if kind == "detector":
        in_name, in_shape = "image", ["n", 3, 32, 32]
        init("stem_w", rng.standard_normal((8, 3, 3, 3)) * 0.4)
        init("stem_b", rng.standard_normal(8) * 0.1)
        init("box_w", rng.standard_normal((4, 8, 1, 1)) * 0.5)
        init("box_b", rng.standard_normal(4))
        init("cls_w", rng.standard_normal((3, 8, 1, 1)) * 0.5)
        init("cls_b", rng.standard_normal(3) * 0.3)
        init("box_shape", [0, 4, -1], np.int64)
        init("cls_shape", [0, 3, -1], np.int64)
        nodes += [helper.make_node("Conv", ["image", "stem_w", "stem_b"], ["stem"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
                  helper.make_node("Relu", ["stem"], ["features"]),
                  helper.make_node("Conv", ["features", "box_w", "box_b"], ["box_map"], kernel_shape=[1, 1]),
                  helper.make_node("Reshape", ["box_map", "box_shape"], ["boxes"]),
                  helper.make_node("Conv", ["features", "cls_w", "cls_b"], ["cls_map"], kernel_shape=[1, 1]),
                  helper.make_node("Sigmoid", ["cls_map"], ["cls_prob"]),
                  helper.make_node("Reshape", ["cls_prob", "cls_shape"], ["scores"])]
        outputs = [("boxes", [4, 256], "[0]"), ("scores", [3, 256], "[1]")]
        meta.update(name="detector", input_layout="NCHW", input_range="[0.0, 1.0]")
    else:
        in_name, in_shape = "x", ["batch", 20]
        init("w", rng.standard_normal((20, 3)))
        init("b", rng.standard_normal(3) * 0.1)
        init("top_axes", [1], np.int64)
        nodes += [helper.make_node("MatMul", ["x", "w"], ["xw"]), helper.make_node("Add", ["xw", "b"], ["scores"]),
                  helper.make_node("ReduceMax", ["scores", "top_axes"], ["top"], keepdims=0)]
        outputs = [("scores", [3], "[0]"), ("top", [], "[1]")]
        meta.update(name="tabular-v3", input_layout="NC", input_range="[-5.0, 5.0]", output_name="scores",
                    labels=json.dumps(["low", "mid", "high"]))
    graph = helper.make_graph(nodes, f"standin_{kind}".replace("-", "_"),
                              [helper.make_tensor_value_info(in_name, TensorProto.FLOAT, in_shape)],
                              [helper.make_tensor_value_info(name, TensorProto.FLOAT, [in_shape[0], *dims])
                               for name, dims, _ in outputs], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    meta.update(input_name=in_name, input_shape=json.dumps([None, *in_shape[1:]]),
                outputs=json.dumps([{"name": name, "shape": [None, *dims], "dtype": "float32", "path": path}
                                    for name, dims, path in outputs]))
    return _save(model, meta, out_dir)


def served_5xx(metrics: str) -> list[str]:
    """The /metrics lines that count 5xx answers, but /readyz's 503 while a worker is still loading
    (what a start-up poll sees): not ready is an answer, not a server error."""
    return [line for line in metrics.splitlines()
            if 'http_response_code="5' in line and float(line.rsplit(" ", 1)[1]) > 0
            and not ('endpoint="/readyz"' in line and 'http_response_code="503"' in line)]


def serve(model_path: Path, log_path: Path, port: int | None = None, **env: str) -> ServerProcess:
    """`bentoml serve` of our service on 127.0.0.1 (not started yet: use as a context manager)."""
    port = port or free_port()
    argv = [sys.executable, "-m", "bentoml", "serve", SERVICE_TARGET, "--host", "127.0.0.1", "--port", str(port)]
    return ServerProcess(argv, port, log_path, env={"MODEL_TAG": "", "MODEL_PATH": str(model_path), **env},
                         name="bentoml serve")


__all__ = ["LABELS", "REPO", "build_model", "build_slow_model", "free_port", "serve", "served_5xx"]
