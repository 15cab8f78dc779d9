"""The fx pass: fold eval-mode BatchNorm into the neighbouring Conv/ConvTranspose/Linear, and strip
Dropout, in a torch.fx graph of the module.

A BN right after a layer folds backward into it, a BN before the next layer folds forward into it
(the math: export/fold_math.py). Forward folds are exact through MaxPool only when every s > 0 (max
commutes with a positive affine map; a negative scale swaps max for min), through Flatten by
repeating s and t per spatial position, and never into a padded Conv (the padded zeros would
become t after folding) nor into a ConvTranspose (see LAYERS). A BN after a torch.cat of several
layers' outputs folds backward by splitting s and t across them. Where no exact fold exists the BN
stays and the report says why. A BN with track_running_stats=False normalizes with batch
statistics even in eval mode: it is not an affine map and cannot be folded (F.batch_norm on a
weight, as in the weight standardization of timm's StdConv2d/ScaledStdConv2d, is no BatchNorm of
activations and is left as it is).

The pass is a short pattern match over an fx graph, in the manner of
torch.fx.experimental.optimization.fuse, driven by two tables: LAYERS (what a BN folds into, and
how its weight holds channels) and NORMS (what is a BatchNorm, and how to read its s and t).
Tracing, and checking each trace against the forward, is export/fx_trace.py.
"""
import copy
import inspect
import weakref
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import fx, nn
from torch.nn import functional as F

from export.fold_math import (CONV_TRANSPOSE_FORWARD, affine_of_bn, affine_of_elementwise,  # noqa: F401 (public here too)
                              compose_affine, fold_backward_arrays, fold_forward_arrays, grouped_channels)
from export.fold_records import FoldRecord, MergeRecord
from export.fx_trace import FoldError, Untraceable, clone, mistrace, record_calls, trace  # noqa: F401

_BatchNorm = nn.modules.batchnorm._BatchNorm


@dataclass
class FoldReport:
    folded: list[FoldRecord] = field(default_factory=list)   # folded into layers
    kept: list[FoldRecord] = field(default_factory=list)     # kept, and why
    removed_dropout: list[str] = field(default_factory=list)
    untraceable: list[dict] = field(default_factory=list)  # {"module", "reason"}: called whole, not traced
    merged: list[MergeRecord] = field(default_factory=list)         # export/merge_fx.py: blocks merged into one conv
    merge_refused: list[MergeRecord] = field(default_factory=list)  # and blocks it refused, with why

    def as_dict(self) -> dict:
        return {"folded": [r.as_dict() for r in self.folded], "kept": [r.as_dict() for r in self.kept],
                "removed_dropout": self.removed_dropout, "untraceable": self.untraceable,
                "merged": [r.as_dict() for r in self.merged], "merge_refused": [r.as_dict() for r in self.merge_refused]}


# --- coverage: what folds into what (both passes read these) ------------------------------------

@dataclass(frozen=True)
class LayerRule:
    """How a layer holds its per-channel linear map, for folding a BN into it."""
    out_axis: int                # weight axis of the output channels (ConvTranspose: within a group)
    in_axis: int                 # weight axis of the input channels
    rank: int                    # rank of its output when the channel axis is 1 ([N, C, *spatial])
    no_forward: str | None = None  # why a BN before it never folds into it (None: it does, unpadded)


CONV = {n: LayerRule(0, 1, n + 2) for n in (1, 2, 3)}
CONV_TRANSPOSE = {n: LayerRule(1, 0, n + 2, CONV_TRANSPOSE_FORWARD) for n in (1, 2, 3)}
LAYERS = {nn.Linear: LayerRule(0, 1, 2),
          nn.Conv1d: CONV[1], nn.Conv2d: CONV[2], nn.Conv3d: CONV[3],
          nn.ConvTranspose1d: CONV_TRANSPOSE[1], nn.ConvTranspose2d: CONV_TRANSPOSE[2],
          nn.ConvTranspose3d: CONV_TRANSPOSE[3]}
# Exact types only: a subclass may do more in its forward (timm's Conv2dSame pads, StdConv2d
# standardizes its weight); fx traces into those, and what they compute is left alone.


def bn_scale_shift(bn: nn.Module) -> tuple[np.ndarray, np.ndarray]:
    """s and t of a torch BatchNorm, or of a FrozenBatchNorm2d-style module, in float64."""
    if getattr(bn, "running_mean", None) is None or getattr(bn, "running_var", None) is None:
        raise FoldError(f"{type(bn).__name__} has track_running_stats=False: it normalizes with batch statistics "
                        f"even in eval mode, so it cannot be folded into a fixed layer")
    var = bn.running_var.detach().double().numpy()
    gamma = np.ones_like(var) if bn.weight is None else bn.weight.detach().double().numpy()
    beta = np.zeros_like(var) if bn.bias is None else bn.bias.detach().double().numpy()
    return affine_of_bn(gamma, beta, bn.running_mean.detach().double().numpy(), var, bn.eps)


# The BatchNorm modules, with the input ranks they take (channel axis 1), read by bn_scale_shift;
# a subclass counts only if it keeps the forward of its torch base class. One that does more in
# its forward (timm's BatchNormAct2d adds an activation) is traced into, and the F.batch_norm call
# inside folds (_functional_norm) while the rest stays. FrozenBatchNorm2d-style modules
# (torchvision.ops, detectron2) are recognized by their buffers and a probe of their forward
# (_frozen_ranks). All of these are kept whole in the trace (fx leaves), so they fold as modules.
NORMS = {nn.BatchNorm1d: (2, 3), nn.BatchNorm2d: (4,), nn.BatchNorm3d: (5,), nn.SyncBatchNorm: (2, 3, 4, 5)}
_STATS = ("weight", "bias", "running_mean", "running_var")


_PROBED: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


def _frozen_ranks(m: nn.Module) -> tuple[int, ...]:
    """The input ranks on which `m`'s forward is x·s + t with s, t from its weight/bias/running_mean/
    running_var buffers and its eps (a FrozenBatchNorm2d), found on random probe inputs; () if none.
    Remembered per module until its buffers or eps change."""
    buffers = dict(m.named_buffers(recurse=False))
    if isinstance(m, _BatchNorm) or list(m.children()) or list(m.parameters()) or not isinstance(getattr(m, "eps", None), float) \
            or not all(k in buffers and buffers[k].ndim == 1 and buffers[k].is_floating_point() for k in _STATS) \
            or len({buffers[k].numel() for k in _STATS}) != 1:
        return ()
    stamp = (m.eps, type(m).forward, *((buffers[k].data_ptr(), buffers[k]._version, buffers[k].dtype) for k in _STATS))
    if m in _PROBED and _PROBED[m][0] == stamp:
        return _PROBED[m][1]
    _PROBED[m] = (stamp, _probe(m, buffers))
    return _PROBED[m][1]


def _probe(m: nn.Module, buffers: dict) -> tuple[int, ...]:
    gamma, beta, mean, var = (buffers[k].detach().double() for k in _STATS)
    dtype, c, ranks = buffers["weight"].dtype, gamma.numel(), []
    for rank in (2, 3, 4, 5):
        x = torch.randn((2, c) + (3,) * (rank - 2), generator=torch.Generator().manual_seed(rank), dtype=torch.float64)
        view = (1, c) + (1,) * (rank - 2)
        want = (x - mean.view(view)) / torch.sqrt(var.view(view) + m.eps) * gamma.view(view) + beta.view(view)
        try:
            with torch.no_grad():
                got = m(x.to(dtype)).double()
        except Exception:  # noqa: BLE001 -- a rank it does not take
            continue
        if got.shape == want.shape and torch.allclose(got, want, rtol=1e3 * torch.finfo(dtype).eps, atol=1e3 * torch.finfo(dtype).eps):
            ranks.append(rank)
    return tuple(ranks)


def _norm_ranks(m: nn.Module) -> tuple[int, ...] | None:
    """The input ranks of a BatchNorm module (() any), None if `m` is not one: a NORMS type, a
    subclass that keeps its forward, or a FrozenBatchNorm2d-style module."""
    base = next((b for b in type(m).__mro__ if b in NORMS), None)
    if base is not None and type(m).forward is base.forward:
        return NORMS[base]
    return _frozen_ranks(m) or None


def _is_norm_module(m: nn.Module) -> bool:
    return _norm_ranks(m) is not None


def _holds_norm(m: nn.Module) -> bool:
    return any(isinstance(d, _BatchNorm) or _is_norm_module(d) for d in m.modules())


# --- the PyTorch (fx) pass: folding into modules ---

def _with_weights(layer: nn.Module, weight: np.ndarray, bias: np.ndarray) -> nn.Module:
    """A copy of `layer` with new weight and bias (the old ones are not copied, only replaced)."""
    folded = copy.deepcopy(layer, {id(p): None for p in (layer.weight, layer.bias) if p is not None})
    dtype = layer.weight.dtype
    folded.weight = nn.Parameter(torch.from_numpy(weight).to(dtype))
    folded.bias = nn.Parameter(torch.from_numpy(bias).to(dtype))
    return folded


def _weight_bias(layer: nn.Module):
    return layer.weight.detach().double().numpy(), None if layer.bias is None else layer.bias.detach().double().numpy()


def fold_backward(layer: nn.Module, scale, shift) -> nn.Module:
    """A LAYERS layer followed by the per-channel map x·scale + shift -> one layer."""
    rule = LAYERS[type(layer)]
    return _with_weights(layer, *fold_backward_arrays(*_weight_bias(layer), scale, shift, out_axis=rule.out_axis,
                                                      groups=getattr(layer, "groups", 1)))


def fold_forward(layer: nn.Module, scale, shift) -> nn.Module:
    """`scale`/`shift` are given per input of `layer` (already repeated across spatial positions
    when a Flatten sat in between). Conv and Linear only (LAYERS' no_forward)."""
    rule = LAYERS[type(layer)]
    return _with_weights(layer, *fold_forward_arrays(*_weight_bias(layer), np.asarray(scale), np.asarray(shift),
                                                     out_axis=rule.out_axis, in_axis=rule.in_axis,
                                                     groups=getattr(layer, "groups", 1)))


def _channels(layer: nn.Module, side: str) -> int:
    return getattr(layer, f"{side}_features", None) or getattr(layer, f"{side}_channels")


# --- the fx pass: the pattern match ---

@dataclass
class _Norm:
    """One BatchNorm in a traced graph: a call of a NORMS module, or a functional F.batch_norm."""
    node: fx.Node
    name: str                      # the module, for the report: "layer1.0.bn1 (BatchNorm2d)"
    module: str | None             # its path, "layer1.0.bn1" (None: a functional batch_norm of no module's buffers)
    scale: np.ndarray | None = None
    shift: np.ndarray | None = None
    ranks: tuple[int, ...] = ()    # input ranks it is known to take; () any
    why_not: str | None = None     # why it cannot fold at all


_SHAPE_ONLY = {"ndim", "shape", "dtype", "device", "size", "dim", "numel"}
_CATS = (torch.cat, torch.concat, torch.concatenate)
_POOLS = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)
_PASS = (nn.Identity, nn.modules.dropout._DropoutNd)  # the identity in eval mode


def _module(modules: dict, node: fx.Node):
    return modules.get(node.target) if node.op == "call_module" else None


def _readers(node: fx.Node) -> list[fx.Node]:
    """The nodes that read `node`'s values: not x.ndim / x.shape / x.size(), nor y.reshape_as(x) (a
    fold keeps the shape)."""
    return [u for u in node.users if not (
        (u.op == "call_function" and u.target is getattr and len(u.args) > 1 and u.args[1] in _SHAPE_ONLY)
        or (u.op == "call_method" and u.target in _SHAPE_ONLY)
        or (u.op == "call_method" and u.target in _SHAPE_OF_OTHER and u.args[0] is not node))]


_SHAPE_OF_OTHER = {"reshape_as", "view_as", "expand_as"}  # y.reshape_as(x) reads only x's shape


def _flattened_layer_output(source: fx.Node) -> fx.Node | None:
    """x when `source` is x.flatten(0, k) (or torch.flatten) to 2-D with x's last axis kept: LeViT's
    BatchNorm1d of a Linear's [B, N, C] output as [B·N, C]; the BN's channels are then x's last axis."""
    if not (source.op == "call_method" and source.target == "flatten"
            or source.op == "call_function" and source.target is torch.flatten):
        return None
    args = list(source.args) + [None] * 3
    x, start = args[0], source.kwargs.get("start_dim", args[1] if args[1] is not None else 0)
    inner, outer = (n.meta.get("fold_shape") if isinstance(n, fx.Node) else None for n in (x, source))
    if start != 0 or inner is None or outer is None or len(outer) != 2 or len(inner) < 2 or outer[-1] != inner[-1]:
        return None
    return x


def _only_reader(node: fx.Node):
    readers = _readers(node)
    return readers[0] if len(readers) == 1 else None


def _rank(node: fx.Node) -> int | None:
    """The rank of `node`'s output as it ran on the example (fold_batchnorm(example=…)), else None."""
    shape = node.meta.get("fold_shape")
    return len(shape) if shape is not None else None


def _what(node: fx.Node) -> str:
    return node.target if node.op == "call_module" else getattr(node.target, "__name__", str(node.target))


def _norm_of(gm: fx.GraphModule, root: nn.Module, modules: dict, node: fx.Node, prefix: str) -> _Norm | None:
    m = _module(modules, node)
    if m is not None and _is_norm_module(m):
        name = f"{prefix}{node.target} ({type(m).__name__})"
        try:
            scale, shift = bn_scale_shift(m)
        except FoldError as e:
            raise FoldError(f"BatchNorm {prefix + node.target!r}: {e}") from None
        return _Norm(node, name, prefix + node.target, scale, shift, _norm_ranks(m))
    if node.op == "call_function" and node.target is F.batch_norm:
        if not _reads_input(node.args[0] if node.args else node.kwargs["input"]):
            return None  # it normalizes a weight, not activations: weight standardization (timm's StdConv2d)
        return _functional_norm(gm, root, node, prefix)
    return None


def _reads_input(node) -> bool:
    """Whether fx value `node` depends on the traced function's inputs (else it is a function of the
    model's parameters alone, the same for every batch)."""
    seen, todo = set(), [node]
    while todo:
        n = todo.pop()
        if not isinstance(n, fx.Node) or n in seen:
            continue
        if n.op == "placeholder":
            return True
        seen.add(n)
        todo.extend(n.all_input_nodes)
    return False


def _functional_norm(gm: fx.GraphModule, root: nn.Module, node: fx.Node, prefix: str) -> _Norm:
    """F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps) as fx
    records it inside a traced BatchNorm subclass (timm's BatchNormAct2d): it folds when training
    is False and every statistic is a constant of the model (a get_attr)."""
    a = inspect.signature(F.batch_norm).bind(*node.args, **node.kwargs)
    a.apply_defaults()
    a = a.arguments
    stats = [a["running_mean"], a["running_var"], a["weight"], a["bias"]]
    constant = [s is None or (isinstance(s, fx.Node) and s.op == "get_attr") for s in stats]
    owner = a["running_mean"].target.rpartition(".")[0] if constant[0] and a["running_mean"] is not None else None
    try:  # named after the module that holds the statistics
        name, module = _where(root.get_submodule(owner), prefix + owner), (prefix + owner).rstrip(".")
    except (AttributeError, TypeError):
        name, module = f"{prefix}{node.name} (F.batch_norm)", None
    if a["training"] is True or a["running_mean"] is None or a["running_var"] is None:
        raise FoldError(f"BatchNorm {name} normalizes with batch statistics even in eval mode (F.batch_norm with "
                        f"training=True or no running statistics), so it cannot be folded into a fixed layer")
    if a["training"] is not False or not all(constant) or not isinstance(a["eps"], float):
        return _Norm(node, name, module, why_not="a functional batch_norm whose statistics, training flag or eps are "
                                         "computed at run time, not constants of the model")
    mean, var, gamma, beta = (None if s is None else _attr(gm, s.target).detach().double().numpy() for s in stats)
    gamma = np.ones_like(var) if gamma is None else gamma
    beta = np.zeros_like(var) if beta is None else beta
    return _Norm(node, name, module, *affine_of_bn(gamma, beta, mean, var, a["eps"]))


def _attr(gm: nn.Module, target: str):
    owner, _, name = target.rpartition(".")
    return getattr(gm.get_submodule(owner) if owner else gm, name)


def _remove_norm(gm: fx.GraphModule, norm: _Norm) -> None:
    node = norm.node
    node.replace_all_uses_with(node.args[0])
    gm.graph.erase_node(node)
    for arg in list(node.args) + list(node.kwargs.values()):
        if isinstance(arg, fx.Node) and arg.op == "get_attr" and not arg.users:
            gm.graph.erase_node(arg)


def _channel_axis_fits(layer: nn.Module, tensor: fx.Node, norm: _Norm) -> bool:
    """Whether axis 1 of `tensor` (what runs between `layer` and `norm`) is the layer's channel axis:
    its rank, when the example run recorded it, must be the layer's (a Linear's output is [N, C] only
    when 2-D), else the norm must take that rank."""
    rank, rule = _rank(tensor), LAYERS[type(layer)]
    return rank == rule.rank if rank is not None else (not norm.ranks or rule.rank in norm.ranks)


def _layer_fits(layer: nn.Module, layer_node: fx.Node, tensor: fx.Node, norm: _Norm, side: str) -> str | None:
    """Why `norm`'s channels are not the output (side "out") / input (side "in") channels of `layer`."""
    if _channels(layer, side) != norm.scale.size:
        return f"its {norm.scale.size} channels do not line up with the {side}put channels of {layer_node.target}"
    if not _channel_axis_fits(layer, tensor, norm):
        return f"it normalizes axis 1 of a rank-{_rank(tensor)} tensor, not the channel axis of {layer_node.target}"
    return None


def _fold_backward(gm, modules, norm: _Norm) -> tuple[list[str] | None, str | None]:
    """Fold into the layer (or the layers of a torch.cat) that produce the BN's input: (the layers
    folded into, None), or (None, why not)."""
    source = norm.node.args[0]
    if source.op == "call_function" and source.target in _CATS:
        return _fold_into_concat(gm, modules, norm, source)
    tensor = source  # what the BN reads: the layer's output, or (LeViT) that output flattened to [M, C]
    flat = _flattened_layer_output(source)
    if flat is not None and type(_module(modules, flat)) is nn.Linear:
        if len(_readers(source)) != 1:
            return None, f"the output of {source.name} is read by {len(_readers(source))} nodes; a fold would change the others"
        source = flat
    layer = _module(modules, source)
    if type(layer) not in LAYERS:
        return None, _not_a_layer(source, layer)
    if len(_readers(source)) != 1:
        return None, f"the output of {source.target} is read by {len(_readers(source))} nodes; a fold would change the others"
    why = _layer_fits(layer, source, tensor, norm, "out")
    if why:
        return None, why
    _replace(gm, modules, source.target, fold_backward(layer, norm.scale, norm.shift))
    return [source.target], None


def _not_a_layer(node: fx.Node, module: nn.Module | None) -> str:
    if node.op == "placeholder":
        return "its input is the input of the traced module, not a layer's output"
    what = f"{node.target} ({type(module).__name__})" if module is not None else f"{node.name} ({_what(node)})"
    return f"its input comes from {what}, not from a Conv/ConvTranspose/Linear module"


def _fold_into_concat(gm, modules, norm: _Norm, cat: fx.Node) -> tuple[list[str] | None, str | None]:
    """A BN after torch.cat([layer_a(x), layer_b(y), …], dim=1): each layer takes its slice of s and t."""
    inputs = cat.args[0] if cat.args else cat.kwargs.get("tensors")
    dim = cat.args[1] if len(cat.args) > 1 else cat.kwargs.get("dim", cat.kwargs.get("axis", 0))
    what = f"{cat.name} (torch.cat)"
    if len(_readers(cat)) != 1:
        return None, f"the output of {what} is read by {len(_readers(cat))} nodes; a fold would change the others"
    if not isinstance(inputs, (list, tuple)) or len(set(inputs)) != len(inputs) or not isinstance(dim, int):
        return None, f"{what} does not join distinct layer outputs along a constant axis"
    layers = [_module(modules, n) for n in inputs]
    for i, (n, layer) in enumerate(zip(inputs, layers)):
        if type(layer) not in LAYERS:
            return None, f"input {i} of {what}, {n.name}, is not the output of a Conv/ConvTranspose/Linear"
        if len(_readers(n)) != 1:
            return None, f"the output of {n.target} is read by {len(_readers(n))} nodes; a fold would change the others"
        if dim % (_rank(n) or LAYERS[type(layer)].rank) != 1 or not _channel_axis_fits(layer, n, norm):
            return None, f"{what} does not join the channel axis of {n.target}"
    sizes = [_channels(layer, "out") for layer in layers]
    if sum(sizes) != norm.scale.size:
        return None, f"its {norm.scale.size} channels are not the {sum(sizes)} channels {what} joins"
    start = 0
    for n, layer, size in zip(inputs, layers, sizes):
        _replace(gm, modules, n.target, fold_backward(layer, norm.scale[start:start + size], norm.shift[start:start + size]))
        start += size
    return [n.target for n in inputs], None


def _is_flatten(modules, node) -> bool:
    """A Flatten of every axis after the batch one."""
    m = _module(modules, node)
    if isinstance(m, nn.Flatten):
        return m.start_dim == 1 and m.end_dim == -1
    if (node.op, node.target) in (("call_function", torch.flatten), ("call_method", "flatten")):
        start = node.kwargs.get("start_dim", node.args[1] if len(node.args) > 1 else 0)
        end = node.kwargs.get("end_dim", node.args[2] if len(node.args) > 2 else -1)
        return start == 1 and end == -1
    return False


def _padded(conv) -> bool:
    if isinstance(conv.padding, str):
        return conv.padding != "valid"
    return any(p != 0 for p in conv.padding)


def _forward_target(modules: dict, norm: _Norm):
    """Walk from the BN through MaxPool/Flatten/Identity/Dropout to the next layer.
    Returns (target node, whether a Flatten sat in between, None) or (None, False, why not)."""
    node, flattened = norm.node, False
    while True:
        nxt = _only_reader(node)
        if nxt is None:
            return None, False, f"{node.name} feeds {len(_readers(node))} consumers; a fold would change the others"
        layer = _module(modules, nxt)
        rule = LAYERS.get(type(layer))
        if rule is not None:
            if rule.no_forward:
                return None, False, f"{rule.no_forward} ({nxt.target})"
            if not isinstance(layer, nn.Linear) and flattened:
                return None, False, f"a Flatten sits between it and the conv {nxt.target}"
            if not isinstance(layer, nn.Linear) and _padded(layer):
                return None, False, (f"the next layer {nxt.target} is zero-padded: its padded zeros would "
                                     f"become the BN shift after folding")
            if nxt.args[0] is not node:
                return None, False, f"it is not the input of {nxt.target}"
            return nxt, flattened, None
        if isinstance(layer, _POOLS):
            if not bool((norm.scale > 0).all()):
                return None, False, (f"{int((norm.scale <= 0).sum())} of its per-channel scales are <= 0, so it "
                                     f"does not commute with {nxt.target} (max would become min)")
        elif _is_flatten(modules, nxt):
            flattened = True
        elif not isinstance(layer, _PASS):
            return None, False, f"it is followed by {_what(nxt)}, which a per-channel affine map cannot pass through"
        node = nxt


def _fold_forward(gm, modules, norm: _Norm) -> tuple[str | None, str | None]:
    """Fold into the layer that reads the BN's output: (the layer, None) or (None, why not)."""
    target, flattened, why = _forward_target(modules, norm)
    if target is None:
        return None, why
    layer = modules[target.target]
    scale, shift = norm.scale, norm.shift
    if flattened:  # repeat s and t over the spatial positions, in Flatten's (C, H, W) order
        per_channel = layer.in_features // scale.size
        if per_channel * scale.size != layer.in_features:
            return None, f"{target.target}.in_features is not a multiple of the {scale.size} BN channels"
        scale, shift = np.repeat(scale, per_channel), np.repeat(shift, per_channel)
    else:
        why = _layer_fits(layer, target, norm.node, norm, "in")
        if why:
            return None, why
    _replace(gm, modules, target.target, fold_forward(layer, scale, shift))
    return target.target, None


def _fold_graph(gm: fx.GraphModule, root: nn.Module, prefix: str, report: FoldReport) -> None:
    """The pattern match over one traced graph of `root`; module names in the report get `prefix`."""
    modules = dict(gm.named_modules())

    def describe(name: str) -> str:
        return f"{prefix}{name} ({type(modules[name]).__name__})"

    for node in list(gm.graph.nodes):
        if isinstance(_module(modules, node), nn.modules.dropout._DropoutNd):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
            report.removed_dropout.append(prefix + node.target)

    for node in list(gm.graph.nodes):
        norm = _norm_of(gm, root, modules, node, prefix)
        if norm is None:
            continue
        if norm.why_not:
            report.kept.append(FoldRecord("fx", norm.name, module=norm.module, reason=norm.why_not))
            continue
        into, why_back = _fold_backward(gm, modules, norm)
        direction = "backward"
        if into is None:
            target, why_forward = _fold_forward(gm, modules, norm)
            into, direction = ([target] if target else None), "forward"
        if into is None:
            reason = why_forward if why_back is None else f"backward: {why_back}; forward: {why_forward}"
            report.kept.append(FoldRecord("fx", norm.name, module=norm.module, reason=reason))
            continue
        _remove_norm(gm, norm)
        report.folded.append(FoldRecord("fx", norm.name, module=norm.module, layers=tuple(prefix + t for t in into),
                                        into=", ".join(describe(t) for t in into), direction=direction))

    gm.graph.lint()
    gm.recompile()
    gm.delete_all_unused_submodules()


def _replace(gm: fx.GraphModule, modules: dict, name: str, new: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, attr, new)
    modules[name] = new


# --- the pass ---

def fold_batchnorm(model: nn.Module, example: tuple | None = None) -> tuple[nn.Module, FoldReport]:
    """Returns an eval-mode copy of `model` with Dropout removed and every BatchNorm folded where
    that is exact, and a report of what was folded into what and which BN stayed and why. The fold
    works in the model's own dtype (float32 or float64).

    Where fx cannot trace a submodule's forward (data-dependent control flow, calls fx does not
    support) that submodule is called as a whole: the BNs its own forward uses stay (reported with
    fx's reason), and each of its children is folded on its own. When the top-level forward itself
    cannot be traced, that is the case for the whole model: its children are folded one by one.

    With `example` (a tuple of inputs in the model's dtype), every traced graph is run on the
    inputs its module receives in model(*example) and must give what the module's forward gives:
    a trace that does not (a Python branch on a leaf's output, say) is not used, and that module
    is folded inside its children only, as above."""
    model = copy.deepcopy(model).eval()
    example = (example,) if isinstance(example, torch.Tensor) else example
    calls = record_calls(model, tuple(example), _holds_norm) if example is not None else {}
    report = FoldReport()
    return _fold(model, "", report, calls).eval(), report


def _fold(module: nn.Module, prefix: str, report: FoldReport, calls: dict) -> nn.Module:
    try:
        gm, leaves = trace(module, {name for name, m in module.named_modules() if name and _is_norm_module(m)})
    except Untraceable as e:
        return _fold_inside(module, prefix, str(e), report, calls)
    if prefix.rstrip(".") in calls:
        why = mistrace(gm, *calls[prefix.rstrip(".")])
        if why:
            reason = f"fx's trace of {_where(module, prefix)} does not compute what its forward does: {why}"
            return _fold_inside(module, prefix, reason, report, calls)
    for name, reason in leaves.items():
        _replace(gm, {}, name, _fold_inside(gm.get_submodule(name), f"{prefix}{name}.", reason, report, calls))
    _fold_graph(gm, module, prefix, report)
    for key, value in vars(module).items():  # plain attributes a caller may read (ultralytics' m.f, m.i)
        if not key.startswith("_") and key != "training" and not hasattr(gm, key):
            setattr(gm, key, value)
    return gm


def _where(module: nn.Module, prefix: str) -> str:
    return f"{prefix.rstrip('.') or '<top level>'} ({type(module).__name__})"


_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def _fold_inside(module: nn.Module, prefix: str, reason: str, report: FoldReport, calls: dict,
                 owner: str | None = None) -> nn.Module:
    """`module`'s forward cannot be traced (or its trace is wrong): keep it, and fold inside each
    child on its own. A child container (Sequential, ModuleList, ModuleDict) that the forward does
    not call — it iterates or indexes it, as ultralytics' DetectionModel does its layers — stays
    the same object, folded inside in the same way (`owner`: the forward that uses it)."""
    where = owner or _where(module, prefix)
    if owner is None:
        report.untraceable.append({"module": where, "reason": reason})
    for name, child in list(module.named_children()):
        path = f"{prefix}{name}"
        if isinstance(child, _BatchNorm) or _is_norm_module(child):
            report.kept.append(FoldRecord("fx", f"{path} ({type(child).__name__})", module=path,
                                          reason=f"called by the forward of {where}, which fx cannot trace: {reason}"))
        elif not _holds_norm(child):
            continue
        elif isinstance(child, _CONTAINERS) and path not in calls:
            _fold_inside(child, f"{path}.", reason, report, calls, owner=where)
        else:
            setattr(module, name, _fold(child, f"{path}.", report, calls))
    return module
