"""The request path: a small Starlette app that BentoML mounts inside the service.

Why not typed `@bentoml.api` endpoints for the hot path: they parse the body with pydantic
(slow on 784-float nested lists), hop to a thread per call and answer malformed input with
BentoML's generic errors (README.md, "Why the request path looks like this", has the
measurement). Here a request is parsed with orjson / numpy, validated in one pass and answered
with orjson, and every client mistake is a 4xx `{"error": ...}`. The service class still declares
typed `predict` / `classify` methods on the same routes (for /docs and BentoML's client); the
HotPathMiddleware answers those routes before BentoML's router reaches them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Awaitable, Callable

import numpy as np
import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from . import oip
from .batching import MicroBatcher
from .errors import ClientError, bad_request, too_large, unprocessable, unsupported_media
from .images import decode_image
from .inputs import InputSpec, images_from_json, images_from_npy, images_from_raw_float32, parse_bool
from .model import OnnxClassifier

logger = logging.getLogger("bentoml.service.http")

JSON = "application/json"
RAW_FLOAT32 = "application/octet-stream"
NPY = "application/x-npy"
MULTIPART = "multipart/form-data"


@dataclass
class Runtime:
    """Everything a request needs; built once per worker by the BentoML service."""

    classifier: OnnxClassifier
    spec: InputSpec
    batcher: MicroBatcher
    max_body_bytes: int
    describe: Callable[[], dict]  # the /metadata document

    @property
    def labels(self) -> tuple[str, ...]:
        return self.classifier.info.labels


def json_response(content: object, status: int = 200) -> Response:
    return Response(orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY), status, media_type=JSON)


def error_response(status: int, message: str) -> Response:
    return json_response({"error": message}, status)


def media_type_of(request: Request) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body, refused with 413 as soon as it is known to exceed `limit` bytes."""
    if request.headers.get("content-encoding", "identity").lower() != "identity":
        raise unsupported_media("Content-Encoding is not supported; send the body uncompressed")
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise bad_request("Content-Length must be a number")
        if int(declared) > limit:
            raise too_large(f"request body of {int(declared)} bytes is over the limit of {limit}")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large(f"request body is over the limit of {limit} bytes")
        chunks.append(chunk)
    body = b"".join(chunks)
    request._body = body  # let request.form() reuse what was read instead of the drained stream
    return body


def predictions(labels: tuple[str, ...], probabilities: np.ndarray) -> list[dict]:
    class_ids = probabilities.argmax(axis=1).tolist()
    return [
        {"label": labels[c], "class_id": c, "probabilities": row}
        for c, row in zip(class_ids, probabilities)
    ]


def guarded(handler: Callable[[Request, Runtime], Awaitable[Response]], runtime_of: Callable[[], Runtime]):
    """ClientError -> its 4xx JSON; anything else -> logged, 500 JSON; never a dead worker."""

    async def endpoint(request: Request) -> Response:
        try:
            return await handler(request, runtime_of())
        except ClientError as exc:
            return error_response(exc.status, exc.message)
        except Exception:
            logger.exception("unhandled error on %s %s", request.method, request.url.path)
            return error_response(500, "internal server error; see the server log")

    return endpoint


async def predict(request: Request, rt: Runtime) -> Response:
    media_type = media_type_of(request)
    if media_type in ("", JSON):
        parse = images_from_json
    elif media_type == RAW_FLOAT32:
        parse = images_from_raw_float32
    elif media_type == NPY:
        parse = images_from_npy
    else:
        raise unsupported_media(
            f"Content-Type {media_type!r} is not supported by /predict; "
            f"use {JSON}, {RAW_FLOAT32} (raw float32) or {NPY}"
        )
    images = parse(await read_body(request, rt.max_body_bytes), rt.spec)
    _, probabilities = await rt.batcher(images)
    return json_response({"predictions": predictions(rt.labels, probabilities)})


async def classify(request: Request, rt: Runtime) -> Response:
    media_type = media_type_of(request)
    if media_type != MULTIPART:
        raise unsupported_media(
            f"Content-Type {media_type or 'none'!r} is not supported by /classify; "
            "upload the picture as multipart/form-data with a field named 'image'"
        )
    await read_body(request, rt.max_body_bytes)
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
        invert_field = form.get("invert")
        if invert_field is not None and not isinstance(invert_field, str):
            raise unprocessable("'invert' must be a plain form field, not a file")
        invert = parse_bool(invert_field, "invert")
        data = await upload.read()
    finally:
        await form.close()
    image = decode_image(data, invert=invert, size=rt.spec.image_shape[-1])
    _, probabilities = await rt.batcher(image)
    return json_response(predictions(rt.labels, probabilities)[0])


async def metadata(request: Request, rt: Runtime) -> Response:
    return json_response(rt.describe())


def _check_model(request: Request) -> None:
    name = request.path_params["name"]
    if name != oip.MODEL_NAME:
        raise ClientError(404, f"unknown model {name!r}; this server has {oip.MODEL_NAME!r}")
    version = request.path_params.get("version")
    if version is not None and version != oip.MODEL_VERSION:
        raise ClientError(404, f"unknown version {version!r} of {name!r}; available: {oip.MODEL_VERSION!r}")


async def v2_server_metadata(request: Request, rt: Runtime) -> Response:
    import bentoml

    return json_response(oip.server_metadata(bentoml.__version__))


async def v2_live(request: Request, rt: Runtime) -> Response:
    return json_response({"live": True})


async def v2_ready(request: Request, rt: Runtime) -> Response:
    return json_response({"ready": True})


async def v2_model_metadata(request: Request, rt: Runtime) -> Response:
    _check_model(request)
    return json_response(oip.model_metadata(rt.classifier.info))


async def v2_model_ready(request: Request, rt: Runtime) -> Response:
    _check_model(request)
    return json_response({"name": oip.MODEL_NAME, "ready": True})


async def v2_infer(request: Request, rt: Runtime) -> Response:
    _check_model(request)
    media_type = media_type_of(request)
    if media_type not in ("", JSON, RAW_FLOAT32):
        raise unsupported_media(f"Content-Type {media_type!r} is not supported; use {JSON}")
    body = await read_body(request, rt.max_body_bytes)
    infer = oip.parse_infer_request(body, request.headers.get(oip.HEADER_LENGTH), rt.classifier.info, rt.spec)
    logits, _ = await rt.batcher(infer.images)
    content, headers = oip.infer_response(infer, logits, rt.classifier.info.output_name)
    media = headers.pop("content-type")
    return Response(content, 200, headers=headers, media_type=media)


class HotPathMiddleware:
    """Answers the hot fixed-path routes before BentoML's router sees them.

    Added with `Service.add_asgi_middleware`, so it runs inside BentoML's metrics, timeout and
    (optional) tracing middlewares, which still count these requests; it only skips the router
    scan over the system routes, the mount and the mounted app's own middleware stack, about a
    quarter of a worker's CPU per small request (py-spy, README.md "Serving"). Every other path and
    method falls through to the mounted app, which serves the same handlers.
    """

    def __init__(self, app, endpoints: dict[tuple[str, str], Callable[[Request], Awaitable[Response]]]) -> None:
        self.app = app
        self.endpoints = endpoints

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            endpoint = self.endpoints.get((scope["method"], scope["path"]))
            if endpoint is not None:
                request = Request(scope, receive)
                response = await endpoint(request)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def hot_endpoints(runtime_of: Callable[[], Runtime]) -> dict[tuple[str, str], Callable]:
    async def v2_infer_default(request: Request) -> Response:
        request.scope["path_params"] = {"name": oip.MODEL_NAME}
        return await guarded(v2_infer, runtime_of)(request)

    return {
        ("POST", "/predict"): guarded(predict, runtime_of),
        ("POST", "/classify"): guarded(classify, runtime_of),
        ("GET", "/metadata"): guarded(metadata, runtime_of),
        ("POST", f"/v2/models/{oip.MODEL_NAME}/infer"): v2_infer_default,
    }


def build_app(runtime_of: Callable[[], Runtime]) -> Starlette:
    """runtime_of: returns this worker's Runtime (created in the service's __init__)."""

    def route(path: str, handler, methods: list[str]) -> Route:
        return Route(path, guarded(handler, runtime_of), methods=methods)

    model = "/v2/models/{name}"
    version = "/v2/models/{name}/versions/{version}"
    return Starlette(
        routes=[
            route("/predict", predict, ["POST"]),
            route("/classify", classify, ["POST"]),
            route("/metadata", metadata, ["GET"]),
            route("/v2", v2_server_metadata, ["GET"]),
            route("/v2/health/live", v2_live, ["GET"]),
            route("/v2/health/ready", v2_ready, ["GET"]),
            route(model, v2_model_metadata, ["GET"]),
            route(model + "/ready", v2_model_ready, ["GET"]),
            route(model + "/infer", v2_infer, ["POST"]),
            route(version, v2_model_metadata, ["GET"]),
            route(version + "/ready", v2_model_ready, ["GET"]),
            route(version + "/infer", v2_infer, ["POST"]),
        ]
    )
