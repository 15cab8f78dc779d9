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

The math runs in float64, then casts back. The pass is a short pattern match over an fx graph, in
the manner of torch.fx.experimental.optimization.fuse.
"""
import copy
from dataclasses import dataclass, field

import torch
from torch import fx, nn

_BN = (nn.BatchNorm1d, nn.BatchNorm2d)
_CONV_LINEAR = (nn.Conv2d, nn.Conv1d, nn.Linear)


class FoldError(ValueError):
    """A model we refuse to fold; the message names the layer."""


@dataclass
class FoldReport:
    folded: list[dict] = field(default_factory=list)     # {"bn", "into", "direction"}
    kept: list[dict] = field(default_factory=list)       # {"bn", "reason"}
    removed_dropout: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"folded": self.folded, "kept": self.kept, "removed_dropout": self.removed_dropout}


def bn_scale_shift(bn: nn.modules.batchnorm._BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """s = γ/√(σ²+ε) and t = β − μ·s, in float64."""
    var, mean = bn.running_var.double(), bn.running_mean.double()
    gamma = bn.weight.double() if bn.affine else torch.ones_like(var)
    beta = bn.bias.double() if bn.affine else torch.zeros_like(var)
    scale = gamma / torch.sqrt(var + bn.eps)
    return scale, beta - mean * scale


def fold_backward(layer: nn.Module, bn) -> nn.Module:
    """W' = W·s per output channel, b' = (b − μ)·s + β  (= b·s + t)."""
    scale, shift = bn_scale_shift(bn)
    weight = layer.weight.double()
    bias = layer.bias.double() if layer.bias is not None else torch.zeros(weight.shape[0], dtype=torch.float64)
    folded = copy.deepcopy(layer)
    folded.weight = nn.Parameter((weight * scale.view(-1, *[1] * (weight.ndim - 1))).to(layer.weight.dtype))
    folded.bias = nn.Parameter((bias * scale + shift).to(layer.weight.dtype))
    return folded


def fold_forward(layer: nn.Module, scale: torch.Tensor, shift: torch.Tensor) -> nn.Module:
    """W' = W·s per input channel/column, b' = b + Σ W·t. `scale`/`shift` are given per input of
    `layer` (already repeated across spatial positions when a Flatten sat in between)."""
    weight = layer.weight.double()
    out_channels = weight.shape[0]
    bias = layer.bias.double() if layer.bias is not None else torch.zeros(out_channels, dtype=torch.float64)
    if isinstance(layer, nn.Linear):
        new_weight = weight * scale.view(1, -1)
        new_bias = bias + weight @ shift
    else:
        # Grouped conv: output channel o reads input channels g·k … g·k+k−1, with k = in/groups.
        in_per_group = weight.shape[1]
        group = torch.arange(out_channels) // (out_channels // layer.groups)
        channel = group.view(-1, 1) * in_per_group + torch.arange(in_per_group).view(1, -1)  # [out, in/groups]
        s, t = scale[channel], shift[channel]
        spatial = [1] * (weight.ndim - 2)
        new_weight = weight * s.view(*s.shape, *spatial)
        new_bias = bias + (weight * t.view(*t.shape, *spatial)).flatten(1).sum(1)
    folded = copy.deepcopy(layer)
    folded.weight = nn.Parameter(new_weight.to(layer.weight.dtype))
    folded.bias = nn.Parameter(new_bias.to(layer.weight.dtype))
    return folded


def _describe(modules: dict, name: str) -> str:
    return f"{name} ({type(modules[name]).__name__})"


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


def _forward_target(modules: dict, bn_node: fx.Node, scale: torch.Tensor):
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


def fold_batchnorm(model: nn.Module) -> tuple[fx.GraphModule, FoldReport]:
    """Returns an eval-mode copy of `model` with Dropout removed and every BatchNorm folded where
    that is exact, and a report of what was folded into what and which BN stayed and why."""
    model = copy.deepcopy(model).eval()
    gm = fx.symbolic_trace(model)
    modules = dict(gm.named_modules())
    report = FoldReport()

    for node in list(gm.graph.nodes):
        if isinstance(_module(modules, node), nn.Dropout):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
            report.removed_dropout.append(node.target)

    for node in list(gm.graph.nodes):
        bn = _module(modules, node)
        if not isinstance(bn, _BN):
            continue
        if bn.running_mean is None or bn.running_var is None:
            raise FoldError(f"BatchNorm {node.target!r} has track_running_stats=False: it normalizes with "
                            f"batch statistics even in eval mode, so it cannot be folded into a fixed layer")
        source = node.args[0]
        source_layer = _module(modules, source)
        if isinstance(source_layer, _CONV_LINEAR) and len(source.users) == 1:
            _replace(gm, modules, source.target, fold_backward(source_layer, bn))
            node.replace_all_uses_with(source)
            gm.graph.erase_node(node)
            report.folded.append({"bn": _describe(modules, node.target), "into": _describe(modules, source.target),
                                  "direction": "backward"})
            continue
        scale, shift = bn_scale_shift(bn)
        target, flattened, why_not = _forward_target(modules, node, scale)
        if target is None:
            report.kept.append({"bn": _describe(modules, node.target), "reason": why_not})
            continue
        layer = modules[target.target]
        if flattened:  # repeat s and t over the spatial positions, in Flatten's (C, H, W) order
            per_channel = layer.in_features // scale.numel()
            if per_channel * scale.numel() != layer.in_features:
                report.kept.append({"bn": _describe(modules, node.target), "reason": f"{target.target}.in_features is not a "
                                    f"multiple of the {scale.numel()} BN channels"})
                continue
            scale, shift = scale.repeat_interleave(per_channel), shift.repeat_interleave(per_channel)
        if scale.numel() != (layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels):
            report.kept.append({"bn": _describe(modules, node.target), "reason": f"its {scale.numel()} channels do not line up "
                                f"with the inputs of {target.target}"})
            continue
        _replace(gm, modules, target.target, fold_forward(layer, scale, shift))
        node.replace_all_uses_with(node.args[0])
        gm.graph.erase_node(node)
        report.folded.append({"bn": _describe(modules, node.target), "into": _describe(modules, target.target),
                              "direction": "forward"})

    gm.graph.lint()
    gm.recompile()
    gm.delete_all_unused_submodules()
    return gm.eval(), report


def _replace(gm: fx.GraphModule, modules: dict, name: str, new: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, attr, new)
    modules[name] = new
