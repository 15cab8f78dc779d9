"""The service over real HTTP: one `bentoml serve` subprocess per session on a free port.

Checks every endpoint, that answers equal in-process onnxruntime on real Fashion-MNIST test
images (<= 1e-6), that concurrent (batched) requests answer like single ones, that every class of
bad input gets a clear 4xx JSON error and the server keeps answering correctly afterwards, that
a real OIP v2 client (tritonclient) works, and that a tampered model stops start-up.
"""

from __future__ import annotations

import asyncio
import io
import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from service_helpers import REPO, ServeProcess, free_port, service_env

pytestmark = pytest.mark.timeout(180)

TOL = 1e-6
MAX_BODY_BYTES = 8 * 1024 * 1024  # small enough that the oversize test sends little
N_TEST_IMAGES = 64


@pytest.fixture(scope="session")
def served_model_dir(model_dir) -> Path:
    """A really exported model (tests/conftest.py: a short seed-cnn run through `python -m export`)."""
    return Path(model_dir)


@pytest.fixture(scope="session")
def real_images(test_images) -> tuple[np.ndarray, np.ndarray]:
    images, labels = test_images
    return np.asarray(images[:N_TEST_IMAGES], np.float32), np.asarray(labels[:N_TEST_IMAGES])


@pytest.fixture(scope="session")
def reference(served_model_dir):
    """In-process onnxruntime on the same file: what every HTTP answer must equal."""
    session = ort.InferenceSession(str(served_model_dir / "model.onnx"), providers=["CPUExecutionProvider"])

    def logits(x: np.ndarray) -> np.ndarray:
        return session.run(["logits"], {"image": np.ascontiguousarray(x, np.float32)})[0]

    def probabilities(x: np.ndarray) -> np.ndarray:
        z = logits(x).astype(np.float64)
        e = np.exp(z - z.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    return logits, probabilities


@pytest.fixture(scope="session")
def server(served_model_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    proc = ServeProcess(served_model_dir / "model.onnx", free_port(), log, MAX_BODY_BYTES=str(MAX_BODY_BYTES))
    try:
        proc.wait_ready(timeout=90)
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="session")
def client(server):
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c


def label_names(client) -> list[str]:
    return client.get("/metadata").json()["labels"]


def check_predictions(doc: dict, expected_probs: np.ndarray, names: list[str]) -> None:
    preds = doc["predictions"]
    assert len(preds) == len(expected_probs)
    got = np.array([p["probabilities"] for p in preds])
    np.testing.assert_allclose(got, expected_probs, atol=TOL, rtol=0)
    ids = [p["class_id"] for p in preds]
    assert ids == expected_probs.argmax(axis=1).tolist()
    assert [p["label"] for p in preds] == [names[i] for i in ids]


def assert_still_serving(client, real_images, reference) -> None:
    """After a bad request: a good one still gets the right answer."""
    x = real_images[0][:2]
    r = client.post("/predict", json={"images": x[:, 0].tolist()})
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(
        [p["probabilities"] for p in r.json()["predictions"]], reference[1](x), atol=TOL, rtol=0
    )


def png_bytes(pixels01: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.round(pixels01 * 255).astype(np.uint8), "L").save(buf, format="PNG")
    return buf.getvalue()


# --- health, metadata, BentoML's own endpoints ---------------------------------------------


def test_bentoml_probes_and_metrics(client):
    assert client.get("/livez").status_code == 200
    assert client.get("/readyz").status_code == 200
    client.post("/predict", json={"images": np.zeros((1, 28, 28)).tolist()})
    metrics = client.get("/metrics")
    assert metrics.status_code == 200
    assert 'endpoint="/predict"' in metrics.text


def test_metadata(client, served_model_dir):
    doc = client.get("/metadata").json()
    recorded = (served_model_dir / "model.onnx.sha256").read_text().split()[0]
    assert doc["model"]["sha256"] == recorded
    assert len(doc["labels"]) == 10 and doc["labels"][9] == "Ankle boot"
    assert doc["input"]["shape"] == [None, 1, 28, 28] and doc["input"]["range"] == [0.0, 1.0]
    assert doc["runtime"]["providers"] == ["CPUExecutionProvider"] and doc["runtime"]["device"] == "cpu"


# --- /predict -------------------------------------------------------------------------------


def test_predict_json_matches_in_process_onnxruntime(client, real_images, reference):
    x, _ = real_images
    names = label_names(client)
    for images in (x[:, 0].tolist(), x.tolist()):  # [N,28,28] and [N,1,28,28]
        r = client.post("/predict", json={"images": images})
        assert r.status_code == 200, r.text
        check_predictions(r.json(), reference[1](x), names)


def test_predict_binary_bodies_match(client, real_images, reference):
    x, _ = real_images
    names = label_names(client)
    r = client.post("/predict", content=x.astype("<f4").tobytes(), headers={"Content-Type": "application/octet-stream"})
    assert r.status_code == 200, r.text
    check_predictions(r.json(), reference[1](x), names)
    buf = io.BytesIO()
    np.save(buf, x[:5, 0])
    r = client.post("/predict", content=buf.getvalue(), headers={"Content-Type": "application/x-npy"})
    assert r.status_code == 200, r.text
    check_predictions(r.json(), reference[1](x[:5]), names)


def test_concurrent_requests_answer_like_single_ones(server, client, real_images, reference):
    x, _ = real_images
    singles = [client.post("/predict", json={"images": x[i : i + 1, 0].tolist()}).json() for i in range(16)]

    async def burst():
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(base_url=server.url, timeout=30, limits=limits) as ac:
            # 3 rounds x 64 requests in flight: single images and small batches mixed.
            jobs = []
            for round_ in range(3):
                for i in range(64):
                    j = (i + round_) % len(x)
                    n = 1 + (i % 3)
                    jobs.append((j, n, ac.post("/predict", json={"images": x[j : j + n, 0].tolist()})))
            responses = await asyncio.gather(*(job[2] for job in jobs))
            return [(j, n, r) for (j, n, _), r in zip(jobs, responses)]

    results = asyncio.run(burst())
    expected = reference[1](x)
    for j, n, r in results:
        assert r.status_code == 200, r.text
        got = np.array([p["probabilities"] for p in r.json()["predictions"]])
        np.testing.assert_allclose(got, expected[j : j + n], atol=TOL, rtol=0)
    for i, doc in enumerate(singles):
        np.testing.assert_allclose(doc["predictions"][0]["probabilities"], expected[i], atol=TOL, rtol=0)


# --- /classify ------------------------------------------------------------------------------


def test_classify_png_matches_in_process(client, real_images, reference):
    x, _ = real_images
    names = label_names(client)
    for i in range(4):
        pixels = np.round(x[i, 0] * 255) / 255  # what PNG carries: 8-bit pixels
        r = client.post("/classify", files={"image": ("shirt.png", png_bytes(x[i, 0]), "image/png")})
        assert r.status_code == 200, r.text
        doc = r.json()
        expected = reference[1](pixels[None, None].astype(np.float32))[0]
        np.testing.assert_allclose(doc["probabilities"], expected, atol=TOL, rtol=0)
        assert doc["class_id"] == int(expected.argmax()) and doc["label"] == names[doc["class_id"]]


def test_classify_invert_option_and_large_jpeg(client, real_images, reference):
    x, _ = real_images
    dark_on_light = Image.fromarray(np.round((1 - x[1, 0]) * 255).astype(np.uint8), "L").resize((280, 280))
    buf = io.BytesIO()
    dark_on_light.convert("RGB").save(buf, format="JPEG", quality=95)
    r_inv = client.post("/classify", files={"image": ("p.jpg", buf.getvalue(), "image/jpeg")}, data={"invert": "true"})
    r_raw = client.post("/classify", files={"image": ("p.jpg", buf.getvalue(), "image/jpeg")})
    assert r_inv.status_code == 200 and r_raw.status_code == 200
    # Inverted back it is close to the original test image, so it gets the same answer.
    assert r_inv.json()["class_id"] == int(reference[1](x[1:2])[0].argmax())
    assert r_inv.json()["probabilities"] != r_raw.json()["probabilities"]


def test_bentoml_typed_client_works(server, real_images, reference, tmp_path):
    """BentoML's own Python client discovers the typed API (/docs.json) and gets the same answers."""
    import bentoml

    x, _ = real_images
    paths = httpx.get(server.url + "/docs.json", timeout=30).json()["paths"]
    assert {"/predict", "/classify"} <= set(paths)
    with bentoml.SyncHTTPClient(server.url, timeout=30) as bento:
        doc = bento.predict(images=x[:8, 0])
        probs = reference[1](x[:8])
        assert [p["class_id"] for p in doc["predictions"]] == probs.argmax(axis=1).tolist()
        np.testing.assert_allclose([p["probabilities"] for p in doc["predictions"]], probs, atol=TOL, rtol=0)
        png = tmp_path / "shirt.png"
        png.write_bytes(png_bytes(x[2, 0]))
        one = bento.classify(image=png)
        expected = reference[1]((np.round(x[2:3] * 255) / 255).astype(np.float32))[0]
        np.testing.assert_allclose(one["probabilities"], expected, atol=TOL, rtol=0)
        with pytest.raises(bentoml.exceptions.BentoMLException, match="must lie in") as excinfo:
            bento.predict(images=np.full((1, 28, 28), 2.0, np.float32))
        assert excinfo.value.error_code == 422
        assert bento.predict(images=x[:1, 0])["predictions"][0]["class_id"] == int(probs[0].argmax())


# --- Open Inference Protocol v2 -------------------------------------------------------------


def test_v2_health_and_metadata(client):
    assert client.get("/v2/health/live").json() == {"live": True}
    assert client.get("/v2/health/ready").json() == {"ready": True}
    assert "binary_tensor_data" in client.get("/v2").json()["extensions"]
    meta = client.get("/v2/models/fashion-mnist").json()
    assert meta["inputs"][0] == {"name": "image", "datatype": "FP32", "shape": [-1, 1, 28, 28]}
    assert meta["outputs"][0]["name"] == "logits"
    assert client.get("/v2/models/fashion-mnist/ready").json()["ready"] is True
    assert client.get("/v2/models/fashion-mnist/versions/1").status_code == 200
    missing = client.get("/v2/models/resnet/ready")
    assert missing.status_code == 404 and "unknown model" in missing.json()["error"]


def test_v2_infer_json(client, real_images, reference):
    x, _ = real_images
    body = {"id": "42", "inputs": [{"name": "image", "shape": list(x[:8].shape), "datatype": "FP32", "data": x[:8].ravel().tolist()}]}
    r = client.post("/v2/models/fashion-mnist/infer", json=body)
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["model_name"] == "fashion-mnist" and doc["id"] == "42"
    out = doc["outputs"][0]
    assert out["name"] == "logits" and out["shape"] == [8, 10] and out["datatype"] == "FP32"
    np.testing.assert_allclose(np.reshape(out["data"], (8, 10)), reference[0](x[:8]), atol=TOL, rtol=0)


def test_tritonclient_http_works_unchanged(server, real_images, reference):
    tritonclient_http = pytest.importorskip("tritonclient.http")
    x, _ = real_images
    client = tritonclient_http.InferenceServerClient(url=server.url.removeprefix("http://"))
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("fashion-mnist")
    assert client.get_model_metadata("fashion-mnist")["inputs"][0]["name"] == "image"
    for binary in (True, False):
        inp = tritonclient_http.InferInput("image", list(x[:16].shape), "FP32")
        inp.set_data_from_numpy(x[:16], binary_data=binary)
        outputs = [tritonclient_http.InferRequestedOutput("logits", binary_data=binary)]
        result = client.infer("fashion-mnist", [inp], outputs=outputs, request_id="t1")
        np.testing.assert_allclose(result.as_numpy("logits"), reference[0](x[:16]), atol=TOL, rtol=0)
    # No outputs named: the client asks for everything in binary.
    inp = tritonclient_http.InferInput("image", [1, 1, 28, 28], "FP32")
    inp.set_data_from_numpy(x[:1])
    np.testing.assert_allclose(client.infer("fashion-mnist", [inp]).as_numpy("logits"), reference[0](x[:1]), atol=TOL, rtol=0)
    with pytest.raises(Exception, match="FP32"):
        bad = tritonclient_http.InferInput("image", [1, 1, 28, 28], "FP64")
        bad.set_data_from_numpy(x[:1].astype(np.float64))
        client.infer("fashion-mnist", [bad])
    client.close()


# --- bad input: a clear 4xx, then the server still answers right -----------------------------


def _json(doc) -> dict:
    return {"content": json.dumps(doc).encode(), "headers": {"Content-Type": "application/json"}}


def _raw(array: np.ndarray) -> dict:
    return {"content": np.ascontiguousarray(array, "<f4").tobytes(), "headers": {"Content-Type": "application/octet-stream"}}


def _nan_image() -> np.ndarray:
    x = np.zeros((1, 1, 28, 28), np.float32)
    x[0, 0, 5, 5] = np.nan
    return x


def _inf_image() -> np.ndarray:
    x = np.zeros((1, 1, 28, 28), np.float32)
    x[0, 0, 5, 5] = np.inf
    return x


def _corrupt_png() -> bytes:
    return png_bytes(np.random.default_rng(0).random((64, 64)))[:150]


def _v2(datatype="FP32", shape=(1, 1, 28, 28), data=None) -> dict:
    data = [0.5] * int(np.prod(shape)) if data is None else data
    return _json({"inputs": [{"name": "image", "shape": list(shape), "datatype": datatype, "data": data}]})


BAD_REQUESTS = [
    # (id, path, request kwargs, status, words the error must contain)
    ("wrong-shape", "/predict", _json({"images": np.zeros((1, 28, 27)).tolist()}), 422, "shape"),
    ("wrong-shape-4d", "/predict", _json({"images": np.zeros((1, 3, 28, 28)).tolist()}), 422, "shape"),
    ("wrong-dtype-strings", "/predict", _json({"images": [[["0.1"] * 28] * 28]}), 422, "only numbers"),
    ("wrong-dtype-bools", "/predict", _json({"images": [[[False] * 28] * 28]}), 422, "booleans"),
    ("ragged", "/predict", _json({"images": [[[0.1] * 28] * 27 + [[0.1] * 5]]}), 422, "images"),
    ("nan-json-literal", "/predict", {"content": b'{"images": [[[NaN]]]}', "headers": {"Content-Type": "application/json"}}, 400, "malformed JSON"),
    ("nan-raw", "/predict", _raw(_nan_image()), 422, "NaN or Inf"),
    ("inf-raw", "/predict", _raw(_inf_image()), 422, "NaN or Inf"),
    ("out-of-range-high", "/predict", _json({"images": np.full((1, 28, 28), 255.0).tolist()}), 422, "[0, 1]"),
    ("out-of-range-low", "/predict", _json({"images": np.full((1, 28, 28), -1.0).tolist()}), 422, "[0, 1]"),
    ("empty-body", "/predict", {"content": b"", "headers": {"Content-Type": "application/json"}}, 400, "empty request body"),
    ("malformed-json", "/predict", {"content": b'{"images": [[[0.1,', "headers": {"Content-Type": "application/json"}}, 400, "malformed JSON"),
    ("no-images-field", "/predict", _json({"pixels": []}), 422, '"images" field'),
    ("raw-wrong-length", "/predict", {"content": b"\0" * 100, "headers": {"Content-Type": "application/octet-stream"}}, 422, "multiple of 3136"),
    ("batch-over-limit", "/predict", _raw(np.zeros((1025, 1, 28, 28))), 413, "over the limit of 1024"),
    ("oversize-body", "/predict", {"content": b"[" * (MAX_BODY_BYTES + 1), "headers": {"Content-Type": "application/json"}}, 413, "over the limit"),
    ("wrong-content-type", "/predict", {"content": b"images=1", "headers": {"Content-Type": "text/plain"}}, 415, "not supported"),
    ("gzip-encoding", "/predict", {"content": b"\x1f\x8b", "headers": {"Content-Type": "application/json", "Content-Encoding": "gzip"}}, 415, "Content-Encoding"),
    ("classify-json", "/classify", _json({"image": "x"}), 415, "multipart/form-data"),
    ("classify-not-an-image", "/classify", {"files": {"image": ("a.png", b"definitely not a png", "image/png")}}, 422, "not a PNG or JPEG"),
    ("classify-corrupt-image", "/classify", {"files": {"image": ("a.png", _corrupt_png(), "image/png")}}, 422, "corrupt or truncated"),
    ("classify-empty-file", "/classify", {"files": {"image": ("a.png", b"", "image/png")}}, 422, "empty"),
    ("classify-no-image-field", "/classify", {"files": {"picture": ("a.png", b"x", "image/png")}}, 422, "field named 'image'"),
    ("classify-bad-invert", "/classify", {"files": {"image": ("a.png", png_bytes(np.zeros((28, 28))), "image/png")}, "data": {"invert": "perhaps"}}, 422, "invert"),
    ("classify-broken-multipart", "/classify", {"content": b"--zz\r\nnonsense", "headers": {"Content-Type": "multipart/form-data; boundary=zz"}}, 4, ""),
    ("v2-wrong-datatype", "/v2/models/fashion-mnist/infer", _v2(datatype="INT64", data=[0] * 784), 422, "FP32"),
    ("v2-wrong-shape", "/v2/models/fashion-mnist/infer", _v2(shape=(1, 28, 29)), 422, "shape"),
    ("v2-data-size-mismatch", "/v2/models/fashion-mnist/infer", _v2(data=[0.5] * 10), 422, "needs 784"),
    ("v2-out-of-range", "/v2/models/fashion-mnist/infer", _v2(data=[7.0] * 784), 422, "[0, 1]"),
    ("v2-empty-body", "/v2/models/fashion-mnist/infer", {"content": b"", "headers": {"Content-Type": "application/json"}}, 400, "empty"),
    ("v2-unknown-model", "/v2/models/mnist/infer", _v2(), 404, "unknown model"),
    ("v2-bad-header-length", "/v2/models/fashion-mnist/infer", {"content": b"{}", "headers": {"Content-Type": "application/json", "Inference-Header-Content-Length": "99"}}, 400, "Inference-Header-Content-Length"),
]


@pytest.mark.parametrize("path, kwargs, status, words", [b[1:] for b in BAD_REQUESTS], ids=[b[0] for b in BAD_REQUESTS])
def test_bad_input_gets_clear_4xx_and_server_keeps_serving(client, real_images, reference, path, kwargs, status, words):
    r = client.post(path, **kwargs)
    if status == 4:  # any 4xx will do
        assert 400 <= r.status_code < 500, r.text
    else:
        assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    error = r.json()["error"]
    assert isinstance(error, str) and words in error
    assert_still_serving(client, real_images, reference)


def test_no_500_after_all_that(server, client):
    metrics = client.get("/metrics").text
    assert "bentoml_service_request_total{" in metrics
    # BentoML pre-creates a 500 counter at 0 for each typed @bentoml.api route: count, don't grep.
    served_5xx = [
        line for line in metrics.splitlines()
        if line.startswith("bentoml_service_request_total{") and 'http_response_code="5' in line
        and float(line.rsplit(" ", 1)[1]) > 0
    ]
    assert not served_5xx, served_5xx
    assert server.proc.poll() is None


# --- start-up refusal -----------------------------------------------------------------------


def test_bentoml_serve_refuses_a_tampered_model(served_model_dir, tmp_path):
    for name in ("model.onnx", "model.onnx.sha256"):
        (tmp_path / name).write_bytes((served_model_dir / name).read_bytes())
    data = bytearray((tmp_path / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit in the weights
    (tmp_path / "model.onnx").write_bytes(bytes(data))
    start = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "bentoml", "serve", "service.service:FashionMNISTClassifier", "--port", str(free_port())],
        cwd=REPO, env=service_env(tmp_path / "model.onnx"), capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "refusing to start" in result.stderr and "does not match its recorded sha256" in result.stderr
    assert "Traceback" not in result.stderr
    assert time.monotonic() - start < 60
