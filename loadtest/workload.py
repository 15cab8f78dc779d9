"""What to send and what to expect, for any served contract model: its GET /metadata read by the service's own
rules (service/contract.py), every body encoded once, up front (docs/loadtest.md)."""
import base64
import io
import json
import math
import urllib.request
import uuid
from collections import namedtuple
from pathlib import Path

import numpy as np

from common.files import sha256_file, write_json
from loadtest.baselines import session
from service.contract import Contract, load_contract, parse_contract
from training.data import DEFAULT_DATA_DIR, LABELS, DataError, load_split_uint8, to_float  # noqa: F401 (re-exported)

BATCH = 64
NPY_BATCH = 8
DECIMALS = 4  # digits per value in JSON bodies: k/255 pixels stay within 5e-5, a 28x28 body ~2 KB
MARGIN = 2.0  # top-1 minus top-2 logit of a test image used for label checks
POOL = 2000  # test images considered
# tag: (weight, path, name in locust's stats)
SCENARIOS = {"single": (8, "/predict", "/predict [1 image]"), "batch64": (1, "/predict", "/predict [64 images]"),
             "batch64raw": (1, "/predict", "/predict [64 images, raw f32]"),
             "npy": (1, "/predict", "/predict [8 images, npy]"), "png": (2, "/classify", "/classify [png]"),
             "oip": (2, "/v2/models/{name}/infer", "/v2 infer [1 image]")}
# One request body, how many inputs it holds, the class ids to expect (None: unknown), its content type.
Sample = namedtuple("Sample", "body n expected content_type", defaults=["application/json"])


def describe(doc: dict) -> Contract:
    """A /metadata document -> the contract of the model it serves."""
    return parse_contract(doc["model"]["onnx_metadata"], doc["model"].get("sha256", ""))


def metadata_of(model_path: str | Path) -> dict:
    """What the tools read of /metadata, from a contract ONNX file (the baselines have no /metadata)."""
    c = load_contract(model_path)[0]
    return {"model": {"name": c.name, "sha256": c.sha256, "onnx_metadata": dict(c.metadata)}}


def fetch_metadata(base_url: str, timeout: float = 10.0) -> dict:
    with urllib.request.urlopen(base_url.rstrip("/") + "/metadata", timeout=timeout) as resp:
        return json.loads(resp.read())


def fashion_mnist(t: Contract) -> bool:
    return sorted(d for d in t.sample_shape if d != 1) == [28, 28] and list(t.labels) == LABELS


def uploads(t: Contract) -> bool:  # /classify takes image uploads for these only
    return t.classify_refusal is None


def inputs(t: Contract, n: int, model: str | Path | None = None, data_dir=DEFAULT_DATA_DIR, seed: int = 0):
    """(x float32 [n, *shape] as sent in JSON, uint8 images for uploads or None, expected labels or None): test
    images (with `model`: those it gets right by a margin, docs/loadtest.md) or seeded random inputs in range."""
    if fashion_mnist(t):
        u8, labels = (a[:POOL] for a in load_split_uint8(data_dir, "test"))
        keep, truth = np.arange(n), None
        wire = np.round(u8 / 255.0, DECIMALS).astype(np.float32).reshape(-1, *t.sample_shape)
        if model:
            sess, keep = session(str(model), 1), np.arange(len(u8))
            for x in (wire, to_float(u8).reshape(-1, *t.sample_shape)):  # (k/255 in float32, as an upload decodes)
                s = np.concatenate([sess.run([t.output_name], {t.input_name: x[i:i + 256]})[0]
                                    for i in range(0, len(x), 256)])
                s = np.log(np.clip(s, 1e-30, None)) if t.output_kind == "probabilities" else s
                top2 = np.sort(s, axis=1)[:, -2:]
                right = (s.argmax(axis=1) == labels) & (top2[:, 1] - top2[:, 0] >= MARGIN)
                keep = np.intersect1d(keep, np.flatnonzero(right))
            if len(keep) < n:
                raise DataError(f"only {len(keep)} of {POOL} test images are classified confidently and correctly "
                                f"by {model}; need {n} (is this a trained model?)")
            keep, truth = keep[:n], labels[keep[:n]]
        return wire[keep], u8[keep], truth
    rng = np.random.default_rng(seed)
    lo, hi = t.input_range or (0.0, 1.0)
    pad = 1e-3 * (hi - lo)  # rounding to DECIMALS must not leave the range
    x = np.round(rng.uniform(lo + pad, hi - pad, (n, *t.sample_shape)), DECIMALS).astype(np.float32)
    u8 = rng.integers(0, 256, (n, t.height, t.width, t.channels), dtype=np.uint8) if uploads(t) else None
    return x, (u8[..., 0] if uploads(t) and t.channels == 1 else u8), None


def json_body(t: Contract, x: np.ndarray) -> bytes:
    """/predict JSON; one-channel images travel as [N, H, W], anything else in the model's shape."""
    if t.is_image and t.channels == 1:
        x = x.reshape(len(x), t.height, t.width)
    return json.dumps({"images": x.astype(np.float64).round(DECIMALS).tolist()}, separators=(",", ":")).encode()


def npy_body(x: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(x, "<f4"), allow_pickle=False)
    return buf.getvalue()


def oip_body(t: Contract, x: np.ndarray) -> bytes:
    flat = x.astype(np.float64).round(DECIMALS).ravel().tolist()
    return json.dumps({"inputs": [{"name": t.input_name, "shape": list(x.shape), "datatype": "FP32", "data": flat}]},
                      separators=(",", ":")).encode()


def image_bytes(u8: np.ndarray, fmt: str = "PNG", size: tuple[int, int] | None = None) -> bytes:
    from PIL import Image

    buf, image = io.BytesIO(), Image.fromarray(u8)
    (image.resize(size, Image.Resampling.BICUBIC).convert("RGB") if size else image).save(buf, format=fmt)
    return buf.getvalue()


def build(doc: dict, model: str | Path | None = None, data_dir=DEFAULT_DATA_DIR, n: int = 256,
          batches: int = 4) -> dict[str, list[Sample]]:
    """Pre-encoded samples per scenario for the /metadata document `doc`."""
    t = describe(doc)
    if model and t.sha256 and sha256_file(model) != t.sha256:
        raise DataError(f"{model} is not the served model (sha256 differs from /metadata): give the served file "
                        "(MODEL_PATH=… with make, --model otherwise) for label checks")
    batch = min(BATCH, doc.get("input", {}).get("max_images_per_request", BATCH))
    x, u8, truth = inputs(t, max(n, batch), model, data_dir)
    exp = (lambda idx: None) if truth is None else (lambda idx: [int(truth[i]) for i in idx])
    work = {s: [] for s in SCENARIOS}
    for i in range(n):
        work["single"].append(Sample(json_body(t, x[i:i + 1]), 1, exp([i])))
        work["oip"].append(Sample(oip_body(t, x[i:i + 1]), 1, exp([i])))
        if uploads(t):  # multipart/form-data with the PNG as the field "image"
            b = "lt" + uuid.uuid4().hex
            body = (f'--{b}\r\nContent-Disposition: form-data; name="image"; filename="sample.png"\r\nContent-Type: '
                    f"image/png\r\n\r\n".encode() + image_bytes(u8[i]) + f"\r\n--{b}--\r\n".encode())
            work["png"].append(Sample(body, 1, exp([i]), f"multipart/form-data; boundary={b}"))
    rng = np.random.default_rng(0)
    for _ in range(batches):
        pick = rng.choice(len(x), size=batch, replace=False)
        work["batch64"].append(Sample(json_body(t, x[pick]), batch, exp(pick)))
        work["batch64raw"].append(Sample(np.ascontiguousarray(x[pick], "<f4").tobytes(), batch, exp(pick),
                                         "application/octet-stream"))
        few = pick[:NPY_BATCH]
        work["npy"].append(Sample(npy_body(x[few]), len(few), exp(few), "application/x-npy"))
    return work


def _shape(nested) -> list[int]:
    """The shape of a nested JSON list, read along its first elements (cheap: the generator's CPU is scarce)."""
    shape = []
    while isinstance(nested, list):
        shape.append(len(nested))
        nested = nested[0] if nested else None
    return shape


def check(t: Contract, answer: dict, sample, oip: bool = False) -> str | None:
    """None when the server's answer to `sample` is right, else what is wrong with it."""
    n, k = sample.n, len(t.labels)
    if not t.classifier:  # every output, by name, with n rows of its shape
        if oip:
            got = {o["name"]: (o["shape"], len(o["data"])) for o in answer["outputs"]}
            want = {o.name: ([n, *o.shape[1:]], n * math.prod(o.shape[1:])) for o in t.outputs}
        else:
            got = {name: (_shape(v), None) for name, v in answer["outputs"].items()}
            want = {o.name: ([n, *o.shape[1:]], None) for o in t.outputs}
        return None if got == want else f"outputs {got}, expected {want}"
    if oip:
        out = answer["outputs"][0]
        got = (answer.get("model_name"), out["shape"], out["datatype"], len(out["data"]))
        if got != (t.name, [n, k], "FP32", n * k):
            return f"{answer.get('model_name')!r} {out['datatype']} {out['shape']}, expected {t.name!r} FP32 [{n}, {k}]"
        got = [max(range(k), key=out["data"][i * k:(i + 1) * k].__getitem__) for i in range(n)]
    else:
        preds = answer["predictions"] if "predictions" in answer else [answer]  # /classify: one
        if len(preds) != n:
            return f"{len(preds)} predictions for {n} inputs"
        for i, p in enumerate(preds):
            probs = p["probabilities"]
            if len(probs) != k or abs(sum(probs) - 1.0) > 1e-3:
                return f"prediction {i}: {len(probs)} probabilities summing to {sum(probs):.4f}, expected {k} and 1"
            if p["label"] != t.labels[p["class_id"]] or probs[p["class_id"]] != max(probs):
                return f"prediction {i}: class_id {p['class_id']}, label {p['label']!r} do not match the probabilities"
        got = [p["class_id"] for p in preds]
    if sample.expected is not None and got != sample.expected:
        i = next(i for i, (a, b) in enumerate(zip(got, sample.expected)) if a != b)
        return f"wrong label at {i}: got {got[i]}, expected {sample.expected[i]}"
    return None


def save(path: str | Path, doc: dict, model=None, data_dir=DEFAULT_DATA_DIR, **kw) -> tuple[str, dict]:
    """Build the load for the /metadata document `doc` and save it with `doc` as JSON (bodies in base64, no
    pickle): (path, samples). Locust's workers read it in milliseconds instead of building it themselves."""
    work = build(doc, model, data_dir, **kw)
    write_json(path, {"metadata": doc, "work": {k: [[base64.b64encode(s.body).decode(), s.n, s.expected,
                                                      s.content_type] for s in v] for k, v in work.items()}})
    return str(path), work


def load(path: str | Path) -> tuple[dict, dict[str, list[Sample]]]:
    saved = json.loads(Path(path).read_text())
    return saved["metadata"], {k: [Sample(base64.b64decode(b), n, e, c) for b, n, e, c in v]
                               for k, v in saved["work"].items()}
