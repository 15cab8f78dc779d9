"""Real Fashion-MNIST test images as ready-to-send request bodies, with the labels to expect.

Load is generated from the real test set, never from noise: noise sits far from the training data,
so it would neither exercise realistic numerics nor let us check answers. The expected answer of a
sample is its true label, and only samples that a reference onnxruntime run of the same model
classifies correctly *with a clear margin* are used, so a wrong label under load means the server
scrambled something (batch order, preprocessing), not that the model was unsure.

Every body is encoded once, up front: the load generator is the bottleneck on a 2-core machine and
must not spend its CPU on JSON encoding per request.
"""

from __future__ import annotations

import io
import json
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from training import data as fmnist

DEFAULT_DATA_DIR = "/usr/share/datasets/fashion-mnist"
BATCH_SIZE = 64
RAW_FLOAT32 = "application/octet-stream"
# Digits kept per pixel in JSON bodies: pixels are k/255, 4 digits keep them within 5e-5 and keep
# a 28x28 body near 2 KB instead of 14 KB.
JSON_DECIMALS = 4
# Top-1 minus top-2 logit a sample needs to be a "known" sample (see module docstring).
MIN_LOGIT_MARGIN = 2.0


class DataError(RuntimeError):
    """The data set or model needed to build the load is missing or unusable."""


def load_test_set(data_dir: str | os.PathLike = DEFAULT_DATA_DIR, limit: int | None = None):
    """Fashion-MNIST test images as uint8 [N,28,28] and labels as int64 [N]."""
    data_dir = Path(data_dir)
    try:  # the pipeline's own IDX reader (numpy only, no torch)
        images = fmnist.read_idx(fmnist.find_file(data_dir, fmnist.FILES["test"][0]))
        labels = fmnist.read_idx(fmnist.find_file(data_dir, fmnist.FILES["test"][1])).astype(np.int64)
    except fmnist.DataError as e:
        raise DataError(str(e)) from None
    if images.shape[1:] != (28, 28) or len(images) != len(labels):
        raise DataError(f"unexpected test set shapes {images.shape} / {labels.shape} in {data_dir}")
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    return images, labels


def wire_pixels(images_u8: np.ndarray) -> np.ndarray:
    """Pixels in [0,1] exactly as they travel in a JSON body (rounded), as float32 [N,1,28,28]."""
    return np.round(images_u8.astype(np.float64) / 255.0, JSON_DECIMALS).astype(np.float32)[:, None]


class ReferenceModel:
    """The served ONNX model run in-process: the answer key for the load test."""

    def __init__(self, model_path: str | os.PathLike):
        import onnxruntime as ort  # imported here: only processes that check labels need it

        if not Path(model_path).is_file():
            raise DataError(f"model not found: {model_path} (run `make export` or pass --model)")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1  # runs once at start-up; must not fight the server for cores
        self.session = ort.InferenceSession(str(model_path), opts, providers=["CPUExecutionProvider"])
        meta = self.session.get_modelmeta().custom_metadata_map
        self.input_name = meta.get("input_name", self.session.get_inputs()[0].name)
        try:
            self.labels: list[str] = json.loads(meta["labels"])
        except (KeyError, ValueError) as e:
            raise DataError(f"{model_path} has no usable 'labels' metadata") from e

    def logits(self, images: np.ndarray) -> np.ndarray:
        out = []
        for start in range(0, len(images), 256):
            out.append(self.session.run(None, {self.input_name: images[start : start + 256]})[0])
        return np.concatenate(out)


def confident_correct(logits: np.ndarray, labels: np.ndarray, margin: float = MIN_LOGIT_MARGIN) -> np.ndarray:
    """Indices the model gets right with top-1 minus top-2 logit of at least ``margin``."""
    top2 = np.sort(logits, axis=1)[:, -2:]
    ok = (logits.argmax(axis=1) == labels) & (top2[:, 1] - top2[:, 0] >= margin)
    return np.flatnonzero(ok)


def png_bytes(image_u8: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image_u8, mode="L").save(buf, format="PNG")
    return buf.getvalue()


def multipart_body(fields: dict[str, tuple[str | None, str, bytes]]) -> tuple[bytes, str]:
    """Encode ``{name: (filename or None, content type, data)}`` as multipart/form-data."""
    boundary = "lt" + uuid.uuid4().hex
    parts = []
    for name, (filename, ctype, data) in fields.items():
        disp = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        head = f"--{boundary}\r\nContent-Disposition: {disp}\r\nContent-Type: {ctype}\r\n\r\n"
        parts.append(head.encode() + data + b"\r\n")
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def predict_body(pixels: np.ndarray) -> bytes:
    """``/predict`` JSON body for float32 [N,1,28,28] pixels, sent as [N,28,28]."""
    rows = pixels[:, 0].astype(np.float64).round(JSON_DECIMALS).tolist()
    return json.dumps({"images": rows}, separators=(",", ":")).encode()


def oip_body(pixels: np.ndarray, input_name: str = "image") -> bytes:
    """Open Inference Protocol v2 infer body for float32 [N,1,28,28] pixels."""
    flat = pixels.astype(np.float64).round(JSON_DECIMALS).ravel().tolist()
    body = {"inputs": [{"name": input_name, "shape": list(pixels.shape), "datatype": "FP32", "data": flat}]}
    return json.dumps(body, separators=(",", ":")).encode()


@dataclass
class Sample:
    """One request body and the class ids its answer must contain, in order."""

    body: bytes
    expected: list[int]
    content_type: str = "application/json"


@dataclass
class Workload:
    labels: list[str]
    single: list[Sample] = field(default_factory=list)
    batch: list[Sample] = field(default_factory=list)
    batch_raw: list[Sample] = field(default_factory=list)
    png: list[Sample] = field(default_factory=list)
    oip: list[Sample] = field(default_factory=list)


def build_workload(
    data_dir: str | os.PathLike = DEFAULT_DATA_DIR,
    model_path: str | os.PathLike | None = None,
    n_samples: int = 256,
    n_batches: int = 4,
    pool: int = 2000,
) -> Workload:
    """Pre-encoded bodies for every scenario from real test images.

    With ``model_path`` only confidently-correct samples are used and their true labels are the
    expected answers. Without it (the do-nothing ceiling, which cannot answer correctly anyway)
    the first images are used and ``expected`` still holds the true labels.
    """
    images_u8, labels = load_test_set(data_dir, limit=pool)
    if model_path is not None:
        ref = ReferenceModel(model_path)
        # Both encodings must be answered right: PNG carries exact k/255 pixels, JSON rounded ones.
        exact = (images_u8.astype(np.float32) / 255.0)[:, None]
        keep = np.intersect1d(
            confident_correct(ref.logits(wire_pixels(images_u8)), labels),
            confident_correct(ref.logits(exact), labels),
        )
        names = ref.labels
    else:
        keep = np.arange(len(labels))
        names = []
    needed = max(n_samples, BATCH_SIZE)
    if len(keep) < needed:
        raise DataError(
            f"only {len(keep)} of {len(labels)} test images are classified confidently and correctly "
            f"by {model_path}; need {needed} (is this a trained model?)"
        )
    keep = keep[:needed]
    pixels = wire_pixels(images_u8[keep])
    truth = labels[keep]

    work = Workload(labels=names)
    for i in range(min(n_samples, len(keep))):
        one = pixels[i : i + 1]
        work.single.append(Sample(predict_body(one), [int(truth[i])]))
        work.oip.append(Sample(oip_body(one), [int(truth[i])]))
        body, ctype = multipart_body({"image": ("sample.png", "image/png", png_bytes(images_u8[keep[i]]))})
        work.png.append(Sample(body, [int(truth[i])], ctype))
    rng = np.random.default_rng(0)
    for _ in range(n_batches):
        pick = rng.choice(len(keep), size=BATCH_SIZE, replace=False)
        work.batch.append(Sample(predict_body(pixels[pick]), truth[pick].tolist()))
        # The same images as raw little-endian float32 (no JSON to parse on either side).
        raw = np.ascontiguousarray(pixels[pick], dtype="<f4").tobytes()
        work.batch_raw.append(Sample(raw, truth[pick].tolist(), RAW_FLOAT32))
    return work
