"""Fold eval-mode BatchNorm into the neighbouring Conv/Linear, and strip Dropout.

In eval mode a BatchNorm is a per-channel affine map  y = x·s + t  with

    s = γ / √(σ² + ε),   t = β − μ·s         (γ = 1, β = 0 when affine=False)

Backward fold, BN right after a Conv/Linear (y = BN(W·x + b)):

    W' = W·γ/√(σ²+ε)                 (scale each output channel / row)
    b' = (b − μ)·γ/√(σ²+ε) + β       (b = 0 when the layer has no bias)

Forward fold, BN before the next Conv/Linear (z = W·BN(x) + b), as in Keras' Dense/Conv2D examples
where BN sits after the activation:

    W' = W·s   (scale each input channel / column),   b' = b + W·t

It is exact through MaxPool only when every s > 0 (max commutes with a positive affine map; a
negative scale swaps max for min), through Flatten by repeating s and t per spatial position, and
never into a padded Conv (the padded zeros would become t after folding). Where no exact fold
exists the BN stays and the report says why. A BN with track_running_stats=False normalizes with
batch statistics even in eval mode: it is not an affine map and cannot be folded.

The math (affine_of_bn, affine_of_elementwise, compose_affine, fold_backward_arrays,
fold_forward_arrays) runs in float64 on plain arrays, then casts back; the ONNX graph pass
(export/onnx_fold.py) uses the same functions. The PyTorch pass is a short
pattern match over an fx graph, in the manner of torch.fx.experimental.optimization.fuse.
"""
import copy
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import fx, nn
from torch.nn import functional as F

from export.errors import one_line

_BN = (nn.BatchNorm1d, nn.BatchNorm2d)
_CONV_LINEAR = (nn.Conv2d, nn.Conv1d, nn.Linear)


class FoldError(ValueError):
    """A model we refuse to fold; the message names the layer."""


@dataclass
class FoldReport:
    folded: list[dict] = field(default_factory=list)     # {"bn", "into", "direction"}
    kept: list[dict] = field(default_factory=list)       # {"bn", "reason"}
    removed_dropout: list[str] = field(default_factory=list)
    untraceable: list[dict] = field(default_factory=list)  # {"module", "reason"}: called whole, not traced

    def as_dict(self) -> dict:
        return {"folded": self.folded, "kept": self.kept, "removed_dropout": self.removed_dropout,
                "untraceable": self.untraceable}


# --- the fold math: one formula, one place; the fx pass below and the ONNX graph pass use it ---

def affine_of_bn(gamma, beta, mean, var, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """A BatchNorm in eval mode as y = x·s + t per channel: s = γ/√(σ²+ε), t = β − μ·s (float64)."""
    gamma, beta, mean, var = (np.asarray(a, dtype=np.float64) for a in (gamma, beta, mean, var))
    scale = gamma / np.sqrt(var + eps)
    return scale, beta - mean * scale


def fold_backward_arrays(weight, bias, scale, shift, out_axis: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """BN after the layer, y = (W·x + b)·s + t:  W' = W·s along the output axis, b' = b·s + t.
    `bias` None means no bias. Returns float64 arrays."""
    weight = np.asarray(weight, dtype=np.float64)
    scale, shift = np.asarray(scale, dtype=np.float64), np.asarray(shift, dtype=np.float64)
    bias = np.zeros(weight.shape[out_axis]) if bias is None else np.asarray(bias, dtype=np.float64)
    view = [1] * weight.ndim
    view[out_axis] = -1
    return weight * scale.reshape(view), bias * scale + shift


def fold_forward_arrays(weight, bias, scale, shift, out_axis: int = 0, in_axis: int = 1,
                        groups: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """BN before the layer, z = W·(x·s + t) + b:  W' = W·s along the input axis, b' = b + Σ W·t
    (summed over every axis but the output one). `scale`/`shift` hold one value per input of the
    whole layer (all groups); a grouped conv's output channel o reads inputs g·k … g·k+k−1 of
    group g = o // (out/groups), with k = in/groups. Returns float64 arrays."""
    weight = np.moveaxis(np.asarray(weight, dtype=np.float64), (out_axis, in_axis), (0, 1))  # [out, in/g, ...]
    scale, shift = np.asarray(scale, dtype=np.float64), np.asarray(shift, dtype=np.float64)
    out_channels, in_per_group = weight.shape[:2]
    group = np.arange(out_channels) // (out_channels // groups)
    channel = group[:, None] * in_per_group + np.arange(in_per_group)[None, :]  # [out, in/g]
    spatial = (1,) * (weight.ndim - 2)
    s, t = scale[channel].reshape(*channel.shape, *spatial), shift[channel].reshape(*channel.shape, *spatial)
    bias = np.zeros(out_channels) if bias is None else np.asarray(bias, dtype=np.float64)
    new_bias = bias + (weight * t).reshape(out_channels, -1).sum(1)
    return np.moveaxis(weight * s, (0, 1), (out_axis, in_axis)), new_bias


def affine_of_elementwise(op: str, const, const_first: bool = False):
    """Add/Sub/Mul/Div of a tensor x with a constant c (as exporters write a BatchNorm: Keras' Sub →
    Mul → Add) as y = x·s + t, with s and t shaped like c (float64). None for c / x, which is not
    affine, and for x / c with a zero in c."""
    c = np.asarray(const, dtype=np.float64)
    one, zero = np.ones_like(c), np.zeros_like(c)
    if op == "Add":
        return one, c
    if op == "Sub":
        return (-one, c) if const_first else (one, -c)
    if op == "Mul":
        return c, zero
    if op == "Div" and not const_first and np.all(c != 0):
        return 1.0 / c, zero
    return None


def compose_affine(first, then) -> tuple[np.ndarray, np.ndarray]:
    """x·s₁ + t₁, then ·s₂ + t₂:  x·(s₁·s₂) + (t₁·s₂ + t₂) (broadcasting)."""
    (s1, t1), (s2, t2) = first, then
    return np.asarray(s1, dtype=np.float64) * s2, np.asarray(t1, dtype=np.float64) * s2 + t2


# --- the PyTorch (fx) pass ---

def bn_scale_shift(bn: nn.modules.batchnorm._BatchNorm) -> tuple[np.ndarray, np.ndarray]:
    """s and t of a torch BatchNorm, in float64."""
    var = bn.running_var.detach().double().numpy()
    gamma = bn.weight.detach().double().numpy() if bn.affine else np.ones_like(var)
    beta = bn.bias.detach().double().numpy() if bn.affine else np.zeros_like(var)
    return affine_of_bn(gamma, beta, bn.running_mean.detach().double().numpy(), var, bn.eps)


def _with_weights(layer: nn.Module, weight: np.ndarray, bias: np.ndarray) -> nn.Module:
    folded = copy.deepcopy(layer)
    dtype = layer.weight.dtype
    folded.weight = nn.Parameter(torch.from_numpy(weight).to(dtype))
    folded.bias = nn.Parameter(torch.from_numpy(bias).to(dtype))
    return folded


def _bias(layer: nn.Module):
    return None if layer.bias is None else layer.bias.detach().double().numpy()


def fold_backward(layer: nn.Module, bn) -> nn.Module:
    """Conv/Linear followed by `bn` -> one Conv/Linear."""
    scale, shift = bn_scale_shift(bn)
    weight = layer.weight.detach().double().numpy()
    return _with_weights(layer, *fold_backward_arrays(weight, _bias(layer), scale, shift, out_axis=0))


def fold_forward(layer: nn.Module, scale, shift) -> nn.Module:
    """`scale`/`shift` are given per input of `layer` (already repeated across spatial positions
    when a Flatten sat in between)."""
    weight = layer.weight.detach().double().numpy()
    groups = 1 if isinstance(layer, nn.Linear) else layer.groups
    return _with_weights(layer, *fold_forward_arrays(weight, _bias(layer), np.asarray(scale), np.asarray(shift),
                                                     groups=groups))


def _module(modules: dict, node: fx.Node):
    return modules.get(node.target) if node.op == "call_module" else None


def _only_user(node: fx.Node):
    return next(iter(node.users)) if len(node.users) == 1 else None


def _is_flatten(modules, node) -> bool:
    return isinstance(_module(modules, node), nn.Flatten) or (
        node.op == "call_function" and node.target is torch.flatten)


def _padded(conv) -> bool:
    if isinstance(conv.padding, str):
        return conv.padding != "valid"
    return any(p != 0 for p in conv.padding)


def _forward_target(modules: dict, bn_node: fx.Node, scale: np.ndarray):
    """Walk from the BN through MaxPool/Flatten to the next Conv/Linear.
    Returns (target node, whether a Flatten sat in between, None) or (None, False, why not)."""
    node, flattened = bn_node, False
    while True:
        nxt = _only_user(node)
        if nxt is None:
            return None, False, f"{node.name} feeds {len(node.users)} consumers; a fold would change the others"
        layer = _module(modules, nxt)
        if isinstance(layer, _CONV_LINEAR):
            if not isinstance(layer, nn.Linear) and flattened:
                return None, False, f"a Flatten sits between it and the conv {nxt.target}"
            if not isinstance(layer, nn.Linear) and _padded(layer):
                return None, False, (f"the next layer {nxt.target} is zero-padded: its padded zeros would "
                                     f"become the BN shift after folding")
            return nxt, flattened, None
        if isinstance(layer, (nn.MaxPool1d, nn.MaxPool2d)):
            if not bool((scale > 0).all()):
                return None, False, (f"{int((scale <= 0).sum())} of its per-channel scales are <= 0, so it "
                                     f"does not commute with {nxt.target} (max would become min)")
        elif _is_flatten(modules, nxt):
            flattened = True
        elif not isinstance(layer, (nn.Identity, nn.Dropout)):
            what = nxt.target if nxt.op == "call_module" else getattr(nxt.target, "__name__", str(nxt.target))
            return None, False, f"it is followed by {what}, which a per-channel affine map cannot pass through"
        node = nxt


class _LeafTracer(fx.Tracer):
    """fx's tracer with the named submodules kept whole (called, not traced into). When tracing
    fails it remembers the innermost submodule whose forward raised."""

    def __init__(self, leaves: set[str]):
        super().__init__()
        self.leaves, self.failed_in = leaves, None

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return qualname in self.leaves or super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                try:
                    self.failed_in = self.path_of_module(m)
                except NameError:  # a module built inside forward: blame its owner
                    pass
            raise


class _Untraceable(Exception):
    """The module's own forward cannot be traced (not one of its submodules)."""


def _trace(module: nn.Module) -> tuple[fx.GraphModule, dict[str, str]]:
    """Symbolic trace in which every submodule fx cannot trace becomes a leaf: trace, make the
    innermost module whose forward raised a leaf, trace again. Returns the graph and the leaves
    with fx's reason. Raises _Untraceable when `module`'s own forward is what fails."""
    leaves: dict[str, str] = {}
    while True:
        tracer = _LeafTracer(set(leaves))
        try:
            graph = tracer.trace(module)
        except Exception as e:
            reason = one_line(e) + _user_line(e)
            if not tracer.failed_in or tracer.failed_in in leaves:
                raise _Untraceable(reason) from None
            leaves[tracer.failed_in] = reason
            continue
        return fx.GraphModule(tracer.root, graph, type(module).__name__), leaves


def _user_line(error: Exception) -> str:
    """ " (at file.py:12: if x.sum() > 0:)": the last line outside torch that the error passed through."""
    torch_dir = str(Path(torch.__file__).parent)
    frames = [f for f in traceback.extract_tb(error.__traceback__) if not f.filename.startswith(torch_dir)
              and f.filename != __file__]
    return f" (at {Path(frames[-1].filename).name}:{frames[-1].lineno}: {frames[-1].line})" if frames else ""


def fold_batchnorm(model: nn.Module) -> tuple[nn.Module, FoldReport]:
    """Returns an eval-mode copy of `model` with Dropout removed and every BatchNorm folded where
    that is exact, and a report of what was folded into what and which BN stayed and why.

    Where fx cannot trace a submodule's forward (data-dependent control flow, calls fx does not
    support) that submodule is called as a whole: the BNs its own forward uses stay (reported with
    fx's reason), and each of its children is folded on its own. When the top-level forward itself
    cannot be traced, that is the case for the whole model: its children are folded one by one."""
    report = FoldReport()
    return _fold(copy.deepcopy(model).eval(), "", report).eval(), report


def _fold(module: nn.Module, prefix: str, report: FoldReport) -> nn.Module:
    try:
        gm, leaves = _trace(module)
    except _Untraceable as e:
        return _fold_inside(module, prefix, str(e), report)
    for name, reason in leaves.items():
        _replace(gm, {}, name, _fold_inside(gm.get_submodule(name), f"{prefix}{name}.", reason, report))
    _fold_graph(gm, prefix, report)
    return gm


def _fold_inside(module: nn.Module, prefix: str, reason: str, report: FoldReport) -> nn.Module:
    """`module`'s forward cannot be traced: keep it, and fold inside each child on its own."""
    where = f"{prefix.rstrip('.') or '<top level>'} ({type(module).__name__})"
    report.untraceable.append({"module": where, "reason": reason})
    for name, child in list(module.named_children()):
        if isinstance(child, _BN):
            report.kept.append({"bn": f"{prefix}{name} ({type(child).__name__})",
                                "reason": f"called by the forward of {where}, which fx cannot trace: {reason}"})
        elif any(isinstance(m, _BN) for m in child.modules()):
            setattr(module, name, _fold(child, f"{prefix}{name}.", report))
    return module


def _fold_graph(gm: fx.GraphModule, prefix: str, report: FoldReport) -> None:
    """The pattern match over one traced graph; module names in the report get `prefix`."""
    modules = dict(gm.named_modules())

    def describe(name: str) -> str:
        return f"{prefix}{name} ({type(modules[name]).__name__})"

    for node in list(gm.graph.nodes):
        if isinstance(_module(modules, node), nn.Dropout):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
            report.removed_dropout.append(prefix + node.target)
        elif node.op == "call_function" and node.target is F.batch_norm:
            report.kept.append({"bn": f"{prefix}{node.name} (F.batch_norm)",
                                "reason": "a functional batch_norm call: this pass folds nn.BatchNorm modules"})

    for node in list(gm.graph.nodes):
        bn = _module(modules, node)
        if not isinstance(bn, _BN):
            continue
        if bn.running_mean is None or bn.running_var is None:
            raise FoldError(f"BatchNorm {prefix + node.target!r} has track_running_stats=False: it normalizes with "
                            f"batch statistics even in eval mode, so it cannot be folded into a fixed layer")
        source = node.args[0]
        source_layer = _module(modules, source)
        if isinstance(source_layer, _CONV_LINEAR) and len(source.users) == 1:
            _replace(gm, modules, source.target, fold_backward(source_layer, bn))
            node.replace_all_uses_with(source)
            gm.graph.erase_node(node)
            report.folded.append({"bn": describe(node.target), "into": describe(source.target), "direction": "backward"})
            continue
        scale, shift = bn_scale_shift(bn)
        target, flattened, why_not = _forward_target(modules, node, scale)
        if target is None:
            report.kept.append({"bn": describe(node.target), "reason": why_not})
            continue
        layer = modules[target.target]
        if flattened:  # repeat s and t over the spatial positions, in Flatten's (C, H, W) order
            per_channel = layer.in_features // scale.size
            if per_channel * scale.size != layer.in_features:
                report.kept.append({"bn": describe(node.target), "reason": f"{target.target}.in_features is not a "
                                    f"multiple of the {scale.size} BN channels"})
                continue
            scale, shift = np.repeat(scale, per_channel), np.repeat(shift, per_channel)
        if scale.size != (layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels):
            report.kept.append({"bn": describe(node.target), "reason": f"its {scale.size} channels do not line up "
                                f"with the inputs of {target.target}"})
            continue
        _replace(gm, modules, target.target, fold_forward(layer, scale, shift))
        node.replace_all_uses_with(node.args[0])
        gm.graph.erase_node(node)
        report.folded.append({"bn": describe(node.target), "into": describe(target.target), "direction": "forward"})

    gm.graph.lint()
    gm.recompile()
    gm.delete_all_unused_submodules()


def _replace(gm: fx.GraphModule, modules: dict, name: str, new: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, attr, new)
    modules[name] = new
