"""The three things `python -m export` takes, each turned into one `Source` the pipeline folds,
exports and verifies the same way:

- `--run DIR`: a training run of ours (weights.safetensors + config.json), verified on the 10k
  Fashion-MNIST test images;
- `--model FILE.py:FACTORY --weights W`: any PyTorch model (a zero-argument factory returning an
  nn.Module) with safetensors weights, or .pt/.pth read by torch.load(weights_only=True);
- `--onnx FILE.onnx`: any ONNX graph.

Without a dataset, parity runs on `--sample X.npy` or on seeded uniform random inputs from the
input range. Everything a user can get wrong is checked here, before anything is written, and
raised as BadInput (one line, exit 2).
"""
import copy
import hashlib
import importlib
import importlib.util
import json
import pickle
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from common.files import sha256_file
from export.contract import DEFAULT_RANGE, IMAGE_LAYOUTS, LAYOUT_RANK, MIN_OPSET
from export.errors import BadInput, one_line
from export.onnx_export import feeds

RANDOM_ROWS, RANDOM_SEED = 256, 0


@dataclass
class Source:
    kind: str                      # "run" | "pytorch" | "onnx" (the contract's source.kind)
    path: str                      # what it came from, as the user named it
    sha256: str                    # of the weights file (run, pytorch) or of the ONNX file (onnx)
    name: str
    input_name: str
    output_name: str
    input_shape: list              # [None, d1, d2, ...]
    layout: str
    input_range: list[float] | None
    background: str | None
    labels: list[str]
    inputs: np.ndarray             # the rows parity runs on, float32 [N, *input_shape[1:]]
    inputs_desc: str               # how they were made, for the report
    targets: np.ndarray | None = None        # class ids (run: the test labels), for accuracy
    module: nn.Module | None = None          # torch sources: the unfolded model, eval mode
    graph: onnx.ModelProto | None = None     # onnx: the graph to fold and publish (batch made dynamic, ...)
    reference_graph: onnx.ModelProto | None = None  # onnx: the graph exactly as given
    reference_batch: int | None = None       # onnx: the given graph only runs one row at a time
    extra_metadata: dict = field(default_factory=dict)  # run: arch, test_accuracy, normalization, weights_sha256
    source_extra: dict = field(default_factory=dict)    # more for the contract's `source` JSON
    request: dict = field(default_factory=dict)         # everything the export depends on (--if-stale)
    notes: list[str] = field(default_factory=list)      # what was inferred or changed, printed and reported


# --- flags ---------------------------------------------------------------------------------------

def parse_shape(text: str) -> list[int]:
    try:
        dims = [int(d) for d in text.replace("x", ",").split(",")]
    except ValueError:
        raise BadInput(f"--input-shape {text!r}: want comma-separated positive ints without the batch, e.g. 3,32,32 or 20") from None
    if not dims or any(d <= 0 for d in dims):
        raise BadInput(f"--input-shape {text!r}: every dimension must be a positive int")
    return dims


def parse_range(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise BadInput(f"--input-range {text!r}: want LO,HI, e.g. 0,1 or -1,1") from None
    if not (np.isfinite(lo) and np.isfinite(hi) and lo < hi):
        raise BadInput(f"--input-range {text!r}: want finite LO < HI")
    return [lo, hi]


def infer_layout(shape: list) -> str:
    """From the full input shape (batch first): rank 4 whose last dim is 1/3/4 and second is not ->
    NHWC; other rank 4 -> NCHW; rank 3 -> NCW; rank 2 -> NC; anything else -> other."""
    if len(shape) == 4:
        return "NHWC" if shape[3] in (1, 3, 4) and shape[1] not in (1, 3, 4) else "NCHW"
    return {3: "NCW", 2: "NC"}.get(len(shape), "other")


def check_layout(layout: str, shape: list, background: str | None) -> None:
    if layout in LAYOUT_RANK and LAYOUT_RANK[layout] != len(shape):
        raise BadInput(f"--layout {layout} wants a rank-{LAYOUT_RANK[layout]} input, but the input is "
                       f"{_shape_text(shape)} (rank {len(shape)})")
    if background is not None and layout not in IMAGE_LAYOUTS:
        raise BadInput(f"--background applies to image inputs (NCHW, NHWC), not to layout {layout}")


def model_name(name: str | None, default: str) -> str:
    if name is not None:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            raise BadInput(f"--name {name!r}: use letters, digits, '_', '.', '-' only (it becomes a URL path)")
        return name
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", default).strip("-.") or "model"


def read_labels(path: str | Path) -> list[str]:
    """A .txt file with one label per line, or a .json file holding a list of strings."""
    path = Path(path)
    if path.suffix.lower() not in (".txt", ".json"):
        raise BadInput(f"--labels {path}: want a .txt file (one label per line) or a .json list of strings")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise BadInput(f"--labels {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise BadInput(f"--labels {path}: cannot read it as UTF-8 text ({one_line(e)})") from None
    if path.suffix.lower() == ".json":
        try:
            labels = json.loads(text)
        except json.JSONDecodeError as e:
            raise BadInput(f"--labels {path}: not valid JSON ({e})") from None
        if not isinstance(labels, list) or not all(isinstance(x, str) and x.strip() for x in labels):
            raise BadInput(f"--labels {path}: want a JSON list of non-empty strings")
    else:
        labels = text.rstrip("\n").split("\n") if text.strip() else []
        labels = [line.rstrip("\r").strip() for line in labels]
        if "" in labels:
            raise BadInput(f"--labels {path}: line {labels.index('') + 1} is empty (one label per line, no blank lines)")
    if not labels:
        raise BadInput(f"--labels {path}: holds no labels")
    seen = set()
    for label in labels:
        if label in seen:
            raise BadInput(f"--labels {path}: {label!r} appears twice")
        seen.add(label)
    return labels


def check_labels(labels: list[str] | None, classes: int, what: str) -> list[str]:
    if labels is None:
        return [f"class_{i}" for i in range(classes)]
    if len(labels) != classes:
        raise BadInput(f"--labels has {len(labels)} labels but {what} outputs {classes} classes")
    return labels


def read_sample(path: str | Path, dims: list | None, input_range: list[float] | None) -> np.ndarray:
    """An .npy batch [N, *dims] (None in dims matches any size), read without pickle, as float32."""
    path = Path(path)
    try:
        sample = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise BadInput(f"--sample {path}: no such file") from None
    except (ValueError, OSError, EOFError) as e:
        raise BadInput(f"--sample {path}: not a readable .npy array ({one_line(e)})") from None
    if not isinstance(sample, np.ndarray):
        raise BadInput(f"--sample {path}: an .npz archive; save one array with np.save")
    if sample.dtype.kind not in "fiub":
        raise BadInput(f"--sample {path}: dtype {sample.dtype}, want a real-valued array")
    if dims is not None and (sample.ndim != len(dims) + 1 or any(d is not None and d != s for d, s in zip(dims, sample.shape[1:]))):
        want = ", ".join("?" if d is None else str(d) for d in dims)
        raise BadInput(f"--sample {path}: shape {list(sample.shape)}, want [N, {want}]")
    if sample.ndim < 2 or len(sample) == 0:
        raise BadInput(f"--sample {path}: shape {list(sample.shape)}, want a batch [N, ...] with N >= 1")
    sample = np.ascontiguousarray(sample, dtype=np.float32)
    if not np.isfinite(sample).all():
        raise BadInput(f"--sample {path}: holds NaN or inf")
    if input_range is not None and (sample.min() < input_range[0] or sample.max() > input_range[1]):
        raise BadInput(f"--sample {path}: values span [{sample.min():g}, {sample.max():g}], outside the input range "
                       f"[{input_range[0]:g}, {input_range[1]:g}]; pass --input-range")
    return sample


def random_inputs(dims: list[int], input_range: list[float]) -> tuple[np.ndarray, str]:
    rng = np.random.default_rng(RANDOM_SEED)
    inputs = rng.uniform(input_range[0], input_range[1], size=(RANDOM_ROWS, *dims)).astype(np.float32)
    return inputs, f"random inputs (uniform in [{input_range[0]:g}, {input_range[1]:g}], seed {RANDOM_SEED})"


def verification_inputs(sample: str | None, dims: list, input_range: list[float]) -> tuple[np.ndarray, str]:
    if sample is None:
        return random_inputs(dims, input_range)
    inputs = read_sample(sample, dims, input_range)
    return inputs, f"rows of --sample {sample}"


def _shape_text(shape) -> str:
    return "[" + ", ".join("N" if i == 0 and d is None else ("?" if d is None else str(d)) for i, d in enumerate(shape)) + "]"


# --- --run ---------------------------------------------------------------------------------------

def from_run(run_dir: str, data_dir: str) -> Source:
    from training.artifacts import load_run
    from training.data import load_split

    module, config = load_run(run_dir)
    images, targets = load_split(data_dir, "test")
    return Source(
        kind="run", path=str(run_dir), sha256=config["weights_sha256"], name="fashion-mnist",
        input_name="image", output_name="logits", input_shape=[None, 1, 28, 28], layout="NCHW",
        input_range=[0.0, 1.0], background="dark", labels=list(config["labels"]),
        inputs=images, inputs_desc="Fashion-MNIST test images", targets=targets, module=module,
        extra_metadata={"arch": config["arch"], "test_accuracy": f"{config['metrics']['test_accuracy']:.4f}",
                        "normalization": config["normalization"], "weights_sha256": config["weights_sha256"]},
        request={"kind": "run", "weights_sha256": config["weights_sha256"]})


# --- --model -------------------------------------------------------------------------------------

def load_factory(spec: str) -> nn.Module:
    """`path/to/file.py:FACTORY` or `package.module:FACTORY` -> FACTORY(), which must be an nn.Module."""
    target, sep, attr = spec.rpartition(":")
    if not sep or not target or not attr:
        raise BadInput(f"--model {spec!r}: want FILE.py:FACTORY or package.module:FACTORY")
    if target.endswith(".py") or "/" in target:
        path = Path(target)
        if not path.is_file():
            raise BadInput(f"--model {spec}: {path} does not exist")
        name = "bnfold_user_" + hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]
        spec_ = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec_)
        sys.modules[name] = module  # dataclasses and friends look their module up by name
        sys.path.insert(0, str(path.resolve().parent))  # so it can import its neighbours
        try:
            spec_.loader.exec_module(module)
        except (Exception, SystemExit) as e:
            sys.modules.pop(name, None)
            raise BadInput(f"--model {spec}: importing {path} raised {type(e).__name__}: {one_line(e)}") from None
        finally:
            sys.path.remove(str(path.resolve().parent))
    else:
        try:
            module = importlib.import_module(target)
        except ModuleNotFoundError as e:
            raise BadInput(f"--model {spec}: cannot import {target} ({e}); give FILE.py:FACTORY or put it on PYTHONPATH") from None
        except (Exception, SystemExit) as e:
            raise BadInput(f"--model {spec}: importing {target} raised {type(e).__name__}: {one_line(e)}") from None
    factory = module
    for part in attr.split("."):
        if not hasattr(factory, part):
            public = [n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n))]
            raise BadInput(f"--model {spec}: {target} has no {attr!r} (callables it defines: {', '.join(public[:12]) or 'none'})")
        factory = getattr(factory, part)
    if not callable(factory):
        raise BadInput(f"--model {spec}: {attr} is a {type(factory).__name__}, not a callable")
    try:
        model = factory()
    except (Exception, SystemExit) as e:
        raise BadInput(f"--model {spec}: {attr}() raised {type(e).__name__}: {one_line(e)}") from None
    if not isinstance(model, nn.Module):
        raise BadInput(f"--model {spec}: {attr}() returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """safetensors, or a .pt/.pth state_dict through torch.load(weights_only=True) (never a full
    unpickle); a {"state_dict": ...} / {"model": ...} checkpoint wrapper is unwrapped."""
    path = Path(path)
    if not path.is_file():
        raise BadInput(f"--weights {path}: no such file")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except Exception as e:
            raise BadInput(f"--weights {path}: not a readable safetensors file ({one_line(e)})") from None
    if suffix not in (".pt", ".pth"):
        raise BadInput(f"--weights {path}: want .safetensors, .pt or .pth")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        why = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        raise BadInput(f"--weights {path}: torch.load(weights_only=True) refuses it"
                       + (f" (it pickles {why.group(1)})" if why else f" ({one_line(e)})")
                       + "; save model.state_dict() or a safetensors file instead") from None
    except Exception as e:
        raise BadInput(f"--weights {path}: torch.load cannot read it ({one_line(e)})") from None
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise BadInput(f"--weights {path}: holds a {type(state).__name__} that is not a state_dict (names -> tensors)")
    return state


def load_state(model: nn.Module, state: dict[str, torch.Tensor], path: str) -> None:
    """load_state_dict, with every mismatch in one line: the first missing and unexpected keys,
    and tensors whose shapes differ. BN's num_batches_tracked may be absent (eval never reads it)."""
    expected = model.state_dict()
    if state and all(k.startswith("module.") for k in state) and not any(k.startswith("module.") for k in expected):
        state = {k[len("module."):]: v for k, v in state.items()}  # saved from DataParallel
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = sorted(k for k in state if k not in expected and not k.endswith("num_batches_tracked"))
    shapes = [f"{k} {list(state[k].shape)} in the file, {list(expected[k].shape)} in the model"
              for k in expected if k in state and state[k].shape != expected[k].shape]
    problems = []
    for what, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
        if keys:
            more = f", … {len(keys) - 5} more" if len(keys) > 5 else ""
            problems.append(f"{len(keys)} {what}: {', '.join(keys[:5])}{more}")
    if problems:
        raise BadInput(f"--weights {path} does not match the model: " + "; ".join(problems))
    model.load_state_dict(state, strict=False)


def probe(run, inputs: np.ndarray, what: str) -> int:
    """Run the model once on two rows; it must give finite [N, K] scores. Returns K."""
    batch = inputs[:2]
    try:
        out = run(batch)
    except BadInput:
        raise
    except Exception as e:
        raise BadInput(f"{what} cannot run on inputs of shape {list(batch.shape)}: {type(e).__name__}: {one_line(e)}") from None
    if isinstance(out, torch.Tensor):
        out = out.detach().numpy()
    if not isinstance(out, np.ndarray):
        raise BadInput(f"{what} returns a {type(out).__name__}; the contract needs one [N, K] tensor of class scores")
    if out.ndim != 2 or out.shape[0] != len(batch):
        raise BadInput(f"{what} outputs shape {list(out.shape)} for a batch of {len(batch)}; the contract needs "
                       f"[N, K] class scores")
    if not np.isfinite(out).all():
        raise BadInput(f"{what} outputs NaN or inf on these inputs; check the weights and --input-range")
    return int(out.shape[1])


def from_pytorch(spec: str, weights: str, input_shape: str, layout: str | None, input_range: str | None,
                 labels: str | None, sample: str | None, name: str | None, background: str | None) -> Source:
    dims = parse_shape(input_shape)
    shape = [None, *dims]
    layout = layout or infer_layout(shape)
    check_layout(layout, shape, background)
    value_range = parse_range(input_range) or list(DEFAULT_RANGE)
    label_list = read_labels(labels) if labels else None
    inputs, inputs_desc = verification_inputs(sample, dims, value_range)
    model = load_factory(spec)
    state = load_weights(weights)
    load_state(model, state, weights)
    model = model.float().eval()

    def run(batch):
        with torch.no_grad():
            return model(torch.from_numpy(batch))

    classes = probe(run, inputs, f"the model from {spec}")
    target = spec.rpartition(":")[0]
    code_path = Path(target) if target.endswith(".py") or "/" in target else None
    weights_sha = sha256_file(weights)
    source_extra = {"factory": spec, "factory_sha256": sha256_file(code_path) if code_path else None}
    default_name = code_path.stem if code_path else target.rpartition(".")[2]
    return Source(
        kind="pytorch", path=str(weights), sha256=weights_sha, name=model_name(name, default_name),
        input_name="input", output_name="logits", input_shape=shape, layout=layout, input_range=value_range,
        background=background, labels=check_labels(label_list, classes, "the model"), inputs=inputs,
        inputs_desc=inputs_desc, module=model, source_extra=source_extra,
        request={"kind": "pytorch", "weights_sha256": weights_sha, **source_extra, "shape": shape, "layout": layout,
                 "range": value_range, "labels": label_list, "sample_sha256": sha256_file(sample) if sample else None,
                 "name": name, "background": background},
        notes=[] if input_range else ["input range [0, 1] (the default; pass --input-range LO,HI to change it)"])


# --- --onnx --------------------------------------------------------------------------------------

def load_onnx(path: str | Path) -> onnx.ModelProto:
    """Read and validate a graph; external data is read in so the result is self-contained."""
    from google.protobuf.message import DecodeError
    from onnx.external_data_helper import load_external_data_for_model, uses_external_data

    path = Path(path)
    if not path.is_file():
        raise BadInput(f"--onnx {path}: no such file")
    try:
        model = onnx.load(path, load_external_data=False)
    except (DecodeError, ValueError, RuntimeError, OSError) as e:
        raise BadInput(f"--onnx {path}: not an ONNX file ({one_line(e)})") from None
    if model.ir_version == 0 or not model.HasField("graph") or not model.graph.node:
        raise BadInput(f"--onnx {path}: not an ONNX model (no graph in it)")
    tensors = [*model.graph.initializer,
               *(a.t for n in model.graph.node for a in n.attribute if a.type == onnx.AttributeProto.TENSOR)]
    for tensor in tensors:
        if uses_external_data(tensor):
            location = next((e.value for e in tensor.external_data if e.key == "location"), "")
            if not (path.parent / location).is_file():
                raise BadInput(f"--onnx {path}: tensor {tensor.name!r} is stored in external data file "
                               f"{location!r}, which is missing (it must sit next to the model)")
    try:
        load_external_data_for_model(model, str(path.parent))
    except (OSError, ValueError) as e:
        raise BadInput(f"--onnx {path}: cannot read its external data ({one_line(e)})") from None
    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise BadInput(f"--onnx {path}: the ONNX checker rejects it: {one_line(' '.join(str(e).split()))}") from None
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < MIN_OPSET:
        raise BadInput(f"--onnx {path}: opset {opset}; the contract needs >= {MIN_OPSET} "
                       f"(onnx.version_converter.convert_version(model, {MIN_OPSET}) can convert it)")
    return model


def _dims(value: onnx.ValueInfoProto) -> list | None:
    """A value's shape with None for anything not a fixed size; None when it has no shape."""
    tensor = value.type.tensor_type
    if not tensor.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in tensor.shape.dim]


def _set_dims(value: onnx.ValueInfoProto, dims: list) -> None:
    """Fix a value's shape: None becomes the dynamic `batch`, ints fixed sizes."""
    shape = value.type.tensor_type.shape
    del shape.dim[:]
    for d in dims:
        dim = shape.dim.add()
        if d is None:
            dim.dim_param = "batch"
        else:
            dim.dim_value = d


def from_onnx(path: str, labels: str | None, input_range: str | None, sample: str | None, layout: str | None,
              name: str | None, background: str | None) -> Source:
    from export.verify import ort_session, run_ort

    model = load_onnx(path)
    value_range = parse_range(input_range) or list(DEFAULT_RANGE)
    label_list = read_labels(labels) if labels else None
    inputs_ = feeds(model)
    if len(inputs_) != 1:
        names = ", ".join(i.name for i in inputs_) or "none"
        raise BadInput(f"--onnx {path}: the graph takes {len(inputs_)} inputs ({names}); the contract feeds exactly one")
    feed = inputs_[0]
    elem = feed.type.tensor_type.elem_type
    if elem != onnx.TensorProto.FLOAT:
        kind = onnx.TensorProto.DataType.Name(elem) if elem else "not a tensor"
        raise BadInput(f"--onnx {path}: its input {feed.name!r} is {kind}; the contract needs a float32 input")
    output = model.graph.output[0]
    dims = _dims(feed)
    sample_rows = None
    if sample is not None:
        sample_rows = read_sample(sample, None if dims is None else dims[1:], value_range)
    notes = []
    if dims is None or any(d is None for d in dims[1:]):
        if sample_rows is None:
            unknown = "its rank" if dims is None else ", ".join(
                f"axis {i} ({d.dim_param or 'unnamed'})" for i, d in enumerate(feed.type.tensor_type.shape.dim)
                if i > 0 and not d.dim_value)
            raise BadInput(f"--onnx {path}: input {feed.name!r} has dynamic {unknown} besides the batch; "
                           f"pass --sample X.npy to fix them from its shape")
        dims = [None if dims is None else dims[0], *sample_rows.shape[1:]]
        notes.append(f"input {feed.name!r} fixed to {_shape_text([None, *dims[1:]])} from the shape of --sample")
    if len(dims) < 2:
        raise BadInput(f"--onnx {path}: input {feed.name!r} has rank {len(dims)}; the contract needs a batch axis and at least one more")
    fixed_batch = dims[0]
    if fixed_batch not in (None, 1):
        raise BadInput(f"--onnx {path}: input {feed.name!r} has a fixed batch of {fixed_batch}; the contract needs a "
                       f"dynamic batch (re-export with a dynamic axis 0)")
    shape = [None, *dims[1:]]
    out_dims = _dims(output)
    if out_dims is not None and len(out_dims) != 2:
        raise BadInput(f"--onnx {path}: output {output.name!r} has rank {len(out_dims)}; the contract needs [N, K] class scores")
    layout_given = layout is not None
    layout = layout or infer_layout(shape)
    check_layout(layout, shape, background)
    if not layout_given:
        notes.append(f"input layout {layout}, inferred from {_shape_text(shape)} (pass --layout to override)")
    if not input_range:
        notes.append("input range [0, 1] (the default; pass --input-range LO,HI to change it)")
    inputs, inputs_desc = ((sample_rows, f"rows of --sample {sample}") if sample_rows is not None
                           else random_inputs(shape[1:], value_range))

    graph = copy.deepcopy(model)
    names = {n.name for n in graph.graph.node}
    for i, node in enumerate(graph.graph.node):  # unnamed nodes get a name, so reports can point at them
        if not node.name:
            node.name = next(f"{node.op_type}_{i}{suffix}" for suffix in ("", *range(1, 1000))
                             if f"{node.op_type}_{i}{suffix}" not in names)
            names.add(node.name)
    _set_dims(next(i for i in graph.graph.input if i.name == feed.name), shape)
    if fixed_batch == 1:
        del graph.graph.value_info[:]  # shapes inferred for batch 1; onnxruntime infers them again
        if out_dims is not None:
            _set_dims(graph.graph.output[0], [None, out_dims[1]])
    try:
        reference = ort_session(model, optimize=False)
    except Exception as e:
        raise BadInput(f"--onnx {path}: onnxruntime cannot load it: {one_line(e)}") from None

    def run_given(batch):
        return np.concatenate([reference.run([output.name], {feed.name: batch[i:i + 1]})[0] for i in range(len(batch))]) \
            if fixed_batch == 1 else reference.run([output.name], {feed.name: batch})[0]

    classes = probe(run_given, inputs, f"--onnx {path}")
    if fixed_batch == 1:  # make the batch dynamic only if the graph really computes the same at other sizes
        rows = inputs[:8]
        try:
            dynamic = run_ort(ort_session(graph, optimize=False), rows, output.name)
            same = dynamic.shape == (len(rows), classes) and np.allclose(dynamic, run_given(rows), atol=1e-5, rtol=1e-5)
        except Exception as e:
            raise BadInput(f"--onnx {path}: its batch is fixed at 1 and the graph does not run at other batch sizes "
                           f"({one_line(e, 200)}); re-export it with a dynamic batch axis") from None
        if not same:
            raise BadInput(f"--onnx {path}: its batch is fixed at 1 and with a dynamic batch the graph computes something "
                           f"else; re-export it with a dynamic batch axis")
        notes.append(f"input {feed.name!r} had a fixed batch of 1; made dynamic (the graph verifies at batch sizes 1 and 7)")
    file_sha = sha256_file(path)
    return Source(
        kind="onnx", path=str(path), sha256=file_sha, name=model_name(name, Path(path).stem),
        input_name=feed.name, output_name=output.name, input_shape=shape, layout=layout, input_range=value_range,
        background=background, labels=check_labels(label_list, classes, "the graph"), inputs=inputs,
        inputs_desc=inputs_desc, graph=graph, reference_graph=model, reference_batch=fixed_batch,
        source_extra={"producer": " ".join(filter(None, (model.producer_name, model.producer_version))) or None},
        request={"kind": "onnx", "sha256": file_sha, "shape": shape, "layout": layout, "range": value_range,
                 "labels": label_list, "sample_sha256": sha256_file(sample) if sample else None, "name": name,
                 "background": background},
        notes=notes)
