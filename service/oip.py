"""Open Inference Protocol v2 (KServe / Triton HTTP/REST): request parsing and response building.

Supports the JSON tensor form and Triton's binary tensor extension (a JSON header of
`Inference-Header-Content-Length` bytes followed by raw tensor bytes), which tritonclient uses by
default, so existing clients work unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import orjson

from .errors import bad_request, too_large, unprocessable
from .contract import Contract
from .inputs import InputSpec, as_numeric_array, check_batch, parse_json

MODEL_VERSION = "1"
HEADER_LENGTH = "inference-header-content-length"


@dataclass(frozen=True)
class InferRequest:
    id: str | None
    images: np.ndarray  # validated float32 [N, *sample_shape]
    outputs: tuple[tuple[int, bool], ...]  # what to answer, in order: (index into contract.outputs, binary?)


def model_metadata(contract: Contract) -> dict:
    return {
        "name": contract.name,
        "versions": [MODEL_VERSION],
        "platform": "onnxruntime_onnx",
        "inputs": [{"name": contract.input_name, "datatype": "FP32", "shape": [-1, *contract.sample_shape]}],
        "outputs": [{"name": o.name, "datatype": "FP32", "shape": [-1, *o.shape[1:]]} for o in contract.outputs],
    }


def server_metadata(version: str) -> dict:
    return {"name": "bnfold-bentoml", "version": version, "extensions": ["binary_tensor_data"]}


def _split_body(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    if header_length is None:
        return body, b""
    try:
        n = int(header_length)
    except ValueError:
        raise bad_request("Inference-Header-Content-Length must be an integer") from None
    if not 0 < n <= len(body):
        raise bad_request(f"Inference-Header-Content-Length {n} does not fit a body of {len(body)} bytes")
    return body[:n], body[n:]


def _names(contract: Contract) -> str:
    names = ", ".join(f'"{name}"' for name in contract.output_names)
    return f"one output {names}" if len(contract.outputs) == 1 else f"the outputs {names}"


def _wanted_outputs(request: dict, contract: Contract) -> tuple[tuple[int, bool], ...]:
    """Every output (none requested) or the requested ones, each in binary or JSON (per output,
    else the request's binary_data_output, else JSON)."""
    outputs = request.get("outputs")
    params = request.get("parameters") or {}
    if not isinstance(params, dict):
        raise unprocessable('"parameters" must be an object')
    binary = bool(params.get("binary_data_output", False))
    names = contract.output_names
    if outputs is None:
        return tuple((i, binary) for i in range(len(names)))
    if not isinstance(outputs, list) or not outputs:
        raise unprocessable('"outputs" must be a non-empty list of {"name": ...}')
    wanted: list[tuple[int, bool]] = []
    for output in outputs:
        name = output.get("name") if isinstance(output, dict) else output
        if not isinstance(output, dict) or not isinstance(name, str) or name not in names:
            raise unprocessable(f"unknown output {name!r}; this model has {_names(contract)}")
        out_params = output.get("parameters") or {}
        if not isinstance(out_params, dict):
            raise unprocessable(f'"parameters" of output "{name}" must be an object')
        index = names.index(name)
        if any(i == index for i, _ in wanted):
            raise unprocessable(f'output "{name}" is requested twice')
        wanted.append((index, bool(out_params.get("binary_data", binary))))
    return tuple(wanted)


def parse_infer_request(body: bytes, header_length: str | None, info: Contract, spec: InputSpec) -> InferRequest:
    json_part, binary_part = _split_body(body, header_length)
    request = parse_json(json_part)
    if not isinstance(request, dict):
        raise unprocessable("inference request must be a JSON object")
    inputs = request.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise unprocessable(f'"inputs" must be a list with exactly one tensor, "{info.input_name}"')
    tensor = inputs[0]
    if tensor.get("name") != info.input_name:
        raise unprocessable(f'unknown input {tensor.get("name")!r}; this model has one input "{info.input_name}"')
    if tensor.get("datatype") != "FP32":
        raise unprocessable(f'input datatype must be "FP32", got {tensor.get("datatype")!r}')
    shape = tensor.get("shape")
    if not (isinstance(shape, list) and shape and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
        raise unprocessable('"shape" must be a list of non-negative integers')
    count = int(np.prod(shape))
    if count > spec.max_images * spec.sample_size:
        raise too_large(f"tensor of shape {shape} is over the limit of {spec.max_images} inputs per request")

    params = tensor.get("parameters") or {}
    binary_size = params.get("binary_data_size") if isinstance(params, dict) else None
    if binary_size is not None:
        if not isinstance(binary_size, int) or binary_size != len(binary_part):
            raise bad_request(
                f"binary_data_size {binary_size!r} does not match the {len(binary_part)} bytes after the JSON header"
            )
        if binary_size != 4 * count:
            raise unprocessable(f"binary tensor has {binary_size} bytes, shape {shape} needs {4 * count}")
        flat = np.frombuffer(binary_part, dtype="<f4")
    else:
        if binary_part:
            raise bad_request("binary data after the JSON header but no input declares binary_data_size")
        if "data" not in tensor:
            raise unprocessable('input has neither "data" nor parameters.binary_data_size')
        flat = as_numeric_array(tensor["data"], '"data"').reshape(-1)
        if flat.size != count:
            raise unprocessable(f'"data" has {flat.size} values, shape {shape} needs {count}')
    images = check_batch(flat.reshape(shape), spec, "input tensor")
    request_id = request.get("id")
    return InferRequest(
        id=str(request_id) if request_id is not None else None,
        images=images,
        outputs=_wanted_outputs(request, info),
    )


def infer_response(request: InferRequest, outputs: list[np.ndarray], contract: Contract) -> tuple[bytes, dict[str, str]]:
    """Body and extra headers of the v2 response (`outputs`: every graph output as it is, in the
    contract's order): the requested ones, binary ones after the JSON header in the same order."""
    head: dict = {"model_name": contract.name, "model_version": MODEL_VERSION}
    if request.id is not None:
        head["id"] = request.id
    answered, raw = [], []
    for index, binary in request.outputs:
        array = outputs[index]
        output: dict = {"name": contract.outputs[index].name, "shape": list(array.shape), "datatype": "FP32"}
        if binary:
            raw.append(np.ascontiguousarray(array, dtype="<f4").tobytes())
            output["parameters"] = {"binary_data_size": len(raw[-1])}
        else:
            output["data"] = np.ascontiguousarray(array.reshape(-1))  # orjson writes float32 as is
        answered.append(output)
    head["outputs"] = answered
    header = orjson.dumps(head, option=orjson.OPT_SERIALIZE_NUMPY)
    if raw:
        return header + b"".join(raw), {HEADER_LENGTH: str(len(header)), "content-type": "application/octet-stream"}
    return header, {"content-type": "application/json"}
