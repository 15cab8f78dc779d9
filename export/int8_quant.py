"""Static post-training quantization of the folded graph with onnxruntime.quantization, and what we
check and change in its result: the host's ISA and the types it needs, analytic bias correction in
the quantized graph, and the quantization's own consistency (every weight within half a step of the
float weight it stands for, every activation grid covering its calibrated range).

Types (`TYPES`; chosen by `choose_types` from /proc/cpuinfo unless --int8-types says otherwise):
  U8S8   uint8 activations (asymmetric), int8 weights (symmetric, per channel): on VNNI hosts
         (avx512_vnni / avx_vnni), whose VPDPBUSD multiplies u8·s8 natively and accumulates in int32,
         so nothing saturates. Measured here (docs/int8.md, "Measured"): about twice as fast as S8S8
         on ResNet-50, which onnxruntime's x86 kernels do not run natively.
  U8S8R  uint8 activations, int8 weights on 7 bits (reduce_range): for x86 hosts without VNNI,
         where onnxruntime's AVX2/AVX512 kernels multiply u8·s8 pairs with VPMADDUBSW, whose int16
         sums saturate on 8-bit weights (microsoft/onnxruntime#16105; two 255·127 products
         overflow 32767, two 255·63 do not).
  S8S8   int8 activations and weights: on ARM (signed dot products), and for users who ask.
  U8U8   for users who know their serving host.
QDQ format: measured against QOperator on this host (docs/int8.md, "QDQ or QOperator").
"""
import contextlib
import logging
import platform
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from export.int8_graph import Net, Stats, bias_shift, expected_input

TYPES = {  # name -> (activation type, weight type, reduce_range)
    "S8S8": ("QInt8", "QInt8", False),
    "U8S8R": ("QUInt8", "QInt8", True),
    "U8S8": ("QUInt8", "QInt8", False),
    "U8U8": ("QUInt8", "QUInt8", False),
}
QUANTIZABLE = ("Conv", "ConvTranspose", "Gemm", "MatMul")


# --- the host -----------------------------------------------------------------------------------------

def host_isa(cpuinfo: str | Path = "/proc/cpuinfo") -> dict:
    """This host as INT8 sees it: common.machine.cpu_summary() ({"model", "isa", "cores"}), whether its int8
    dot products are VNNI, and its machine type."""
    from common.machine import cpu_summary

    summary = cpu_summary(cpuinfo)
    return {**summary, "vnni": "VNNI" in summary["isa"], "machine": platform.machine().lower()}


def choose_types(isa: dict) -> tuple[str, str]:
    """(types, why) for a host: U8S8 on VNNI (nothing saturates, native), U8S8R on x86 without VNNI, S8S8 on ARM."""
    if isa["vnni"]:
        return "U8S8", (f"{isa['isa']}: u8·s8 dot products (VPDPBUSD) accumulate in int32 without saturating, and "
                        "run natively (S8S8 measured about half as fast here, docs/int8.md)")
    if isa["machine"] in ("x86_64", "amd64", "i686"):
        return "U8S8R", (f"{isa['isa']}: onnxruntime's u8·s8 kernel (VPMADDUBSW) saturates int16 pair sums on 8-bit "
                         "weights (onnxruntime#16105); 7-bit weights cannot")
    return "S8S8", f"{isa['isa']}: signed int8 kernels"


# --- quantizing -----------------------------------------------------------------------------------------

@contextlib.contextmanager
def _quiet():
    """onnxruntime.quantization logs advice through the root logger (pre-processing, ...): not ours to print."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


class _Reader:
    def __init__(self, name: str, rows: np.ndarray, batch: int = 32):
        self.batches = iter([{name: rows[i:i + batch]} for i in range(0, len(rows), batch)])

    def get_next(self):
        return next(self.batches, None)


def quantizable(model: onnx.ModelProto) -> list[str]:
    """Nodes onnxruntime can quantize that hold constant weights (what makes INT8 worth anything)."""
    inits = {t.name for t in model.graph.initializer}
    return [n.name for n in model.graph.node if n.op_type in QUANTIZABLE and len(n.input) > 1 and n.input[1] in inits]


def quantize(model: onnx.ModelProto, calibration: np.ndarray, types: str, per_channel: bool = True,
             fmt: str = "QDQ") -> tuple[onnx.ModelProto, dict[str, tuple[float, float]]]:
    """quantize_static on `model` (MinMax calibration on `calibration`). Returns the quantized model and
    each calibrated tensor's (min, max)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.calibrate import load_tensors_data

    activation, weight, reduce_range = TYPES[types]
    with tempfile.TemporaryDirectory(prefix="bnfold-int8-") as tmp, _quiet():
        src, dst, cache = Path(tmp) / "float.onnx", Path(tmp) / "int8.onnx", Path(tmp) / "ranges.json"
        onnx.save(model, src)
        quantize_static(str(src), str(dst), _Reader(model.graph.input[0].name, calibration),
                        quant_format=getattr(QuantFormat, fmt), per_channel=per_channel, reduce_range=reduce_range,
                        activation_type=getattr(QuantType, activation), weight_type=getattr(QuantType, weight),
                        calibrate_method=CalibrationMethod.MinMax, calibration_cache_path=str(cache),
                        extra_options={"WeightSymmetric": True, "ActivationSymmetric": False})
        # (MinMax calibration reduces each tensor to its min and max per batch in the augmented graph, so memory
        # stays small; its CalibMaxIntermediateOutputs would drop the batches collected before each flush: unused)
        quantized = onnx.load(dst)
        ranges = {name: (float(np.min(d.range_value[0])), float(np.max(d.range_value[1])))
                  for name, d in load_tensors_data(cache).items()}
    return quantized, ranges


# --- reading the quantized graph --------------------------------------------------------------------------

@dataclass
class QParam:
    """One DequantizeLinear of a constant: its integer values, scale, zero point (broadcast on `axis`)."""
    node: onnx.NodeProto
    q: np.ndarray
    scale: np.ndarray
    zero_point: np.ndarray
    axis: int

    def view(self, a: np.ndarray) -> np.ndarray:
        """`a` (one value per channel, or one for all) shaped to broadcast over q along `axis`."""
        if a.size == 1 or self.q.ndim == 0:
            return a.reshape(())
        shape = [1] * self.q.ndim
        shape[self.axis] = -1
        return a.reshape(shape)

    def dequantized(self) -> np.ndarray:
        return (self.q.astype(np.float64) - self.view(self.zero_point.astype(np.float64))) * \
            self.view(self.scale.astype(np.float64))


def _attr(node, name, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def qparam(qnet: Net, tensor: str) -> QParam | None:
    """The DequantizeLinear that makes `tensor` out of constants, if one does."""
    dq = qnet.producer.get(tensor)
    if dq is None or dq.op_type != "DequantizeLinear":
        return None
    arrays = [numpy_helper.to_array(qnet.inits[n]) if n in qnet.inits else None for n in dq.input]
    if arrays[0] is None or arrays[1] is None:
        return None
    zero = arrays[2] if len(arrays) > 2 and arrays[2] is not None else np.zeros_like(arrays[1], dtype=arrays[0].dtype)
    axis = _attr(dq, "axis", 1)
    return QParam(dq, arrays[0], arrays[1], zero, axis + arrays[0].ndim if axis < 0 else axis)


def quantized_layers(fnet: Net, qnet: Net) -> dict[str, tuple]:
    """Every layer of the float graph whose weights the quantized graph holds as integers (same node
    name): name -> (float node, quantized node, weight QParam, bias QParam or None)."""
    layers = {}
    for name, node in fnet.nodes.items():
        qnode = qnet.nodes.get(name)
        if node.op_type not in QUANTIZABLE or qnode is None or len(qnode.input) < 2:
            continue
        w = qparam(qnet, qnode.input[1])
        if w is not None:
            b = qparam(qnet, qnode.input[2]) if len(qnode.input) > 2 and qnode.input[2] else None
            layers[name] = (node, qnode, w, b)
    return layers


def correct_biases(float_model: onnx.ModelProto, quantized: onnx.ModelProto, stats: dict[str, Stats]) -> tuple[dict, dict]:
    """Analytic bias correction in the quantized graph: each layer's int32 bias loses ε·E[x]/scale, where ε
    is what quantizing its weights changed and E[x] its input's mean from the statistics (export/int8_graph.py).
    Edits `quantized` in place. Returns the report entry and {layer: the float bias shift applied}."""
    fnet, qnet = Net(float_model), Net(quantized)
    corrected, skipped, shifts = [], [], {}
    for name, (node, qnode, w, b) in quantized_layers(fnet, qnet).items():
        if node.op_type not in ("Conv", "Gemm"):
            skipped.append({"layer": name, "why": f"bias correction covers Conv and Gemm, not {node.op_type}"})
            continue
        e, why = expected_input(fnet, node, stats)
        if e is None:
            skipped.append({"layer": name, "why": why})
            continue
        if b is None:
            skipped.append({"layer": name, "why": "it has no bias to correct"})
            continue
        shift = -bias_shift(node, w.dequantized() - fnet.weight(node), e)
        step = b.scale.astype(np.float64) * np.ones_like(shift)
        new = np.round((fnet.bias(node) + shift) / step)  # rounded once, like the uncorrected bias
        if np.abs(new).max(initial=0) >= 2 ** 31:
            skipped.append({"layer": name, "why": "the corrected bias does not fit int32"})
            continue
        qnet.inits[b.node.input[0]].CopyFrom(numpy_helper.from_array(new.astype(b.q.dtype), b.node.input[0]))
        shifts[name] = shift
        rel = float(np.abs(shift).max() / max(np.abs(fnet.bias(node)).max(), 1e-12))
        corrected.append({"layer": name, "max_shift": float(np.abs(shift).max()), "relative_to_bias": rel})
    return {"corrected": corrected, "skipped": skipped}, shifts
