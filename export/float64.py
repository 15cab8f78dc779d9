"""An ONNX graph in float64: the ground truth the verification judges folds against (export/verify.py).

`to_float64(model)` is the same graph with every float32 tensor (initializers, constants, Casts,
declared types) made float64. float32 values are exact in float64, so the copy computes what the
graph's own weights mean, without float32 rounding in between. `run_float64(model, inputs)` runs
it. onnxruntime's CPU provider has no float64 Conv, ConvTranspose, AveragePool or
GlobalAveragePool (1.32), so this uses onnx's reference evaluator, with the ops that dominate a
CNN's time (convolutions, pooling) computed by torch in float64 when their attributes map onto
torch's directly (else onnx's own implementation runs, only slower).
"""
import numpy as np
import onnx
from onnx import numpy_helper
from onnx.reference import ReferenceEvaluator
from onnx.reference.ops import load_op

F32, F64 = onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE


class Float64Unavailable(Exception):
    """The graph cannot be evaluated in float64 (an op without a float64 implementation, ...)."""


# --- the graph ------------------------------------------------------------------------------------

def to_float64(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` in which every float32 tensor and type is float64."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    _graph_to_float64(out.graph)
    return out


def _tensor_to_float64(tensor: onnx.TensorProto) -> None:
    if tensor.data_type == F32:
        tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.float64), tensor.name))


def _graph_to_float64(graph: onnx.GraphProto) -> None:
    for tensor in graph.initializer:
        _tensor_to_float64(tensor)
    for value in [*graph.input, *graph.output, *graph.value_info]:
        if value.type.tensor_type.elem_type == F32:
            value.type.tensor_type.elem_type = F64
    for node in graph.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.TENSOR:
                _tensor_to_float64(a.t)
            elif a.type == onnx.AttributeProto.GRAPH:
                _graph_to_float64(a.g)
            elif a.type == onnx.AttributeProto.GRAPHS:
                for g in a.graphs:
                    _graph_to_float64(g)
            elif a.name in ("to", "dtype") and a.type == onnx.AttributeProto.INT and a.i == F32:
                a.i = F64  # Cast(to=float), EyeLike/RandomNormal(dtype=float), ...


# --- running it -----------------------------------------------------------------------------------

def _torch_pads(pads, rank: int):
    """ONNX pads [b1, b2, ..., e1, e2, ...] -> (symmetric per-axis padding, or None)."""
    pads = list(pads or [0] * (2 * rank))
    begin, end = pads[:rank], pads[rank:]
    return tuple(begin) if begin == end else None


def _torch_op(name: str, run):
    """A reference-evaluator op named `name` that tries `run` (torch, float64) first and falls back to
    onnx's implementation when `run` returns None (attributes torch does not take as they are)."""
    base = load_op("", name)

    def _run(self, *args, **kwargs):
        if all(a is None or a.dtype == np.float64 for a in args if isinstance(a, np.ndarray)):
            import torch

            with torch.no_grad():
                result = run(torch, *args, **kwargs)
            if result is not None:
                return (result.numpy(),)
        return base._run(self, *args, **kwargs)

    return type(name, (base,), {"_run": _run, "op_domain": ""})


def _tensor(torch, a: np.ndarray):
    return torch.from_numpy(np.require(a, requirements=("C", "W")))  # the evaluator may hand over read-only or strided arrays


def _conv(torch, x, w, b=None, auto_pad=None, dilations=None, group=None, kernel_shape=None, pads=None,
          strides=None):
    rank = x.ndim - 2
    padding = _torch_pads(pads, rank)
    if (auto_pad not in (None, "NOTSET", b"NOTSET") and any(pads or ())) or padding is None or rank not in (1, 2, 3):
        return None
    if auto_pad not in (None, "NOTSET", b"NOTSET", "VALID", b"VALID"):
        return None
    conv = (torch.nn.functional.conv1d, torch.nn.functional.conv2d, torch.nn.functional.conv3d)[rank - 1]
    return conv(_tensor(torch, x), _tensor(torch, w), None if b is None else _tensor(torch, b),
                stride=tuple(strides or [1] * rank), padding=padding, dilation=tuple(dilations or [1] * rank),
                groups=group or 1)


def _conv_transpose(torch, x, w, b=None, auto_pad=None, dilations=None, group=None, kernel_shape=None,
                    output_padding=None, output_shape=None, pads=None, strides=None):
    rank = x.ndim - 2
    padding = _torch_pads(pads, rank)
    if output_shape or auto_pad not in (None, "NOTSET", b"NOTSET") or padding is None or rank not in (1, 2, 3):
        if (group or 1) > 1:  # onnx 1.23's own ConvTranspose adds the first bias to every channel, or raises
            raise Float64Unavailable("onnx.reference's ConvTranspose is wrong for group > 1, and torch does not "
                                     "take these attributes as they are")
        return None
    conv = (torch.nn.functional.conv_transpose1d, torch.nn.functional.conv_transpose2d,
            torch.nn.functional.conv_transpose3d)[rank - 1]
    return conv(_tensor(torch, x), _tensor(torch, w), None if b is None else _tensor(torch, b),
                stride=tuple(strides or [1] * rank), padding=padding,
                output_padding=tuple(output_padding or [0] * rank), groups=group or 1,
                dilation=tuple(dilations or [1] * rank))


def _pool(kind: str):
    def run(torch, x, auto_pad=None, ceil_mode=0, dilations=None, kernel_shape=None, pads=None, storage_order=0,
            strides=None, count_include_pad=0):
        rank = x.ndim - 2
        padding = _torch_pads(pads, rank)
        if auto_pad not in (None, "NOTSET", b"NOTSET") or padding is None or rank not in (1, 2, 3):
            return None
        if any(p * 2 > k for p, k in zip(padding, kernel_shape)):
            return None  # torch takes at most half the kernel as padding
        functional = torch.nn.functional
        t, stride = _tensor(torch, x), tuple(strides or [1] * rank)
        if kind == "max":
            pool = (functional.max_pool1d, functional.max_pool2d, functional.max_pool3d)[rank - 1]
            return pool(t, tuple(kernel_shape), stride, padding, tuple(dilations or [1] * rank), bool(ceil_mode))
        if dilations and any(d != 1 for d in dilations):
            return None
        pool = (functional.avg_pool1d, functional.avg_pool2d, functional.avg_pool3d)[rank - 1]
        return pool(t, tuple(kernel_shape), stride, padding, bool(ceil_mode), bool(count_include_pad))
    return run


def _global_average_pool(torch, x):
    return _tensor(torch, x).mean(dim=tuple(range(2, x.ndim)), keepdim=True)


def _erf(torch, x):
    return torch.erf(_tensor(torch, x))


FAST_OPS = [_torch_op("Conv", _conv), _torch_op("ConvTranspose", _conv_transpose),
            _torch_op("MaxPool", _pool("max")), _torch_op("AveragePool", _pool("avg")),
            _torch_op("GlobalAveragePool", _global_average_pool), _torch_op("Erf", _erf)]


class Float64Graph:
    """A float64 copy of `model`, ready to run: `graph(inputs)` -> [outputs] (float64 arrays)."""

    def __init__(self, model: onnx.ModelProto):
        self.model = to_float64(model)
        try:
            self.evaluator = ReferenceEvaluator(self.model, new_ops=FAST_OPS)
        except Exception as e:
            raise Float64Unavailable(f"onnx's reference evaluator cannot load the float64 graph: {type(e).__name__}: "
                                     f"{str(e).splitlines()[0][:200] if str(e) else ''}") from None
        self.input_name = self.evaluator.input_names[0]

    def __call__(self, inputs: np.ndarray, batch: int = 64) -> list[np.ndarray]:
        outputs = []
        for start in range(0, len(inputs), batch):
            try:
                rows = self.evaluator.run(None, {self.input_name: inputs[start:start + batch].astype(np.float64)})
            except Exception as e:
                raise Float64Unavailable(f"the float64 graph does not run: {type(e).__name__}: "
                                         f"{str(e).splitlines()[0][:200] if str(e) else ''}") from None
            outputs.append(rows)
        return [np.concatenate(parts) for parts in zip(*outputs)]
