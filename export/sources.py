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
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from common.files import sha256_file
from export.contract import DEFAULT_RANGE, IMAGE_LAYOUTS, LAYOUT_RANK
from export.errors import BadInput, one_line
from export.loading import load_factory, load_onnx, load_state, load_weights  # noqa: F401 (public here too)
from export.onnx_export import feeds

RANDOM_SEED = 0
# Random verification rows, by what one row costs in its Conv/ConvTranspose/Linear (Gemm/MatMul)
# layers: as many as FLOP_BUDGET floating-point operations and ELEMENT_BUDGET output elements allow,
# between MIN_ROWS and MAX_ROWS; --samples N overrides. A wrong fold shows on any input; the rows are
# for float32 error statistics. Elements count because float64 on CPU (the ground truth) costs
# ~0.05-0.2 s per million output elements whatever the FLOPs (measured 2026-12-01, torch 2.14:
# MNASNet 0.63 GFLOP and 5.5 M elements per row, 0.66 s per row in float64; ResNet-50 8.2 GFLOP,
# 11 M elements, 0.64 s). The seed models get 256 rows, ImageNet-sized nets 16.
MIN_ROWS, MAX_ROWS, FLOP_BUDGET, ELEMENT_BUDGET = 16, 256, 1.2e11, 8e7


@dataclass
class Source:
    kind: str                      # "run" | "pytorch" | "onnx" (the contract's source.kind)
    path: str                      # what it came from, as the user named it
    sha256: str                    # of the weights file (run, pytorch) or of the ONNX file (onnx)
    name: str
    input_name: str
    output_name: str | None        # the class-score output; None: not a classifier
    input_shape: list              # [None, d1, d2, ...]
    layout: str
    input_range: list[float] | None
    background: str | None
    labels: list[str] | None       # classifiers only
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
    outputs: list[dict] = field(default_factory=list)   # every output: {name, shape, dtype, path} (contract v3)

    def __post_init__(self) -> None:
        self.request.setdefault("merge", True)  # the default; --no-merge sets False (export/__main__.py)

    @property
    def scores(self) -> int | None:
        """Index of the class-score output among `outputs`, None when the model is not a classifier."""
        return next((i for i, o in enumerate(self.outputs) if o["name"] == self.output_name), None)


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


def parse_samples(text: str | None) -> int | None:
    if text is None:
        return None
    try:
        rows = int(text)
    except ValueError:
        raise BadInput(f"--samples {text!r}: want a whole number of rows, 1 to 100000") from None
    if not 1 <= rows <= 100_000:
        raise BadInput(f"--samples {rows}: want 1 to 100000 rows")
    return rows


def rows_for(cost: tuple[float, float] | None) -> int:
    """The default number of random verification rows for a model whose row costs (FLOPs, output elements)."""
    if not cost or not all(cost):
        return MAX_ROWS
    flops, elements = cost
    return int(np.clip(min(FLOP_BUDGET // flops, ELEMENT_BUDGET // elements), MIN_ROWS, MAX_ROWS))


def random_inputs(dims: list[int], input_range: list[float], rows: int) -> tuple[np.ndarray, str]:
    rng = np.random.default_rng(RANDOM_SEED)
    inputs = rng.uniform(input_range[0], input_range[1], size=(rows, *dims)).astype(np.float32)
    return inputs, f"random inputs (uniform in [{input_range[0]:g}, {input_range[1]:g}], seed {RANDOM_SEED})"


def verification_inputs(sample: str | None, dims: list, input_range: list[float], samples: int | None,
                        cost) -> tuple[np.ndarray, str]:
    """--sample's rows (the first --samples of them), else seeded random rows: --samples of them, or as
    many as the model's cost allows (`cost()`: FLOPs and output elements of one row, see rows_for)."""
    if sample is None:
        row_cost = None if samples else cost()
        rows = samples or rows_for(row_cost)
        inputs, desc = random_inputs(dims, input_range, rows)
        return inputs, desc + ("" if samples else f"; {rows} rows for a model of {_cost_text(row_cost)} per row "
                                                  f"(--samples N to change)")
    inputs = read_sample(sample, dims, input_range)
    if samples is not None and samples < len(inputs):
        return inputs[:samples], f"the first {samples} rows of --sample {sample}"
    return inputs, f"rows of --sample {sample}"


def _cost_text(cost: tuple[float, float] | None) -> str:
    return "unknown cost" if not cost else f"{cost[0] / 1e9:.3g} GFLOP, {cost[1] / 1e6:.3g} M elements out of its conv/linear layers"


def torch_cost(model: nn.Module, dims: list[int]) -> tuple[float, float] | None:
    """(FLOPs, output elements) of one row's forward pass through the model's Conv, ConvTranspose and
    Linear modules, from the shapes they see (torch's FlopCounterMode is ~50x slower on ResNet-50);
    None if the model cannot run on one row of zeros."""
    flops = elements = 0.0

    def count(module, inputs, output):
        nonlocal flops, elements
        if not isinstance(output, torch.Tensor):
            return
        elements += output.numel()
        if isinstance(module, nn.modules.conv._ConvTransposeNd):  # each input element meets out/g·k weights
            flops += 2.0 * inputs[0].numel() * module.weight[0].numel()
        else:  # each output element sums in/g·k (Conv) or in (Linear) products
            flops += 2.0 * output.numel() * module.weight[0].numel()

    hooks = [m.register_forward_hook(count) for m in model.modules()
             if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))]
    try:
        with torch.no_grad():
            model(torch.zeros(1, *dims))
    except Exception:
        return None
    finally:
        for h in hooks:
            h.remove()
    return (flops, elements) if flops else None


def _shape_text(shape) -> str:
    return "[" + ", ".join("N" if i == 0 and d is None else ("?" if d is None else str(d)) for i, d in enumerate(shape)) + "]"


# --- --run ---------------------------------------------------------------------------------------

def from_run(run_dir: str, data_dir: str) -> Source:
    from training.artifacts import load_run
    from training.data import load_split

    module, config = load_run(run_dir)
    images, targets = load_split(data_dir, "test")
    data, notes = run_data(run_dir, config, data_dir)
    return Source(notes=notes,
        kind="run", path=str(run_dir), sha256=config["weights_sha256"], name="fashion-mnist",
        input_name="image", output_name="logits", input_shape=[None, 1, 28, 28], layout="NCHW",
        input_range=[0.0, 1.0], background="dark", labels=list(config["labels"]),
        inputs=images, inputs_desc="Fashion-MNIST test images", targets=targets, module=module,
        outputs=[{"name": "logits", "shape": [None, len(config["labels"])], "dtype": "float32", "path": ""}],
        extra_metadata={"arch": config["arch"], "test_accuracy": f"{config['metrics']['test_accuracy']:.4f}",
                        "normalization": config["normalization"], "weights_sha256": config["weights_sha256"]},
        request={"kind": "run", "weights_sha256": config["weights_sha256"], "data_sha256": data})


STALE_RUN = "stale run:"  # the note that says so (an export of a stale run is stale too: export/pipeline.py)


def run_data(run_dir: str, config: dict, data_dir: str) -> tuple[dict, list[str]]:
    """The sha256 of the data files in `data_dir` (the export is verified on its test set, and is stale when
    they change), and a note when the run was trained on other data: its run is stale (training/provenance.py)."""
    from training.provenance import data_digest

    data = data_digest(data_dir)["files"]
    had = config.get("trained_on", {}).get("data", {})
    if had.get("files") == data:
        return data, []
    what = (f"on other data ({had.get('dir')})" if had else "on data it does not record (an older bnfold)")
    return data, [f"{STALE_RUN} {run_dir} was trained {what} than {data_dir}: this export is verified on the test "
                  f"images there, but the model has not learnt from its training images; to train on them: "
                  f"make pipeline DATA_DIR={data_dir} (or python -m training --data-dir {data_dir} --if-stale)"]


# --- --model -------------------------------------------------------------------------------------

def probe(run, inputs: np.ndarray, what: str) -> list[tuple[str, np.ndarray]]:
    """Run the model once on two rows. Returns its outputs as (path, array) in pytree order: the path
    says where each sits in the return value ("" for a plain tensor, "[0]", "['boxes']")."""
    batch = inputs[:2]
    try:
        out = run(batch)
    except BadInput:
        raise
    except Exception as e:
        raise BadInput(f"{what} cannot run on inputs of shape {list(batch.shape)}: {type(e).__name__}: {one_line(e)}") from None
    if isinstance(out, list) and all(isinstance(a, np.ndarray) for a in out):  # an ONNX graph's outputs
        return [(str(i), a) for i, a in enumerate(out)]
    from torch.utils._pytree import keystr, tree_flatten_with_path

    leaves = []
    for path, leaf in tree_flatten_with_path(out)[0]:
        if not isinstance(leaf, torch.Tensor):
            raise BadInput(f"{what} returns a {type(leaf).__name__} at {keystr(path) or 'the top'}; every output must be "
                           f"a tensor (tuples, lists and dicts of tensors are fine)")
        leaves.append((keystr(path), leaf.detach().numpy()))
    if not leaves:
        raise BadInput(f"{what} returns no tensor")
    return leaves


def _output_name(path: str) -> str:
    """"[1][0]" -> output_1_0, "['boxes']" -> boxes, ".pred" -> pred."""
    parts = [p for p in re.split(r"[\[\]'\".]+", path) if p]
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", "_".join(parts)) or "output"
    return f"output_{name}" if name[0].isdigit() else name


def describe_outputs(leaves: list[tuple[str, np.ndarray]], what: str, names: list[str] | None = None,
                     class_output: str | None = None) -> tuple[list[dict], str | None]:
    """The contract's `outputs` ({name, shape, dtype, path}) from the probe, and the class-score
    output's name (or None: not a classifier). Every output must be float32, batch first, finite."""
    outputs, seen = [], set()
    for i, (path, a) in enumerate(leaves):
        plain = len(leaves) == 1 and path == ""
        name = names[i] if names else ("logits" if plain and a.ndim == 2 else "output" if plain else _output_name(path))
        while name in seen:
            name += "_"
        seen.add(name)
        where = f"output {name!r}" + (f" ({path})" if path and not names else "")
        if a.dtype != np.float32:
            raise BadInput(f"{what}: {where} is {a.dtype}; the contract carries float32 outputs")
        if a.ndim < 1 or a.shape[0] != 2:
            raise BadInput(f"{what}: {where} has shape {list(a.shape)} for a batch of 2; every output must have the "
                           f"batch as its first axis")
        if not np.isfinite(a).all():
            raise BadInput(f"{what}: {where} is NaN or inf on these inputs; check the weights and --input-range")
        outputs.append({"name": name, "shape": [None, *a.shape[1:]], "dtype": "float32", "path": "" if names else path})
    listing = ", ".join(f"{o['name']} {_shape_text(o['shape'])}" for o in outputs)
    if class_output is not None:
        chosen = next((o for o in outputs if o["name"] == class_output), None)
        if chosen is None:
            raise BadInput(f"--class-output {class_output!r}: {what} has no such output (its outputs: {listing})")
        if len(chosen["shape"]) != 2:
            raise BadInput(f"--class-output {class_output!r} has shape {_shape_text(chosen['shape'])}; class scores "
                           f"are [N, K]")
        return outputs, class_output
    if len(outputs) == 1 and len(outputs[0]["shape"]) == 2:
        return outputs, outputs[0]["name"]
    return outputs, None


def classifier_labels(labels: list[str] | None, outputs: list[dict], scores: str | None, what: str) -> list[str] | None:
    """The labels of a classifier (given, or class_0 ...); None for a model that is not one."""
    if scores is None:
        if labels is not None:
            listing = ", ".join(f"{o['name']} {_shape_text(o['shape'])}" for o in outputs)
            raise BadInput(f"--labels: {what} is not a classifier (its outputs: {listing}); pass --class-output NAME "
                           f"to say which output holds the class scores")
        return None
    classes = next(o for o in outputs if o["name"] == scores)["shape"][1]
    return check_labels(labels, classes, what)


def from_pytorch(spec: str, weights: str, input_shape: str, layout: str | None, input_range: str | None,
                 labels: str | None, sample: str | None, name: str | None, background: str | None,
                 samples: str | None = None, class_output: str | None = None) -> Source:
    dims = parse_shape(input_shape)
    shape = [None, *dims]
    layout = layout or infer_layout(shape)
    check_layout(layout, shape, background)
    value_range = parse_range(input_range) or list(DEFAULT_RANGE)
    rows = parse_samples(samples)
    label_list = read_labels(labels) if labels else None
    if sample is not None:
        read_sample(sample, dims, value_range)  # a bad --sample is refused before the model is built
    model = load_factory(spec)
    state = load_weights(weights)
    load_state(model, state, weights)
    model = model.float().eval()

    def run(batch):
        with torch.no_grad():
            return model(torch.from_numpy(batch))

    what = f"the model from {spec}"
    inputs, inputs_desc = verification_inputs(sample, dims, value_range, rows, lambda: torch_cost(model, dims))
    outputs, scores = describe_outputs(probe(run, inputs, what), what, class_output=class_output)
    target = spec.rpartition(":")[0]
    code_path = Path(target) if target.endswith(".py") or "/" in target else None
    weights_sha = sha256_file(weights)
    source_extra = {"factory": spec, "factory_sha256": sha256_file(code_path) if code_path else None}
    default_name = code_path.stem if code_path else target.rpartition(".")[2]
    return Source(
        kind="pytorch", path=str(weights), sha256=weights_sha, name=model_name(name, default_name),
        input_name="input", output_name=scores, input_shape=shape, layout=layout, input_range=value_range,
        background=background, labels=classifier_labels(label_list, outputs, scores, "the model"), inputs=inputs,
        inputs_desc=inputs_desc, module=model, source_extra=source_extra, outputs=outputs,
        request={"kind": "pytorch", "weights_sha256": weights_sha, **source_extra, "shape": shape, "layout": layout,
                 "range": value_range, "labels": label_list, "sample_sha256": sha256_file(sample) if sample else None,
                 "name": name, "background": background, "samples": rows, "class_output": class_output},
        notes=[] if input_range else ["input range [0, 1] (the default; pass --input-range LO,HI to change it)"])


# --- --onnx --------------------------------------------------------------------------------------

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


def onnx_cost(model: onnx.ModelProto) -> tuple[float, float] | None:
    """(FLOPs, output elements) of one row through the graph's Conv/ConvTranspose/Gemm/MatMul nodes
    (shapes from ONNX shape inference with the batch set to 1), None when shapes are unknown."""
    try:
        one = copy.deepcopy(model)
        for d in one.graph.input[0].type.tensor_type.shape.dim[:1]:
            d.Clear()
            d.dim_value = 1
        inferred = onnx.shape_inference.infer_shapes(one)
    except Exception:
        return None
    shapes = {v.name: _dims(v) for v in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]}
    shapes.update({t.name: list(t.dims) for t in inferred.graph.initializer})
    flops = elements = 0.0
    for node in inferred.graph.node:
        if node.op_type not in ("Conv", "ConvTranspose", "Gemm", "MatMul"):
            continue
        out, w, x = shapes.get(node.output[0]), shapes.get(node.input[1]), shapes.get(node.input[0])
        if not out or not w or None in out or None in w or (node.op_type == "ConvTranspose" and (not x or None in x)):
            continue
        elements += np.prod(out)
        if node.op_type == "Conv":
            flops += 2 * np.prod(out) * np.prod(w[1:])
        elif node.op_type == "ConvTranspose":
            flops += 2 * np.prod(x) * np.prod(w[1:])
        else:
            flops += 2 * np.prod(out) * (x[-1] if x and x[-1] else w[0])
    return (float(flops), float(elements)) if flops else None


def from_onnx(path: str, labels: str | None, input_range: str | None, sample: str | None, layout: str | None,
              name: str | None, background: str | None, samples: str | None = None,
              class_output: str | None = None) -> Source:
    from export.verify import ort_session, run_ort

    model = load_onnx(path)
    value_range = parse_range(input_range) or list(DEFAULT_RANGE)
    rows = parse_samples(samples)
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
    out_names = [o.name for o in model.graph.output]
    layout_given = layout is not None
    layout = layout or infer_layout(shape)
    check_layout(layout, shape, background)
    if not layout_given:
        notes.append(f"input layout {layout}, inferred from {_shape_text(shape)} (pass --layout to override)")
    if not input_range:
        notes.append("input range [0, 1] (the default; pass --input-range LO,HI to change it)")
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
        for out in graph.graph.output:
            if (out_dims := _dims(out)) is not None and out_dims:
                _set_dims(out, [None, *out_dims[1:]])
    if sample_rows is not None:
        inputs = sample_rows[:rows] if rows else sample_rows
        inputs_desc = (f"the first {rows} rows of --sample {sample}" if rows and rows < len(sample_rows)
                       else f"rows of --sample {sample}")
    else:
        inputs, inputs_desc = verification_inputs(None, shape[1:], value_range, rows, lambda: onnx_cost(graph))
    try:
        reference = ort_session(model, optimize=False)
    except Exception as e:
        raise BadInput(f"--onnx {path}: onnxruntime cannot load it: {one_line(e)}") from None

    def run_given(batch):
        if fixed_batch != 1:
            return reference.run(out_names, {feed.name: batch})
        rows_ = [reference.run(out_names, {feed.name: batch[i:i + 1]}) for i in range(len(batch))]
        return [np.concatenate(parts) for parts in zip(*rows_)]

    what = f"--onnx {path}"
    outputs, scores = describe_outputs(probe(run_given, inputs, what), what, names=out_names, class_output=class_output)
    if fixed_batch == 1:  # make the batch dynamic only if the graph really computes the same at other sizes
        few = inputs[:8]
        try:
            dynamic = run_ort(ort_session(graph, optimize=False), few)
            same = all(a.shape == b.shape and np.allclose(a, b, atol=1e-5, rtol=1e-5)
                       for a, b in zip(dynamic, run_given(few)))
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
        input_name=feed.name, output_name=scores, input_shape=shape, layout=layout, input_range=value_range,
        background=background, labels=classifier_labels(label_list, outputs, scores, "the graph"), inputs=inputs,
        inputs_desc=inputs_desc, graph=graph, reference_graph=model, reference_batch=fixed_batch, outputs=outputs,
        source_extra={"producer": " ".join(filter(None, (model.producer_name, model.producer_version))) or None},
        request={"kind": "onnx", "sha256": file_sha, "shape": shape, "layout": layout, "range": value_range,
                 "labels": label_list, "sample_sha256": sha256_file(sample) if sample else None, "name": name,
                 "background": background, "samples": rows, "class_output": class_output},
        notes=notes)
