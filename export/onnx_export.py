"""Eval-mode ONNX export with a dynamic batch axis, the metadata the service reads
(docs/onnx-contract.md), and the small graph edits every source needs. Everything is built in
memory; files are written atomically (common.files)."""
import contextlib
import io
import json
import logging
import os
import re
import sys
import tempfile
import warnings
from collections import Counter
from pathlib import Path

import onnx
import torch

from common.files import write_with_checksum
from export.contract import CONTRACT_VERSION
from export.errors import BadInput, one_line

OPSET = 18
MAX_BATCH = 1 << 16
BN_OPS = ("BatchNormalization",)


def export_to_proto(module: torch.nn.Module, example_shape=(2, 1, 28, 28), input_name: str = "image",
                    output_names: list[str] = ("logits",)) -> onnx.ModelProto:
    """torch.onnx (dynamo) with optimize=False: our fold pass, not the exporter's optimizer, removes
    BatchNormalization (with optimize=True it folds BN on its own and the unfolded reference would
    not be one). external_data=False keeps the weights inside the one file. Axis 0 is dynamic.
    `output_names`: one per tensor the module returns, in pytree order (tuples, lists, dicts)."""
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # "torchvision is not installed" noise
    module = module.eval()
    example = torch.rand(*example_shape)
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings(), quiet_stderr():
        warnings.simplefilter("ignore")
        path = Path(tmp) / "model.onnx"
        try:
            torch.onnx.export(module, (example,), path, input_names=[input_name], output_names=list(output_names),
                              dynamic_shapes=({0: batch},), opset_version=OPSET, dynamo=True,
                              external_data=False, optimize=False, verbose=False)
        except Exception as e:  # torch.export could not capture the model: say why, in one line
            raise BadInput(f"torch.onnx.export cannot export {type(module).__name__}: {export_error(e)}") from None
        return onnx.load(path)


@contextlib.contextmanager
def quiet_stderr():
    """Swallow what torch.export writes to stderr (pages of graph dumps and logging when it fails)
    at the file-descriptor level: its log handlers hold their own stream objects. Our caller
    turns the exception into one line."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink, contextlib.redirect_stderr(io.StringIO()):
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


def export_error(error: Exception) -> str:
    """torch.onnx's multi-page error as one line: the exception summary and the user code it names."""
    text = str(error)
    summary = re.search(r"## Exception summary\s+(.+)", text)
    cause = summary.group(1) if summary else one_line(text)
    cause = re.sub(r"^<class '[\w.]*?(\w+)'>: ", r"\1: ", cause)
    where = re.search(r'The following call raised this error:\s+File "([^"]+)", line (\d+), in \w+\s+(.+)', text)
    if where:
        cause += f" (at {Path(where.group(1)).name}:{where.group(2)}: {where.group(3).strip()})"
    return one_line(cause, limit=400)


def simplify(model: onnx.ModelProto) -> onnx.ModelProto:
    """Graph clean-up for the already-folded model: onnxscript's constant folding and rewrite rules
    turn the exporter's Shape -> Squeeze -> Concat -> Reshape chain for the dynamic batch into one
    Reshape (measured +10-20% images/s at batch 64 on one thread, make bench-model). Its
    FuseBatchNorm* rules are left out: a BatchNorm our passes kept stays, as the report says."""
    import onnxscript.ir.passes.common as passes
    from onnxscript import ir, optimizer, rewriter

    rules = [r for r in getattr(rewriter, "_DEFAULT_REWRITE_RULES", ())
             if not (r.name or "").startswith("FuseBatchNorm")]
    graph = ir.serde.deserialize_model(model)
    for _ in range(2):
        optimizer.fold_constants(graph)
        if rules:
            graph = rewriter.rewrite(graph, pattern_rewrite_rules=rules)
    passes.RemoveUnusedNodesPass()(graph)
    passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(graph)
    simplified = ir.serde.serialize_model(graph)
    if [d.dim_param for d in simplified.graph.input[0].type.tensor_type.shape.dim][:1] != ["batch"]:
        raise ValueError("graph clean-up lost the dynamic batch axis")
    if norms_of_activations(simplified) != norms_of_activations(model):
        raise ValueError("graph clean-up changed the BatchNormalization nodes")
    return simplified


def norms_of_activations(model: onnx.ModelProto) -> int:
    """BatchNormalization nodes whose input depends on the graph's inputs. One of constants alone (the
    weight standardization of timm's StdConv2d, exported as a batch-statistics BatchNormalization of
    the weight) is a constant, and constant folding rightly removes it."""
    live = {i.name for i in feeds(model)}
    count = 0
    for node in model.graph.node:  # ONNX nodes are topologically sorted
        if any(name in live for name in node.input):
            live.update(node.output)
            count += node.op_type == "BatchNormalization"
    return count


def node_counts(model: onnx.ModelProto) -> dict[str, int]:
    return dict(sorted(Counter(node.op_type for node in model.graph.node).items()))


def feeds(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """The graph inputs a caller feeds (old exporters also list every initializer as an input)."""
    initializers = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in initializers]


def output_kind(model: onnx.ModelProto, output_name: str) -> str:
    """`probabilities` when the output comes from a Softmax (through Identity/Cast/Reshape/Flatten),
    else `logits`."""
    producers = {out: node for node in model.graph.node for out in node.output}
    node = producers.get(output_name)
    while node is not None and node.op_type in ("Identity", "Cast", "Reshape", "Flatten", "Squeeze"):
        node = producers.get(node.input[0])
    return "probabilities" if node is not None and node.op_type == "Softmax" else "logits"


def rename_value(model: onnx.ModelProto, old: str, new: str) -> None:
    """Rename a value (a graph output, say) everywhere it is produced or used."""
    for node in model.graph.node:
        node.input[:] = [new if name == old else name for name in node.input]
        node.output[:] = [new if name == old else name for name in node.output]
    for value in [*model.graph.output, *model.graph.input, *model.graph.value_info]:
        if value.name == old:
            value.name = new


def contract_metadata(fields: dict) -> dict[str, str]:
    """The metadata_props of docs/onnx-contract.md from plain values: strings stay strings,
    everything else is JSON; None means "not set" and is left out."""
    base = {"contract_version": CONTRACT_VERSION, "onnx_version": onnx.__version__}
    return {key: value if isinstance(value, str) else json.dumps(value)
            for key, value in {**base, **fields}.items() if value is not None}


def with_metadata(model: onnx.ModelProto, metadata: dict[str, str]) -> onnx.ModelProto:
    """A copy of `model` carrying `metadata` (contract keys replace any the model had; other
    keys it had are kept), checked with the full ONNX checker."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    kept = [(p.key, p.value) for p in model.metadata_props if p.key not in metadata]
    del out.metadata_props[:]
    for key, value in [*kept, *metadata.items()]:
        entry = out.metadata_props.add()
        entry.key, entry.value = key, value
    out.producer_name, out.producer_version = "bnfold", ""
    onnx.checker.check_model(out, full_check=True)
    return out


def read_metadata(path_or_model) -> dict[str, str]:
    model = path_or_model if isinstance(path_or_model, onnx.ModelProto) else onnx.load(path_or_model)
    return {p.key: p.value for p in model.metadata_props}


def save_model(model: onnx.ModelProto, path: str | Path) -> str:
    """Write the model and its `sha256sum`-format checksum, each atomically. Returns the sha256."""
    return write_with_checksum(path, model.SerializeToString())
