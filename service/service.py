"""The BentoML service: `bentoml serve service.service:Classifier --port 3000` (docs/service.md).

Serves any model of the ONNX contract (docs/onnx-contract.md). One class: the decorator holds the
BentoML config, `__init__` builds this worker's runtime (one onnxruntime session, the fault guard),
and each route is one method marked with `@route` (service/routing.py), the only place its
behaviour is written; /docs.json and /schema.json are generated from the same marks.
Never imports torch, training/, export/ or common/ (a bento ships service/ only).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import bentoml
import numpy as np
from starlette.requests import Request
from starlette.responses import Response

from . import oip
from .config import Settings
from .contract import ModelLoadError, load_contract, read_header, read_verified, parse_contract
from .docs import client_schema, openapi
from .errors import ClientError, bad_request, too_large, unprocessable, unsupported_media
from .guard import ADMITTED, Guard, install_protocol, install_supervisor
from .images import image_to_input, peek_image
from .inputs import InputSpec, images_from_json, images_from_npy, images_from_raw_float32, parse_bool
from .batching import Batcher
from .model import Model
from .precision import choose as choose_precision
from .routing import BODY_READ, JSON, Router, error_response, json_response, route, routes_of, work_matcher
from .tuning import TUNING_ENV, TuningError, decode, derive, measure_in_subprocess, time_batches
from .workers import Gate, GatedLoop, WorkerTable, table_path

logger = logging.getLogger("bentoml.service")

SETTINGS = Settings.from_env(vars(bentoml.use_arguments()))
SERVICE_NAME = "bnfold"
STORE_MODEL_FILE = "model.onnx"
STATIC = Path(__file__).with_name("static")
RAW_FLOAT32 = "application/octet-stream"
NPY = "application/x-npy"
MULTIPART = "multipart/form-data"
# decode + convert cost of an upload per pixel of the file (docs/service.md, "Uploads"): decides
# what leaves the event loop; an estimate, measured for PNG, the dearer format per pixel
DECODE_S_PER_PIXEL = 20e-9
TENSOR_ERRORS = {400: "", 413: "", 415: "", 422: "", 503: ""}
PAGE_HEADERS = {"content-security-policy": "default-src 'self'; img-src 'self' data: blob:",
                "x-content-type-options": "nosniff"}
# Swagger UI sets inline styles and draws data: images; still nothing from outside this server.
DOCS_HEADERS = {"content-security-policy": "default-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:",
                "x-content-type-options": "nosniff"}


def refuse_bad_model_early(settings: Settings) -> None:
    """In `bentoml serve`'s own process (and `bentoml build`): checksum + contract, no session.

    A worker that fails in __init__ is respawned by the supervisor forever; failing here stops
    `bentoml serve` at once with one line and exit status 2. Workers skip this (their __init__
    does the same checks on the bytes it loads)."""
    try:
        path = Path(settings.resolve_model_path())
        data, sha256 = read_verified(path)
        header = read_header(data)
        parse_contract(header.metadata, sha256, str(path), header)
    except ModelLoadError as exc:
        print(f"refusing to start: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def measure_for_workers(env: dict) -> None:
    """In `bentoml serve`'s own process, once, before the first worker starts: time the model
    (service/tuning.py) and hand the figures to every worker, respawned ones too, through `env`.
    A setting that cannot work with the measured cost stops `bentoml serve` here: one line, exit 2."""
    if TUNING_ENV not in os.environ:
        try:
            os.environ[TUNING_ENV] = measure_in_subprocess(SETTINGS.resolve_model_path())
        except (TuningError, ModelLoadError) as exc:
            print(f"refusing to start: {exc}", file=sys.stderr)
            raise SystemExit(2) from None
    env[TUNING_ENV] = os.environ[TUNING_ENV]


def worker_index() -> int | None:
    from bentoml._internal.context import server_context

    return getattr(server_context, "worker_index", None)


if worker_index() is None:
    refuse_bad_model_early(SETTINGS)
    install_supervisor(SETTINGS.drain_s, SETTINGS.fast_respawn, prepare=measure_for_workers)
install_protocol()


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body, refused with 413 as soon as it is known to exceed `limit` bytes."""
    if request.headers.get("content-encoding", "identity").lower() != "identity":
        raise unsupported_media("Content-Encoding is not supported; send the body uncompressed")
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise bad_request("Content-Length must be a number")
        if int(declared) > limit:
            raise too_large(f"request body of {int(declared)} bytes is over the limit of {limit} (MAX_BODY_BYTES)")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large(f"request body is over the limit of {limit} bytes (MAX_BODY_BYTES)")
        chunks.append(chunk)
    request.scope[BODY_READ] = True
    body = b"".join(chunks)
    request._body = body  # let request.form() reuse what was read instead of the drained stream
    return body


def media_type_of(request: Request) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


class Classifier:
    # Declared only when a store model is wanted, so `make serve` works from a plain checkout;
    # `make bento` builds with `--arg model_tag=...`, so the bento carries the model.
    if SETTINGS.model_tag:
        bento_model = bentoml.models.BentoModel(SETTINGS.model_tag)

    def __init__(self) -> None:
        settings = self.settings = SETTINGS
        try:
            contract, data = load_contract(settings.resolve_model_path())
            data, self.precision = choose_precision(contract, data, settings)  # INT8 where proven here (docs/int8.md)
            # by `bentoml serve`, before any worker (of model.onnx: a worker that serves INT8 measures its own model)
            measured = decode(os.environ.get(TUNING_ENV), contract.sha256) if self.precision["what"] == "fp32" else None
            self.model = Model(contract, data, settings.provider, settings.intra_op_threads, settings.chunk_images,
                               timed_runs=0 if measured else 1)
            if measured is None:  # not started by `bentoml serve` (or another model): measure here
                measured = time_batches(self.model, max(self.model.seconds_per_sample, (settings.latency_budget_ms or 500.0) / 1000))
            seconds, cpu = measured
            self.tuning = derive(seconds, settings, cpu)
        except (ModelLoadError, TuningError) as exc:  # changed since start-up: say so in one line
            logger.error("refusing to start: %s", exc)
            raise SystemExit(f"refusing to start: {exc}") from None
        self.model.seconds_per_sample = seconds[1]
        del data
        self.contract = contract
        self.spec = InputSpec.of(contract, self.tuning.max_images)
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="onnx")  # onnxruntime has its own threads
        self.decoder = ThreadPoolExecutor(1, thread_name_prefix="decode")  # big uploads, off the event loop
        index = worker_index()
        self.table = WorkerTable(table_path(os.getppid()), settings.workers, index - 1) \
            if index is not None and 0 < index <= settings.workers else None
        gate = GatedLoop.gate = Gate(self.table) if self.table is not None else None
        self.started_all = False  # every worker has been loaded at once (readiness, not_ready)
        self.batcher = Batcher(self.model.run, self.tuning.batch_max, self.tuning.inline_max, self.executor,
                               seconds_per_input=self.tuning.call_s(self.tuning.batch_max) / self.tuning.batch_max)
        self.guard = Guard(settings, self.tuning.queue_delay_s, self.tuning.window_s, work_matcher(ROUTES), gate,
                           self.batcher.backlog_s, self.tuning.shed_pace_s)
        self.batcher.started = self.guard.started
        self.guard.start()
        self.docs_json = json_response(openapi(ROUTES, contract, SERVICE_NAME, self.spec.max_images, settings.max_body_bytes)).body
        self.schema_json = json_response(client_schema(ROUTES, SERVICE_NAME)).body
        self.static = {name: (STATIC / name).read_bytes() for name in ("index.html", "page.js", "page.css", "docs.html", "docs.js")}
        self.about = self.describe()
        if settings.gc_freeze:
            # Everything loaded so far lives as long as the worker: out of the collector's reach,
            # so a full collection under load walks only request garbage (a latency tail otherwise).
            gc.collect()
            gc.freeze()
        if self.table is not None:
            self.table.set_loaded()
        t = self.tuning
        logger.info("serving %s (%s %s, %s, sha256 %s…) on %s; %.3f ms per input; calls of up to %d inputs "
                    "(%d on the event loop); shedding past %.0f ms of queue; worker %s of %d, pid %d", contract.name,
                    contract.layout, list(contract.input_shape),
                    f"{contract.classes} classes" if contract.classifier else f"outputs {contract.outputs_text}",
                    contract.sha256[:12], self.model.device.upper(), 1000 * seconds[1], t.batch_max, t.inline_max,
                    1000 * t.queue_delay_s, index, settings.workers, os.getpid())

    def describe(self) -> dict:
        c, s, m = self.contract, self.settings, self.model
        return {
            "model": {"name": c.name, "sha256": c.sha256, "path": c.path, "contract_version": c.version,
                      "arch": c.metadata.get("arch"), "folded": c.metadata.get("folded"),
                      "test_accuracy": float(c.metadata["test_accuracy"]) if c.metadata.get("test_accuracy", "").replace(".", "", 1).isdigit() else None,
                      "onnx_metadata": {k: v for k, v in c.metadata.items() if k != "fold_report"}},
            "labels": list(c.labels) if c.classifier else None,
            "input": {"name": c.input_name, "layout": c.layout, "shape": list(c.input_shape),
                      "accepted_shapes": c.accepted_shapes, "channels": c.channels, "height": c.height,
                      "width": c.width, "range": list(c.input_range) if c.input_range else None,
                      "background": c.background, "dtype": "float32", "max_images_per_request": self.spec.max_images,
                      "max_body_bytes": s.max_body_bytes, "content_types": [JSON, RAW_FLOAT32, NPY],
                      "classify": c.classify_refusal is None},
            "output": {"name": c.output_name, "kind": c.output_kind, "shape": [None, c.classes]} if c.classifier else None,
            "outputs": [o.describe() for o in c.outputs],
            "classifier": c.classifier,
            "classify_refusal": c.classify_refusal,
            "runtime": {"precision": self.precision, "providers": m.providers, "device": m.device,
                        "intra_op_threads": m.intra_op_threads,
                        "ms_per_input": round(1000 * m.seconds_per_sample, 4), "workers": s.workers,
                        "bentoml_version": bentoml.__version__, "derived": self.tuning.describe()},
            "settings": s.public(),
        }

    async def run(self, batch: np.ndarray, request: Request) -> list[np.ndarray]:
        """The model's outputs for a validated batch (every output, in the contract's order), through
        the batcher (service/batching.py): one call at a time, coalesced with what arrives meanwhile,
        on the event loop only when the call is cheap."""
        return await self.batcher(batch, request.scope.get(ADMITTED))

    async def decode_upload(self, data: bytes, invert: bool | None) -> np.ndarray:
        """An upload -> the model's input; pictures too big to convert within INLINE_BUDGET_MS (by
        their pixel count) are converted in the worker's decode thread, off the event loop."""
        image = peek_image(data)  # the header only
        args = (image, self.contract, invert, self.settings.classify_margin)
        if image.width * image.height * DECODE_S_PER_PIXEL <= self.settings.inline_budget_ms / 1000:
            return image_to_input(*args)
        return await asyncio.get_running_loop().run_in_executor(self.decoder, image_to_input, *args)

    def predictions(self, outputs: list[np.ndarray]) -> list[dict]:
        probabilities = self.model.probabilities(outputs[self.contract.class_index])
        labels = self.contract.labels
        return [{"label": labels[c], "class_id": c, "probabilities": row}
                for c, row in zip(probabilities.argmax(axis=1).tolist(), probabilities)]

    # --- the model --------------------------------------------------------------------------

    @route("POST", "/predict", "Run the model on a batch of inputs of its own shape: a classifier's predictions, "
           "else every output by name", body={JSON: "Images", RAW_FLOAT32: "RawFloat32", NPY: "Npy"},
           answers={200: "PredictAnswer", **TENSOR_ERRORS}, work=True,
           client_input={"properties": {"images": {"format": "numpy-array", "title": "Images", "type": "tensor"}},
                         "required": ["images"], "title": "Input", "type": "object"})
    async def predict(self, request: Request) -> Response:
        media_type = media_type_of(request)
        parse = {"": images_from_json, JSON: images_from_json, RAW_FLOAT32: images_from_raw_float32,
                 NPY: images_from_npy}.get(media_type)
        if parse is None:
            raise unsupported_media(f"Content-Type {media_type!r} is not supported by /predict; "
                                    f"use {JSON}, {RAW_FLOAT32} (raw float32) or {NPY}")
        batch = parse(await read_body(request, self.settings.max_body_bytes), self.spec)
        outputs = await self.run(batch, request)
        if self.contract.classifier:
            return json_response({"predictions": self.predictions(outputs)})
        return json_response({"outputs": dict(zip(self.contract.output_names, map(np.ascontiguousarray, outputs)))})

    @route("POST", "/classify", "Classify one uploaded PNG/JPEG (image models)", body={MULTIPART: "Upload"},
           answers={200: "Prediction", **TENSOR_ERRORS}, work=True,
           client_input={"properties": {"image": {"content_type": "image/*", "format": "image", "title": "Image",
                                                  "type": "file"},
                                        "invert": {"title": "Invert", "type": "boolean"}},
                         "required": ["image"], "title": "Input", "type": "object"})
    async def classify(self, request: Request) -> Response:
        if self.contract.classify_refusal:
            raise unprocessable(self.contract.classify_refusal)
        media_type = media_type_of(request)
        if media_type != MULTIPART:
            raise unsupported_media(f"Content-Type {media_type or 'none'!r} is not supported by /classify; "
                                    "upload the picture as multipart/form-data with a field named 'image'")
        await read_body(request, self.settings.max_body_bytes)
        try:
            form = await request.form(max_files=1, max_fields=8)
        except ClientError:
            raise
        except Exception as exc:  # starlette/python-multipart raise several types for a broken form
            raise bad_request(f"malformed multipart/form-data body: {exc}") from None
        try:
            upload = form.get("image")
            if upload is None or isinstance(upload, str):
                raise unprocessable("multipart form needs a file field named 'image'")
            invert = form.get("invert")
            if invert is not None and not isinstance(invert, str):
                raise unprocessable("'invert' must be a plain form field, not a file")
            invert = None if invert is None or invert.strip().lower() == "auto" else parse_bool(invert, "invert")
            data = await upload.read()
        finally:
            await form.close()
        batch = await self.decode_upload(data, invert)
        return json_response(self.predictions(await self.run(batch, request))[0])

    @route("GET", "/metadata", "The served model: input shape/layout/range, outputs, labels (classifiers), limits",
           answers={200: "Metadata"})
    async def metadata(self, request: Request) -> Response:
        return json_response({**self.about, "runtime": {**self.about["runtime"], "pid": os.getpid(),
                                                         "guard": self.guard.stats(), "batching": self.batcher.stats()}})

    # --- probes and docs ----------------------------------------------------------------------

    def not_ready(self) -> str | None:
        """Why this server cannot take work now (None: it can): draining, or, until every worker
        has loaded its model once, a worker still starting (no client connects while only the
        first one serves). A worker's later respawn does not make the server unready: the others
        serve meanwhile, and taking the pod out would move all of its load onto other pods."""
        if self.guard.draining:
            return "draining: this worker got SIGTERM and is shutting down"
        if self.table is not None and not self.started_all:
            if not self.table.all_ready():
                waiting = [w["worker"] for w in self.table.describe() if not (w["live"] and w["loaded"])]
                return f"starting: worker {', '.join(map(str, waiting))} of {self.settings.workers} has not loaded its model yet"
            self.started_all = True
        return None

    @route("GET", "/readyz", "Readiness: 503 until every worker has loaded its model, and from the moment the "
           "server got SIGTERM", answers={200: "Ready", 503: ""}, tag="probes")
    async def readyz(self, request: Request) -> Response:
        why = self.not_ready()
        return error_response(503, why) if why else json_response({"ready": True})

    @route("GET", "/", "This page: upload or draw an image, see the label and the probabilities",
           answers={200: "Text"}, produces="text/html", tag="page")
    async def page(self, request: Request) -> Response:
        return Response(self.static["index.html"], headers=PAGE_HEADERS, media_type="text/html")

    @route("GET", "/ui/page.js", "The page's script", answers={200: "Text"}, produces="text/javascript", tag="page")
    async def page_js(self, request: Request) -> Response:
        return Response(self.static["page.js"], headers=PAGE_HEADERS, media_type="text/javascript")

    @route("GET", "/ui/page.css", "The page's style sheet", answers={200: "Text"}, produces="text/css", tag="page")
    async def page_css(self, request: Request) -> Response:
        return Response(self.static["page.css"], headers=PAGE_HEADERS, media_type="text/css")

    @route("GET", "/docs", "Swagger UI over /docs.json (BentoML's bundled assets)", answers={200: "Text"},
           produces="text/html", tag="page")
    async def docs(self, request: Request) -> Response:
        return Response(self.static["docs.html"], headers=DOCS_HEADERS, media_type="text/html")

    @route("GET", "/ui/docs.js", "Starts Swagger UI", answers={200: "Text"}, produces="text/javascript", tag="page")
    async def docs_js(self, request: Request) -> Response:
        return Response(self.static["docs.js"], headers=DOCS_HEADERS, media_type="text/javascript")

    @route("GET", "/docs.json", "This document (OpenAPI 3)", answers={200: "Text"}, tag="page")
    async def openapi(self, request: Request) -> Response:
        return Response(self.docs_json, media_type=JSON)

    @route("GET", "/schema.json", "The routes in BentoML's client format (bentoml.SyncHTTPClient)",
           answers={200: "Text"}, tag="page")
    async def schema(self, request: Request) -> Response:
        return Response(self.schema_json, media_type=JSON)

    # --- Open Inference Protocol v2 (KServe / Triton HTTP) ------------------------------------

    def check_model(self, request: Request) -> None:
        name, version = request.path_params["name"], request.path_params.get("version")
        if name != self.contract.name:
            raise ClientError(404, f"unknown model {name!r}; this server has {self.contract.name!r}")
        if version is not None and version != oip.MODEL_VERSION:
            raise ClientError(404, f"unknown version {version!r} of {name!r}; available: {oip.MODEL_VERSION!r}")

    @route("GET", "/v2", "OIP v2 server metadata", answers={200: "ServerMetadataV2"}, tag="oip-v2")
    async def v2_server(self, request: Request) -> Response:
        return json_response(oip.server_metadata(bentoml.__version__))

    @route("GET", "/v2/health/live", "OIP v2 liveness", answers={200: "Live"}, tag="oip-v2")
    async def v2_live(self, request: Request) -> Response:
        return json_response({"live": True})

    @route("GET", "/v2/health/ready", "OIP v2 readiness (false while draining)", answers={200: "Ready", 503: ""},
           tag="oip-v2")
    async def v2_ready(self, request: Request) -> Response:
        ready = self.not_ready() is None
        return json_response({"ready": ready}, 200 if ready else 503)

    @route("GET", "/v2/models/{name}", "OIP v2 model metadata", answers={200: "ModelMetadataV2", 404: ""}, tag="oip-v2")
    async def v2_model(self, request: Request) -> Response:
        self.check_model(request)
        return json_response(oip.model_metadata(self.contract))

    @route("GET", "/v2/models/{name}/versions/{version}", "OIP v2 model metadata (version 1)",
           answers={200: "ModelMetadataV2", 404: ""}, tag="oip-v2")
    async def v2_model_version(self, request: Request) -> Response:
        return await self.v2_model(request)

    @route("GET", "/v2/models/{name}/ready", "OIP v2 model readiness", answers={200: "Ready", 404: ""}, tag="oip-v2")
    async def v2_model_ready(self, request: Request) -> Response:
        self.check_model(request)
        return json_response({"name": self.contract.name, "ready": not self.guard.draining})

    @route("GET", "/v2/models/{name}/versions/{version}/ready", "OIP v2 model readiness (version 1)",
           answers={200: "Ready", 404: ""}, tag="oip-v2")
    async def v2_model_version_ready(self, request: Request) -> Response:
        return await self.v2_model_ready(request)

    @route("POST", "/v2/models/{name}/infer", "OIP v2 inference: JSON tensors or the binary tensor extension",
           body={JSON: "InferRequestV2", RAW_FLOAT32: "Binary"},
           answers={200: "InferResponseV2", 404: "", **TENSOR_ERRORS}, work=True, tag="oip-v2")
    async def v2_infer(self, request: Request) -> Response:
        self.check_model(request)
        media_type = media_type_of(request)
        if media_type not in ("", JSON, RAW_FLOAT32):
            raise unsupported_media(f"Content-Type {media_type!r} is not supported; use {JSON}")
        body = await read_body(request, self.settings.max_body_bytes)
        infer = oip.parse_infer_request(body, request.headers.get(oip.HEADER_LENGTH), self.contract, self.spec)
        content, headers = oip.infer_response(infer, await self.run(infer.images, request), self.contract)
        return Response(content, 200, headers={k: v for k, v in headers.items() if k != "content-type"},
                        media_type=headers["content-type"])

    @route("POST", "/v2/models/{name}/versions/{version}/infer", "OIP v2 inference (version 1)",
           body={JSON: "InferRequestV2", RAW_FLOAT32: "Binary"},
           answers={200: "InferResponseV2", 404: "", **TENSOR_ERRORS}, work=True, tag="oip-v2")
    async def v2_infer_version(self, request: Request) -> Response:
        return await self.v2_infer(request)

    @bentoml.on_shutdown
    def close(self) -> None:
        self.executor.shutdown(wait=False)
        self.decoder.shutdown(wait=False)
        if GatedLoop.gate is not None:
            GatedLoop.gate.close()
        elif self.table is not None:
            self.table.close()


ROUTES = routes_of(Classifier)
Classifier = bentoml.service(
    name=SERVICE_NAME,
    workers=SETTINGS.workers,
    traffic={"timeout": SETTINGS.request_timeout_s},
    metrics={"enabled": SETTINGS.metrics},
    logging={"access": {"enabled": SETTINGS.access_log}},
    # With no trace exporter configured every span is dropped anyway, but BentoML's OpenTelemetry
    # middleware still builds one per request (~10% of a worker's CPU under load, py-spy):
    # exclude every URL unless TRACING is on.
    **({} if SETTINGS.tracing else {"tracing": {"excluded_urls": [".*"]}}),
)(Classifier)
Classifier.add_asgi_middleware(Router, routes=ROUTES)
FashionMNISTClassifier = Classifier  # the import path of issue 4 (docs/history.md, older commands)
