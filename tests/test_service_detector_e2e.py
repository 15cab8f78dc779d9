"""End to end, issue 18 item 1: a small detection-style PyTorch model (a Conv-BN stem and two heads,
forward returning a tuple (boxes [N,4,64], scores [N,3,64])) exported by `python -m export
--model`, then served by `bentoml serve`. The export must describe both outputs (contract version
3: `outputs`, no `output_name`/`labels`), and every answer must equal onnxruntime on the exported
file (and the torch model within float32 rounding): /predict's named outputs, /v2/.../infer via
tritonclient (binary and JSON), /classify's 422 naming the outputs and routes; bad bodies a JSON
4xx, no 5xx.

Needs the export side of multi-output outputs (the lead's package, issue 18 item 1); until it
lands on main this test fails at the export step, on purpose (it is not skipped)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import onnx
import onnxruntime as ort
import pytest

from service_helpers import REPO, serve, served_5xx

pytestmark = pytest.mark.timeout(600)
TOL = 1e-6
ANCHORS, CLASSES = 64, 3

MODEL_SOURCE = '''
import torch
from torch import nn


def conv_bn(c_in, c_out, stride=1):
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())


class TinyDetector(nn.Module):
    """YOLO-style: a stem, then a box head and a class head per anchor (one anchor per cell)."""

    def __init__(self, classes=3):
        super().__init__()
        self.stem = nn.Sequential(conv_bn(3, 8, 2), conv_bn(8, 16, 2))
        self.box = nn.Sequential(conv_bn(16, 16), nn.Conv2d(16, 4, 1))
        self.cls = nn.Sequential(conv_bn(16, 16), nn.Conv2d(16, classes, 1))

    def forward(self, x):
        features = self.stem(x)
        return self.box(features).flatten(2), self.cls(features).sigmoid().flatten(2)


def build():
    return TinyDetector()
'''


def trained_like(module):
    """Non-trivial BatchNorm statistics and affine parameters, so folding changes the weights."""
    import torch

    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.3)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=gen) * 0.2)
    return module.eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    import importlib.util

    import torch
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("tiny-detector")
    source = root / "tiny_detector.py"
    source.write_text(MODEL_SOURCE, encoding="utf-8")
    spec = importlib.util.spec_from_file_location("tiny_detector", source)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch_model = trained_like(module.build())
    save_file(torch_model.state_dict(), str(root / "weights.safetensors"))
    out = root / "out"
    result = subprocess.run([sys.executable, "-m", "export", "--model", f"{source}:build", "--weights",
                             str(root / "weights.safetensors"), "--input-shape", "3,32,32", "--name", "tiny-detector",
                             "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"python -m export --model failed (exit {result.returncode}):\n{result.stderr[-3000:]}"
    return torch_model, out / "model.onnx"


@pytest.fixture(scope="module")
def served(exported, tmp_path_factory):
    _, model = exported
    with serve(model, tmp_path_factory.mktemp("serve") / "serve.log", SERVICE_WORKERS="1") as proc:
        proc.wait_ready(120)
        with httpx.Client(base_url=proc.url, timeout=30) as client:
            yield proc, client


def test_the_export_describes_both_outputs(exported):
    _, model = exported
    meta = {p.key: p.value for p in onnx.load(str(model)).metadata_props}
    assert meta["contract_version"] == "3" and "output_name" not in meta and "labels" not in meta
    outputs = json.loads(meta["outputs"])
    assert [(o["shape"], o["dtype"], o["path"]) for o in outputs] == [([None, 4, ANCHORS], "float32", "[0]"),
                                                                      ([None, CLASSES, ANCHORS], "float32", "[1]")]
    assert [o["name"] for o in outputs] == [o.name for o in onnx.load(str(model)).graph.output]


def test_served_outputs_equal_onnxruntime_and_torch(exported, served):
    import torch
    import tritonclient.http as triton

    torch_model, model = exported
    proc, client = served
    meta = client.get("/metadata").json()
    described = json.loads({p.key: p.value for p in onnx.load(str(model)).metadata_props}["outputs"])
    assert meta["outputs"] == described and (meta["classifier"], meta["output"], meta["labels"]) == (False, None, None)
    names = [o["name"] for o in described]
    x = np.random.default_rng(5).random((6, 3, 32, 32), dtype=np.float32)
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    expected = dict(zip(names, session.run(names, {meta["input"]["name"]: x})))
    with torch.no_grad():
        for want, got in zip(torch_model(torch.from_numpy(x)), expected.values()):
            np.testing.assert_allclose(got, want.numpy(), atol=1e-4, rtol=0)  # the fold kept what the model computes

    for body in ({"json": {"images": x.tolist()}},
                 {"content": x.tobytes(), "headers": {"content-type": "application/octet-stream"}}):
        r = client.post("/predict", **body)
        assert r.status_code == 200, r.text
        assert list(r.json()["outputs"]) == names
        for name in names:
            np.testing.assert_allclose(np.array(r.json()["outputs"][name], np.float32), expected[name], atol=TOL, rtol=0)

    triton_client = triton.InferenceServerClient(url=proc.url.removeprefix("http://"))
    try:
        for binary in (True, False):
            inp = triton.InferInput(meta["input"]["name"], list(x.shape), "FP32")
            inp.set_data_from_numpy(x, binary_data=binary)
            result = triton_client.infer("tiny-detector", [inp], outputs=[triton.InferRequestedOutput(n, binary_data=binary)
                                                                          for n in names])
            for name in names:
                np.testing.assert_allclose(result.as_numpy(name), expected[name], atol=TOL, rtol=0)
    finally:
        triton_client.close()


def test_classify_refuses_and_bad_input_is_a_json_4xx(served):
    proc, client = served
    names = [o["name"] for o in client.get("/metadata").json()["outputs"]]
    r = client.post("/classify", files={"image": ("p.png", b"\x89PNG", "image/png")})
    assert r.status_code == 422
    for words in ("not a classifier", *names, "POST /predict", "POST /v2/models/tiny-detector/infer"):
        assert words in r.json()["error"]
    for body in ({"json": {"images": np.zeros((1, 3, 32, 32 + 1)).tolist()}}, {"json": {"images": [[1, 2]]}},
                 {"content": b"\0" * 7, "headers": {"content-type": "application/octet-stream"}}):
        r = client.post("/predict", **body)
        assert 400 <= r.status_code < 500 and r.json()["error"], r.text
    metrics = client.get("/metrics").text
    assert not served_5xx(metrics)
    assert proc.proc.poll() is None
