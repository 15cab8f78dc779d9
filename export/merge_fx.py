"""The merge rule (export/merge.py) on PyTorch models as they come: torch.fx graphs, after the fx
fold pass (export/fold.py). No model code is called (no `reparameterize()`): the rule reads the
traced graph — nn.ConvNd and nn.AvgPoolNd modules, BatchNorm modules and F.batch_norm calls,
+ − × ÷ with constants (a layer scale), Identity/Dropout — and each block it merges becomes one
nn.ConvNd module called on the block's input.

    merge_branches(model, report, example=None, only=None) -> model   (in place; `report` gains the records)

The rule knows every value's shape from the fold pass's run of its example (or, for graphs the fold
pass did not run, from a run of `example` here, a tuple of inputs in the model's dtype).
"""
import operator

import numpy as np
import torch
from torch import fx, nn
from torch.nn import functional as F

from export import merge
from export.fold import (FoldReport, _attr, _is_norm_module, _module, _norm_of, _readers, _reads_input,
                         bn_scale_shift)
from export.fold_math import affine_of_elementwise
from export.fold_records import MergeRecord
from export.fx_trace import mistrace, record_calls
from export.merge import AFFINE, CONV, OTHER, PASS, SUM, Op

_CONVS = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}
_POOLS = {nn.AvgPool1d: 1, nn.AvgPool2d: 2, nn.AvgPool3d: 3}
_PASS = (nn.Identity, nn.modules.dropout._DropoutNd)
_ADD = {operator.add, torch.add, operator.iadd, "add", "add_"}
_SUB = {operator.sub, torch.sub, operator.isub, "sub", "sub_"}
_MUL = {operator.mul, torch.mul, operator.imul, "mul", "mul_"}
_DIV = {operator.truediv, torch.div, torch.true_divide, operator.itruediv, "div", "div_"}
_NEG = {operator.neg, torch.neg, "neg"}
_ATTENTION = {torch.matmul, torch.bmm, F.softmax, torch.softmax, "softmax", "matmul", "bmm",
              getattr(F, "scaled_dot_product_attention", None)}


def merge_branches(model: nn.Module, report: FoldReport, example: tuple | None = None, only=None) -> nn.Module:
    """Merge every block of branches of one input into one conv, in every traced graph of `model`
    (the fold pass's result: a GraphModule, or a module holding some), in place. The rule needs each
    value's shape: the fold pass noted them where it checked a trace on its example; other graphs run
    on `example` here (without it, they are left alone). `only`, a set of block names, limits the
    merges to those (the diagnosis of a failed exactness check bisects with it)."""
    graphs = [(path, gm) for path, gm in model.named_modules() if isinstance(gm, fx.GraphModule)]
    unknown = {path for path, gm in graphs if not any("fold_shape" in n.meta for n in gm.graph.nodes)}
    calls = record_calls(model, tuple(example), lambda m: isinstance(m, fx.GraphModule)) \
        if unknown and example is not None else {}
    for path, gm in graphs:
        if path in unknown and (path not in calls or calls[path][1] or mistrace(gm, *calls[path]) is not None):
            continue  # no shapes (not run, or called with keyword arguments): nothing merged there
        _merge_graph(gm, f"{path}." if path else "", report, only)
    return model


def _merge_graph(gm: fx.GraphModule, prefix: str, report: FoldReport, only) -> None:
    names = {r.module: r.bn for r in report.folded + report.kept if r.module}  # the fold pass's names of BNs
    view = FxView(gm, prefix, names)
    explained, refusals, blocks = set(), [], []
    for node in reversed(list(gm.graph.nodes)):
        if node in view.erased or node in explained:
            continue
        found = merge.match(view, node)
        if isinstance(found, merge.Refusal):  # refused for one branch: the sums inside may merge without it
            refusals.append(found)
            if found.term is None:
                explained.update(found.nodes)
        elif found is not None:
            explained.update(found.nodes)
            if only is None or found.name in only:
                layers = tuple(view.prefix + n.target for n in found.convs)
                layer, into = _apply(gm, view, found)
                blocks.append(found)
                report.merged.append(MergeRecord(
                    "fx", found.name, found.input, tuple(found.branches), into, view.prefix + layer, layers,
                    tuple(found.after), tuple(op.what for op in found.bns), tuple(op.module for op in found.bns if op.module)))
    report.merge_refused += [MergeRecord("fx", r.name, reason=r.reason) for r in merge.reported(refusals, blocks)]
    merged = {op.module for b in blocks for op in b.bns if op.module}
    report.kept = [r for r in report.kept if r.module not in merged]  # merged: no longer kept
    gm.graph.lint()
    gm.recompile()
    gm.delete_all_unused_submodules()


# --- the view: each fx node as an Op ------------------------------------------------------------------

class FxView:
    asymmetric_pads = False  # a torch Conv pads both ends of an axis alike

    def __init__(self, gm: fx.GraphModule, prefix: str, names: dict):
        self.gm, self.prefix, self.modules, self.names = gm, prefix, dict(gm.named_modules()), names
        self.erased: set = set()
        self._ops: dict = {}

    def readers(self, node) -> int:
        return len(_readers(node)) if isinstance(node, fx.Node) else 0

    def producers(self, node) -> list:
        return node.all_input_nodes if isinstance(node, fx.Node) else []

    def shape(self, node):
        return node.meta.get("fold_shape") if isinstance(node, fx.Node) else None

    def op(self, node) -> Op:
        if node not in self._ops:
            try:
                self._ops[node] = self._op(node)
            except _NotLinear as e:
                m = _module(self.modules, node)
                self._ops[node] = Op(OTHER, what=self._what(node), why=str(e),
                                     branch_op=type(m) in _CONVS or type(m) in _POOLS or bool(getattr(m, "training", False)))
        return self._ops[node]

    def block_name(self, nodes, root) -> str:
        """The modules' common path (when it is one module's own path: its parent, which also holds
        the sum), else the root node's name."""
        paths = {self.prefix + n.target for n in nodes if n.op == "call_module"}
        paths |= {self.op(n).module for n in nodes if self.op(n).module}
        parts = [p.split(".") for p in paths]
        common = []
        for level in zip(*parts) if parts else ():
            if len(set(level)) != 1:
                break
            common.append(level[0])
        if ".".join(common) in paths:
            common = common[:-1]
        return ".".join(common) if common else f"{self.prefix}{root.name}"

    def _what(self, node) -> str:
        if not isinstance(node, fx.Node):
            return repr(node)
        m = _module(self.modules, node)
        if m is not None:
            return f"{self.prefix}{node.target} ({type(m).__name__})"
        if node.op == "placeholder":
            return f"the input {node.target}"
        return f"{self.prefix}{node.name} ({getattr(node.target, '__name__', node.target)})"

    def _op(self, node) -> Op:
        if not isinstance(node, fx.Node) or node.op in ("placeholder", "get_attr", "output"):
            raise _NotLinear("not an op")
        what, m = self._what(node), _module(self.modules, node)
        if m is not None:
            return self._module_op(node, m, what)
        norm = _norm_of(self.gm, self.gm, self.modules, node, self.prefix) if node.op == "call_function" else None
        if norm is not None and norm.scale is not None:  # (the graph's copy of a module has lost its class: the fold's name)
            return Op(AFFINE, (node.args[0],), scale=norm.scale, shift=norm.shift, what=self.names.get(norm.module, norm.name),
                      module=norm.module, batchnorm=True)
        target = node.target
        if target in _ATTENTION:
            raise _NotLinear(f"attention ({what})")
        args = list(node.args)
        if node.op == "call_method" and isinstance(target, str) and target.endswith("_") \
                and isinstance(args[0], fx.Node) and len(_readers(args[0])) != 1:
            raise _NotLinear(f"an in-place {target} on a value others read too ({what})")
        if target in _ADD | _SUB and len(args) == 2 and node.kwargs.get("alpha", 1) == 1:
            tensors = [isinstance(a, fx.Node) and _reads_input(a) for a in args]
            sign = 1 if target in _ADD else -1
            if all(tensors):
                return Op(SUM, tuple(args), (1, sign), what=what)
            return self._affine(node, args, tensors, "Add" if sign == 1 else "Sub", what)
        if target in _MUL | _DIV and len(args) == 2:
            tensors = [isinstance(a, fx.Node) and _reads_input(a) for a in args]
            if all(tensors):
                raise _NotLinear(f"a product of two tensors, as in SE or attention ({what})")
            return self._affine(node, args, tensors, "Mul" if target in _MUL else "Div", what)
        if target in _NEG and len(args) == 1:
            return Op(AFFINE, (args[0],), scale=-np.ones(1), shift=np.zeros(1), what=what)
        name = getattr(target, "__name__", str(target))
        raise _NotLinear(f"an activation ({name})" if _is_activation(name) else f"{what}, which the merge does not read as linear")

    def _module_op(self, node, m, what: str) -> Op:
        x = node.args[0] if node.args else None
        if isinstance(m, _PASS):
            return Op(PASS, (x,), what=what)
        if _is_norm_module(m):
            scale, shift = bn_scale_shift(m)
            return Op(AFFINE, (x,), scale=scale, shift=shift, what=what, module=self.prefix + node.target,
                      batchnorm=True)
        if type(m) in _CONVS:
            return Op(CONV, (x,), conv=self._conv(m), what=f"{what[:-1]} {'x'.join(map(str, m.kernel_size))})",
                      module=self.prefix + node.target)
        if type(m) in _POOLS:
            return Op(CONV, (x,), conv=self._pool(m, x, what), what=what, module=self.prefix + node.target)
        if m.training:
            raise _NotLinear(f"{what} in training mode")
        kind = type(m).__module__.startswith("torch.nn.modules.activation") or _is_activation(type(m).__name__)
        raise _NotLinear(f"an activation ({what})" if kind else f"{what}, which the merge does not read as linear")

    def _conv(self, m) -> merge.Conv:
        if m.padding_mode != "zeros":
            raise _NotLinear(f"a conv padded with {m.padding_mode!r}, not zeros")
        k, d = m.kernel_size, m.dilation
        if isinstance(m.padding, str):  # "same": torch pads the extra one at the end; "valid": none
            totals = [d_ * (k_ - 1) if m.padding == "same" else 0 for k_, d_ in zip(k, d)]
            pads = tuple((t // 2, t - t // 2) for t in totals)
        else:
            pads = tuple((p, p) for p in m.padding)
        weight = m.weight.detach().double().numpy()
        bias = None if m.bias is None else m.bias.detach().double().numpy()
        return merge.Conv(weight, bias, tuple(m.stride), tuple(d), pads, m.groups)

    def _pool(self, m, x, what: str) -> merge.Conv:
        dims = _POOLS[type(m)]
        k, s, p = (_tuple(v, dims) for v in (m.kernel_size, m.stride or m.kernel_size, m.padding))
        if m.ceil_mode:
            raise _NotLinear(f"an AvgPool with ceil_mode=True ({what}): its last window may be partial")
        if not m.count_include_pad and any(p):
            raise _NotLinear(f"an AvgPool that excludes its padding from the average ({what}, count_include_pad=False)")
        shape = self.shape(x)
        if shape is None:
            raise _NotLinear(f"{what} on a value of unknown shape")
        divisor = getattr(m, "divisor_override", None) or int(np.prod(k))
        weight = np.full((shape[1], 1, *k), 1.0 / divisor)
        return merge.Conv(weight, None, s, (1,) * dims, tuple((p_, p_) for p_ in p), shape[1], diagonal=True)

    def _affine(self, node, args, tensors, op: str, what: str) -> Op:
        """x op c (or c op x) with a constant c: per channel, or one value."""
        if sum(tensors) != 1:
            raise _NotLinear(f"{what} of constants")
        data = args[tensors.index(True)]
        const_first = tensors[0] is False
        c = _constant(self.gm, args[0] if const_first else args[1])
        shape = self.shape(node)
        if c is None or shape is None or c.ndim > len(shape):
            raise _NotLinear(f"{what}: its other operand is not a constant this rule reads")
        c = c.reshape((1,) * (len(shape) - c.ndim) + c.shape)
        if c.shape[0] != 1 or any(n != 1 for n in c.shape[2:]) or c.shape[1] not in (1, shape[1]):
            raise _NotLinear(f"{what}: its constant varies along another axis than the channels")
        if self.shape(data) != shape:
            raise _NotLinear(f"{what} broadcasts its input to another shape")
        affine = affine_of_elementwise(op, c.reshape(-1), const_first)
        if affine is None:
            raise _NotLinear(f"{what} is not affine in its input")
        return Op(AFFINE, (data,), scale=affine[0], shift=affine[1], what=what)


class _NotLinear(Exception):
    pass


def _is_activation(name: str) -> bool:
    return any(a in name.lower() for a in ("relu", "gelu", "silu", "sigmoid", "tanh", "swish", "mish", "elu",
                                            "softplus", "hardtanh", "clamp", "clip", "act"))


def _tuple(v, n: int) -> tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * n


def _constant(gm: fx.GraphModule, value):
    """The value of a constant argument (a number, or a node that reads no input), float64; None if not one."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return np.asarray(float(value))
    if not isinstance(value, fx.Node) or _reads_input(value):
        return None
    try:
        with torch.no_grad():
            out = _evaluate(gm, value, {})
    except Exception:  # noqa: BLE001 -- anything it cannot compute is no constant to it
        return None
    return out.detach().double().numpy() if isinstance(out, torch.Tensor) else (
        np.asarray(float(out)) if isinstance(out, (int, float)) else None)


def _evaluate(gm, node, memo: dict):
    if not isinstance(node, fx.Node):
        if isinstance(node, (list, tuple)):
            return type(node)(_evaluate(gm, n, memo) for n in node)
        return node
    if node not in memo:
        args = [_evaluate(gm, a, memo) for a in node.args]
        kwargs = {k: _evaluate(gm, v, memo) for k, v in node.kwargs.items()}
        if node.op == "get_attr":
            memo[node] = _attr(gm, node.target)
        elif node.op == "call_function":
            memo[node] = node.target(*args, **kwargs)
        elif node.op == "call_method":
            memo[node] = getattr(args[0], node.target)(*args[1:], **kwargs)
        elif node.op == "call_module":
            memo[node] = gm.get_submodule(node.target)(*args, **kwargs)
        else:
            raise ValueError(node.op)
    return memo[node]


# --- the rewrite ---------------------------------------------------------------------------------------

def _apply(gm: fx.GraphModule, view: FxView, block: merge.Block) -> tuple[str, str]:
    """Replace the block's nodes by one conv module called on x; returns its path in `gm` and the conv
    as people read it."""
    conv, x = block.conv, block.x
    dims = conv.weight.ndim - 2
    dtype = x.meta.get("fold_dtype", torch.get_default_dtype())
    layer = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[dims - 1](
        conv.weight.shape[1] * conv.groups, conv.weight.shape[0], conv.weight.shape[2:], stride=conv.stride,
        padding=tuple(b for b, _ in conv.pads), dilation=conv.dilation, groups=conv.groups, bias=True, dtype=dtype)
    layer.weight = nn.Parameter(torch.from_numpy(conv.weight).to(dtype))
    layer.bias = nn.Parameter(torch.from_numpy(conv.bias).to(dtype))
    local = block.name[len(view.prefix):] if block.name.startswith(view.prefix) else ""
    base = f"{local}.merged" if local and local != block.root.name else f"merged_{block.root.name}"
    name, i = base, 1
    while _exists(gm, name):
        name, i = f"{base}_{i}", i + 1
    gm.add_submodule(name, layer)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    nodes = sorted(set(block.nodes), key=order.__getitem__)
    with gm.graph.inserting_before(nodes[0]):
        new = gm.graph.call_module(name, (x,))
    new.meta.update({k: v for k, v in block.root.meta.items() if k in ("fold_shape", "fold_dtype")})
    block.root.replace_all_uses_with(new)
    inputs = set()
    for node in reversed(nodes):
        inputs.update(n for n in node.all_input_nodes if n not in block.nodes)
        node.replace_all_uses_with(new)  # what is left: readers of its shape only (x.ndim, x.shape)
        gm.graph.erase_node(node)
        view.erased.add(node)
    _erase_unused_constants(gm, inputs, view)
    size = "x".join(map(str, conv.weight.shape[2:]))
    return name, f"{view.prefix}{name} ({type(layer).__name__} {size}" + (f", groups {conv.groups})" if conv.groups > 1 else ")")


def _exists(gm, name: str) -> bool:
    try:
        gm.get_submodule(name)
        return True
    except AttributeError:
        return False


def _erase_unused_constants(gm: fx.GraphModule, candidates: set, view: FxView) -> None:
    """Erase the constants (get_attr and what is computed from them alone) that fed the block only."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    todo = sorted((n for n in candidates if n in order), key=order.__getitem__)
    while todo:
        node = todo.pop()
        if node.users or node.op in ("placeholder", "output") or _reads_input(node) or node.op == "call_module":
            continue
        more = [n for n in node.all_input_nodes if n in order]
        gm.graph.erase_node(node)
        view.erased.add(node)
        todo = sorted(set(todo) | set(more), key=order.__getitem__)
