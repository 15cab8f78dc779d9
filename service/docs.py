"""/docs.json (OpenAPI 3) and /schema.json (what BentoML's Python client reads), both generated from
the route table (service/routing.py) and the served model's contract, so they describe the routes
as they are: the model's real shapes, content types and error statuses."""

from __future__ import annotations

from .contract import Contract
from .routing import Route

STATUS_TEXT = {
    400: "malformed body (empty, bad JSON, broken multipart)",
    404: "unknown model name/version or path",
    405: "wrong method",
    408: "headers not complete or body stalled (HEADER_TIMEOUT_S, BODY_TIMEOUT_S); the connection closes",
    413: "body over MAX_BODY_BYTES or batch over MAX_IMAGES_PER_REQUEST; the connection closes unread",
    415: "unsupported Content-Type or Content-Encoding",
    422: "valid syntax, wrong content: shape, dtype, NaN/Inf, out of input_range, not an image",
    503: "overloaded (QUEUE_MAX requests queued in the worker) or draining: retry after Retry-After seconds",
}


def _nested(dims: list[int], leaf: dict, max_n: int) -> dict:
    schema = leaf
    for d in reversed(dims):
        schema = {"type": "array", "minItems": d, "maxItems": d, "items": schema}
    return {"type": "array", "minItems": 1, "maxItems": max_n, "items": schema}


def components(contract: Contract, max_images: int, max_body: int) -> dict:
    number: dict = {"type": "number", "format": "float"}
    if contract.input_range:
        number.update(minimum=contract.input_range[0], maximum=contract.input_range[1])
    shapes = [s[1:] for s in contract.accepted_shapes]
    tensor = _nested(shapes[0], number, max_images)
    if len(shapes) > 1:
        tensor = {"oneOf": [_nested(s, number, max_images) for s in shapes]}
    shape_text = " or ".join("[" + ", ".join(["N", *map(str, s)]) + "]" for s in shapes)
    range_text = f"values in {list(contract.input_range)}" if contract.input_range else "any finite values"
    k = contract.classes
    if contract.classifier:
        probs = {"type": "array", "minItems": k, "maxItems": k, "items": {"type": "number", "minimum": 0, "maximum": 1}}
        prediction = {"type": "object", "required": ["label", "class_id", "probabilities"], "properties": {
            "label": {"type": "string", "enum": list(dict.fromkeys(contract.labels))},
            "class_id": {"type": "integer", "minimum": 0, "maximum": k - 1},
            "probabilities": {**probs, "description": "softmax of the logits, or the model's own probabilities "
                                                      "(output_kind), in label order"}}}
        predict_answer = {"$ref": "#/components/schemas/Predictions"}
        response_text = f"one FP32 tensor {contract.output_name!r} [N, {k}]: the graph's {contract.output_kind} as they are"
    else:
        prediction = {"type": "object", "description": f"not served: {contract.classify_refusal}"}
        float32 = {"type": "number", "format": "float"}
        predict_answer = {"type": "object", "required": ["outputs"], "properties": {"outputs": {
            "type": "object", "required": list(contract.output_names),
            "description": "every output of the model by name, batch first (row i belongs to input i)",
            "properties": {o.name: {**_nested(list(o.shape[1:]), float32, max_images),
                                    "description": f"{o} (at {o.path or 'the return value'!r} of the model's output)"}
                           for o in contract.outputs}}}}
        response_text = f"FP32 tensors {contract.outputs_text} (every output, or the requested ones), batch first"
    tensor_v2 = {"type": "object", "required": ["name", "shape", "datatype"], "properties": {
        "name": {"type": "string", "enum": [contract.input_name]},
        "shape": {"type": "array", "items": {"type": "integer"}, "example": [1, *contract.sample_shape]},
        "datatype": {"type": "string", "enum": ["FP32"]},
        "data": {"type": "array", "items": {"type": "number"}, "description": "row-major values"},
        "parameters": {"type": "object", "description": "binary_data_size with the binary tensor extension"}}}
    return {
        "Images": {"type": "object", "required": ["images"], "properties": {"images": {
            **tensor, "description": f"a batch of 1..{max_images} inputs, {shape_text}, {range_text}"}}},
        "RawFloat32": {"type": "string", "format": "binary", "description":
                       f"N*{contract.sample_size} little-endian float32 values, no header (shape {shape_text})"},
        "Npy": {"type": "string", "format": "binary", "description": f"one .npy array (no pickles), {shape_text}"},
        "Upload": {"type": "object", "required": ["image"], "properties": {
            "image": {"type": "string", "format": "binary", "description": "PNG or JPEG, any size"},
            "invert": {"type": "string", "enum": ["true", "false", "auto"], "description":
                       "invert the picture; absent/auto: decided by its border pixels and the model's image_background"}}},
        "Prediction": prediction,
        "Predictions": {"type": "object", "required": ["predictions"], "properties": {
            "predictions": {"type": "array", "items": {"$ref": "#/components/schemas/Prediction"}}}},
        "PredictAnswer": predict_answer,
        "Error": {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}},
        "Metadata": {"type": "object", "required": ["model", "labels", "input", "output", "outputs", "classifier"],
                     "description": "the served model (docs/onnx-contract.md): clients build their requests from this",
                     "properties": {"model": {"type": "object"},
                                    "labels": {"type": "array", "items": {"type": "string"}, "nullable": True,
                                               "description": "classifiers: one per class; null otherwise"},
                                    "input": {"type": "object"},
                                    "output": {"type": "object", "nullable": True,
                                               "description": "classifiers: the class-score output; null otherwise"},
                                    "outputs": {"type": "array", "description": "every output: name, shape, dtype, path",
                                                "example": [o.describe() for o in contract.outputs], "items": {
                                                    "type": "object", "properties": {
                                                        "name": {"type": "string"}, "shape": {"type": "array"},
                                                        "dtype": {"type": "string"}, "path": {"type": "string"}}}},
                                    "classifier": {"type": "boolean"},
                                    "classify_refusal": {"type": "string", "nullable": True,
                                                         "description": "why /classify answers 422 (null: it serves)"},
                                    "runtime": {"type": "object"}, "settings": {"type": "object"}}},
        "Ready": {"type": "object", "properties": {"ready": {"type": "boolean"}}},
        "Live": {"type": "object", "properties": {"live": {"type": "boolean"}}},
        "ServerMetadataV2": {"type": "object", "properties": {"name": {"type": "string"}, "version": {"type": "string"},
                                                              "extensions": {"type": "array", "items": {"type": "string"}}}},
        "ModelMetadataV2": {"type": "object", "properties": {"name": {"type": "string", "enum": [contract.name]},
                                                             "versions": {"type": "array"}, "platform": {"type": "string"},
                                                             "inputs": {"type": "array"}, "outputs": {"type": "array"}}},
        "InferRequestV2": {"type": "object", "required": ["inputs"], "properties": {
            "id": {"type": "string"}, "inputs": {"type": "array", "minItems": 1, "maxItems": 1, "items": tensor_v2},
            "outputs": {"type": "array", "items": {"type": "object", "properties": {
                "name": {"type": "string", "enum": list(contract.output_names)},
                "parameters": {"type": "object", "description": "binary_data: true for the binary tensor extension"}}}},
            "parameters": {"type": "object"}}},
        "InferResponseV2": {"type": "object", "properties": {
            "model_name": {"type": "string"}, "model_version": {"type": "string"}, "id": {"type": "string"},
            "outputs": {"type": "array", "description": response_text}}},
        "Binary": {"type": "string", "format": "binary"},
        "Text": {"type": "string"},
    }


def _content(schema: str) -> dict:
    return {"schema": {"$ref": f"#/components/schemas/{schema}"}}


def operation(r: Route, contract: Contract) -> dict:
    op: dict = {"summary": r.summary, "operationId": r.handler, "tags": [r.tag], "responses": {}}
    if "{name}" in r.path:
        op["parameters"] = [{"name": "name", "in": "path", "required": True,
                             "schema": {"type": "string", "enum": [contract.name]}}]
        if "{version}" in r.path:
            op["parameters"].append({"name": "version", "in": "path", "required": True,
                                     "schema": {"type": "string", "enum": ["1"]}})
    if r.body:
        op["requestBody"] = {"required": True, "content": {ct: _content(s) for ct, s in r.body.items()}}
    if r.handler == "classify" and contract.classify_refusal:
        op["description"] = f"Not available for this model: {contract.classify_refusal} (422)."
    for status, what in sorted(r.answers.items()):
        answer: dict = {"description": STATUS_TEXT.get(status, what if status < 300 else "error")}
        if status < 300:
            answer["description"] = "OK"
            answer["content"] = {r.produces: _content(what)}
        else:
            answer["content"] = {"application/json": _content("Error")}
            if status == 503:
                answer["headers"] = {"Retry-After": {"schema": {"type": "integer"}, "description": "seconds"}}
        op["responses"][str(status)] = answer
    return op


def openapi(routes: tuple[Route, ...], contract: Contract, service_name: str, max_images: int, max_body: int) -> dict:
    paths: dict = {}
    for r in routes:
        paths.setdefault(r.path, {})[r.method.lower()] = operation(r, contract)
    plain = {"content": {"text/plain": _content("Text")}}
    paths["/livez"] = {"get": {"summary": "Liveness (BentoML)", "tags": ["probes"], "responses": {"200": {"description": "alive", **plain}}}}
    paths["/healthz"] = {"get": {"summary": "Liveness, alias (BentoML)", "tags": ["probes"], "responses": {"200": {"description": "alive", **plain}}}}
    paths["/metrics"] = {"get": {"summary": "Prometheus metrics (BentoML, plus bnfold_guard_total)", "tags": ["probes"],
                                 "responses": {"200": {"description": "text exposition format", **plain}}}}
    return {
        "openapi": "3.0.2",
        "info": {"title": f"{service_name}: {contract.name}", "version": contract.sha256[:12] or "unknown",
                 "description": f"Serves the ONNX model {contract.name!r} ({contract.layout} {list(contract.input_shape)}, "
                                f"{f'{contract.classes} classes' if contract.classifier else 'not a classifier: outputs ' + contract.outputs_text}"
                                f") by docs/onnx-contract.md. Every mistake is a 4xx "
                                f"with a JSON body {{\"error\": \"...\"}}. Bodies over {max_body} bytes are refused (413)."},
        "paths": paths,
        "components": {"schemas": components(contract, max_images, max_body)},
    }


def client_schema(routes: tuple[Route, ...], service_name: str) -> dict:
    """BentoML's /schema.json format (what `bentoml.SyncHTTPClient(url)` reads to find endpoints)."""
    return {"name": service_name, "type": "service", "routes": [
        {"name": r.handler, "route": r.path, "batchable": False, "input": r.client_input,
         "output": {"additionalProperties": True, "type": "object"}, "is_task": False}
        for r in routes if r.client]}
