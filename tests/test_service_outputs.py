"""Models that are not (only) classifiers, over real HTTP (contract version 3, docs/onnx-contract.md):
a detection-style stand-in with two outputs, boxes [N,4,256] and scores [N,3,256], and a
classifier with a second output (class scores [N,3] plus their maximum [N]), both hand-made with
onnx.helper (tests/service_helpers.py) and served by `bentoml serve`.

Checked against in-process onnxruntime on the same file: /predict's named outputs (JSON, raw
float32, .npy bodies), /v2/models/<name>/infer (every output or the requested ones, JSON and the
binary extension, through httpx and tritonclient), concurrent requests split per output; /classify
answers 422 naming the outputs and the routes that serve them; /metadata and /docs.json describe
the real outputs; bad bodies get a JSON 4xx and nothing gets a 5xx."""

from __future__ import annotations

import asyncio
import io

import httpx
import numpy as np
import onnxruntime as ort
import pytest

from service_helpers import build_model, serve, served_5xx

pytestmark = pytest.mark.timeout(300)
TOL = 1e-6


@pytest.fixture(scope="module")
def detector(tmp_path_factory):
    root = tmp_path_factory.mktemp("detector")
    model = build_model(root, "detector")
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    with serve(model, root / "serve.log", SERVICE_WORKERS="1", MAX_IMAGES_PER_REQUEST="64") as proc:
        proc.wait_ready(120)
        with httpx.Client(base_url=proc.url, timeout=30) as client:
            yield proc, client, lambda x: dict(zip(["boxes", "scores"], session.run(["boxes", "scores"], {"image": x})))


def images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 3, 32, 32), dtype=np.float32)


def test_metadata_describes_the_real_outputs(detector):
    _, client, _ = detector
    doc = client.get("/metadata").json()
    assert doc["outputs"] == [{"name": "boxes", "shape": [None, 4, 256], "dtype": "float32", "path": "[0]"},
                              {"name": "scores", "shape": [None, 3, 256], "dtype": "float32", "path": "[1]"}]
    assert (doc["output"], doc["labels"], doc["classifier"]) == (None, None, False)
    assert doc["model"]["contract_version"] == 3 and doc["input"]["classify"] is False
    assert doc["classify_refusal"] == client.post("/classify", files={"image": ("x.png", b"", "image/png")}).json()["error"]
    v2 = client.get("/v2/models/detector").json()
    assert v2["outputs"] == [{"name": "boxes", "datatype": "FP32", "shape": [-1, 4, 256]},
                             {"name": "scores", "datatype": "FP32", "shape": [-1, 3, 256]}]


def test_predict_answers_every_output_by_name_in_each_body_type(detector):
    _, client, reference = detector
    x = images(5)
    expected = reference(x)
    buf = io.BytesIO()
    np.save(buf, x)
    bodies = {"json": {"json": {"images": x.tolist()}},
              "raw": {"content": x.tobytes(), "headers": {"content-type": "application/octet-stream"}},
              "npy": {"content": buf.getvalue(), "headers": {"content-type": "application/x-npy"}}}
    for kind, body in bodies.items():
        r = client.post("/predict", **body)
        assert r.status_code == 200, (kind, r.text)
        doc = r.json()
        assert list(doc) == ["outputs"] and list(doc["outputs"]) == ["boxes", "scores"], kind
        for name, want in expected.items():
            np.testing.assert_allclose(np.array(doc["outputs"][name], np.float32), want, atol=TOL, rtol=0)


def test_v2_infer_every_output_or_the_requested_ones(detector):
    _, client, reference = detector
    x = images(3, seed=1)
    expected = reference(x)
    tensor = {"name": "image", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}
    doc = client.post("/v2/models/detector/infer", json={"id": "d1", "inputs": [tensor]}).json()
    assert doc["id"] == "d1" and [(o["name"], o["shape"]) for o in doc["outputs"]] == [("boxes", [3, 4, 256]), ("scores", [3, 3, 256])]
    for out in doc["outputs"]:
        np.testing.assert_allclose(np.reshape(out["data"], out["shape"]), expected[out["name"]], atol=TOL, rtol=0)
    doc = client.post("/v2/models/detector/infer", json={"inputs": [tensor], "outputs": [{"name": "scores"}]}).json()
    assert [o["name"] for o in doc["outputs"]] == ["scores"]
    unknown = client.post("/v2/models/detector/infer", json={"inputs": [tensor], "outputs": [{"name": "logits"}]})
    assert unknown.status_code == 422 and 'the outputs "boxes", "scores"' in unknown.json()["error"]


def test_tritonclient_reads_both_outputs_binary_and_json(detector):
    import tritonclient.http as triton

    proc, _, reference = detector
    x = images(4, seed=2)
    expected = reference(x)
    client = triton.InferenceServerClient(url=proc.url.removeprefix("http://"))
    try:
        meta = client.get_model_metadata("detector")
        assert [o["name"] for o in meta["outputs"]] == ["boxes", "scores"]
        for binary in (True, False):
            inp = triton.InferInput("image", list(x.shape), "FP32")
            inp.set_data_from_numpy(x, binary_data=binary)
            result = client.infer("detector", [inp])  # no outputs named: every output, binary
            for name in ("boxes", "scores"):
                np.testing.assert_allclose(result.as_numpy(name), expected[name], atol=TOL, rtol=0)
            result = client.infer("detector", [inp], outputs=[triton.InferRequestedOutput("scores", binary_data=binary),
                                                             triton.InferRequestedOutput("boxes", binary_data=not binary)])
            assert [o["name"] for o in result.get_response()["outputs"]] == ["scores", "boxes"]
            for name in ("boxes", "scores"):
                np.testing.assert_allclose(result.as_numpy(name), expected[name], atol=TOL, rtol=0)
    finally:
        client.close()


def test_concurrent_requests_get_their_own_rows_of_every_output(detector):
    """Requests that share one onnxruntime call (the micro-batcher) each get their own rows of both outputs."""
    proc, _, reference = detector
    x = images(24, seed=3)
    expected = reference(x)

    async def burst():
        async with httpx.AsyncClient(base_url=proc.url, timeout=30, limits=httpx.Limits(max_connections=32)) as ac:
            jobs = [(i % 20, 1 + i % 4) for i in range(48)]
            answers = await asyncio.gather(*(ac.post("/predict", content=x[j:j + n].tobytes(),
                                                     headers={"content-type": "application/octet-stream"}) for j, n in jobs))
            return list(zip(jobs, answers)), (await ac.get("/metadata")).json()["runtime"]["batching"]

    results, batching = asyncio.run(burst())
    for (j, n), r in results:
        assert r.status_code == 200, r.text
        for name, want in expected.items():
            np.testing.assert_allclose(np.array(r.json()["outputs"][name], np.float32), want[j:j + n], atol=TOL, rtol=0)
    assert batching["inputs"] >= sum(n for (_, n), _ in results)


def test_classify_answers_422_naming_the_outputs_and_routes(detector):
    _, client, _ = detector
    r = client.post("/classify", files={"image": ("p.png", b"\x89PNG whatever", "image/png")})
    assert r.status_code == 422 and r.headers["content-type"].startswith("application/json")
    message = r.json()["error"]
    for words in ("not a classifier", "boxes [N,4,256]", "scores [N,3,256]", "POST /predict", "POST /v2/models/detector/infer"):
        assert words in message, message


def test_docs_json_shows_the_outputs_shapes(detector):
    _, client, _ = detector
    doc = client.get("/docs.json").json()
    answer = doc["paths"]["/predict"]["post"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert answer == {"$ref": "#/components/schemas/PredictAnswer"}
    outputs = doc["components"]["schemas"]["PredictAnswer"]["properties"]["outputs"]["properties"]
    boxes, scores = outputs["boxes"], outputs["scores"]
    assert (boxes["maxItems"], boxes["items"]["minItems"], boxes["items"]["items"]["maxItems"]) == (64, 4, 256)
    assert (scores["items"]["maxItems"], scores["items"]["items"]["minItems"]) == (3, 256)
    assert "Not available for this model" in doc["paths"]["/classify"]["post"]["description"]


BAD = [
    ("/predict", {"json": {"images": np.zeros((1, 3, 32, 31)).tolist()}}, 422, "must have shape [N,3,32,32]"),
    ("/predict", {"json": {"images": np.full((1, 3, 32, 32), 2.0).tolist()}}, 422, "[0, 1]"),
    ("/predict", {"content": b"\0" * 10, "headers": {"content-type": "application/octet-stream"}}, 422, "multiple of 12288"),
    ("/predict", {"content": b"{", "headers": {"content-type": "application/json"}}, 400, "malformed JSON"),
    ("/predict", {"content": b"", "headers": {"content-type": "application/json"}}, 400, "empty"),
    ("/predict", {"content": images(65).tobytes(), "headers": {"content-type": "application/octet-stream"}}, 413, "over the limit of 64"),
    ("/v2/models/detector/infer", {"json": {"inputs": [{"name": "image", "shape": [1, 3, 32, 32], "datatype": "FP32",
                                                       "data": [0.5] * 3072}], "outputs": [{"name": "boxes"}, {"name": "boxes"}]}},
     422, "requested twice"),
    ("/v2/models/detector/infer", {"json": {"inputs": [{"name": "image", "shape": [1, 3, 32, 32], "datatype": "FP32",
                                                       "data": [0.5] * 3072}], "outputs": "boxes"}}, 422, "non-empty list"),
    ("/v2/models/detector/infer", {"json": {"inputs": [{"name": "image", "shape": [1, 3, 32, 32], "datatype": "FP32",
                                                       "data": [0.5] * 3072}], "outputs": [{"name": "boxes", "parameters": 3}]}},
     422, "must be an object"),
    ("/classify", {"json": {"image": "x"}}, 422, "is not a classifier"),
]


@pytest.mark.parametrize("path, kwargs, status, words", BAD, ids=[f"{i}-{b[0]}" for i, b in enumerate(BAD)])
def test_bad_input_gets_a_json_4xx(detector, path, kwargs, status, words):
    _, client, reference = detector
    r = client.post(path, **kwargs)
    assert r.status_code == status and words in r.json()["error"], r.text
    x = images(1)
    ok = client.post("/predict", content=x.tobytes(), headers={"content-type": "application/octet-stream"})
    np.testing.assert_allclose(np.array(ok.json()["outputs"]["boxes"], np.float32), reference(x)["boxes"], atol=TOL, rtol=0)


def test_no_5xx_and_the_worker_alive(detector):
    proc, client, _ = detector
    metrics = client.get("/metrics").text
    assert not served_5xx(metrics)
    assert proc.proc.poll() is None


def test_a_classifier_with_a_second_output(tmp_path):
    """Version 3, output_name = "scores" among two outputs: /predict classifies by the class scores,
    /v2 answers both outputs (or the one asked for)."""
    import tritonclient.http as triton

    model = build_model(tmp_path, "features-v3")
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(4).uniform(-5, 5, (6, 20)).astype(np.float32)
    scores, top = session.run(["scores", "top"], {"x": x})
    expected = np.exp(scores - scores.max(1, keepdims=True))
    expected /= expected.sum(1, keepdims=True)
    with serve(model, tmp_path / "serve.log", SERVICE_WORKERS="1") as proc:
        proc.wait_ready(120)
        with httpx.Client(base_url=proc.url, timeout=30) as c:
            meta = c.get("/metadata").json()
            assert meta["classifier"] is True and meta["labels"] == ["low", "mid", "high"]
            assert meta["output"] == {"name": "scores", "kind": "logits", "shape": [None, 3]}
            assert [o["name"] for o in meta["outputs"]] == ["scores", "top"] and meta["outputs"][1]["shape"] == [None]
            preds = c.post("/predict", json={"images": x.tolist()}).json()["predictions"]
            np.testing.assert_allclose([p["probabilities"] for p in preds], expected, atol=1e-5, rtol=0)
            assert [p["label"] for p in preds] == [["low", "mid", "high"][i] for i in scores.argmax(1)]
            r = c.post("/classify", files={"image": ("p.png", b"x", "image/png")})
            assert r.status_code == 422 and "needs an image model" in r.json()["error"]
        client = triton.InferenceServerClient(url=proc.url.removeprefix("http://"))
        try:
            inp = triton.InferInput("x", list(x.shape), "FP32")
            inp.set_data_from_numpy(x)
            result = client.infer("tabular-v3", [inp])
            np.testing.assert_allclose(result.as_numpy("scores"), scores, atol=TOL, rtol=0)
            np.testing.assert_allclose(result.as_numpy("top"), top, atol=TOL, rtol=0)
            only = client.infer("tabular-v3", [inp], outputs=[triton.InferRequestedOutput("top")])
            assert [o["name"] for o in only.get_response()["outputs"]] == ["top"] and only.as_numpy("top").shape == (6,)
        finally:
            client.close()
