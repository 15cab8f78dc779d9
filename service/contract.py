"""The model file and its contract (docs/onnx-contract.md), read without onnxruntime.

`load_contract(path)` checks the file against its `.sha256` and reads `metadata_props` and the
graph's inputs/outputs straight from the ONNX protobuf (a few dozen lines of wire format, skipping
the weights by length), so `bentoml serve` can refuse a bad model at import time without building
an onnxruntime session, and each worker builds exactly one. Only the standard library here.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Mapping

LAYOUTS = ("NCHW", "NHWC", "NCW", "NC", "other")
IMAGE_LAYOUTS = ("NCHW", "NHWC")
OUTPUT_KINDS = ("logits", "probabilities")
BACKGROUNDS = ("dark", "light")
NAME_RE = re.compile(r"[A-Za-z0-9_.-]+")
# Version 1 (no `contract_version`) is the Fashion-MNIST special case: what every such model is.
V1_DEFAULTS = {"name": "fashion-mnist", "image_background": "dark"}


class ModelLoadError(RuntimeError):
    """The model can't be served (missing, corrupt, tampered, bad metadata): refuse to start."""


# --- the file -------------------------------------------------------------------------------


def recorded_sha256(model_path: Path) -> str:
    """The checksum the export wrote beside the model, in `sha256sum` format."""
    sidecar = model_path.with_name(model_path.name + ".sha256")
    if not sidecar.is_file():
        raise ModelLoadError(f"checksum file {sidecar} is missing; re-run the export (make export)")
    fields = sidecar.read_text(encoding="utf-8", errors="replace").split()
    if not fields or not re.fullmatch(r"[0-9a-fA-F]{64}", fields[0]):
        raise ModelLoadError(f"checksum file {sidecar} is not in sha256sum format")
    return fields[0].lower()


def read_verified(model_path: Path) -> tuple[bytes, str]:
    """The model's bytes and sha256; refuses a missing model or one the export did not write."""
    if not model_path.is_file():
        raise ModelLoadError(f"model file {model_path} not found; run `make export` first")
    expected = recorded_sha256(model_path)
    data = model_path.read_bytes()  # read once: the bytes we check are the bytes we load
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected:
        raise ModelLoadError(
            f"model file {model_path} does not match its recorded sha256 "
            f"(expected {expected}, got {actual}); refusing to serve a modified or corrupt model: re-export it"
        )
    return data, actual


# --- protobuf wire format: just enough of onnx.proto ----------------------------------------


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise ValueError("truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7


def _fields(buf: bytes):
    """(field number, value): ints for varint/fixed fields, bytes for length-delimited ones."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = int.from_bytes(buf[pos : pos + 8], "little"), pos + 8
        elif wire == 5:
            value, pos = int.from_bytes(buf[pos : pos + 4], "little"), pos + 4
        elif wire == 2:
            length, pos = _varint(buf, pos)
            if pos + length > len(buf):
                raise ValueError("truncated field")
            value, pos = buf[pos : pos + length], pos + length
        else:
            raise ValueError(f"unsupported wire type {wire}")
        yield number, value


def _text(value: bytes) -> str:
    return value.decode("utf-8", errors="replace")


def _value_info(buf: bytes) -> tuple[str, tuple[int | str | None, ...] | None, int]:
    """ValueInfoProto -> (name, dims, elem_type); a dim is an int, a symbolic name, or None; dims
    None = unranked; elem_type is TensorProto's code (1 = float32, 0 = not a tensor or unknown)."""
    name, dims, elem_type = "", None, 0
    for number, value in _fields(buf):
        if number == 1:
            name = _text(value)
        elif number == 2:  # TypeProto
            for tnum, tval in _fields(value):
                if tnum != 1:  # tensor_type
                    continue
                for fnum, fval in _fields(tval):
                    if fnum == 1 and isinstance(fval, int):
                        elem_type = fval
                    if fnum != 2:  # shape
                        continue
                    dims = []
                    for snum, sval in _fields(fval):
                        if snum != 1:
                            continue
                        dim: int | str | None = None
                        for dnum, dval in _fields(sval):
                            dim = dval if dnum == 1 else _text(dval) if dnum == 2 else dim
                        dims.append(dim)
                    dims = tuple(dims)
    return name, dims, elem_type


FLOAT32 = 1  # TensorProto.FLOAT


@dataclass(frozen=True)
class GraphHeader:
    metadata: Mapping[str, str]
    inputs: Mapping[str, tuple | None]  # fed inputs (initializers excluded), name -> dims
    outputs: Mapping[str, tuple | None]  # in graph order
    types: Mapping[str, int] = field(default_factory=dict)  # input/output name -> TensorProto elem_type


def read_header(data: bytes) -> GraphHeader:
    """metadata_props and graph inputs/outputs of a serialized ModelProto."""
    meta: dict[str, str] = {}
    inputs: dict[str, tuple | None] = {}
    outputs: dict[str, tuple | None] = {}
    types: dict[str, int] = {}
    initializers: set[str] = set()
    try:
        for number, value in _fields(data):
            if number == 14:  # metadata_props: StringStringEntryProto
                entry = dict(_fields(value))
                meta[_text(entry.get(1, b""))] = _text(entry.get(2, b""))
            elif number == 7:  # graph
                for gnum, gval in _fields(value):
                    if gnum == 11:
                        name, dims, types[name] = _value_info(gval)
                        inputs[name] = dims
                    elif gnum == 12:
                        name, dims, types[name] = _value_info(gval)
                        outputs[name] = dims
                    elif gnum == 5:  # initializer: TensorProto, name is field 8
                        initializers.update(_text(v) for n, v in _fields(gval) if n == 8)
    except (ValueError, TypeError) as exc:
        raise ModelLoadError(f"not a readable ONNX model: {exc}") from None
    if not inputs or not outputs:
        raise ModelLoadError("not a readable ONNX model: the graph has no inputs or no outputs")
    fed = {k: v for k, v in inputs.items() if k not in initializers}
    return GraphHeader(MappingProxyType(meta), MappingProxyType(fed), MappingProxyType(outputs), MappingProxyType(types))


# --- the contract ---------------------------------------------------------------------------


def _dims(shape) -> str:
    return "[" + ",".join("N" if d is None else str(d) for d in shape) + "]"


@dataclass(frozen=True)
class Output:
    """One graph output as the contract describes it: float32, batch first (row i belongs to input i)."""

    name: str
    shape: tuple  # (None, d1, ...)
    path: str = ""  # where it sits in the model's return value: "" (a plain tensor), "[0]", "['boxes']"
    dtype: str = "float32"

    def describe(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype, "path": self.path}

    def __str__(self) -> str:
        return f"{self.name} {_dims(self.shape)}"


@dataclass(frozen=True)
class Contract:
    """Everything the service serves by, from metadata_props (all derived values as properties)."""

    version: int
    name: str
    input_name: str
    input_shape: tuple  # (None, d1, d2, ...)
    layout: str
    input_range: tuple[float, float] | None
    background: str | None  # image models: "dark" | "light" | None (unknown)
    outputs: tuple[Output, ...]  # every graph output the service runs, in graph order
    output_name: str | None  # the class-score output [N, K]; None: not a classifier
    labels: tuple[str, ...]  # one per class (classifiers); () otherwise
    output_kind: str
    sha256: str
    path: str
    metadata: Mapping[str, str]

    @property
    def classifier(self) -> bool:
        return self.output_name is not None

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(o.name for o in self.outputs)

    @property
    def class_index(self) -> int | None:
        """Where the class scores sit among `outputs` (None: not a classifier)."""
        return self.output_names.index(self.output_name) if self.classifier else None

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.input_shape[1:])

    @property
    def sample_size(self) -> int:
        return math.prod(self.sample_shape)

    @property
    def is_image(self) -> bool:
        return self.layout in IMAGE_LAYOUTS

    @property
    def channels(self) -> int | None:
        if self.layout == "NCHW" or self.layout == "NCW":
            return self.input_shape[1]
        if self.layout == "NHWC":
            return self.input_shape[3]
        return None

    @property
    def height(self) -> int | None:
        return self.input_shape[2] if self.layout == "NCHW" else self.input_shape[1] if self.layout == "NHWC" else None

    @property
    def width(self) -> int | None:
        return self.input_shape[3] if self.layout == "NCHW" else self.input_shape[2] if self.layout == "NHWC" else None

    @property
    def classes(self) -> int:
        return len(self.labels)

    @property
    def accepted_shapes(self) -> list[list[int | None]]:
        """What /predict takes: the model's own shape, plus [N,H,W] for one-channel images."""
        shapes = [[None, *self.sample_shape]]
        if self.is_image and self.channels == 1:
            shapes.insert(0, [None, self.height, self.width])
        return shapes

    @property
    def outputs_text(self) -> str:
        """'boxes [N,4,84] and scores [N,3,84]': the outputs as a person reads them."""
        names = [str(o) for o in self.outputs]
        return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]

    @property
    def classify_refusal(self) -> str | None:
        """Why /classify can't serve this model (None: it can)."""
        if not self.classifier:
            return (f"this model is not a classifier (it has no class-score output), so /classify cannot serve it: "
                    f"its outputs {self.outputs_text} are served by POST /predict and POST /v2/models/{self.name}/infer")
        if not self.is_image:
            return (f"/classify needs an image model (layout NCHW or NHWC); this model's input is "
                    f"{self.layout} {list(self.input_shape)}: send tensors to /predict instead")
        if self.channels not in (1, 3):
            return (f"/classify converts uploads to 1 (grey) or 3 (RGB) channels; this model takes "
                    f"{self.channels}: send tensors to /predict instead")
        return None


def _json(meta: Mapping[str, str], key: str):
    try:
        return json.loads(meta[key])
    except json.JSONDecodeError:
        raise ModelLoadError(f"model metadata {key!r} is not JSON: {meta[key][:80]!r}") from None


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _batch_first(shape, min_rank: int) -> bool:
    """[null, d1, ...]: the batch, then positive ints."""
    return (isinstance(shape, list) and len(shape) >= min_rank and shape[0] is None
            and all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape[1:]))


def parse_outputs(meta: Mapping[str, str]) -> tuple[Output, ...]:
    """Version 3's `outputs`: [{name, shape, dtype, path}, ...], every graph output in graph order."""
    raw = _json(meta, "outputs")
    if not (isinstance(raw, list) and raw):
        raise ModelLoadError(f"model metadata 'outputs' must be a non-empty JSON list of {{name, shape, dtype, path}}, "
                             f"got {meta['outputs'][:80]!r}")
    outputs: list[Output] = []
    for i, entry in enumerate(raw):
        where = f"model metadata 'outputs'[{i}]"
        if not isinstance(entry, dict):
            raise ModelLoadError(f"{where} must be an object {{name, shape, dtype, path}}, got {json.dumps(entry)[:80]}")
        name = entry.get("name")
        if not (isinstance(name, str) and NAME_RE.fullmatch(name)):
            raise ModelLoadError(f"{where} 'name' must match [A-Za-z0-9_.-]+, got {name!r}")
        shape = entry.get("shape")
        if not _batch_first(shape, min_rank=1):
            raise ModelLoadError(f"{where} ({name}) 'shape' must be batch first, [null, d1, ...] with positive ints, "
                                 f"got {json.dumps(shape)[:80]}")
        dtype = entry.get("dtype", "float32")
        if dtype != "float32":
            raise ModelLoadError(f"{where} ({name}) 'dtype' must be float32 (the contract's only output type), got {dtype!r}")
        path = entry.get("path", "")
        if not isinstance(path, str):
            raise ModelLoadError(f"{where} ({name}) 'path' must be a string like \"[0]\", got {path!r}")
        if any(o.name == name for o in outputs):
            raise ModelLoadError(f"model metadata 'outputs' names {name!r} twice")
        outputs.append(Output(name, tuple(shape), path))
    return tuple(outputs)


def parse_contract(meta: Mapping[str, str], sha256: str = "", path: str = "", header: GraphHeader | None = None) -> Contract:
    """metadata_props (and, when given, the graph's inputs/outputs) -> Contract, or ModelLoadError."""
    raw_version = meta.get("contract_version", "1")
    if raw_version not in ("1", "2", "3"):
        raise ModelLoadError(f"model metadata 'contract_version' must be 1, 2 or 3, got {raw_version!r}")
    version = int(raw_version)
    # Versions 1 and 2 are classifiers with one output; from version 3 `outputs` describes every
    # output and `output_name` + `labels` are there only for a classifier.
    classifier = version < 3 or "output_name" in meta
    required = ["labels"] * classifier + ["input_name"] + ["output_name"] * (version < 3) + ["input_shape"]
    missing = [k for k in required + ["outputs"] * (version >= 3) if k not in meta]
    if missing:
        raise ModelLoadError(f"model metadata lacks {', '.join(missing)} (see docs/onnx-contract.md)")
    if not classifier and "labels" in meta:
        raise ModelLoadError("model metadata has 'labels' but no 'output_name': labels name the classes of a "
                             "classifier's class-score output, which output_name must name")
    defaults = V1_DEFAULTS if version == 1 else {}

    labels: list = []
    if classifier:
        labels = _json(meta, "labels")
        if not (isinstance(labels, list) and labels and all(isinstance(x, str) for x in labels)):
            raise ModelLoadError("model metadata 'labels' must be a non-empty JSON list of strings")
    shape = _json(meta, "input_shape")
    if not _batch_first(shape, min_rank=2):
        raise ModelLoadError(f"model metadata 'input_shape' must be [null, d1, ...] with positive ints, got {shape!r}")
    rank = len(shape)
    layout = meta.get("input_layout") or {4: "NCHW", 2: "NC"}.get(rank, "other")
    want_rank = {"NCHW": 4, "NHWC": 4, "NCW": 3, "NC": 2}.get(layout)
    if layout not in LAYOUTS:
        raise ModelLoadError(f"model metadata 'input_layout' must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    if want_rank is not None and rank != want_rank:
        raise ModelLoadError(f"input_layout {layout} needs a rank-{want_rank} input_shape, got {shape!r}")

    value_range = None
    if "input_range" in meta:
        value_range = _json(meta, "input_range")
        if not (isinstance(value_range, list) and len(value_range) == 2 and all(map(_finite, value_range))
                and value_range[0] < value_range[1]):
            raise ModelLoadError(f"model metadata 'input_range' must be [lo, hi] with lo < hi, got {value_range!r}")
        value_range = (float(value_range[0]), float(value_range[1]))
    background = meta.get("image_background") or defaults.get("image_background")
    if background is not None and background not in BACKGROUNDS:
        raise ModelLoadError(f"model metadata 'image_background' must be dark or light, got {background!r}")
    if layout not in IMAGE_LAYOUTS:
        background = None
    kind = meta.get("output_kind", "logits")
    if kind not in OUTPUT_KINDS:
        raise ModelLoadError(f"model metadata 'output_kind' must be logits or probabilities, got {kind!r}")
    name = meta.get("name") or defaults.get("name", "model")
    if not NAME_RE.fullmatch(name):
        raise ModelLoadError(f"model metadata 'name' must match [A-Za-z0-9_.-]+, got {name!r}")

    output_name = meta.get("output_name") if classifier else None
    if version < 3:  # one output: the class scores, [N, K]
        outputs = (Output(output_name, (None, len(labels))),)
    else:
        outputs = parse_outputs(meta)
        scores = next((o for o in outputs if o.name == output_name), None)
        if classifier and scores is None:
            raise ModelLoadError(f"model metadata 'output_name' {output_name!r} is not one of the outputs "
                                 f"{[o.name for o in outputs]}")
        if classifier and scores.shape != (None, len(labels)):
            raise ModelLoadError(f"the class-score output {output_name!r} must be [N, K] with K = {len(labels)} labels, "
                                 f"the metadata says {list(scores.shape)}")

    contract = Contract(
        version=version, name=name, input_name=meta["input_name"], input_shape=tuple(shape), layout=layout,
        input_range=value_range, background=background, outputs=outputs, output_name=output_name,
        labels=tuple(labels), output_kind=kind, sha256=sha256, path=path, metadata=MappingProxyType(dict(meta)),
    )
    if header is not None:
        check_graph(contract, header)
    return contract


def check_graph(contract: Contract, header: GraphHeader) -> None:
    """The graph really has the input/outputs the metadata names, float32, with compatible shapes."""
    if contract.input_name not in header.inputs:
        raise ModelLoadError(f"model metadata names input {contract.input_name!r}, the graph feeds {sorted(header.inputs)}")
    if len(header.inputs) != 1:
        raise ModelLoadError(f"the graph must have exactly one fed input, it has {sorted(header.inputs)}")
    dims = header.inputs[contract.input_name]
    if dims is not None:
        fixed = [d if isinstance(d, int) and d > 0 else None for d in dims]
        if len(dims) != len(contract.input_shape) or any(
            f is not None and f != want for f, want in zip(fixed[1:], contract.input_shape[1:])
        ):
            raise ModelLoadError(f"graph input {contract.input_name!r} has shape {list(dims)}, "
                                 f"the metadata says {list(contract.input_shape)}")
    graph_outputs = list(header.outputs)
    if contract.version >= 3 and graph_outputs != list(contract.output_names):
        raise ModelLoadError(f"model metadata 'outputs' names {list(contract.output_names)}, the graph's outputs are "
                             f"{graph_outputs} (every graph output, in graph order)")
    for output in contract.outputs:
        if output.name not in header.outputs:
            raise ModelLoadError(f"model metadata names output {output.name!r}, the graph has {sorted(header.outputs)}")
        out = header.outputs[output.name]
        if output.name == contract.output_name and out is not None:
            if len(out) != 2:
                raise ModelLoadError(f"graph output {output.name!r} must be [N, K], it has shape {list(out)}")
            if isinstance(out[1], int) and out[1] > 0 and out[1] != contract.classes:
                raise ModelLoadError(f"graph output {output.name!r} has {out[1]} classes, "
                                     f"the metadata has {contract.classes} labels")
        if out is not None and (len(out) != len(output.shape) or any(
                isinstance(d, int) and d > 0 and d != want for d, want in zip(out[1:], output.shape[1:]))):
            raise ModelLoadError(f"graph output {output.name!r} has shape {list(out)}, the metadata says {list(output.shape)}")
    for tensor in (contract.input_name, *contract.output_names):
        if header.types.get(tensor, FLOAT32) not in (FLOAT32, 0):
            raise ModelLoadError(f"graph tensor {tensor!r} has ONNX element type {header.types[tensor]}; "
                                 f"the contract serves float32 (type 1) only")


def load_contract(model_path: str | Path) -> tuple[Contract, bytes]:
    """Checksum + contract + graph header of the model file, and its bytes (for the session)."""
    path = Path(model_path)
    data, sha256 = read_verified(path)
    header = read_header(data)
    return parse_contract(header.metadata, sha256=sha256, path=str(path), header=header), data
