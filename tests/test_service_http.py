"""The service over real HTTP: `bentoml serve` subprocesses on free ports.

The real Fashion-MNIST model (tests/conftest.py `model_dir`: exported by today's `python -m
export --run`, contract version 1) serves the full check: every route, answers equal to
in-process onnxruntime on real test images (<= 1e-6), concurrent requests like single ones,
BentoML's Python client and tritonclient over HTTP, the bad-input battery (a JSON 4xx each, then a
right answer), no 500 in /metrics, and a tampered model refused at start-up. Three contract-v2
stand-ins (RGB 3x32x32 NCHW logits; Keras-like NHWC [N,28,28,1] ending in Softmax; flat NC
features) check that the service serves what the metadata says, not Fashion-MNIST.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from service_helpers import REPO, build_model, free_port, serve, served_5xx

pytestmark = pytest.mark.timeout(300)

TOL = 1e-6
MAX_BODY_BYTES = 8 * 1024 * 1024  # small enough that the oversize case sends little
N_TEST_IMAGES = 64


@pytest.fixture(scope="session")
def real_images(test_images) -> tuple[np.ndarray, np.ndarray]:
    images, labels = test_images
    return np.asarray(images[:N_TEST_IMAGES], np.float32), np.asarray(labels[:N_TEST_IMAGES])


@pytest.fixture(scope="session")
def reference(model_dir):
    """In-process onnxruntime on the same file: what every HTTP answer must equal."""
    session = ort.InferenceSession(str(Path(model_dir) / "model.onnx"), providers=["CPUExecutionProvider"])

    def logits(x: np.ndarray) -> np.ndarray:
        return session.run(["logits"], {"image": np.ascontiguousarray(x, np.float32)})[0]

    def probabilities(x: np.ndarray) -> np.ndarray:
        z = logits(x).astype(np.float64)
        e = np.exp(z - z.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    return logits, probabilities


@pytest.fixture(scope="session")
def server(model_dir, tmp_path_factory):
    with serve(Path(model_dir) / "model.onnx", tmp_path_factory.mktemp("serve") / "serve.log",
               MAX_BODY_BYTES=str(MAX_BODY_BYTES)) as proc:
        proc.wait_ready(120)
        yield proc


@pytest.fixture(scope="session")
def client(server):
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c


def png_bytes(pixels01: np.ndarray, mode: str = "L") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.round(pixels01 * 255).astype(np.uint8), mode).save(buf, format="PNG")
    return buf.getvalue()


def check_predictions(doc: dict, expected: np.ndarray, names: list[str]) -> None:
    preds = doc["predictions"]
    got = np.array([p["probabilities"] for p in preds])
    np.testing.assert_allclose(got, expected, atol=TOL, rtol=0)
    assert [p["class_id"] for p in preds] == expected.argmax(axis=1).tolist()
    assert [p["label"] for p in preds] == [names[i] for i in expected.argmax(axis=1)]


def assert_still_serving(client, real_images, reference) -> None:
    x = real_images[0][:2]
    r = client.post("/predict", json={"images": x[:, 0].tolist()})
    assert r.status_code == 200, r.text
    np.testing.assert_allclose([p["probabilities"] for p in r.json()["predictions"]], reference[1](x), atol=TOL, rtol=0)


# --- metadata, probes, docs ----------------------------------------------------------------


def test_metadata_follows_the_contract(client, model_dir):
    doc = client.get("/metadata").json()
    assert doc["model"]["sha256"] == (Path(model_dir) / "model.onnx.sha256").read_text().split()[0]
    # a --run export carries every version-1 key and, since export-byo, contract_version 2
    assert doc["model"]["name"] == "fashion-mnist" and doc["model"]["contract_version"] == 3
    assert doc["labels"][9] == "Ankle boot" and len(doc["labels"]) == 10
    assert doc["input"] | {"max_images_per_request": 0, "max_body_bytes": 0} == {
        "name": "image", "layout": "NCHW", "shape": [None, 1, 28, 28], "accepted_shapes": [[None, 28, 28], [None, 1, 28, 28]],
        "channels": 1, "height": 28, "width": 28, "range": [0.0, 1.0], "background": "dark", "dtype": "float32",
        "max_images_per_request": 0, "max_body_bytes": 0, "content_types": ["application/json", "application/octet-stream",
                                                                             "application/x-npy"], "classify": True}
    assert doc["input"]["max_body_bytes"] == MAX_BODY_BYTES and doc["input"]["max_images_per_request"] == 1024
    assert doc["output"] == {"name": "logits", "kind": "logits", "shape": [None, 10]}
    assert doc["outputs"] == [{"name": "logits", "shape": [None, 10], "dtype": "float32", "path": ""}]
    assert doc["classifier"] is True and doc["classify_refusal"] is None
    assert doc["runtime"]["providers"] == ["CPUExecutionProvider"] and doc["runtime"]["guard"]["draining"] is False


def test_probes_page_docs_and_unknown_paths(client):
    assert client.get("/livez").status_code == 200 and client.get("/healthz").status_code == 200
    assert client.get("/readyz").json() == {"ready": True}
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "/ui/page.js" in page.text and "http" not in page.text.replace('name="viewport"', "")  # nothing external
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert client.get("/ui/page.js").status_code == 200 and client.get("/docs").status_code == 200
    assert client.get("/static_content/swagger-ui-bundle.js").status_code == 200  # BentoML's bundled Swagger UI
    missing = client.get("/nope")
    assert missing.status_code == 404 and "no route" in missing.json()["error"]
    wrong = client.get("/predict")
    assert wrong.status_code == 405 and wrong.headers["allow"] == "POST" and "use POST" in wrong.json()["error"]


def test_docs_json_describes_what_is_served(client):
    doc = client.get("/docs.json").json()
    paths = set(doc["paths"])
    assert {"/predict", "/classify", "/metadata", "/readyz", "/v2", "/v2/models/{name}/infer", "/livez", "/metrics"} <= paths
    images = doc["components"]["schemas"]["Images"]["properties"]["images"]
    assert len(images["oneOf"]) == 2 and images["oneOf"][0]["maxItems"] == 1024  # [N,28,28] or [N,1,28,28]
    assert images["oneOf"][1]["items"]["minItems"] == 1 and images["oneOf"][1]["items"]["items"]["items"]["maxItems"] == 28
    for path, ops in doc["paths"].items():  # every documented GET really answers (no 404/405)
        if "get" in ops:
            concrete = path.replace("{name}", "fashion-mnist").replace("{version}", "1")
            assert client.get(concrete).status_code == 200, path
        if "post" in ops:
            concrete = path.replace("{name}", "fashion-mnist").replace("{version}", "1")
            assert client.post(concrete, content=b"").status_code not in (404, 405), path


# --- /predict ------------------------------------------------------------------------------


def test_predict_json_raw_npy_match_in_process_onnxruntime(client, real_images, reference):
    x, _ = real_images
    names = client.get("/metadata").json()["labels"]
    for images in (x[:, 0].tolist(), x.tolist()):
        r = client.post("/predict", json={"images": images})
        assert r.status_code == 200, r.text
        check_predictions(r.json(), reference[1](x), names)
    r = client.post("/predict", content=x.astype("<f4").tobytes(), headers={"Content-Type": "application/octet-stream"})
    check_predictions(r.json(), reference[1](x), names)
    buf = io.BytesIO()
    np.save(buf, x[:5, 0])
    r = client.post("/predict", content=buf.getvalue(), headers={"Content-Type": "application/x-npy"})
    check_predictions(r.json(), reference[1](x[:5]), names)


def test_concurrent_requests_answer_like_single_ones(server, real_images, reference):
    x, _ = real_images

    async def burst():
        async with httpx.AsyncClient(base_url=server.url, timeout=30, limits=httpx.Limits(max_connections=64)) as ac:
            jobs = [(j, n) for r in range(3) for i in range(64) for j, n in [((i + r) % len(x), 1 + i % 3)]]
            answers = await asyncio.gather(*(ac.post("/predict", json={"images": x[j:j + n, 0].tolist()}) for j, n in jobs))
            big = await ac.post("/predict", content=x.astype("<f4").tobytes(), headers={"Content-Type": "application/octet-stream"})
            return list(zip(jobs, answers)), big

    results, big = asyncio.run(burst())
    expected = reference[1](x)
    for (j, n), r in results:
        assert r.status_code == 200, r.text
        np.testing.assert_allclose([p["probabilities"] for p in r.json()["predictions"]], expected[j:j + n], atol=TOL, rtol=0)
    np.testing.assert_allclose([p["probabilities"] for p in big.json()["predictions"]], expected, atol=TOL, rtol=0)


# --- /classify -----------------------------------------------------------------------------


def test_classify_a_model_sized_png_exactly(client, real_images, reference):
    x, _ = real_images
    for i in range(4):
        r = client.post("/classify", files={"image": ("shirt.png", png_bytes(x[i, 0]), "image/png")})
        assert r.status_code == 200, r.text
        expected = reference[1]((np.round(x[i:i + 1] * 255) / 255).astype(np.float32))[0]
        np.testing.assert_allclose(r.json()["probabilities"], expected, atol=TOL, rtol=0)


def test_classify_photos_like_a_person_takes_them(client, real_images, reference):
    """Test images as a phone photo would have them: dark on a light background, enlarged, off
    centre, as RGB JPEG. Auto polarity (the border) and the crop recover the model's view: the
    labels mostly agree with the model on the original images; with invert=false they do not."""
    x, _ = real_images
    expected = reference[1](x[:24]).argmax(axis=1)
    agree = {"auto": 0, "false": 0}
    for i in range(24):
        photo = Image.new("RGB", (300, 220), (235, 235, 230))
        item = Image.fromarray(np.round((1 - x[i, 0]) * 235).astype(np.uint8)).resize((112, 112), Image.Resampling.BICUBIC)
        photo.paste(item.convert("RGB"), (150, 60))
        buf = io.BytesIO()
        photo.save(buf, format="JPEG", quality=92)
        for mode in agree:
            data = {} if mode == "auto" else {"invert": mode}
            r = client.post("/classify", files={"image": ("photo.jpg", buf.getvalue(), "image/jpeg")}, data=data)
            assert r.status_code == 200, r.text
            agree[mode] += r.json()["class_id"] == expected[i]
    assert agree["auto"] >= 18 and agree["false"] <= 12, agree


def test_bentoml_python_client(server, real_images, reference, tmp_path):
    import bentoml

    x, _ = real_images
    with bentoml.SyncHTTPClient(server.url, timeout=30) as bento:
        doc = bento.predict(images=x[:8, 0])
        check_predictions(doc, reference[1](x[:8]), httpx.get(server.url + "/metadata").json()["labels"])
        png = tmp_path / "shirt.png"
        png.write_bytes(png_bytes(x[2, 0]))
        one = bento.classify(image=png)
        np.testing.assert_allclose(one["probabilities"], reference[1]((np.round(x[2:3] * 255) / 255).astype(np.float32))[0],
                                   atol=TOL, rtol=0)
        assert bento.classify(image=png, invert=False)["class_id"] == one["class_id"]
        with pytest.raises(bentoml.exceptions.BentoMLException, match="must lie in") as excinfo:
            bento.predict(images=np.full((1, 28, 28), 2.0, np.float32))
        assert excinfo.value.error_code == 422


# --- Open Inference Protocol v2 ---------------------------------------------------------------


def test_v2_routes(client, real_images, reference):
    assert client.get("/v2/health/live").json() == {"live": True}
    assert client.get("/v2/health/ready").json() == {"ready": True}
    meta = client.get("/v2/models/fashion-mnist").json()
    assert meta["inputs"][0] == {"name": "image", "datatype": "FP32", "shape": [-1, 1, 28, 28]}
    assert client.get("/v2/models/fashion-mnist/versions/1/ready").json()["ready"] is True
    missing = client.get("/v2/models/resnet/ready")
    assert missing.status_code == 404 and "unknown model" in missing.json()["error"]
    x, _ = real_images
    body = {"id": "42", "inputs": [{"name": "image", "shape": [8, 1, 28, 28], "datatype": "FP32", "data": x[:8].ravel().tolist()}]}
    out = client.post("/v2/models/fashion-mnist/infer", json=body).json()
    assert out["id"] == "42" and out["outputs"][0]["shape"] == [8, 10]
    np.testing.assert_allclose(np.reshape(out["outputs"][0]["data"], (8, 10)), reference[0](x[:8]), atol=TOL, rtol=0)


def test_tritonclient_http(server, real_images, reference):
    import tritonclient.http as triton

    x, _ = real_images
    client = triton.InferenceServerClient(url=server.url.removeprefix("http://"))
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("fashion-mnist")
    for binary in (True, False):
        inp = triton.InferInput("image", list(x[:16].shape), "FP32")
        inp.set_data_from_numpy(x[:16], binary_data=binary)
        result = client.infer("fashion-mnist", [inp], outputs=[triton.InferRequestedOutput("logits", binary_data=binary)])
        np.testing.assert_allclose(result.as_numpy("logits"), reference[0](x[:16]), atol=TOL, rtol=0)
    with pytest.raises(Exception, match="FP32"):
        bad = triton.InferInput("image", [1, 1, 28, 28], "FP64")
        bad.set_data_from_numpy(x[:1].astype(np.float64))
        client.infer("fashion-mnist", [bad])
    client.close()


# --- bad input: a clear JSON 4xx, then the server still answers right ----------------------------


def _json(doc) -> dict:
    return {"content": json.dumps(doc).encode(), "headers": {"Content-Type": "application/json"}}


def _raw(array: np.ndarray) -> dict:
    return {"content": np.ascontiguousarray(array, "<f4").tobytes(), "headers": {"Content-Type": "application/octet-stream"}}


def _with(value: float) -> np.ndarray:
    x = np.zeros((1, 1, 28, 28), np.float32)
    x[0, 0, 5, 5] = value
    return x


def _v2(datatype="FP32", shape=(1, 1, 28, 28), data=None) -> dict:
    return _json({"inputs": [{"name": "image", "shape": list(shape), "datatype": datatype,
                              "data": [0.5] * int(np.prod(shape)) if data is None else data}]})


BAD_REQUESTS = [
    # (id, method, path, request kwargs, status, words the error must contain)
    ("wrong-shape", "/predict", _json({"images": np.zeros((1, 28, 27)).tolist()}), 422, "shape"),
    ("wrong-shape-4d", "/predict", _json({"images": np.zeros((1, 3, 28, 28)).tolist()}), 422, "shape"),
    ("strings", "/predict", _json({"images": [[["0.1"] * 28] * 28]}), 422, "only numbers"),
    ("bools", "/predict", _json({"images": [[[False] * 28] * 28]}), 422, "booleans"),
    ("ragged", "/predict", _json({"images": [[[0.1] * 28] * 27 + [[0.1] * 5]]}), 422, "images"),
    ("nan-literal", "/predict", {"content": b'{"images": [[[NaN]]]}', "headers": {"Content-Type": "application/json"}}, 400, "malformed JSON"),
    ("nan-raw", "/predict", _raw(_with(np.nan)), 422, "NaN or Inf"),
    ("inf-raw", "/predict", _raw(_with(np.inf)), 422, "NaN or Inf"),
    ("too-high", "/predict", _json({"images": np.full((1, 28, 28), 255.0).tolist()}), 422, "[0, 1]"),
    ("too-low", "/predict", _json({"images": np.full((1, 28, 28), -1.0).tolist()}), 422, "[0, 1]"),
    ("empty-body", "/predict", {"content": b"", "headers": {"Content-Type": "application/json"}}, 400, "empty request body"),
    ("malformed-json", "/predict", {"content": b'{"images": [[[0.1,', "headers": {"Content-Type": "application/json"}}, 400, "malformed JSON"),
    ("no-images-field", "/predict", _json({"pixels": []}), 422, '"images" field'),
    ("raw-length", "/predict", {"content": b"\0" * 100, "headers": {"Content-Type": "application/octet-stream"}}, 422, "multiple of 3136"),
    ("batch-over-limit", "/predict", _raw(np.zeros((1025, 1, 28, 28))), 413, "over the limit of 1024"),
    ("body-over-limit", "/predict", {"content": b"[" * (MAX_BODY_BYTES + 1), "headers": {"Content-Type": "application/json"}}, 413, "over the limit"),
    ("content-type", "/predict", {"content": b"images=1", "headers": {"Content-Type": "text/plain"}}, 415, "not supported"),
    ("gzip", "/predict", {"content": b"\x1f\x8b", "headers": {"Content-Type": "application/json", "Content-Encoding": "gzip"}}, 415, "Content-Encoding"),
    ("classify-json", "/classify", _json({"image": "x"}), 415, "multipart/form-data"),
    ("classify-not-image", "/classify", {"files": {"image": ("a.png", b"not a png", "image/png")}}, 422, "not a PNG or JPEG"),
    ("classify-corrupt", "/classify", {"files": {"image": ("a.png", png_bytes(np.random.default_rng(0).random((64, 64)))[:150], "image/png")}}, 422, "corrupt or truncated"),
    ("classify-empty-file", "/classify", {"files": {"image": ("a.png", b"", "image/png")}}, 422, "empty"),
    ("classify-no-image-field", "/classify", {"files": {"picture": ("a.png", b"x", "image/png")}}, 422, "field named 'image'"),
    ("classify-bad-invert", "/classify", {"files": {"image": ("a.png", png_bytes(np.zeros((28, 28))), "image/png")}, "data": {"invert": "perhaps"}}, 422, "invert"),
    ("classify-broken-multipart", "/classify", {"content": b"--zz\r\nnonsense", "headers": {"Content-Type": "multipart/form-data; boundary=zz"}}, 4, ""),
    ("v2-datatype", "/v2/models/fashion-mnist/infer", _v2(datatype="INT64", data=[0] * 784), 422, "FP32"),
    ("v2-shape", "/v2/models/fashion-mnist/infer", _v2(shape=(1, 28, 29)), 422, "shape"),
    ("v2-data-size", "/v2/models/fashion-mnist/infer", _v2(data=[0.5] * 10), 422, "needs 784"),
    ("v2-range", "/v2/models/fashion-mnist/infer", _v2(data=[7.0] * 784), 422, "[0, 1]"),
    ("v2-empty", "/v2/models/fashion-mnist/infer", {"content": b"", "headers": {"Content-Type": "application/json"}}, 400, "empty"),
    ("v2-unknown-model", "/v2/models/mnist/infer", _v2(), 404, "unknown model"),
    ("v2-header-length", "/v2/models/fashion-mnist/infer", {"content": b"{}", "headers": {"Content-Type": "application/json", "Inference-Header-Content-Length": "99"}}, 400, "Inference-Header-Content-Length"),
]


@pytest.mark.parametrize("path, kwargs, status, words", [b[1:] for b in BAD_REQUESTS], ids=[b[0] for b in BAD_REQUESTS])
def test_bad_input_gets_clear_4xx_and_server_keeps_serving(client, real_images, reference, path, kwargs, status, words):
    r = client.post(path, **kwargs)
    if status == 4:
        assert 400 <= r.status_code < 500, r.text
    else:
        assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    assert words in r.json()["error"]
    assert_still_serving(client, real_images, reference)


def test_no_500_after_all_that(server, client):
    assert not served_5xx(client.get("/metrics").text)
    assert server.proc.poll() is None


def test_bentoml_serve_refuses_a_tampered_model(model_dir, tmp_path):
    for name in ("model.onnx", "model.onnx.sha256"):
        (tmp_path / name).write_bytes((Path(model_dir) / name).read_bytes())
    data = bytearray((tmp_path / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0x01
    (tmp_path / "model.onnx").write_bytes(bytes(data))
    argv = [sys.executable, "-m", "bentoml", "serve", "service.service:Classifier", "--port", str(free_port())]
    result = subprocess.run(argv, cwd=REPO, env={**os.environ, "MODEL_PATH": str(tmp_path / "model.onnx"), "MODEL_TAG": ""},
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "refusing to start" in result.stderr and "does not match its recorded sha256" in result.stderr
    assert "Traceback" not in result.stderr


# --- contract-v2 stand-ins: what the metadata says, not Fashion-MNIST ---------------------------


@pytest.fixture(scope="module", params=["rgb32", "nhwc28", "features"])
def standin(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    model = build_model(root, request.param)
    with serve(model, root / "serve.log", SERVICE_WORKERS="1") as proc:
        proc.wait_ready(120)
        session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
        yield request.param, proc, session


def standin_input(kind: str, n: int) -> np.ndarray:
    rng = np.random.default_rng(7)
    shape = {"rgb32": (n, 3, 32, 32), "nhwc28": (n, 28, 28, 1), "features": (n, 20)}[kind]
    scale = {"rgb32": 1.0, "nhwc28": 255.0, "features": 5.0}[kind]
    return (rng.random(shape) * scale).astype(np.float32)


def test_standin_metadata_predict_oip(standin):
    kind, proc, session = standin
    with httpx.Client(base_url=proc.url, timeout=30) as c:
        meta = c.get("/metadata").json()
        name, in_name, out_name = meta["model"]["name"], meta["input"]["name"], meta["output"]["name"]
        assert meta["model"]["contract_version"] == 2
        assert [len(s) for s in meta["input"]["accepted_shapes"]] == {"rgb32": [4], "nhwc28": [3, 4], "features": [2]}[kind]
        x = standin_input(kind, 5)
        raw = session.run([out_name], {in_name: x})[0]
        expected = raw if meta["output"]["kind"] == "probabilities" else np.exp(raw) / np.exp(raw).sum(axis=1, keepdims=True)
        r = c.post("/predict", json={"images": x.tolist()})
        assert r.status_code == 200, r.text
        got = np.array([p["probabilities"] for p in r.json()["predictions"]])
        np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
        assert [p["label"] for p in r.json()["predictions"]] == [meta["labels"][i] for i in expected.argmax(axis=1)]
        if kind == "nhwc28":  # [N,H,W] too, the channel axis added at the end
            squeezed = c.post("/predict", json={"images": x[..., 0].tolist()}).json()
            np.testing.assert_allclose([p["probabilities"] for p in squeezed["predictions"]], expected, atol=1e-5, rtol=0)
        wrong = c.post("/predict", json={"images": np.zeros((1, 7)).tolist()})
        assert wrong.status_code == 422 and "must have shape" in wrong.json()["error"]
        v2 = c.post(f"/v2/models/{name}/infer", json={"inputs": [{"name": in_name, "shape": list(x.shape), "datatype": "FP32",
                                                                  "data": x.ravel().tolist()}]}).json()
        np.testing.assert_allclose(np.reshape(v2["outputs"][0]["data"], raw.shape), raw, atol=1e-5, rtol=0)
        assert c.get("/v2/models/fashion-mnist").status_code == 404


def test_standin_classify(standin):
    kind, proc, session = standin
    photo = Image.new("RGB", (90, 60), (250, 250, 250))
    photo.paste((200, 30, 30), (30, 10, 60, 50))
    buf = io.BytesIO()
    photo.save(buf, format="PNG")
    with httpx.Client(base_url=proc.url, timeout=30) as c:
        r = c.post("/classify", files={"image": ("p.png", buf.getvalue(), "image/png")})
        if kind == "features":
            assert r.status_code == 422 and "/classify needs an image model" in r.json()["error"]
            assert c.get("/metadata").json()["input"]["classify"] is False
            return
        assert r.status_code == 200, r.text
        doc = r.json()
        assert len(doc["probabilities"]) == 10 and abs(sum(doc["probabilities"]) - 1) < 1e-4


def test_standin_no_500(standin):
    kind, proc, _ = standin
    with httpx.Client(base_url=proc.url, timeout=30) as c:
        for body in (b"", b"{", json.dumps({"images": [[1e9] * 20]}).encode(), json.dumps({"images": "x"}).encode()):
            r = c.post("/predict", content=body, headers={"Content-Type": "application/json"})
            assert 400 <= r.status_code < 500 and r.json()["error"]
        metrics = c.get("/metrics").text
    assert not served_5xx(metrics)
