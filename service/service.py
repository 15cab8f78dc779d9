"""The BentoML service: `bentoml serve service.service:FashionMNISTClassifier --port 3000`.

One `@bentoml.service` class owns the onnxruntime session (one per worker process); the HTTP
routes live in `http_app.py`, mounted into the service so BentoML's /livez, /readyz, /metrics,
workers, traffic limits and `bentoml build` / `containerize` all still apply.
Never imports torch (tests check it).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import sys
from http import HTTPStatus
from pathlib import Path
from typing import Annotated

import bentoml
import numpy as np
from bentoml.validators import ContentType

from .config import Settings
from .batching import MicroBatcher
from .errors import ClientError
from .http_app import HotPathMiddleware, Runtime, build_app, hot_endpoints, predictions
from .images import decode_image
from .inputs import InputSpec, as_numeric_array, check_batch
from .model import ModelLoadError, OnnxClassifier

logger = logging.getLogger("bentoml.service")

SETTINGS = Settings.from_env(vars(bentoml.use_arguments()))
STORE_MODEL_FILE = "model.onnx"

_runtime: Runtime | None = None


def current_runtime() -> Runtime:
    if _runtime is None:  # routes are only reachable after the lifespan built the service
        raise RuntimeError("service not initialised")
    return _runtime


app = build_app(current_runtime)


def resolve_model_path(settings: Settings) -> str:
    """A model from the BentoML store (MODEL_TAG, set inside a bento) wins over MODEL_PATH."""
    if settings.model_tag:
        try:
            return bentoml.models.get(settings.model_tag).path_of(STORE_MODEL_FILE)
        except bentoml.exceptions.NotFound:
            raise ModelLoadError(
                f"model {settings.model_tag!r} is not in the BentoML model store; run `make bento`"
            ) from None
    return settings.model_path


def load_classifier(settings: Settings) -> OnnxClassifier:
    model_path = resolve_model_path(settings)
    return OnnxClassifier(
        model_path,
        provider=settings.provider,
        intra_op_threads=settings.intra_op_threads,
        chunk_images=settings.chunk_images,
    )


def refuse_bad_model_early(settings: Settings) -> None:
    """Check the model when the module is imported, i.e. in `bentoml serve`'s own process.

    A worker that fails in __init__ is respawned by BentoML's supervisor forever; failing here
    stops `bentoml serve` (and `bentoml build`) at once with one line and exit status 2.
    """
    try:
        load_classifier(settings)
    except ModelLoadError as exc:
        print(f"refusing to start: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


refuse_bad_model_early(SETTINGS)


@bentoml.service(
    name="fashion_mnist_classifier",
    workers=SETTINGS.workers,
    traffic={"timeout": SETTINGS.request_timeout_s},
    metrics={"enabled": SETTINGS.metrics},
    logging={"access": {"enabled": SETTINGS.access_log}},
    # With no trace exporter configured every span is dropped anyway, but BentoML's OpenTelemetry
    # middleware still builds one per request (~10% of a worker's CPU under load, py-spy):
    # exclude every URL unless TRACING is on.
    **({} if SETTINGS.tracing else {"tracing": {"excluded_urls": [".*"]}}),
)
@bentoml.asgi_app(app, path="/")
class FashionMNISTClassifier:
    # Declared only when a store model is wanted, so `make serve` works from a plain checkout;
    # `make bento` builds with `--arg model_tag=...`, so the bento carries the model and, served
    # or containerized, loads it from its own model store.
    if SETTINGS.model_tag:
        bento_model = bentoml.models.BentoModel(SETTINGS.model_tag)

    def __init__(self) -> None:
        global _runtime
        settings = SETTINGS
        try:
            classifier = load_classifier(settings)
        except ModelLoadError as exc:  # changed since the import-time check: say so in one line
            logger.error("refusing to start: %s", exc)
            raise SystemExit(f"refusing to start: {exc}") from None
        info = classifier.info
        spec = InputSpec(
            image_shape=info.image_shape,  # type: ignore[arg-type]
            value_range=info.input_range,
            max_images=settings.max_images,
        )
        batcher = MicroBatcher(
            classifier.logits_and_probabilities,
            max_batch_images=settings.batch_max_images,
            inline_max_images=settings.batch_inline_max_images,
            mode=settings.batch_mode,
        )
        self.runtime = Runtime(
            classifier=classifier,
            spec=spec,
            batcher=batcher,
            max_body_bytes=settings.max_body_bytes,
            describe=lambda: self.describe(),
        )
        _runtime = self.runtime
        if settings.gc_freeze:
            # Everything loaded so far (BentoML, numpy, onnxruntime, the model) lives as long as the
            # worker: move it out of the collector's reach, so a full collection under load walks
            # only request garbage instead of the whole heap (a latency tail otherwise).
            gc.collect()
            gc.freeze()
        logger.info(
            "serving %s from %s on %s (%s); worker pid %d",
            info.arch, info.path, classifier.device.upper(), ", ".join(classifier.providers), os.getpid(),
        )

    def describe(self) -> dict:
        rt = self.runtime
        info = rt.classifier.info
        return {
            "model": {
                "name": "fashion-mnist",
                "arch": info.arch,
                "test_accuracy": info.test_accuracy,
                "sha256": info.sha256,
                "path": info.path,
                "folded": info.metadata.get("folded"),
                "onnx_metadata": {k: v for k, v in info.metadata.items() if k != "fold_report"},
            },
            "labels": list(info.labels),
            "input": {
                "name": info.input_name,
                "layout": info.input_layout,
                "shape": list(info.input_shape),
                "accepted_shapes": [[None, *info.image_shape[1:]], [None, *info.image_shape]],
                "dtype": "float32",
                "range": list(info.input_range),
                "max_images_per_request": rt.spec.max_images,
                "max_body_bytes": rt.max_body_bytes,
                "content_types": ["application/json", "application/octet-stream", "application/x-npy"],
            },
            "output": {"name": info.output_name, "shape": [None, len(info.labels)]},
            "runtime": {
                "provider_setting": rt.classifier.provider_setting,
                "providers": rt.classifier.providers,
                "device": rt.classifier.device,
                "intra_op_threads": rt.classifier.intra_op_threads,
                "chunk_images": rt.classifier.chunk_images,
                "workers": SETTINGS.workers,
                "pid": os.getpid(),
                "bentoml_version": bentoml.__version__,
            },
            "batching": {
                "max_images_per_call": rt.batcher.max_batch_images,
                "inline_max_images": rt.batcher.inline_max_images,
                **rt.batcher.stats(),
            },
        }

    # The typed BentoML API: the same /predict and /classify, declared so that BentoML's OpenAPI
    # page (/docs) and its Python clients (`bentoml.SyncHTTPClient(url).predict(images=...)`)
    # know them. Over HTTP the HotPathMiddleware answers these two routes first, with the same
    # wire format ({"images": ...} JSON; multipart `image` + `invert`), so these bodies serve
    # in-process calls; they run the same checks and the same batcher.
    @bentoml.api(route="/predict")
    async def predict(self, images: np.ndarray) -> dict:
        """Classify a batch: images [N,28,28] or [N,1,28,28], pixel values in [0,1]."""
        rt = self.runtime
        with client_errors_as_http():
            batch = check_batch(as_numeric_array(images, '"images"'), rt.spec, '"images"')
        _, probabilities = await rt.batcher(batch)
        return {"predictions": as_plain(predictions(rt.labels, probabilities))}

    @bentoml.api(route="/classify")
    async def classify(self, image: Annotated[Path, ContentType("image/*")], invert: bool = False) -> dict:
        """Classify one PNG/JPEG of any size; invert=True for a dark object on a light background."""
        rt = self.runtime
        with client_errors_as_http():
            pixels = decode_image(Path(image).read_bytes(), invert=invert, size=rt.spec.image_shape[-1])
        _, probabilities = await rt.batcher(pixels)
        return as_plain(predictions(rt.labels, probabilities))[0]

    @bentoml.on_shutdown
    def close(self) -> None:
        self.runtime.batcher.close()


@contextlib.contextmanager
def client_errors_as_http():
    """ClientError -> BentoMLException with the same status, which BentoML answers as a 4xx."""
    try:
        yield
    except ClientError as exc:
        raise bentoml.exceptions.BentoMLException(exc.message, error_code=HTTPStatus(exc.status)) from None


def as_plain(rows: list[dict]) -> list[dict]:
    """Probabilities as lists of floats: BentoML's JSON encoder, unlike orjson, wants no ndarrays."""
    return [{**row, "probabilities": np.asarray(row["probabilities"]).tolist()} for row in rows]


FashionMNISTClassifier.add_asgi_middleware(HotPathMiddleware, endpoints=hot_endpoints(current_runtime))
