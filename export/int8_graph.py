"""What folding makes possible before INT8, on the folded ONNX graph (Nagel et al. 2019, "Data-Free
Quantization Through Weight Equalization and Bias Correction"). numpy and onnx only; each step
switchable (`python -m export --int8 --no-equalize / --no-absorb / --no-bias-correction`).

A *pair* is layer A → [activation] → [pooling] → layer B, where A is a Conv or Gemm with constant
weights, B a Conv or Gemm reading A's channels, and every tensor in between is read by the next
node alone (and is no graph output). The activation is ReLU, LeakyReLU or none: positively
homogeneous, act(x·s) = act(x)·s for s > 0; MaxPool and GlobalAveragePool (then a Flatten into a
Gemm: one position per channel) commute with a positive per-channel scale and with a per-channel
shift. (ReLU6 = Clip(0, 6) is not homogeneous: pairs through it are left
alone; the paper trains with ReLU in its place.) A depthwise conv between two pointwise ones makes
two pairs that share it (the paper's triplet).

1. Cross-layer equalization (CLE). Output channel i of A scaled by 1/sᵢ (its weights and bias),
   input channel i of B by sᵢ, with sᵢ = √(r¹ᵢ / r²ᵢ), r¹ᵢ = max |A's weights of output i|,
   r²ᵢ = max |B's weights of input i|: afterwards both are √(r¹ᵢ r²ᵢ), so one per-tensor scale
   fits every channel of both. The function is unchanged in exact arithmetic; the pipeline proves it
   in float64 like a fold (export/int8.py). Pairs are equalized in turn until the scales settle
   (triplets need a few rounds).
2. High-bias absorption. After A, channel i is ~N(βᵢ, γᵢ²) (the BN folded into A made it so:
   `Stats`); with a ReLU, cᵢ = max(0, βᵢ − 3|γᵢ|) is below the activation for all but ~0.1% of
   inputs, so ReLU(y − c) = ReLU(y) − c there: A's bias loses c, B's gains W_B·c. Only into a B
   without zero padding (padded zeros would stay zeros, not −c: the same reason a BN never folds
   forward into a padded conv) and only through ReLU/MaxPool. Not exact: the INT8 verification
   judges the end result against the unaltered model.
3. Analytic bias correction (after quantization, `bias_corrections`). A quantized weight W + ε
   shifts B's output by ε·E[x]; E[x] for x = act(y), y ~ N(β, γ²) from A's folded BN (in closed
   form for ReLU, Clip and no activation), so B's bias gets −ε·E[x] (through a Flatten, each
   channel's E repeats per position). Layers whose input has no such statistics (the first layer,
   a layer after MaxPool or an Add) are left alone, and the report says why.
"""
from dataclasses import dataclass, field
from math import erf, sqrt

import numpy as np
import onnx
from onnx import numpy_helper

LAYERS = ("Conv", "Gemm")
HOMOGENEOUS = ("Relu", "LeakyRelu")  # act(x·s) = act(x)·s for s > 0
COMMUTES = ("MaxPool", "GlobalAveragePool")  # pool(x·s + c) = pool(x)·s + c for s > 0
FLATTEN = ("Flatten", "Reshape")     # after a GlobalAveragePool: [N, C, 1, 1] -> [N, C], channels stay channels
ABSORB_SIGMAS = 3.0
CLE_ROUNDS, CLE_SETTLED = 50, 1e-3  # rounds until no scale moves by more than 0.1% (an 8-bit step is 0.4%)


@dataclass
class Stats:
    """A layer's output channels before their activation, as its folded BatchNorm made them: N(mean, std²)."""
    mean: np.ndarray
    std: np.ndarray

    def scaled(self, s: np.ndarray) -> "Stats":
        return Stats(self.mean / s, self.std / s)


@dataclass
class Pair:
    first: onnx.NodeProto
    act: onnx.NodeProto | None
    between: list = field(default_factory=list)   # MaxPool nodes
    second: onnx.NodeProto | None = None

    @property
    def names(self) -> str:
        return f"{self.first.name} -> {self.second.name}"


class Net:
    """Read/write access to a ModelProto's nodes and constant tensors. Floating constants are read as
    float64 and edited in memory; `flush()` writes the edited ones back, each rounded once to its dtype."""

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self.inits = {t.name: t for t in model.graph.initializer}
        self.nodes = {n.name: n for n in model.graph.node}
        self.producer = {o: n for n in model.graph.node for o in n.output}
        self.readers: dict[str, list] = {}
        for n in model.graph.node:
            for name in set(n.input):
                self.readers.setdefault(name, []).append(n)
        self.graph_outputs = {o.name for o in model.graph.output}
        self.cache: dict[str, np.ndarray] = {}
        self.dtypes: dict[str, np.dtype] = {}
        self.dirty: set[str] = set()

    def array(self, name: str) -> np.ndarray | None:
        if name in self.cache:
            return self.cache[name]
        t = self.inits.get(name)
        if t is None:
            return None
        a = numpy_helper.to_array(t)
        self.dtypes[name] = a.dtype
        if a.dtype.kind == "f":
            a = self.cache[name] = a.astype(np.float64)
        return a

    def set_array(self, name: str, value: np.ndarray, like: str | None = None) -> None:
        if like is not None:
            self.array(like)
            self.dtypes[name] = self.dtypes[like]
        self.cache[name] = np.asarray(value, dtype=np.float64)
        self.dirty.add(name)

    def flush(self) -> onnx.ModelProto:
        for name in sorted(self.dirty):
            tensor = numpy_helper.from_array(self.cache[name].astype(self.dtypes[name]), name)
            if name in self.inits:
                self.inits[name].CopyFrom(tensor)
            else:
                self.model.graph.initializer.append(tensor)
                self.inits[name] = self.model.graph.initializer[-1]
        self.dirty.clear()
        return self.model

    def only_reader(self, tensor: str):
        readers = self.readers.get(tensor, [])
        return readers[0] if len(readers) == 1 and tensor not in self.graph_outputs else None

    def weight(self, node) -> np.ndarray | None:
        return self.array(node.input[1]) if len(node.input) > 1 else None

    def bias(self, node) -> np.ndarray:
        """The layer's bias (zeros when it has none; `ensure_bias` adds one)."""
        if len(node.input) > 2 and node.input[2]:
            return self.array(node.input[2])
        return np.zeros(out_channels(node, self.weight(node)))

    def ensure_bias(self, node) -> str:
        if len(node.input) > 2 and node.input[2]:
            return node.input[2]
        name = f"{node.name}.int8_bias"
        self.set_array(name, self.bias(node), like=node.input[1])
        while len(node.input) < 3:
            node.input.append("")
        node.input[2] = name
        return name


def attr(node, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def out_channels(node, weight: np.ndarray) -> int:
    if node.op_type == "Gemm":
        return weight.shape[0] if attr(node, "transB", 0) else weight.shape[1]
    return weight.shape[0]


def in_matrix(node, weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A layer's weights as [out, inputs per group, rest...] and each entry's input channel, [out, inputs per
    group] (a grouped conv's output o reads inputs g·k … g·k+k−1 of its group g)."""
    if node.op_type == "Gemm":
        w = weight if attr(node, "transB", 0) else weight.T
        return w, np.broadcast_to(np.arange(w.shape[1]), w.shape)
    groups = attr(node, "group", 1)
    out, per = weight.shape[:2]
    group = np.arange(out) // (out // groups)
    return weight, group[:, None] * per + np.arange(per)[None, :]


def unpadded(node) -> bool:
    return node.op_type == "Gemm" or (not any(attr(node, "pads", []) or [])
                                      and attr(node, "auto_pad", b"NOTSET") in (b"NOTSET", b"VALID", "NOTSET", "VALID"))


def _is_layer(net: Net, node) -> bool:
    if node is None or node.op_type not in LAYERS or net.weight(node) is None:
        return False
    if node.op_type == "Gemm":
        return attr(node, "transA", 0) == 0 and net.weight(node).ndim == 2 and (len(node.input) < 3 or not node.input[2]
                                                                                or net.array(node.input[2]) is not None)
    return len(node.input) < 3 or not node.input[2] or net.array(node.input[2]) is not None


def find_pairs(net: Net) -> tuple[list[Pair], list[dict]]:
    """Every layer → [ReLU/LeakyReLU] → [pooling] → layer pair, and why the other layer outputs are not one."""
    pairs, refused = [], []
    for first in net.model.graph.node:
        if not _is_layer(net, first):
            continue
        pair, tensor, node = Pair(first, None), first.output[0], net.only_reader(first.output[0])
        while node is not None and node.input[0] == tensor and (
                (node.op_type in HOMOGENEOUS and pair.act is None and not pair.between) or node.op_type in COMMUTES
                or (node.op_type in FLATTEN and pair.between and pair.between[-1].op_type == "GlobalAveragePool")):
            if node.op_type in COMMUTES or node.op_type in FLATTEN:
                pair.between.append(node)
            else:
                pair.act = node
            tensor, node = node.output[0], net.only_reader(node.output[0])
        why = None
        if node is None:
            why = "its output is read by more than one node (or is a graph output)"
        elif node.op_type in ("Clip",):
            why = "a Clip (ReLU6) follows: not positively homogeneous"
        elif not _is_layer(net, node) or node.input[0] != tensor:
            why = f"{node.op_type} {node.name} follows, not a Conv/Gemm with constant weights"
        elif node.op_type == "Gemm" and first.op_type != "Gemm" and not (
                pair.between and pair.between[-1].op_type in FLATTEN):
            why = "a Gemm after a Conv reads channels flattened with positions"
        else:
            w1, w2 = net.weight(first), net.weight(node)
            channels = in_matrix(node, w2)[1].max() + 1
            if out_channels(first, w1) != channels:
                why = f"{out_channels(first, w1)} output channels feed {channels} input channels"
        if why:
            refused.append({"layer": first.name, "why": why})
        else:
            pair.second = node
            pairs.append(pair)
    return pairs, refused


def _ranges(net: Net, pair: Pair) -> tuple[np.ndarray, np.ndarray]:
    w1 = np.abs(net.weight(pair.first))
    w1 = w1.reshape(w1.shape[0], -1) if pair.first.op_type == "Conv" or attr(pair.first, "transB", 0) else w1.T
    r1 = w1.max(axis=1)
    w2, channels = in_matrix(pair.second, np.abs(net.weight(pair.second)))
    w2 = w2.reshape(*channels.shape, -1).max(axis=2)
    r2 = np.zeros(r1.size)
    np.maximum.at(r2, channels.ravel(), w2.ravel())
    return r1, r2


def _scale_pair(net: Net, pair: Pair, s: np.ndarray) -> None:
    """A's output channel i ÷ sᵢ (weights and bias), B's input channel i × sᵢ; float64, cast back once."""
    first, second = pair.first, pair.second
    w1 = net.weight(first)
    if first.op_type == "Conv" or attr(first, "transB", 0):
        w1 = w1 / s.reshape(-1, *([1] * (w1.ndim - 1)))
    else:
        w1 = w1 / s[None, :]
    net.set_array(first.input[1], w1)
    bias = net.ensure_bias(first)
    net.set_array(bias, net.array(bias) / s)
    w2 = net.weight(second)
    matrix, channels = in_matrix(second, w2)
    factor = s[channels].reshape(*channels.shape, *([1] * (matrix.ndim - 2)))
    scaled = matrix * factor
    net.set_array(second.input[1], scaled if second.op_type == "Conv" or attr(second, "transB", 0) else scaled.T)


def equalize(net: Net, stats: dict[str, Stats]) -> dict:
    """Cross-layer equalization of every pair, in rounds until no scale moves by more than CLE_SETTLED.
    Updates `stats` (a scaled channel's mean and std scale with it). Returns the report entry."""
    pairs, refused = find_pairs(net)
    total = {p.first.name: np.ones(out_channels(p.first, net.weight(p.first))) for p in pairs}
    rounds = 0
    for rounds in range(1, CLE_ROUNDS + 1):
        moved = 0.0
        for pair in pairs:
            r1, r2 = _ranges(net, pair)
            s = np.where((r1 > 0) & (r2 > 0), np.sqrt(r1 / np.where(r2 > 0, r2, 1)), 1.0)
            moved = max(moved, float(np.abs(np.log(s)).max(initial=0.0)))
            _scale_pair(net, pair, s)
            total[pair.first.name] *= s
        if moved < CLE_SETTLED:
            break
    for name, s in total.items():
        if name in stats:
            stats[name] = stats[name].scaled(s)
    return {"pairs": [{"first": p.first.name, "second": p.second.name,
                       "through": [n.op_type for n in ([p.act] if p.act else []) + p.between],
                       "scale_min": float(total[p.first.name].min()), "scale_max": float(total[p.first.name].max())}
                      for p in pairs],
            "rounds": rounds, "not_pairs": refused}


def absorb_high_bias(net: Net, stats: dict[str, Stats]) -> dict:
    """High-bias absorption for every pair through a ReLU into an unpadded layer whose first layer has
    BN statistics. Updates `stats` (the means lose what was absorbed)."""
    pairs, _ = find_pairs(net)
    done, skipped = [], []
    for pair in pairs:
        name = pair.first.name
        why = ("no BatchNorm statistics for its output" if name not in stats else
               "no ReLU between the layers" if pair.act is None or pair.act.op_type != "Relu" else
               f"{pair.second.name} is zero-padded (the padding would not carry the shift)" if not unpadded(pair.second)
               else None)
        if why:
            skipped.append({"first": name, "second": pair.second.name, "why": why})
            continue
        st = stats[name]
        c = np.maximum(0.0, st.mean - ABSORB_SIGMAS * np.abs(st.std))
        if not np.any(c > 0):
            skipped.append({"first": name, "second": pair.second.name, "why": "no channel's bias is high (beta < 3|gamma|)"})
            continue
        bias1 = net.ensure_bias(pair.first)
        net.set_array(bias1, net.array(bias1) - c)
        matrix, channels = in_matrix(pair.second, net.weight(pair.second))
        shift = (matrix.reshape(*channels.shape, -1).sum(axis=2) * c[channels]).sum(axis=1)
        bias2 = net.ensure_bias(pair.second)
        net.set_array(bias2, net.array(bias2) + shift)
        stats[name] = Stats(st.mean - c, st.std)
        done.append({"first": name, "second": pair.second.name, "channels": int((c > 0).sum()),
                     "absorbed_max": float(c.max())})
    return {"absorbed": done, "skipped": skipped}


# --- bias correction: E[x] of a layer's input from the statistics of the layer before it -------------

_SQRT2 = sqrt(2.0)
_phi = np.vectorize(lambda z: np.exp(-0.5 * z * z) / sqrt(2 * np.pi))
_Phi = np.vectorize(lambda z: 0.5 * (1.0 + erf(z / _SQRT2)))


def relu_mean(mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """E[max(y, 0)] for y ~ N(mean, std²): std·φ(mean/std) + mean·Φ(mean/std) (mean·[mean > 0] when std = 0)."""
    std = np.abs(std)
    z = np.divide(mean, std, out=np.zeros_like(mean), where=std > 0)
    return np.where(std > 0, std * _phi(z) + mean * _Phi(z), np.maximum(mean, 0.0))


def expected_input(net: Net, layer, stats: dict[str, Stats]) -> tuple[np.ndarray | None, str]:
    """E[x] per input feature of `layer` from the statistics of the layer that produces x, through
    ReLU / Clip / nothing, then (Gemm) an optional GlobalAveragePool (which keeps each channel's mean)
    and Flatten (which repeats it per position); (None, why not) when there are none."""
    tensor = layer.input[0]
    node = net.producer.get(tensor)
    flatten = None
    if node is not None and node.op_type in FLATTEN and layer.op_type == "Gemm":
        flatten, tensor = node, node.input[0]
        node = net.producer.get(tensor)
    if node is not None and node.op_type == "GlobalAveragePool":
        node = net.producer.get(node.input[0])
    act = None
    if node is not None and node.op_type in ("Relu", "Clip"):
        act, node = node, net.producer.get(node.input[0])
    if node is None or node.op_type not in LAYERS or node.name not in stats:
        what = "the graph input" if node is None else f"{node.op_type} {node.name}"
        return None, f"its input comes from {what}, which has no BatchNorm statistics"
    st = stats[node.name]
    mean, std = st.mean.astype(np.float64), np.abs(st.std.astype(np.float64))
    if act is None:
        e = mean
    elif act.op_type == "Relu":
        e = relu_mean(mean, std)
    else:
        lo, hi = _clip_bounds(net, act)
        e = lo + relu_mean(mean - lo, std) - (relu_mean(mean - hi, std) if np.isfinite(hi) else 0.0)
    inputs = in_matrix(layer, net.weight(layer))[1].max() + 1
    if flatten is not None:
        if inputs % e.size:
            return None, f"{inputs} inputs are not a whole number of positions of {e.size} channels"
        e = np.repeat(e, inputs // e.size)
    if e.size != inputs:
        return None, f"{e.size} channels of statistics for {inputs} inputs"
    return e, ""


def _clip_bounds(net: Net, clip) -> tuple[float, float]:
    lo, hi = attr(clip, "min", -np.inf), attr(clip, "max", np.inf)
    if len(clip.input) > 1 and clip.input[1]:
        lo = float(net.array(clip.input[1]))
    if len(clip.input) > 2 and clip.input[2]:
        hi = float(net.array(clip.input[2]))
    return float(lo), float(hi)


def bias_shift(layer, weight_error: np.ndarray, e: np.ndarray) -> np.ndarray:
    """What a weight error ε adds to each output on average: Σ ε·E[x] over the output's inputs (and kernel)."""
    matrix, channels = in_matrix(layer, weight_error.astype(np.float64))
    return (matrix.reshape(*channels.shape, -1).sum(axis=2) * e[channels]).sum(axis=1)
