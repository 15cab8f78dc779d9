"""Load the exported ONNX model (see docs/onnx-contract.md) and run it with onnxruntime.

Only numpy and onnxruntime here: the service must never import torch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

logger = logging.getLogger("service.model")

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
PROVIDER_SETTINGS = ("auto", "cpu", "cuda")
REQUIRED_METADATA = ("labels", "input_name", "output_name", "input_shape")


class ModelLoadError(RuntimeError):
    """The model can't be served (missing, corrupt, tampered, bad metadata): refuse to start."""


@dataclass(frozen=True)
class ModelInfo:
    """What the service needs to know about the model, read from its ONNX metadata_props."""

    labels: tuple[str, ...]
    input_name: str
    output_name: str
    input_shape: tuple[int | None, ...]  # e.g. (None, 1, 28, 28)
    input_range: tuple[float, float]
    input_layout: str
    arch: str
    test_accuracy: float | None
    sha256: str
    path: str
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def image_shape(self) -> tuple[int, ...]:
        """Shape of one image as the graph wants it, e.g. (1, 28, 28)."""
        return tuple(int(d) for d in self.input_shape[1:])  # type: ignore[arg-type]

    @property
    def pixels_per_image(self) -> int:
        return int(np.prod(self.image_shape))


def recorded_sha256(model_path: Path) -> str:
    """The checksum the export wrote beside the model, in `sha256sum` format."""
    sidecar = model_path.with_name(model_path.name + ".sha256")
    if not sidecar.is_file():
        raise ModelLoadError(
            f"checksum file {sidecar} is missing; re-run the export (make export)"
        )
    fields = sidecar.read_text(encoding="utf-8").split()
    if not fields or len(fields[0]) != 64 or any(c not in "0123456789abcdef" for c in fields[0].lower()):
        raise ModelLoadError(f"checksum file {sidecar} is not in sha256sum format")
    return fields[0].lower()


def verify_model_file(model_path: Path) -> bytes:
    """The model's bytes; refuses a missing model or one that differs from what the export recorded."""
    if not model_path.is_file():
        raise ModelLoadError(f"model file {model_path} not found; run `make export` first")
    expected = recorded_sha256(model_path)
    data = model_path.read_bytes()  # read once: the bytes we check are the bytes we load
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected:
        raise ModelLoadError(
            f"model file {model_path} does not match its recorded sha256 "
            f"(expected {expected}, got {actual}); refusing to serve a modified or corrupt model"
        )
    return data


def _json_field(meta: dict[str, str], key: str) -> Any:
    try:
        return json.loads(meta[key])
    except (KeyError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"model metadata {key!r} is missing or not JSON") from exc


def parse_metadata(meta: dict[str, str], sha256: str = "", path: str = "") -> ModelInfo:
    """Turn ONNX metadata_props (all strings) into a ModelInfo, checking the contract."""
    missing = [k for k in REQUIRED_METADATA if k not in meta]
    if missing:
        raise ModelLoadError(f"model metadata lacks {', '.join(missing)} (see docs/onnx-contract.md)")
    labels = _json_field(meta, "labels")
    if not (isinstance(labels, list) and labels and all(isinstance(x, str) for x in labels)):
        raise ModelLoadError("model metadata 'labels' must be a JSON list of strings")
    shape = _json_field(meta, "input_shape")
    if not (
        isinstance(shape, list)
        and len(shape) == 4
        and shape[0] is None
        and all(isinstance(d, int) and d > 0 for d in shape[1:])
    ):
        raise ModelLoadError(f"model metadata 'input_shape' must be [null, C, H, W], got {shape!r}")
    layout = meta.get("input_layout", "NCHW")
    if layout != "NCHW":
        raise ModelLoadError(f"model input layout {layout!r} is not supported (want NCHW)")
    value_range = _json_field(meta, "input_range") if "input_range" in meta else [0.0, 1.0]
    accuracy = meta.get("test_accuracy")
    try:
        test_accuracy = float(accuracy) if accuracy not in (None, "") else None
    except ValueError:
        test_accuracy = None
    return ModelInfo(
        labels=tuple(labels),
        input_name=meta["input_name"],
        output_name=meta["output_name"],
        input_shape=tuple(shape),
        input_range=(float(value_range[0]), float(value_range[1])),
        input_layout=layout,
        arch=meta.get("arch", "unknown"),
        test_accuracy=test_accuracy,
        sha256=sha256,
        path=path,
        metadata=dict(meta),
    )


def choose_providers(setting: str, available: Sequence[str]) -> list[str]:
    """Execution providers to ask onnxruntime for.

    `auto` prefers CUDA when onnxruntime-gpu offers it (the session still falls back to CPU when
    no GPU is usable, see `active_device`); `cuda` insists on it; `cpu` never touches it.
    """
    setting = setting.lower()
    if setting not in PROVIDER_SETTINGS:
        raise ModelLoadError(f"ORT_PROVIDER must be one of {', '.join(PROVIDER_SETTINGS)}, got {setting!r}")
    if setting == "cpu":
        return [CPU]
    if CUDA in available:
        return [CUDA, CPU]
    if setting == "cuda":
        raise ModelLoadError(
            "ORT_PROVIDER=cuda but onnxruntime offers no CUDAExecutionProvider "
            "(install the `gpu` extra: onnxruntime-gpu)"
        )
    return [CPU]


def active_device(setting: str, session_providers: Sequence[str]) -> str:
    """'cuda' or 'cpu': what the session really runs on; forced cuda that fell back is an error."""
    if CUDA in session_providers:
        return "cuda"
    if setting.lower() == "cuda":
        raise ModelLoadError("ORT_PROVIDER=cuda but no GPU is usable (onnxruntime fell back to CPU)")
    return "cpu"


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    np.exp(shifted, out=shifted)
    shifted /= shifted.sum(axis=1, keepdims=True)
    return shifted


class OnnxClassifier:
    """One onnxruntime session plus the contract metadata; `logits()` is thread-safe."""

    def __init__(
        self,
        model_path: str | os.PathLike[str],
        provider: str = "auto",
        intra_op_threads: int = 1,
        chunk_images: int = 32,
        ort: Any = None,
    ) -> None:
        if ort is None:  # injectable so provider selection can be tested with a fake onnxruntime
            import onnxruntime as ort

        path = Path(model_path)
        model_bytes = verify_model_file(path)
        sha256 = hashlib.sha256(model_bytes).hexdigest()
        requested = choose_providers(provider, ort.get_available_providers())
        options = ort.SessionOptions()
        options.intra_op_num_threads = max(1, int(intra_op_threads))
        options.inter_op_num_threads = 1
        # Spinning intra-op threads would steal the core the HTTP event loop needs.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        try:
            self.session = ort.InferenceSession(model_bytes, sess_options=options, providers=requested)
        except Exception as exc:
            raise ModelLoadError(f"onnxruntime cannot load {path}: {exc}") from exc
        meta = dict(self.session.get_modelmeta().custom_metadata_map)
        self.info = parse_metadata(meta, sha256=sha256, path=str(path))
        self.providers = list(self.session.get_providers())
        self.device = active_device(provider, self.providers)
        self.provider_setting = provider
        self.chunk_images = max(1, int(chunk_images))
        self.intra_op_threads = options.intra_op_num_threads
        inputs = {i.name for i in self.session.get_inputs()}
        outputs = {o.name for o in self.session.get_outputs()}
        if self.info.input_name not in inputs or self.info.output_name not in outputs:
            raise ModelLoadError(
                f"model graph has inputs {sorted(inputs)} / outputs {sorted(outputs)}, "
                f"but its metadata names {self.info.input_name!r} / {self.info.output_name!r}"
            )
        logger.info(
            "model %s (%s, sha256 %s…) on %s via %s, %d intra-op thread(s)",
            path, self.info.arch, sha256[:12], self.device.upper(), self.providers[0], self.intra_op_threads,
        )

    def _run(self, images: np.ndarray) -> np.ndarray:
        return self.session.run([self.info.output_name], {self.info.input_name: images})[0]

    def logits(self, images: np.ndarray) -> np.ndarray:
        """images: float32 [N, C, H, W] already validated; returns float32 [N, classes].

        Big batches run in chunks: past a few dozen images the activations stop fitting in cache
        and the cost per image doubles (seed-cnn, 1 thread: 1024 images in one call 14k img/s,
        in chunks of 32 32k img/s; README.md, "Batching").
        """
        n, chunk = images.shape[0], self.chunk_images
        if n <= chunk:
            return self._run(images)
        return np.concatenate([self._run(images[i : i + chunk]) for i in range(0, n, chunk)])

    def predict_proba(self, images: np.ndarray) -> np.ndarray:
        return softmax(self.logits(images))

    def logits_and_probabilities(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Both at once, so a coalesced batch pays for one softmax, not one per request."""
        logits = self.logits(images)
        return logits, softmax(logits.copy())
