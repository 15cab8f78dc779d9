"""Service pieces without a server: model loading and checksum, metadata, providers, input
validation, image preprocessing, OIP v2 parsing, micro-batching, and the no-torch rule."""

from __future__ import annotations

import asyncio
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from service import oip
from service.batching import MicroBatcher
from service.errors import ClientError
from service.images import decode_image, fit_on_canvas
from service.inputs import InputSpec, images_from_json, images_from_npy, images_from_raw_float32, parse_bool
from service.model import (
    CPU,
    CUDA,
    ModelLoadError,
    OnnxClassifier,
    active_device,
    choose_providers,
    parse_metadata,
    softmax,
)
from service_helpers import REPO, build_standin_model

SPEC = InputSpec(image_shape=(1, 28, 28), max_images=8)


@pytest.fixture(scope="module")
def standin_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("standin")
    build_standin_model(out)
    return out


def status_of(excinfo) -> int:
    return excinfo.value.status


# --- model file, checksum, metadata ---------------------------------------------------------


def test_classifier_loads_contract_metadata(standin_dir):
    clf = OnnxClassifier(standin_dir / "model.onnx", provider="cpu")
    assert clf.info.labels[0] == "T-shirt/top" and len(clf.info.labels) == 10
    assert clf.info.image_shape == (1, 28, 28)
    assert clf.info.input_range == (0.0, 1.0)
    assert clf.providers == [CPU] and clf.device == "cpu"
    probs = clf.predict_proba(np.random.default_rng(0).random((3, 1, 28, 28), dtype=np.float32))
    assert probs.shape == (3, 10)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)


def test_tampered_model_is_refused(standin_dir, tmp_path):
    for name in ("model.onnx", "model.onnx.sha256"):
        (tmp_path / name).write_bytes((standin_dir / name).read_bytes())
    model = tmp_path / "model.onnx"
    data = bytearray(model.read_bytes())
    data[-1] ^= 0xFF
    model.write_bytes(bytes(data))
    with pytest.raises(ModelLoadError, match="does not match its recorded sha256"):
        OnnxClassifier(model)


def test_missing_model_or_checksum_is_refused(standin_dir, tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        OnnxClassifier(tmp_path / "nope.onnx")
    (tmp_path / "model.onnx").write_bytes((standin_dir / "model.onnx").read_bytes())
    with pytest.raises(ModelLoadError, match="checksum file .* is missing"):
        OnnxClassifier(tmp_path / "model.onnx")


def test_corrupt_model_with_matching_checksum_is_refused(tmp_path):
    import hashlib

    junk = b"this is not an onnx protobuf"
    (tmp_path / "model.onnx").write_bytes(junk)
    (tmp_path / "model.onnx.sha256").write_text(f"{hashlib.sha256(junk).hexdigest()}  model.onnx\n")
    with pytest.raises(ModelLoadError, match="onnxruntime cannot load"):
        OnnxClassifier(tmp_path / "model.onnx")


def contract_meta(**overrides) -> dict[str, str]:
    meta = {
        "labels": json.dumps(["a", "b"]),
        "input_name": "image",
        "output_name": "logits",
        "input_layout": "NCHW",
        "input_shape": json.dumps([None, 1, 28, 28]),
        "input_range": json.dumps([0.0, 1.0]),
        "arch": "seed-cnn",
        "test_accuracy": "0.9213",
    }
    meta.update(overrides)
    return {k: v for k, v in meta.items() if v is not None}


def test_parse_metadata_reads_the_contract():
    info = parse_metadata(contract_meta(), sha256="ab" * 32, path="m.onnx")
    assert info.labels == ("a", "b")
    assert info.input_shape == (None, 1, 28, 28) and info.image_shape == (1, 28, 28)
    assert info.test_accuracy == pytest.approx(0.9213)
    assert info.arch == "seed-cnn" and info.pixels_per_image == 784


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"labels": None}, "lacks labels"),
        ({"labels": "not json"}, "not JSON"),
        ({"labels": json.dumps([1, 2])}, "list of strings"),
        ({"input_shape": json.dumps([1, 1, 28, 28])}, r"\[null, C, H, W\]"),
        ({"input_layout": "NHWC"}, "not supported"),
    ],
)
def test_parse_metadata_rejects_broken_contract(overrides, message):
    with pytest.raises(ModelLoadError, match=message):
        parse_metadata(contract_meta(**overrides))


# --- execution providers --------------------------------------------------------------------


@pytest.mark.parametrize(
    "setting, available, expected",
    [
        ("auto", [CPU], [CPU]),
        ("auto", [CUDA, CPU], [CUDA, CPU]),
        ("cpu", [CUDA, CPU], [CPU]),
        ("cuda", [CUDA, CPU], [CUDA, CPU]),
        ("AUTO", ["TensorrtExecutionProvider", CUDA, CPU], [CUDA, CPU]),
    ],
)
def test_choose_providers(setting, available, expected):
    assert choose_providers(setting, available) == expected


def test_forced_cuda_without_gpu_build_is_refused():
    with pytest.raises(ModelLoadError, match="onnxruntime-gpu"):
        choose_providers("cuda", [CPU])
    with pytest.raises(ModelLoadError, match="must be one of"):
        choose_providers("tpu", [CPU])


def test_active_device_reports_fallback():
    assert active_device("auto", [CUDA, CPU]) == "cuda"
    assert active_device("auto", [CPU]) == "cpu"  # CUDA offered but no GPU: clean CPU fallback
    with pytest.raises(ModelLoadError, match="no GPU is usable"):
        active_device("cuda", [CPU])


class FakeOrt:
    """Just enough of onnxruntime to see what the classifier asks for; wraps the real session."""

    def __init__(self, available, gpu_present):
        import onnxruntime

        self.real = onnxruntime
        self.available = available
        self.gpu_present = gpu_present
        self.requested = None
        self.SessionOptions = onnxruntime.SessionOptions
        self.GraphOptimizationLevel = onnxruntime.GraphOptimizationLevel

    def get_available_providers(self):
        return list(self.available)

    def InferenceSession(self, data, sess_options, providers):
        self.requested = list(providers)
        session = self.real.InferenceSession(data, sess_options=sess_options, providers=[CPU])
        active = list(providers) if self.gpu_present else [p for p in providers if p != CUDA]

        class Session:
            def __getattr__(self, name):
                return getattr(session, name)

            def get_providers(self):
                return active

        return Session()


def test_auto_uses_cuda_when_gpu_build_and_gpu_are_there(standin_dir):
    ort = FakeOrt([CUDA, CPU], gpu_present=True)
    clf = OnnxClassifier(standin_dir / "model.onnx", provider="auto", ort=ort)
    assert ort.requested == [CUDA, CPU]
    assert clf.device == "cuda"


def test_auto_falls_back_to_cpu_when_gpu_build_has_no_gpu(standin_dir):
    ort = FakeOrt([CUDA, CPU], gpu_present=False)
    clf = OnnxClassifier(standin_dir / "model.onnx", provider="auto", ort=ort)
    assert ort.requested == [CUDA, CPU]
    assert clf.device == "cpu" and clf.providers == [CPU]
    x = np.zeros((2, 1, 28, 28), np.float32)
    assert clf.logits(x).shape == (2, 10)


def test_forced_cuda_with_gpu_build_but_no_gpu_is_refused(standin_dir):
    with pytest.raises(ModelLoadError, match="no GPU is usable"):
        OnnxClassifier(standin_dir / "model.onnx", provider="cuda", ort=FakeOrt([CUDA, CPU], gpu_present=False))


# --- request bodies -------------------------------------------------------------------------


def test_json_images_accept_both_layouts():
    rng = np.random.default_rng(1)
    x = rng.random((2, 28, 28)).astype(np.float32)
    a = images_from_json(json.dumps({"images": x.tolist()}).encode(), SPEC)
    b = images_from_json(json.dumps({"images": x[:, None].tolist()}).encode(), SPEC)
    assert a.shape == b.shape == (2, 1, 28, 28) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a[:, 0], x)


@pytest.mark.parametrize(
    "body, status, message",
    [
        (b"", 400, "empty request body"),
        (b"{not json", 400, "malformed JSON"),
        (b"[1, 2]", 422, '"images" field'),
        (json.dumps({"images": np.zeros((1, 27, 28)).tolist()}).encode(), 422, "shape"),
        (json.dumps({"images": np.zeros((1, 2, 28, 28)).tolist()}).encode(), 422, "shape"),
        (json.dumps({"images": []}).encode(), 422, "shape"),
        (json.dumps({"images": [[["0.5"] * 28] * 28]}).encode(), 422, "only numbers"),
        (json.dumps({"images": [[[True] * 28] * 28]}).encode(), 422, "booleans"),
        (json.dumps({"images": [[[0.5] * 28] * 27 + [[0.5] * 27]]}).encode(), 422, "ragged|rectangular|only numbers"),
        (json.dumps({"images": [[[0.5] * 28] * 27 + [[None] * 28]]}).encode(), 422, "only numbers"),
        (json.dumps({"images": np.full((1, 28, 28), 1.5).tolist()}).encode(), 422, r"in \[0, 1\]"),
        (json.dumps({"images": np.full((1, 28, 28), -0.1).tolist()}).encode(), 422, r"in \[0, 1\]"),
        (b'{"images": [[' + b",".join([b"[" + b",".join([b"NaN"] * 28) + b"]"] * 28) + b"]]}", 400, "malformed JSON"),
        (json.dumps({"images": np.zeros((9, 28, 28)).tolist()}).encode(), 413, "over the limit of 8"),
    ],
)
def test_json_images_reject_bad_input(body, status, message):
    with pytest.raises(ClientError, match=message) as excinfo:
        images_from_json(body, SPEC)
    assert status_of(excinfo) == status


def test_nan_and_inf_are_refused_in_binary_bodies():
    for bad in (np.nan, np.inf):
        x = np.zeros((1, 1, 28, 28), np.float32)
        x[0, 0, 3, 4] = bad
        with pytest.raises(ClientError, match="NaN or Inf") as excinfo:
            images_from_raw_float32(x.tobytes(), SPEC)
        assert status_of(excinfo) == 422


def test_raw_float32_and_npy_bodies():
    x = np.random.default_rng(2).random((3, 1, 28, 28), dtype=np.float32)
    np.testing.assert_array_equal(images_from_raw_float32(x.tobytes(), SPEC), x)
    buf = io.BytesIO()
    np.save(buf, x[:, 0])
    np.testing.assert_array_equal(images_from_npy(buf.getvalue(), SPEC), x)
    with pytest.raises(ClientError, match="multiple of 3136") as excinfo:
        images_from_raw_float32(x.tobytes()[:-4], SPEC)
    assert status_of(excinfo) == 422
    with pytest.raises(ClientError, match="npy"):
        images_from_npy(b"\x93NUMPY garbage", SPEC)
    pickled = io.BytesIO()
    np.save(pickled, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ClientError, match="pickles"):
        images_from_npy(pickled.getvalue(), SPEC)


def test_parse_bool():
    assert parse_bool("true", "invert") and parse_bool("1", "invert") and not parse_bool("no", "invert")
    assert parse_bool(None, "invert") is False
    with pytest.raises(ClientError, match="invert must be true or false"):
        parse_bool("maybe", "invert")


# --- image preprocessing --------------------------------------------------------------------


def encode(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def test_png_roundtrip_of_a_28x28_image_is_exact():
    pixels = (np.random.default_rng(3).random((28, 28)) * 255).astype(np.uint8)
    out = decode_image(encode(Image.fromarray(pixels, "L"), "PNG"))
    assert out.shape == (1, 1, 28, 28) and out.dtype == np.float32
    np.testing.assert_allclose(out[0, 0], pixels / 255.0, atol=1e-7)


def test_large_rgb_jpeg_is_resized_keeping_aspect_and_inverted_on_request():
    # A dark square on a white 200x100 background: the Fashion-MNIST convention is the opposite.
    rgb = np.full((100, 200, 3), 255, np.uint8)
    rgb[25:75, 75:125] = 0
    data = encode(Image.fromarray(rgb, "RGB"), "JPEG")
    plain = decode_image(data)[0, 0]
    inverted = decode_image(data, invert=True)[0, 0]
    # 200x100 -> 28x14 centred: rows 0..6 and 21..27 are padding (black).
    assert plain[:7].max() == 0.0 and plain[21:].max() == 0.0
    assert plain[10, 2] > 0.9 and plain[14, 14] < 0.1  # white background, dark object
    assert inverted[10, 2] < 0.1 and inverted[14, 14] > 0.9  # light object on dark, as trained


def test_transparent_png_background_becomes_black():
    rgba = np.zeros((40, 40, 4), np.uint8)
    rgba[10:30, 10:30] = (255, 255, 255, 255)
    out = decode_image(encode(Image.fromarray(rgba, "RGBA"), "PNG"))[0, 0]
    assert out[0, 0] == 0.0 and out[14, 14] > 0.99


def test_fit_on_canvas_centres_a_tall_image():
    out = np.asarray(fit_on_canvas(Image.new("L", (10, 40), 255), 28))
    assert out.shape == (28, 28)
    assert out[:, :10].max() == 0 and out[:, 18:].max() == 0 and out[:, 12:16].min() == 255


@pytest.mark.parametrize(
    "data, status, message",
    [
        (b"", 422, "empty"),
        (b"hello, not an image", 422, "not a PNG or JPEG"),
        (None, 422, "PNG or JPEG, got GIF"),
        ("truncated", 422, "corrupt or truncated"),
    ],
)
def test_bad_images_are_refused(data, status, message):
    if data is None:
        data = encode(Image.new("L", (5, 5)), "GIF")
    elif data == "truncated":
        data = encode(Image.fromarray((np.random.default_rng(4).random((64, 64)) * 255).astype(np.uint8)), "PNG")[:200]
    with pytest.raises(ClientError, match=message) as excinfo:
        decode_image(data)
    assert status_of(excinfo) == status


# --- Open Inference Protocol v2 -------------------------------------------------------------


@pytest.fixture(scope="module")
def info(standin_dir):
    return OnnxClassifier(standin_dir / "model.onnx", provider="cpu").info


def test_oip_json_request(info):
    x = np.random.default_rng(5).random((2, 1, 28, 28), dtype=np.float32)
    body = json.dumps(
        {"id": "r1", "inputs": [{"name": "image", "shape": [2, 1, 28, 28], "datatype": "FP32", "data": x.ravel().tolist()}]}
    ).encode()
    req = oip.parse_infer_request(body, None, info, SPEC)
    np.testing.assert_array_equal(req.images, x)
    assert req.id == "r1" and not req.binary_output
    content, headers = oip.infer_response(req, np.ones((2, 10), np.float32), "logits")
    doc = json.loads(content)
    assert doc["model_name"] == "fashion-mnist" and doc["id"] == "r1"
    assert doc["outputs"][0]["shape"] == [2, 10] and len(doc["outputs"][0]["data"]) == 20


def test_oip_binary_request_and_response(info):
    x = np.random.default_rng(6).random((1, 1, 28, 28), dtype=np.float32)
    head = json.dumps(
        {
            "inputs": [{"name": "image", "shape": [1, 1, 28, 28], "datatype": "FP32", "parameters": {"binary_data_size": x.nbytes}}],
            "outputs": [{"name": "logits", "parameters": {"binary_data": True}}],
        }
    ).encode()
    req = oip.parse_infer_request(head + x.tobytes(), str(len(head)), info, SPEC)
    np.testing.assert_array_equal(req.images, x)
    assert req.binary_output
    logits = np.arange(10, dtype=np.float32).reshape(1, 10)
    content, headers = oip.infer_response(req, logits, "logits")
    n = int(headers[oip.HEADER_LENGTH])
    assert json.loads(content[:n])["outputs"][0]["parameters"]["binary_data_size"] == 40
    np.testing.assert_array_equal(np.frombuffer(content[n:], "<f4"), logits.ravel())


@pytest.mark.parametrize(
    "doc, message",
    [
        ({"inputs": []}, "exactly one tensor"),
        ({"inputs": [{"name": "x", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": [0.0] * 784}]}, "unknown input"),
        ({"inputs": [{"name": "image", "shape": [1, 1, 28, 28], "datatype": "INT8", "data": [0] * 784}]}, "FP32"),
        ({"inputs": [{"name": "image", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": [0.0] * 783}]}, "needs 784"),
        ({"inputs": [{"name": "image", "shape": [1, 1, 28, "a"], "datatype": "FP32", "data": [0.0] * 784}]}, "non-negative integers"),
        ({"inputs": [{"name": "image", "shape": [1, 2, 28, 14], "datatype": "FP32", "data": [0.0] * 784}]}, "shape"),
        ({"inputs": [{"name": "image", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": [2.0] * 784}]}, r"in \[0, 1\]"),
        ({"inputs": [{"name": "image", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": [0.0] * 784}], "outputs": [{"name": "probs"}]}, "unknown output"),
    ],
)
def test_oip_rejects_bad_requests(info, doc, message):
    with pytest.raises(ClientError, match=message):
        oip.parse_infer_request(json.dumps(doc).encode(), None, info, SPEC)


# --- micro-batching -------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["inline", "thread"])
def test_batcher_coalesces_concurrent_requests_and_keeps_order(mode):
    calls: list[int] = []

    def infer(batch: np.ndarray) -> np.ndarray:
        calls.append(batch.shape[0])
        return batch.reshape(batch.shape[0], -1)[:, :3] * 2

    async def main():
        batcher = MicroBatcher(infer, max_batch_images=64, inline_max_images=4, mode=mode)
        inputs = [np.full((1 + i % 3, 1, 2, 2), float(i), np.float32) for i in range(10)]
        inputs.append(np.full((6, 1, 2, 2), 99.0, np.float32))  # over inline_max: runs on its own
        outputs = await asyncio.gather(*(batcher(x) for x in inputs))
        batcher.close()
        return inputs, outputs, batcher.stats()

    inputs, outputs, stats = asyncio.run(main())
    for x, y in zip(inputs, outputs):
        np.testing.assert_array_equal(y, x.reshape(x.shape[0], -1)[:, :3] * 2)
    assert sorted(calls) == [6, sum(1 + i % 3 for i in range(10))]  # 10 small requests, one call
    assert stats["requests"] == 11 and stats["onnx_calls"] == 2


def test_batcher_caps_a_batch_and_splits_tuple_outputs():
    calls: list[int] = []

    def infer(batch):
        calls.append(batch.shape[0])
        flat = batch.reshape(batch.shape[0], -1)
        return flat[:, :1], flat[:, :1] + 100

    async def main():
        batcher = MicroBatcher(infer, max_batch_images=4, inline_max_images=4)
        return await asyncio.gather(*(batcher(np.full((1, 1, 1, 1), float(i), np.float32)) for i in range(10)))

    results = asyncio.run(main())
    assert calls == [4, 4, 2]
    for i, (a, b) in enumerate(results):
        assert a.tolist() == [[float(i)]] and b.tolist() == [[float(i) + 100]]


@pytest.mark.parametrize("mode", ["inline", "thread"])
def test_batcher_failure_reaches_every_waiter_and_it_keeps_working(mode):
    state = {"fail": True}

    def infer(batch):
        if state["fail"]:
            raise RuntimeError("boom")
        return batch

    async def main():
        batcher = MicroBatcher(infer, mode=mode)
        results = await asyncio.gather(*(batcher(np.zeros((1, 1, 2, 2), np.float32)) for _ in range(3)), return_exceptions=True)
        state["fail"] = False
        ok = await batcher(np.ones((1, 1, 2, 2), np.float32))
        batcher.close()
        return results, ok

    results, ok = asyncio.run(main())
    assert all(isinstance(r, RuntimeError) for r in results)
    np.testing.assert_array_equal(ok, np.ones((1, 1, 2, 2)))


def test_chunked_inference_equals_one_call(standin_dir):
    x = np.random.default_rng(7).random((70, 1, 28, 28), dtype=np.float32)
    whole = OnnxClassifier(standin_dir / "model.onnx", provider="cpu", chunk_images=1000).logits(x)
    chunked = OnnxClassifier(standin_dir / "model.onnx", provider="cpu", chunk_images=16).logits(x)
    assert chunked.shape == (70, 10)
    np.testing.assert_allclose(chunked, whole, atol=1e-6, rtol=0)


def test_softmax_is_stable_and_normalised():
    p = softmax(np.array([[1000.0, 0.0], [-5.0, -5.0]], np.float32))
    np.testing.assert_allclose(p, [[1.0, 0.0], [0.5, 0.5]], atol=1e-7)


# --- the service module never imports torch -------------------------------------------------


def test_service_never_imports_torch(standin_dir):
    code = (
        "import sys, service.service as s; "
        "assert s.FashionMNISTClassifier is not None; "
        "print('torch' in sys.modules, [m for m in sys.modules if m.startswith('torch')][:3])"
    )
    env = {**os.environ, "MODEL_PATH": str(standin_dir / "model.onnx")}
    env.pop("MODEL_TAG", None)
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().startswith("False"), result.stdout


def test_importing_the_service_refuses_a_tampered_model(standin_dir, tmp_path):
    for name in ("model.onnx", "model.onnx.sha256"):
        (tmp_path / name).write_bytes((standin_dir / name).read_bytes())
    with (tmp_path / "model.onnx").open("ab") as f:
        f.write(b"\0")
    env = {**os.environ, "MODEL_PATH": str(tmp_path / "model.onnx")}
    env.pop("MODEL_TAG", None)
    result = subprocess.run([sys.executable, "-c", "import service.service"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().startswith("refusing to start: model file")
    assert "Traceback" not in result.stderr


# --- the typed @bentoml.api methods, called in-process ---------------------------------------

TYPED_API_SCRIPT = r"""
import asyncio, io, json, sys, tempfile
from pathlib import Path
import numpy as np
from PIL import Image
import bentoml
from service.service import FashionMNISTClassifier

svc = FashionMNISTClassifier()
rng = np.random.default_rng(0)
images = rng.random((5, 28, 28), dtype=np.float32)
expected = svc.runtime.classifier.logits_and_probabilities(images.reshape(5, 1, 28, 28))[1]

async def main():
    out = {}
    doc = await svc.predict(images)
    out["probabilities"] = [p["probabilities"] for p in doc["predictions"]]
    out["class_ids"] = [p["class_id"] for p in doc["predictions"]]
    out["expected"] = np.asarray(expected).tolist()
    json.dumps(doc)  # plain JSON, no ndarrays left for BentoML's encoder
    png = Path(tempfile.mkdtemp()) / "x.png"
    Image.fromarray(np.round(images[0] * 255).astype(np.uint8), "L").save(png)
    one = await svc.classify(png)
    out["classify_expected"] = np.asarray(svc.runtime.classifier.logits_and_probabilities(
        (np.round(images[:1] * 255) / 255).astype(np.float32).reshape(1, 1, 28, 28))[1][0]).tolist()
    out["classify"] = one["probabilities"]
    errors = []
    for bad in (np.full((1, 28, 28), np.nan), np.full((1, 28, 28), 2.0), np.zeros((1, 27, 28)), [["a"]]):
        try:
            await svc.predict(bad)
            errors.append(None)
        except bentoml.exceptions.BentoMLException as exc:
            errors.append([int(exc.error_code), str(exc)])
    not_image = png.with_suffix(".txt")
    not_image.write_text("hello")
    try:
        await svc.classify(not_image)
    except bentoml.exceptions.BentoMLException as exc:
        errors.append([int(exc.error_code), str(exc)])
    out["errors"] = errors
    print(json.dumps(out))

asyncio.run(main())
"""


def test_typed_bentoml_api_methods_in_process(standin_dir):
    """`svc.predict` / `svc.classify` (the typed API) answer like the model and refuse bad input
    with the request path's own 4xx status and message."""
    env = {**os.environ, "MODEL_PATH": str(standin_dir / "model.onnx")}
    env.pop("MODEL_TAG", None)
    result = subprocess.run([sys.executable, "-c", TYPED_API_SCRIPT], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    np.testing.assert_allclose(out["probabilities"], out["expected"], atol=1e-7, rtol=0)
    assert out["class_ids"] == np.argmax(out["expected"], axis=1).tolist()
    np.testing.assert_allclose(out["classify"], out["classify_expected"], atol=1e-7, rtol=0)
    (nan, high, shape, text, not_image) = out["errors"]
    assert nan == [422, '"images" contains NaN or Inf']
    assert high[0] == 422 and "must lie in [0, 1]" in high[1]
    assert shape[0] == 422 and "must have shape" in shape[1]
    assert text[0] == 422 and "only numbers" in text[1]
    assert not_image == [422, "the uploaded file is not a PNG or JPEG image"]
