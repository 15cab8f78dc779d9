"""Service pieces without a server: the ONNX header reader and the contract (v1, v2 and v3 with
several outputs), checksum refusals, providers, the model (every output batch first, checked
against onnxruntime; probabilities never softmaxed twice), request parsing for every layout,
upload preprocessing (channels, polarity, crop, range, layout), OIP v2 parsing and answers (every
output or the requested ones, JSON and binary), batching (each output split per request), the
guard's decisions, the generated docs, and the no-torch rule."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from PIL import Image

from service import oip
from service.batching import Batcher
from service.contract import ModelLoadError, load_contract, parse_contract, read_header
from service.docs import client_schema, openapi
from service.errors import ClientError
from service.guard import Guard, canned
from service.images import crop_to_object, upload_to_input
from service.inputs import InputSpec, images_from_json, images_from_npy, images_from_raw_float32, parse_bool
from service.model import CPU, CUDA, Model, active_device, choose_providers, softmax
from common.files import write_with_checksum
from service_helpers import LABELS, REPO, build_model

KINDS = ("fmnist-v1", "rgb32", "nhwc28", "features", "detector", "features-v3")


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("standins")
    return {kind: build_model(root / kind, kind) for kind in KINDS}


def contract_of(models, kind):
    return load_contract(models[kind])[0]


def model_of(models, kind, **kwargs):
    contract, data = load_contract(models[kind])
    return Model(contract, data, "cpu", **kwargs)


def encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


# --- the ONNX header and the contract -------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_header_reader_agrees_with_onnx(models, kind):
    """Our protobuf walk reads the same metadata and graph inputs/outputs as onnx.load."""
    model = onnx.load(models[kind])
    header = read_header(models[kind].read_bytes())
    assert dict(header.metadata) == {p.key: p.value for p in model.metadata_props}
    dims = lambda vi: tuple(d.dim_value if d.HasField("dim_value") else d.dim_param for d in vi.type.tensor_type.shape.dim)
    assert dict(header.inputs) == {vi.name: dims(vi) for vi in model.graph.input}
    assert dict(header.outputs) == {vi.name: dims(vi) for vi in model.graph.output}
    assert list(header.outputs) == [vi.name for vi in model.graph.output]  # graph order
    assert dict(header.types) == {vi.name: vi.type.tensor_type.elem_type for vi in [*model.graph.input, *model.graph.output]}


def test_contract_v1_defaults_and_v2_keys(models):
    v1 = contract_of(models, "fmnist-v1")
    assert (v1.version, v1.name, v1.background, v1.output_kind) == (1, "fashion-mnist", "dark", "logits")
    assert v1.accepted_shapes == [[None, 28, 28], [None, 1, 28, 28]] and (v1.channels, v1.height, v1.width) == (1, 28, 28)
    rgb = contract_of(models, "rgb32")
    assert (rgb.name, rgb.layout, rgb.channels, rgb.background, rgb.input_name) == ("cifar-standin", "NCHW", 3, None, "pixels")
    assert rgb.accepted_shapes == [[None, 3, 32, 32]] and rgb.classify_refusal is None
    nhwc = contract_of(models, "nhwc28")
    assert (nhwc.layout, nhwc.channels, nhwc.height, nhwc.width) == ("NHWC", 1, 28, 28)
    assert nhwc.accepted_shapes == [[None, 28, 28], [None, 28, 28, 1]]
    assert nhwc.output_kind == "probabilities" and nhwc.input_range == (0.0, 255.0)
    features = contract_of(models, "features")
    assert (features.layout, features.channels, features.height, features.classes) == ("NC", None, None, 3)
    assert "/predict" in features.classify_refusal


def meta(**overrides) -> dict[str, str]:
    base = {"labels": json.dumps(["a", "b"]), "input_name": "x", "output_name": "y", "input_shape": json.dumps([None, 4])}
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def test_contract_layout_defaults_by_rank():
    assert parse_contract(meta()).layout == "NC"
    assert parse_contract(meta(input_shape=json.dumps([None, 3, 8, 8]))).layout == "NCHW"
    assert parse_contract(meta(input_shape=json.dumps([None, 2, 8]))).layout == "other"
    assert parse_contract(meta(contract_version="2")).name == "model"  # the contract's default
    assert parse_contract(meta(input_shape=json.dumps([None, 2, 8]), input_layout="NCW")).channels == 2


@pytest.mark.parametrize("overrides, message", [
    ({"labels": None}, "lacks labels"),
    ({"labels": "not json"}, "not JSON"),
    ({"labels": json.dumps([1, 2])}, "list of strings"),
    ({"input_shape": json.dumps([1, 4])}, r"\[null, d1"),
    ({"input_shape": json.dumps([None])}, r"\[null, d1"),
    ({"input_shape": json.dumps([None, 0])}, "positive"),
    ({"input_layout": "NHWC"}, "rank-4"),
    ({"input_layout": "CHW"}, "one of"),
    ({"input_range": json.dumps([1, 0])}, "lo < hi"),
    ({"input_range": json.dumps([0, "x"])}, "lo < hi"),
    ({"output_kind": "scores"}, "logits or probabilities"),
    ({"image_background": "grey"}, "dark or light"),
    ({"name": "bad name"}, "name"),
    ({"contract_version": "4"}, "1, 2 or 3"),
    ({"contract_version": "3"}, "lacks outputs"),
])
def test_contract_rejects_what_it_cannot_serve(overrides, message):
    with pytest.raises(ModelLoadError, match=message):
        parse_contract(meta(**overrides))


def meta_v3(**overrides) -> dict[str, str]:
    base = {"contract_version": "3", "input_name": "x", "input_shape": json.dumps([None, 4]), "outputs": json.dumps([
        {"name": "boxes", "shape": [None, 4, 6], "dtype": "float32", "path": "[0]"},
        {"name": "scores", "shape": [None, 2, 6], "dtype": "float32", "path": "[1]"}])}
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def test_contract_v3_outputs_and_who_is_a_classifier(models):
    det = contract_of(models, "detector")
    assert (det.version, det.classifier, det.output_name, det.labels, det.class_index) == (3, False, None, (), None)
    assert [o.describe() for o in det.outputs] == [
        {"name": "boxes", "shape": [None, 4, 256], "dtype": "float32", "path": "[0]"},
        {"name": "scores", "shape": [None, 3, 256], "dtype": "float32", "path": "[1]"}]
    assert det.classify_refusal == ("this model is not a classifier (it has no class-score output), so /classify cannot "
                                    "serve it: its outputs boxes [N,4,256] and scores [N,3,256] are served by "
                                    "POST /predict and POST /v2/models/detector/infer")
    v3 = contract_of(models, "features-v3")
    assert (v3.classifier, v3.output_name, v3.class_index, v3.classes) == (True, "scores", 0, 3)
    assert [o.shape for o in v3.outputs] == [(None, 3), (None,)] and "image model" in v3.classify_refusal
    v2 = contract_of(models, "rgb32")  # a version-2 file is a classifier with one output
    assert [o.describe() for o in v2.outputs] == [{"name": "logits", "shape": [None, 10], "dtype": "float32", "path": ""}]
    assert v2.classifier and v2.class_index == 0
    second = parse_contract(meta_v3(outputs=json.dumps([{"name": "emb", "shape": [None, 5]}, {"name": "y", "shape": [None, 2]}]),
                                    output_name="y", labels=json.dumps(["a", "b"])))
    assert second.class_index == 1 and (second.outputs[0].path, second.outputs[0].dtype) == ("", "float32")


@pytest.mark.parametrize("overrides, message", [
    ({"outputs": None}, "lacks outputs"),
    ({"outputs": "{"}, "not JSON"),
    ({"outputs": "[]"}, "non-empty JSON list"),
    ({"outputs": json.dumps({"name": "y"})}, "non-empty JSON list"),
    ({"outputs": json.dumps(["y"])}, r"'outputs'\[0\] must be an object"),
    ({"outputs": json.dumps([{"name": "a b", "shape": [None, 2]}])}, "'name' must match"),
    ({"outputs": json.dumps([{"shape": [None, 2]}])}, "'name' must match"),
    ({"outputs": json.dumps([{"name": "y", "shape": [2, 2]}])}, "batch first"),
    ({"outputs": json.dumps([{"name": "y", "shape": [None, 0]}])}, "batch first"),
    ({"outputs": json.dumps([{"name": "y", "shape": []}])}, "batch first"),
    ({"outputs": json.dumps([{"name": "y", "shape": [None, 2.5]}])}, "batch first"),
    ({"outputs": json.dumps([{"name": "y"}])}, "batch first"),
    ({"outputs": json.dumps([{"name": "y", "shape": [None, 2], "dtype": "float16"}])}, "must be float32"),
    ({"outputs": json.dumps([{"name": "y", "shape": [None, 2], "path": 0}])}, "'path' must be a string"),
    ({"outputs": json.dumps([{"name": "y", "shape": [None, 2]}, {"name": "y", "shape": [None, 3]}])}, "twice"),
    ({"labels": json.dumps(["a", "b"])}, "'labels' but no 'output_name'"),
    ({"output_name": "boxes"}, "lacks labels"),
    ({"output_name": "nope", "labels": json.dumps(["a", "b"])}, "not one of the outputs"),
    ({"output_name": "boxes", "labels": json.dumps(["a", "b"])}, r"must be \[N, K\]"),
    ({"outputs": json.dumps([{"name": "y", "shape": [None, 3]}]), "output_name": "y", "labels": json.dumps(["a", "b"])},
     "K = 2 labels"),
])
def test_contract_v3_refuses_malformed_outputs(overrides, message):
    with pytest.raises(ModelLoadError, match=message):
        parse_contract(meta_v3(**overrides))


def test_v3_graph_must_match_its_outputs(models, tmp_path):
    """Every graph output described, in graph order, with the graph's shapes, float32."""
    base = onnx.load(models["detector"])
    described = json.loads(next(p.value for p in base.metadata_props if p.key == "outputs"))
    cases = [(list(reversed(described)), None, "in graph order"),
             (described[:1], None, "in graph order"),
             ([described[0], {**described[1], "shape": [None, 3, 255]}], None, r"'scores' has shape \['n', 3, 256\]"),
             ([described[0], {**described[1], "shape": [None, 3, 256, 1]}], None, "'scores' has shape"),
             (described, onnx.TensorProto.DOUBLE, "'scores' has ONNX element type 11")]
    for outputs, scores_type, message in cases:
        model = onnx.ModelProto()
        model.CopyFrom(base)
        next(p for p in model.metadata_props if p.key == "outputs").value = json.dumps(outputs)
        if scores_type is not None:
            model.graph.output[1].type.tensor_type.elem_type = scores_type
        write_with_checksum(tmp_path / "model.onnx", model.SerializeToString())
        with pytest.raises(ModelLoadError, match=message):
            load_contract(tmp_path / "model.onnx")


def test_graph_must_match_the_metadata(models, tmp_path):
    model = onnx.load(models["rgb32"])
    for key, value, message in (("input_name", "nope", "graph feeds"), ("output_name", "nope", "graph has"),
                                ("labels", json.dumps(["a", "b"]), "has 10 classes"),
                                ("input_shape", json.dumps([None, 3, 28, 28]), "has shape")):
        broken = onnx.ModelProto()
        broken.CopyFrom(model)
        next(p for p in broken.metadata_props if p.key == key).value = value
        data = broken.SerializeToString()
        (tmp_path / "model.onnx").write_bytes(data)
        (tmp_path / "model.onnx.sha256").write_text(f"{hashlib.sha256(data).hexdigest()}  model.onnx\n")
        with pytest.raises(ModelLoadError, match=message):
            load_contract(tmp_path / "model.onnx")


def test_tampered_missing_and_corrupt_models_are_refused(models, tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        load_contract(tmp_path / "nope.onnx")
    (tmp_path / "model.onnx").write_bytes(models["rgb32"].read_bytes())
    with pytest.raises(ModelLoadError, match="checksum file .* is missing"):
        load_contract(tmp_path / "model.onnx")
    (tmp_path / "model.onnx.sha256").write_text(models["rgb32"].with_name("model.onnx.sha256").read_text())
    data = bytearray(models["rgb32"].read_bytes())
    data[len(data) // 2] ^= 1
    (tmp_path / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(ModelLoadError, match="does not match its recorded sha256.*re-export it"):
        load_contract(tmp_path / "model.onnx")
    junk = b"this is not an onnx protobuf"
    (tmp_path / "model.onnx").write_bytes(junk)
    (tmp_path / "model.onnx.sha256").write_text(f"{hashlib.sha256(junk).hexdigest()}  model.onnx\n")
    with pytest.raises(ModelLoadError, match="not a readable ONNX model"):
        load_contract(tmp_path / "model.onnx")


# --- the model ----------------------------------------------------------------------------


def test_probabilities_output_is_not_softmaxed_again(models):
    m = model_of(models, "nhwc28")
    x = np.random.default_rng(0).uniform(0, 255, (3, 28, 28, 1)).astype(np.float32)
    (out,) = m.run(x)
    reference = ort.InferenceSession(str(models["nhwc28"]), providers=[CPU]).run(None, {"input_1": x})[0]
    np.testing.assert_allclose(m.probabilities(out), reference, atol=1e-7)
    np.testing.assert_allclose(out.sum(axis=1), 1.0, atol=1e-5)
    assert not np.allclose(softmax(out.copy()), reference, atol=1e-3)  # a second softmax would flatten them


def test_logits_get_softmax_and_chunks_equal_one_call(models):
    x = np.random.default_rng(1).random((70, 3, 32, 32), dtype=np.float32)
    whole = model_of(models, "rgb32", chunk_images=1000)
    chunked = model_of(models, "rgb32", chunk_images=16)
    np.testing.assert_allclose(chunked.run(x)[0], whole.run(x)[0], atol=1e-5, rtol=0)
    p = whole.probabilities(whole.run(x)[0])
    np.testing.assert_allclose(p.sum(axis=1), 1.0, rtol=1e-5)
    assert whole.seconds_per_sample > 0


def test_every_output_like_onnxruntime_and_chunks_equal_one_call(models):
    x = np.random.default_rng(8).random((70, 3, 32, 32), dtype=np.float32)
    reference = ort.InferenceSession(str(models["detector"]), providers=[CPU]).run(["boxes", "scores"], {"image": x})
    for chunk in (1000, 16):
        got = model_of(models, "detector", chunk_images=chunk).run(x)
        assert [(a.shape, a.dtype) for a in got] == [((70, 4, 256), np.float32), ((70, 3, 256), np.float32)]
        for array, want in zip(got, reference):
            np.testing.assert_allclose(array, want, atol=1e-5, rtol=0)
    scores, top = model_of(models, "features-v3").run(np.random.default_rng(9).uniform(-5, 5, (4, 20)).astype(np.float32))
    assert scores.shape == (4, 3) and top.shape == (4,)
    np.testing.assert_array_equal(top, scores.max(axis=1))


def test_an_output_that_is_not_batch_first_is_refused(models, tmp_path):
    """scores averaged over the batch are [1, 3, 256] whatever N is, though the graph says [n, 3, 256]."""
    from onnx import helper, numpy_helper

    model = onnx.load(models["detector"])
    next(n for n in model.graph.node if n.output[0] == "scores").output[0] = "scores_per_row"
    model.graph.initializer.append(numpy_helper.from_array(np.array([0], np.int64), "batch_axis"))
    model.graph.node.append(helper.make_node("ReduceMean", ["scores_per_row", "batch_axis"], ["scores"], keepdims=1))
    write_with_checksum(tmp_path / "model.onnx", model.SerializeToString())
    contract, data = load_contract(tmp_path / "model.onnx")  # the header can't tell
    with pytest.raises(ModelLoadError, match=r"output 'scores' of 2 input\(s\) is float32 \[1, 3, 256\], the contract "
                                             r"wants float32 \[2, 3, 256\]"):
        Model(contract, data, "cpu")


def test_softmax_is_stable():
    np.testing.assert_allclose(softmax(np.array([[1000.0, 0.0], [-5.0, -5.0]], np.float32)), [[1, 0], [0.5, 0.5]], atol=1e-7)


@pytest.mark.parametrize("setting, available, expected", [
    ("auto", [CPU], [CPU]), ("auto", [CUDA, CPU], [CUDA, CPU]), ("cpu", [CUDA, CPU], [CPU]),
    ("cuda", [CUDA, CPU], [CUDA, CPU]), ("AUTO", ["TensorrtExecutionProvider", CUDA, CPU], [CUDA, CPU]),
])
def test_choose_providers(setting, available, expected):
    assert choose_providers(setting, available) == expected


def test_provider_refusals():
    with pytest.raises(ModelLoadError, match="onnxruntime-gpu"):
        choose_providers("cuda", [CPU])
    with pytest.raises(ModelLoadError, match="must be one of"):
        choose_providers("tpu", [CPU])
    assert active_device("auto", [CUDA, CPU]) == "cuda" and active_device("auto", [CPU]) == "cpu"
    with pytest.raises(ModelLoadError, match="no GPU is usable"):
        active_device("cuda", [CPU])


class FakeOrt:
    """Just enough of onnxruntime to see what the model asks for; wraps the real session."""

    def __init__(self, available, gpu_present):
        self.real, self.available, self.gpu_present, self.requested = ort, available, gpu_present, None
        self.SessionOptions, self.GraphOptimizationLevel = ort.SessionOptions, ort.GraphOptimizationLevel

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


def test_cuda_used_when_there_and_cpu_fallback_when_not(models):
    contract, data = load_contract(models["fmnist-v1"])
    fake = FakeOrt([CUDA, CPU], gpu_present=True)
    assert Model(contract, data, "auto", ort=fake).device == "cuda" and fake.requested == [CUDA, CPU]
    fake = FakeOrt([CUDA, CPU], gpu_present=False)
    m = Model(contract, data, "auto", ort=fake)
    assert m.device == "cpu" and m.providers == [CPU] and m.run(np.zeros((2, 1, 28, 28), np.float32))[0].shape == (2, 10)
    with pytest.raises(ModelLoadError, match="no GPU is usable"):
        Model(contract, data, "cuda", ort=FakeOrt([CUDA, CPU], gpu_present=False))


# --- request bodies -----------------------------------------------------------------------


def spec_of(models, kind, max_images=8):
    return InputSpec.of(contract_of(models, kind), max_images)


def test_json_accepts_the_model_shape_and_squeezed_one_channel_images(models):
    x = np.random.default_rng(2).random((2, 28, 28)).astype(np.float32)
    v1 = spec_of(models, "fmnist-v1")
    a = images_from_json(json.dumps({"images": x.tolist()}).encode(), v1)
    b = images_from_json(json.dumps({"images": x[:, None].tolist()}).encode(), v1)
    assert a.shape == (2, 1, 28, 28) and np.array_equal(a, b)
    nhwc = spec_of(models, "nhwc28")
    c = images_from_json(json.dumps({"images": (x * 255).tolist()}).encode(), nhwc)
    assert c.shape == (2, 28, 28, 1) and np.allclose(c[..., 0], x * 255)
    features = spec_of(models, "features")
    assert images_from_json(json.dumps({"images": [[0.5] * 20]}).encode(), features).shape == (1, 20)


@pytest.mark.parametrize("kind, images, status, message", [
    ("fmnist-v1", np.zeros((1, 27, 28)), 422, r"\[N,28,28\] or \[N,1,28,28\]"),
    ("fmnist-v1", np.zeros((1, 3, 28, 28)), 422, "shape"),
    ("rgb32", np.zeros((1, 32, 32)), 422, r"\[N,3,32,32\], got"),  # 3 channels: no squeezed form
    ("rgb32", np.zeros((1, 32, 32, 3)), 422, "shape"),  # NHWC data for an NCHW model
    ("nhwc28", np.zeros((1, 1, 28, 28)), 422, r"\[N,28,28,1\]"),
    ("nhwc28", np.full((1, 28, 28, 1), 256.0), 422, r"\[0, 255\]"),
    ("features", np.zeros((1, 21)), 422, r"\[N,20\]"),
    ("features", np.full((1, 20), -5.5), 422, r"\[-5, 5\]"),
    ("fmnist-v1", np.zeros((9, 28, 28)), 413, "over the limit of 8"),
    ("fmnist-v1", np.zeros((0, 28, 28)), 422, r"got \[0\]"),  # JSON [] has no inner shape
])
def test_bad_batches_are_refused(models, kind, images, status, message):
    with pytest.raises(ClientError, match=message) as excinfo:
        images_from_json(json.dumps({"images": images.tolist()}).encode(), spec_of(models, kind))
    assert excinfo.value.status == status


@pytest.mark.parametrize("body, status, message", [
    (b"", 400, "empty request body"), (b"{not json", 400, "malformed JSON"), (b"[1, 2]", 422, '"images" field'),
    (json.dumps({"images": [[["0.5"] * 28] * 28]}).encode(), 422, "only numbers"),
    (json.dumps({"images": [[[True] * 28] * 28]}).encode(), 422, "booleans"),
    (json.dumps({"images": [[[0.5] * 28] * 27 + [[0.5] * 27]]}).encode(), 422, "ragged|rectangular|only numbers"),
    (b'{"images": [[' + b",".join([b"[" + b",".join([b"NaN"] * 28) + b"]"] * 28) + b"]]}", 400, "malformed JSON"),
])
def test_bad_json_bodies(models, body, status, message):
    with pytest.raises(ClientError, match=message) as excinfo:
        images_from_json(body, spec_of(models, "fmnist-v1"))
    assert excinfo.value.status == status


def test_nan_inf_refused_even_without_a_declared_range():
    spec = InputSpec((4,), None, 8)
    assert images_from_raw_float32(np.full((1, 4), 1e30, np.float32).tobytes(), spec).shape == (1, 4)
    for bad in (np.nan, np.inf, -np.inf):
        x = np.zeros((1, 4), np.float32)
        x[0, 1] = bad
        with pytest.raises(ClientError, match="NaN or Inf"):
            images_from_raw_float32(x.tobytes(), spec)


def test_raw_and_npy_bodies(models):
    spec = spec_of(models, "rgb32")
    x = np.random.default_rng(3).random((2, 3, 32, 32), dtype=np.float32)
    np.testing.assert_array_equal(images_from_raw_float32(x.tobytes(), spec), x)
    buf = io.BytesIO()
    np.save(buf, x)
    np.testing.assert_array_equal(images_from_npy(buf.getvalue(), spec), x)
    with pytest.raises(ClientError, match="multiple of 12288"):
        images_from_raw_float32(x.tobytes()[:-4], spec)
    pickled = io.BytesIO()
    np.save(pickled, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ClientError, match="pickles"):
        images_from_npy(pickled.getvalue(), spec)


def test_npy_bodies_are_read_in_place_in_any_order_and_byte_order(models):
    spec = spec_of(models, "rgb32")
    x = np.random.default_rng(4).random((2, 3, 32, 32))
    for variant in (x.astype(np.float32), np.asfortranarray(x), x.astype(">f4"), x.astype(np.float16)):
        buf = io.BytesIO()
        np.save(buf, variant)
        got = images_from_npy(buf.getvalue(), spec)
        assert got.dtype == np.float32 and got.flags.c_contiguous
        np.testing.assert_array_equal(got, variant.astype(np.float32))
    buf = io.BytesIO()
    np.save(buf, x.astype(np.float32))
    body = buf.getvalue()
    for broken, message in ((body[:-4], "truncated"), (body[:20], "not a readable .npy"), (b"\x93NUMPY\x03\x00" + body[8:], "version"),
                            (b"not npy at all", "not a readable .npy")):
        with pytest.raises(ClientError, match=message) as excinfo:
            images_from_npy(broken, spec)
        assert excinfo.value.status == 422


def test_parse_bool():
    assert parse_bool("true", "invert") is True and parse_bool("false", "invert") is False
    assert parse_bool(None, "invert") is None and parse_bool("", "invert") is None
    with pytest.raises(ClientError, match="invert must be true or false"):
        parse_bool("maybe", "invert")


# --- uploads -------------------------------------------------------------------------------


def test_upload_of_the_model_size_is_taken_as_it_is(models):
    pixels = (np.random.default_rng(4).random((28, 28)) * 200).astype(np.uint8)  # dark-ish border: no inversion
    pixels[0, :] = 0
    out = upload_to_input(encode(Image.fromarray(pixels, "L")), contract_of(models, "fmnist-v1"))
    assert out.shape == (1, 1, 28, 28) and out.dtype == np.float32
    np.testing.assert_array_equal(out[0, 0], pixels.astype(np.float32) / np.float32(255))


def test_polarity_follows_the_border_unless_invert_is_given(models):
    fmnist = contract_of(models, "fmnist-v1")  # dark background
    light = np.full((28, 28), 255, np.uint8)
    light[8:20, 10:18] = 0  # a dark object on white: the opposite of Fashion-MNIST
    auto = upload_to_input(encode(Image.fromarray(light)), fmnist)[0, 0]
    assert auto[0, 0] == 0.0 and auto[14, 14] == 1.0  # inverted by itself
    kept = upload_to_input(encode(Image.fromarray(light)), fmnist, invert=False)[0, 0]
    assert kept[0, 0] == 1.0 and kept[14, 14] == 0.0
    forced = upload_to_input(encode(Image.fromarray(255 - light)), fmnist, invert=True)[0, 0]
    assert forced[0, 0] == 1.0
    unknown = contract_of(models, "rgb32")  # no image_background: never inverted by itself
    assert upload_to_input(encode(Image.fromarray(light).convert("RGB").resize((32, 32))), unknown)[0, :, 0, 0].tolist() == [1.0] * 3


def test_crop_finds_the_object_anywhere_and_keeps_its_aspect(models, test_images):
    """A real test image, enlarged 5x and pasted off-centre on a big dark canvas, comes back close
    to the original after cropping to the object and resizing."""
    images, _ = test_images
    fmnist = contract_of(models, "fmnist-v1")
    correlations = []
    for i in range(16):
        original = np.round(images[i, 0] * 255).astype(np.uint8)
        big = Image.fromarray(original).resize((140, 140), Image.Resampling.BICUBIC)
        canvas = Image.new("L", (400, 300), 0)
        canvas.paste(big, (230, 20))
        out = upload_to_input(encode(canvas), fmnist, margin=0.0)[0, 0]
        correlations.append(np.corrcoef(out.ravel(), original.ravel())[0, 1])
    # Resampling twice blurs (median 0.95 measured); without the crop the object would be a
    # quarter of the frame and the correlation near 0.
    assert np.median(correlations) > 0.9 and min(correlations) > 0.6, correlations
    wide = np.zeros((100, 100, 1), np.float32)
    wide[40:60, 10:90] = 255
    crop = crop_to_object(wide, np.zeros(1, np.float32), margin=0.1, aspect=1.0)
    assert crop.shape[:2] == (96, 96)  # 80 wide + 2x8 margin, padded square


def test_rgb_model_gets_three_channels_and_nhwc_its_layout_and_range(models):
    rgb = Image.new("RGB", (64, 48), (255, 255, 255))
    rgb.paste((255, 0, 0), (20, 10, 40, 30))
    out = upload_to_input(encode(rgb, "JPEG"), contract_of(models, "rgb32"))
    assert out.shape == (1, 3, 32, 32) and out[0, 0].max() > 0.9 and out[0, 1].min() < 0.2
    grey = Image.new("L", (56, 56), 0)
    grey.paste(255, (10, 10, 40, 50))
    nhwc = upload_to_input(encode(grey), contract_of(models, "nhwc28"))
    assert nhwc.shape == (1, 28, 28, 1) and nhwc.max() == 255.0 and nhwc.min() == 0.0  # range [0, 255]


def test_transparency_becomes_the_models_background(models):
    rgba = np.zeros((28, 28, 4), np.uint8)  # the model's size: no crop, so the border stays
    rgba[8:20, 8:20] = (255, 255, 255, 255)
    out = upload_to_input(encode(Image.fromarray(rgba, "RGBA")), contract_of(models, "fmnist-v1"))[0, 0]
    assert out[0, 0] == 0.0 and out[14, 14] > 0.99


@pytest.mark.parametrize("data, status, message", [
    (b"", 422, "empty"), (b"hello, not an image", 422, "not a PNG or JPEG"),
    ("gif", 422, "PNG or JPEG, got GIF"), ("truncated", 422, "corrupt or truncated"),
])
def test_bad_uploads_are_refused(models, data, status, message):
    if data == "gif":
        data = encode(Image.new("L", (5, 5)), "GIF")
    elif data == "truncated":
        data = encode(Image.fromarray((np.random.default_rng(5).random((64, 64)) * 255).astype(np.uint8)))[:200]
    with pytest.raises(ClientError, match=message) as excinfo:
        upload_to_input(data, contract_of(models, "fmnist-v1"))
    assert excinfo.value.status == status


# --- OIP v2 --------------------------------------------------------------------------------


def test_oip_json_and_binary(models):
    contract = contract_of(models, "rgb32")
    spec = InputSpec.of(contract, 8)
    x = np.random.default_rng(6).random((2, 3, 32, 32), dtype=np.float32)
    body = json.dumps({"id": "r1", "inputs": [{"name": "pixels", "shape": [2, 3, 32, 32], "datatype": "FP32",
                                               "data": x.ravel().tolist()}]}).encode()
    req = oip.parse_infer_request(body, None, contract, spec)
    np.testing.assert_array_equal(req.images, x)
    doc = json.loads(oip.infer_response(req, [np.ones((2, 10), np.float32)], contract)[0])
    assert doc["model_name"] == "cifar-standin" and doc["outputs"][0]["shape"] == [2, 10]
    head = json.dumps({"inputs": [{"name": "pixels", "shape": [2, 3, 32, 32], "datatype": "FP32",
                                   "parameters": {"binary_data_size": x.nbytes}}],
                       "outputs": [{"name": "logits", "parameters": {"binary_data": True}}]}).encode()
    req = oip.parse_infer_request(head + x.tobytes(), str(len(head)), contract, spec)
    assert req.outputs == ((0, True),) and np.array_equal(req.images, x)
    meta_doc = oip.model_metadata(contract)
    assert meta_doc["inputs"][0] == {"name": "pixels", "datatype": "FP32", "shape": [-1, 3, 32, 32]}


def test_oip_every_output_or_the_requested_ones_json_and_binary(models):
    """A two-output model: every output when none is named, else the named ones in the asked order,
    each as JSON or binary; the binary answer is read back with tritonclient's own parser."""
    from tritonclient.http import InferResult

    contract = contract_of(models, "detector")
    spec = InputSpec.of(contract, 8)
    rng = np.random.default_rng(10)
    boxes, scores = rng.random((2, 4, 256), dtype=np.float32), rng.random((2, 3, 256), dtype=np.float32)
    x = rng.random((2, 3, 32, 32), dtype=np.float32).ravel().tolist()

    def answer(**request):
        doc = {"inputs": [{"name": "image", "shape": [2, 3, 32, 32], "datatype": "FP32", "data": x}], **request}
        req = oip.parse_infer_request(json.dumps(doc).encode(), None, contract, spec)
        body, headers = oip.infer_response(req, [boxes, scores], contract)
        length = headers.get(oip.HEADER_LENGTH)
        return InferResult.from_response_body(body, header_length=int(length) if length else None), headers

    result, headers = answer()
    assert headers["content-type"] == "application/json"
    assert [o["name"] for o in result.get_response()["outputs"]] == ["boxes", "scores"]
    np.testing.assert_array_equal(result.as_numpy("boxes"), boxes)
    np.testing.assert_array_equal(result.as_numpy("scores"), scores)
    result, headers = answer(parameters={"binary_data_output": True})
    assert headers["content-type"] == "application/octet-stream"
    assert [o["parameters"]["binary_data_size"] for o in result.get_response()["outputs"]] == [boxes.nbytes, scores.nbytes]
    np.testing.assert_array_equal(result.as_numpy("boxes"), boxes)
    np.testing.assert_array_equal(result.as_numpy("scores"), scores)
    result, _ = answer(outputs=[{"name": "scores", "parameters": {"binary_data": True}}, {"name": "boxes"}])
    outputs = result.get_response()["outputs"]
    assert [o["name"] for o in outputs] == ["scores", "boxes"] and "data" in outputs[1] and "data" not in outputs[0]
    np.testing.assert_array_equal(result.as_numpy("scores"), scores)
    np.testing.assert_array_equal(result.as_numpy("boxes"), boxes)
    result, _ = answer(outputs=[{"name": "boxes"}])
    assert [o["name"] for o in result.get_response()["outputs"]] == ["boxes"] and result.as_numpy("scores") is None
    assert oip.model_metadata(contract)["outputs"] == [{"name": "boxes", "datatype": "FP32", "shape": [-1, 4, 256]},
                                                       {"name": "scores", "datatype": "FP32", "shape": [-1, 3, 256]}]
    for outputs, message in (([{"name": "logits"}], 'unknown output \'logits\'; this model has the outputs "boxes", "scores"'),
                             ([{"name": "boxes"}, {"name": "boxes"}], "requested twice"),
                             ([{"name": "boxes", "parameters": [1]}], "must be an object"),
                             (["boxes"], "unknown output 'boxes'"), ([], "non-empty list")):
        with pytest.raises(ClientError, match=message):
            answer(outputs=outputs)


@pytest.mark.parametrize("doc, message", [
    ({"inputs": []}, "exactly one tensor"),
    ({"inputs": [{"name": "nope", "shape": [1, 20], "datatype": "FP32", "data": [0.0] * 20}]}, "unknown input"),
    ({"inputs": [{"name": "x", "shape": [1, 20], "datatype": "INT8", "data": [0] * 20}]}, "FP32"),
    ({"inputs": [{"name": "x", "shape": [1, 20], "datatype": "FP32", "data": [0.0] * 19}]}, "needs 20"),
    ({"inputs": [{"name": "x", "shape": [1, 20], "datatype": "FP32", "data": [9.0] * 20}]}, r"\[-5, 5\]"),
    ({"inputs": [{"name": "x", "shape": [1, 20], "datatype": "FP32", "data": [0.0] * 20}], "outputs": [{"name": "p"}]}, "unknown output"),
])
def test_oip_rejects_bad_requests(models, doc, message):
    contract = contract_of(models, "features")  # input "x", 20 features, range [-5, 5]
    with pytest.raises(ClientError, match=message):
        oip.parse_infer_request(json.dumps(doc).encode(), None, contract, InputSpec.of(contract, 8))


# --- batching ------------------------------------------------------------------------------


def test_batcher_coalesces_caps_and_keeps_order():
    calls: list[int] = []

    def infer(batch):  # two outputs, like a detection head: [n, 2] and [n]
        calls.append(batch.shape[0])
        return [batch.reshape(batch.shape[0], -1)[:, :2] * 2, batch.sum(axis=(1, 2, 3))]

    async def main():
        batcher = Batcher(infer, max_batch=8, inline_max=8)
        inputs = [np.full((1 + i % 3, 1, 2, 2), float(i), np.float32) for i in range(10)]
        return inputs, await asyncio.gather(*(batcher(x) for x in inputs)), batcher.stats()

    inputs, outputs, stats = asyncio.run(main())
    for x, (y, total) in zip(inputs, outputs):
        np.testing.assert_array_equal(y, x.reshape(x.shape[0], -1)[:, :2] * 2)
        np.testing.assert_array_equal(total, np.full(x.shape[0], 4.0 * x[0, 0, 0, 0]))
    assert sum(calls) == sum(1 + i % 3 for i in range(10)) and max(calls) <= 8 and len(calls) < 10
    assert stats["onnx_calls"] == len(calls)


def test_batcher_runs_big_calls_in_the_thread_one_at_a_time_and_reports_queue_waits():
    import threading
    import time as _time
    from concurrent.futures import ThreadPoolExecutor

    loop_thread, calls, ticks, waits = [], [], [], []
    running = threading.Event()

    def infer(batch):  # ~50 ms a call; never two at once
        assert not running.is_set()
        running.set()
        start = _time.monotonic()
        _time.sleep(0.05)
        calls.append((threading.current_thread() is loop_thread[0], batch.shape[0], start, _time.monotonic()))
        running.clear()
        return [batch[:, 0] * 3]

    async def main():
        loop_thread.append(threading.current_thread())
        batcher = Batcher(infer, max_batch=4, inline_max=1, executor=ThreadPoolExecutor(1), started=waits.append)
        done = asyncio.Event()

        async def ticker():  # does the loop run while the model works?
            while not done.is_set():
                ticks.append(_time.monotonic())
                await asyncio.sleep(0.002)

        admitted = _time.monotonic()
        inputs = [np.full((1, 2), float(i), np.float32) for i in range(9)]
        ticking = asyncio.ensure_future(ticker())
        results = await asyncio.gather(*(batcher(x, admitted) for x in inputs))
        done.set()
        await ticking
        return inputs, results, batcher.stats()

    inputs, results, stats = asyncio.run(main())
    for x, (y,) in zip(inputs, results):
        np.testing.assert_array_equal(y, x[:, 0] * 3)
    sizes = [n for _, n, _, _ in calls]
    assert sum(sizes) == 9 and max(sizes) <= 4 and sizes == [4, 4, 1]  # coalesced up to the cap, in order
    assert [on_loop for on_loop, _, _, _ in calls] == [False, False, True]  # over inline_max: in the thread
    in_thread = [(a, b) for on_loop, _, a, b in calls if not on_loop]
    assert any(a < t < b for t in ticks for a, b in in_thread)  # the loop ran while the thread computed
    assert stats["calls_in_thread"] == 2 and stats["onnx_calls"] == 3
    assert len(waits) == 9 and max(waits) >= 0.1  # the last request waited for the first two calls


def test_batcher_knows_its_backlog_and_the_guard_sheds_before_the_queue_forms():
    import threading
    from concurrent.futures import ThreadPoolExecutor

    release = threading.Event()
    seen = []

    def infer(batch):
        release.wait(5)
        return [batch]

    async def main():
        batcher = Batcher(infer, max_batch=2, inline_max=0, executor=ThreadPoolExecutor(1), seconds_per_input=0.1)
        guard = Guard(FakeSettings(), queue_delay_s=0.5, backlog_s=batcher.backlog_s)  # limit: 5 inputs' worth
        tasks = [asyncio.ensure_future(batcher(np.zeros((1, 2), np.float32))) for _ in range(4)]
        await asyncio.sleep(0.05)
        seen.append((batcher.queued_inputs, round(batcher.backlog_s(), 3), guard.overloaded(4)))
        tasks += [asyncio.ensure_future(batcher(np.zeros((3, 2), np.float32)))]
        await asyncio.sleep(0.05)
        seen.append((batcher.queued_inputs, round(batcher.backlog_s(), 3), guard.overloaded(5), guard.overloaded(3)))
        release.set()
        await asyncio.gather(*tasks)
        seen.append((batcher.queued_inputs, guard.overloaded(5)))

    asyncio.run(main())
    assert seen[0] == (4, 0.4, False)  # 0.4 s of work queued: under the 0.5 s limit
    assert seen[1] == (7, 0.7, True, False)  # 0.7 s: shed, unless fewer than MIN_INFLIGHT requests are in
    assert seen[2] == (0, False)


def test_batcher_failure_reaches_every_waiter_and_it_keeps_working():
    state = {"fail": True}

    def infer(batch):
        if state["fail"]:
            raise RuntimeError("boom")
        return [batch]

    async def main():
        batcher = Batcher(infer, max_batch=32, inline_max=32)
        failed = await asyncio.gather(*(batcher(np.zeros((1, 2), np.float32)) for _ in range(3)), return_exceptions=True)
        state["fail"] = False
        return failed, await batcher(np.ones((1, 2), np.float32))

    failed, ok = asyncio.run(main())
    assert all(isinstance(r, RuntimeError) for r in failed) and ok[0].tolist() == [[1.0, 1.0]]


# --- the guard -----------------------------------------------------------------------------


class FakeSettings:
    queue_max, queue_delay_ms, retry_after_s, max_connections = 100, 100.0, 1, 10
    header_timeout_s = body_timeout_s = 10.0
    drain_s, shutdown_timeout_s = 5.0, 20.0


def test_guard_sheds_on_a_standing_queue_and_past_the_cap():
    import time as _time

    guard = Guard(FakeSettings())  # QUEUE_DELAY_MS 100, QUEUE_MAX 100
    assert not guard.overloaded(50)
    guard.started(0.3)  # one slow start opens a window...
    guard.started(0.02)  # ...but a quick one in the same window: no standing queue
    _time.sleep(0.11)
    guard.started(0.5)  # next window: the last one's minimum (20 ms) is what counts
    assert guard.standing == pytest.approx(0.02) and not guard.overloaded(50)
    guard.started(0.4)
    _time.sleep(0.11)
    guard.started(0.3)
    assert guard.standing == pytest.approx(0.4) and guard.overloaded(50)  # everyone waited > 100 ms
    assert not guard.overloaded(3)  # below MIN_INFLIGHT: always admitted, so the delay keeps being measured
    guard.standing = 0.0
    assert guard.overloaded(100)  # QUEUE_MAX
    head, body = guard.shed_keep.split(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503 ") and b"retry-after: 1" in head and json.loads(body)["error"]
    assert b"connection: close" in guard.shed_close and b"content-length: " in guard.too_many


def test_work_paths_come_from_the_route_marks_and_canned_answers(models, monkeypatch):
    monkeypatch.setenv("MODEL_PATH", str(models["features"]))
    from service.routing import route, routes_of, work_matcher
    from service.service import ROUTES

    is_work = work_matcher(ROUTES)
    assert is_work(b"POST", b"/predict") and is_work(b"POST", b"/v2/models/m/infer") and is_work(b"POST", b"/classify")
    assert is_work(b"POST", b"/v2/models/m/versions/1/infer")
    assert not is_work(b"GET", b"/readyz") and not is_work(b"POST", b"/metadata") and not is_work(b"GET", b"/predict")
    assert not is_work(b"POST", b"/v2/models/m/ready") and not is_work(b"POST", b"/\xff")

    class Extra:  # a new model route is shed as soon as it is marked, with no list to update
        @route("POST", "/segment", "x", work=True)
        async def segment(self, request): ...

        @route("POST", "/echo", "x")
        async def echo(self, request): ...

    extra = work_matcher(routes_of(Extra))
    assert extra(b"POST", b"/segment") and not extra(b"POST", b"/echo")
    assert canned(408, "Request Timeout", "x", close=True).startswith(b"HTTP/1.1 408 Request Timeout\r\n")


# --- generated docs --------------------------------------------------------------------------


def test_docs_describe_every_route_with_the_models_shapes(models, monkeypatch):
    monkeypatch.setenv("MODEL_PATH", str(models["features"]))
    from service.service import ROUTES

    contract = contract_of(models, "rgb32")
    doc = openapi(ROUTES, contract, "bnfold", 8, 1 << 20)
    assert {r.path for r in ROUTES} | {"/livez", "/healthz", "/metrics"} == set(doc["paths"])
    images = doc["components"]["schemas"]["Images"]["properties"]["images"]
    assert images["maxItems"] == 8 and images["items"]["minItems"] == 3 and images["items"]["items"]["minItems"] == 32
    predict = doc["paths"]["/predict"]["post"]
    assert set(predict["requestBody"]["content"]) == {"application/json", "application/octet-stream", "application/x-npy"}
    assert {"400", "413", "415", "422", "503"} <= set(predict["responses"])
    assert "Retry-After" in predict["responses"]["503"]["headers"]
    infer = doc["paths"]["/v2/models/{name}/infer"]["post"]
    assert infer["parameters"][0]["schema"]["enum"] == ["cifar-standin"]
    features = openapi(ROUTES, contract_of(models, "features"), "bnfold", 8, 1 << 20)
    assert "Not available" in features["paths"]["/classify"]["post"]["description"]
    assert doc["components"]["schemas"]["PredictAnswer"] == {"$ref": "#/components/schemas/Predictions"}
    detector = openapi(ROUTES, contract_of(models, "detector"), "bnfold", 8, 1 << 20)
    schemas = detector["components"]["schemas"]
    outputs = schemas["PredictAnswer"]["properties"]["outputs"]
    assert outputs["required"] == ["boxes", "scores"]
    assert outputs["properties"]["boxes"]["maxItems"] == 8 and outputs["properties"]["boxes"]["items"]["minItems"] == 4
    assert outputs["properties"]["scores"]["items"]["items"]["maxItems"] == 256
    assert "POST /predict and POST /v2/models/detector/infer" in detector["paths"]["/classify"]["post"]["description"]
    assert schemas["InferRequestV2"]["properties"]["outputs"]["items"]["properties"]["name"]["enum"] == ["boxes", "scores"]
    assert "boxes [N,4,256] and scores [N,3,256]" in schemas["InferResponseV2"]["properties"]["outputs"]["description"]
    assert "not a classifier" in detector["info"]["description"]
    schema = client_schema(ROUTES, "bnfold")
    assert {r["name"]: r["route"] for r in schema["routes"]} == {"predict": "/predict", "classify": "/classify"}


# --- the service module: no torch, early refusal -------------------------------------------


def run_python(code: str, model: Path, **env) -> subprocess.CompletedProcess:
    full = {**os.environ, "MODEL_PATH": str(model), "MODEL_TAG": "", "PYTHONPATH": str(REPO), **env}
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=full, capture_output=True, text=True, timeout=120)


def test_service_never_imports_torch(models):
    result = run_python("import sys, service.service as s; print(s.Classifier is not None, "
                        "[m for m in sys.modules if m.split('.')[0] in ('torch', 'training', 'export', 'common')])",
                        models["features"])
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "True []", result.stdout


def test_importing_the_service_refuses_a_bad_model_in_one_line(models, tmp_path):
    for name in ("model.onnx", "model.onnx.sha256"):
        (tmp_path / name).write_bytes(models["rgb32"].with_name(name).read_bytes())
    with (tmp_path / "model.onnx").open("ab") as f:
        f.write(b"\0")
    result = run_python("import service.service", tmp_path / "model.onnx")
    assert result.returncode == 2
    assert result.stderr.strip().startswith("refusing to start: model file") and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_malformed_v3_outputs_are_refused_at_start_up_in_one_line(models, tmp_path):
    model = onnx.load(models["detector"])
    entry = next(p for p in model.metadata_props if p.key == "outputs")
    entry.value = json.dumps([{**o, "dtype": "float64"} for o in json.loads(entry.value)])
    write_with_checksum(tmp_path / "model.onnx", model.SerializeToString())
    result = run_python("import service.service", tmp_path / "model.onnx")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == ["refusing to start: model metadata 'outputs'[0] (boxes) 'dtype' must be "
                                                  "float32 (the contract's only output type), got 'float64'"]


def test_settings_refuse_bad_values_in_one_line(models):
    result = run_python("import service.service", models["rgb32"], QUEUE_MAX="many")
    assert result.returncode != 0 and "QUEUE_MAX must be an integer, got 'many'" in result.stderr
    assert "Traceback" not in result.stderr
