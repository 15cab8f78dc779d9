"""Models exported by `python -m export --model / --onnx` (main's export-byo), served by our service
over real HTTP: a ResNet-style 3x32x32 NCHW model (logits), a flat-feature MLP ending in Softmax
(probabilities, never softmaxed twice) and a Keras-style NHWC graph given as ONNX (Transpose inside,
0..255 input, Softmax output). For each: /metadata from the contract, /predict in the model's own
shape equals onnxruntime on the exported file, /classify converts an RGB photo-like upload (or
refuses with 422 for a non-image model), and a battery of bad inputs gets JSON 4xx, never a 500."""

from __future__ import annotations

import io
import json
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

import byo_models
from service_helpers import build_model, serve, served_5xx
from test_export_byo import save_weights

pytestmark = pytest.mark.timeout(300)
MODELS = Path(byo_models.__file__).resolve()

def weights(tmp: Path, factory: str) -> str:
    """tests/byo_models.py:factory with non-trivial BN statistics, saved as a trained model's weights."""
    save_weights(tmp / "w.safetensors", factory)
    return str(tmp / "w.safetensors")


# name, export arguments (after --out), input shape without the batch, kind of output
EXPORTS = {
    "resnet-nchw": (lambda tmp: ["--model", f"{MODELS}:resnet", "--weights", weights(tmp, "resnet"),
                                 "--input-shape", "3,32,32", "--name", "resnet-nchw"], (3, 32, 32), "logits"),
    "mlp-features": (lambda tmp: ["--model", f"{MODELS}:mlp", "--weights", weights(tmp, "mlp"),
                                  "--input-shape", "20", "--input-range", "-3,3", "--name", "mlp-features"], (20,), "probabilities"),
    "keras-nhwc": (lambda tmp: ["--onnx", str(build_model(tmp, "nhwc28")), "--input-range", "0,255", "--background", "dark",
                                "--name", "keras-nhwc"], (28, 28, 1), "probabilities"),
}


@pytest.fixture(scope="module", params=list(EXPORTS))
def exported(request, tmp_path_factory):
    from export.__main__ import main as export_main

    name = request.param
    make_args, shape, kind = EXPORTS[name]
    root = tmp_path_factory.mktemp(name)
    (root / "src").mkdir()
    assert export_main(["--out", str(root / "out"), *make_args(root / "src")]) == 0
    model = root / "out" / "model.onnx"
    with serve(model, root / "serve.log", SERVICE_WORKERS="1") as proc:
        proc.wait_ready(120)
        yield name, shape, kind, proc, ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])


def test_served_like_onnxruntime_in_its_own_shape(exported):
    name, shape, kind, proc, session = exported
    with httpx.Client(base_url=proc.url, timeout=30) as c:
        meta = c.get("/metadata").json()
        assert meta["model"]["name"] == name and meta["model"]["contract_version"] == 3
        assert meta["input"]["shape"] == [None, *shape] and meta["output"]["kind"] == kind
        lo, hi = meta["input"]["range"]
        x = np.random.default_rng(3).uniform(lo, hi, (6, *shape)).astype(np.float32)
        raw = session.run([meta["output"]["name"]], {meta["input"]["name"]: x})[0]
        expected = raw if kind == "probabilities" else np.exp(raw - raw.max(1, keepdims=True)) / np.exp(raw - raw.max(1, keepdims=True)).sum(1, keepdims=True)
        for body in ({"json": {"images": x.tolist()}},
                     {"content": x.tobytes(), "headers": {"content-type": "application/octet-stream"}}):
            r = c.post("/predict", **body)
            assert r.status_code == 200, r.text
            got = np.array([p["probabilities"] for p in r.json()["predictions"]])
            np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)  # probabilities: as given, not softmaxed again
            assert [p["label"] for p in r.json()["predictions"]] == [meta["labels"][i] for i in expected.argmax(1)]
        v2 = c.post(f"/v2/models/{name}/infer", json={"inputs": [{"name": meta["input"]["name"], "shape": list(x.shape),
                                                                  "datatype": "FP32", "data": x.ravel().tolist()}]})
        assert v2.status_code == 200, v2.text
        np.testing.assert_allclose(np.reshape(v2.json()["outputs"][0]["data"], raw.shape), raw, atol=1e-5, rtol=0)


def test_classify_converts_uploads_or_refuses(exported):
    name, shape, kind, proc, _ = exported
    photo = Image.new("RGB", (120, 80), (245, 245, 240))  # a dark-red object on a light background
    photo.paste((120, 20, 20), (40, 10, 80, 70))
    buf = io.BytesIO()
    photo.save(buf, format="JPEG")
    with httpx.Client(base_url=proc.url, timeout=30) as c:
        r = c.post("/classify", files={"image": ("p.jpg", buf.getvalue(), "image/jpeg")})
        if len(shape) != 3:
            assert r.status_code == 422 and "error" in r.json(), r.text
            return
        assert r.status_code == 200, r.text
        doc = r.json()
        labels = c.get("/metadata").json()["labels"]
        assert doc["label"] == labels[doc["class_id"]] and len(doc["probabilities"]) == len(labels)
        assert abs(sum(doc["probabilities"]) - 1) < 1e-4


def test_no_input_gets_a_500(exported):
    name, shape, kind, proc, _ = exported
    n = int(np.prod(shape))
    bad = [
        {"content": b"", "headers": {"content-type": "application/json"}},
        {"content": b"{\"images\": [1, 2", "headers": {"content-type": "application/json"}},
        {"json": {"images": np.zeros((1, n + 1)).tolist()}},
        {"json": {"images": np.full((1, *shape), 1e6).tolist()}},  # outside input_range
        {"json": {"images": [[["x"]]]}},
        {"content": b"\x00" * (4 * n + 2), "headers": {"content-type": "application/octet-stream"}},
        {"content": b"abc", "headers": {"content-type": "application/x-npy"}},
        {"content": b"<xml/>", "headers": {"content-type": "text/xml"}},
    ]
    with httpx.Client(base_url=proc.url, timeout=30) as c:
        for body in bad:
            r = c.post("/predict", **body)
            assert 400 <= r.status_code < 500 and r.json()["error"], (body, r.status_code, r.text)
        for files in ({"image": ("x.png", b"not a png", "image/png")}, {"other": ("x.png", b"", "image/png")}):
            r = c.post("/classify", files=files)
            assert 400 <= r.status_code < 500 and r.json()["error"], r.text
        r = c.post(f"/v2/models/{name}/infer", content=json.dumps({"inputs": [{"name": "nope"}]}))
        assert 400 <= r.status_code < 500 and r.json()["error"], r.text
        metrics = c.get("/metrics").text
    assert not served_5xx(metrics)
