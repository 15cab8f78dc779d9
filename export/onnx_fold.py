"""BatchNorm folding inside ONNX graphs from any exporter (Keras 3, tf2onnx, torch): issue 9.

    fold_onnx(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict]

returns a new model (the input is not modified; float32 and float64 graphs alike, each folded in its
own dtype) and a report:

    folded              [FoldRecord]                   per-channel affine chains folded into a layer (or,
                                                       after a Concat, into several: `layers` names them all)
    kept                [FoldRecord]                   per-channel affine chains left in place, and why
    removed             [{"node", "op", "why"}]        Identity, Dropout, no-op Cast, merged bias Add, scalar
                                                       affine nodes folded (input scaling), Pad moved into a
                                                       Conv, Transpose folded into weights
    kept_affine         [{"nodes", "reason"}]          scalar affine chains left in place (input scaling
                                                       such as (x - mean) / std: not a BatchNorm), and why
    transposes_removed  int                            Transpose nodes gone (pairs cancelled, folded)
    constants_folded    int                            nodes evaluated away (constant/shape arithmetic)
    nodes_before / nodes_after                         {op_type: count}
    bn_derived_before / bn_derived_after               BatchNormalization + constant Sub/Mul/Div nodes

`kind` is "batchnorm" for a chain with a BatchNormalization node or a per-channel Sub (the mean
subtraction of Keras' Sub → Mul → Add), "affine" otherwise (ConvNeXt's layer scale, a per-channel
Mul/Add: folded the same way, not a BatchNorm); `nodes` lists the chain's affine nodes; `module` is the
torch module of its BatchNormalization node (or last node) when torch.onnx's name scopes are there.
The report holds FoldRecords (export/fold_records.py, as the fx pass's); `as_dict` writes them.

An *affine chain* is a run of nodes, each read by the next one only, made of per-channel affine
maps — BatchNormalization, or Add/Sub/Mul/Div with a constant operand that does not vary along the
batch axis (Keras writes a BatchNorm as Sub → Mul → Add in NHWC) — and of the ops such a map passes
through exactly: Transpose, Reshape/Flatten that keep the batch axis (the map is carried element by
element, so NHWC flattening is exact), and MaxPool when every scale is > 0 and constant over space.
Identity, Dropout and float→float Casts are removed first. The whole chain is one map
y = L(x)·S + T (L the layout ops); it is folded, with the math of export/fold_math.py, into the
layers of the LAYERS table:

  backward into the Conv / ConvTranspose / Gemm / MatMul that produces the chain's input, when that
           output is read by the chain alone (a MatMul keeps one Add for its bias); or, when the
           input is a Concat of such layers' outputs (each read by the Concat alone) along their
           channel axis, into each of them, its slice of S and T;
  forward  into the Conv / Gemm / MatMul that reads the chain's output, when nothing else reads it and
           the Conv is not zero-padded (the padded zeros would become the shift). Never into a
           ConvTranspose (CONV_TRANSPOSE_FORWARD says why).

Otherwise it stays, and "kept" says why. A chain is *BN-like* when it holds a BatchNormalization
node or a constant with more than one value (per channel); a chain of scalar constants only (input
normalization, x/255) is folded by the same rules but reported under "removed" / "kept_affine",
so that "folded" and "kept" speak of per-channel maps alone. Then Transposes are moved down through elementwise ops,
Pad and reductions until NHWC↔NCHW pairs meet and cancel; a Transpose right before a Flatten into a
MatMul/Gemm becomes a row permutation of the weights; zero Pads move into the next Conv. Graph
inputs and outputs keep their names, types and shapes; the result passes onnx.checker (full_check).
"""
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from export.fold_math import (CONV_TRANSPOSE_FORWARD, affine_of_bn, affine_of_elementwise, compose_affine,
                              fold_backward_arrays, fold_forward_arrays)
from export.fold_records import FoldRecord, torch_module_of
from export.onnx_graph import (FLOATS, Graph, attr, bn_derived_nodes, clean, describe, fuse_pad_into_conv,
                               node_counts, optimize_transposes, set_attr)

AFFINE_BINARY = ("Add", "Sub", "Mul", "Div")


@dataclass(frozen=True)
class OnnxLayer:
    """How an ONNX layer holds its per-channel linear map, for folding a BN into it (the ONNX pass's
    counterpart of export/fold.py's LAYERS)."""
    out_axis: int                  # weight axis of its output channels
    in_axis: int                   # weight axis of its input channels
    channel_axis: int              # the channel axis of the tensors it reads and writes
    grouped: bool = False          # `group` attribute; weight axis 1 then holds one group's channels
    no_forward: str | None = None  # why a BN before it never folds into it (None: it does, unpadded)


# Conv [out, in/group, k…]; ConvTranspose [in, out/group, k…]; Gemm B [K, N] or, with transB, [N, K];
# MatMul B [K, N] on the last axis (its bias is the Add after it).
LAYERS = {"Conv": OnnxLayer(0, 1, 1, grouped=True),
          "ConvTranspose": OnnxLayer(1, 0, 1, grouped=True, no_forward=CONV_TRANSPOSE_FORWARD),
          "Gemm": OnnxLayer(1, 0, 1), "Gemm transB": OnnxLayer(0, 1, 1),
          "MatMul": OnnxLayer(1, 0, -1)}


def layer_rule(node) -> OnnxLayer | None:
    """The LAYERS entry of a node, None when a BN does not fold into it."""
    return LAYERS.get("Gemm transB" if node.op_type == "Gemm" and attr(node, "transB", 0) else node.op_type)


def _channels(layer, w, axis: int) -> int:
    """The channels weight axis `axis` stands for (all groups')."""
    rule = layer_rule(layer)
    return w.shape[axis] * (attr(layer, "group", 1) if rule.grouped and axis == 1 else 1)


def _groups(layer) -> int:
    return attr(layer, "group", 1) if layer_rule(layer).grouped else 1


def fold_onnx(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict]:
    graph = Graph(model)
    report = {"folded": [], "kept": [], "removed": [], "kept_affine": [], "transposes_removed": 0, "constants_folded": 0,
              "nodes_before": node_counts(model), "bn_derived_before": bn_derived_nodes(model)}
    report["removed"] += clean(graph)
    _fold_affine_chains(graph, report)
    report["removed"] += clean(graph)
    report["removed"] += fuse_pad_into_conv(graph)  # first, so a Transpose does not move between them
    optimize_transposes(graph)
    report["removed"] += _fold_transpose_into_flatten(graph)
    report["removed"] += fuse_pad_into_conv(graph)
    report["removed"] += clean(graph)
    report["constants_folded"] = graph.constants_folded

    folded = graph.to_model()
    onnx.checker.check_model(folded, full_check=True)
    _check_signature(model, folded)
    report["nodes_after"] = node_counts(folded)
    report["transposes_removed"] = report["nodes_before"].get("Transpose", 0) - report["nodes_after"].get("Transpose", 0)
    report["bn_derived_after"] = bn_derived_nodes(folded)
    return folded, report


def _check_signature(original: onnx.ModelProto, folded: onnx.ModelProto) -> None:
    for kind in ("input", "output"):
        a, b = getattr(original.graph, kind), getattr(folded.graph, kind)
        if [x.SerializeToString() for x in a] != [x.SerializeToString() for x in b]:
            raise AssertionError(f"fold_onnx changed the graph {kind}s")


# --- one node as an affine map --------------------------------------------------------------------

def _data_input(graph: Graph, node) -> str:
    if node.op_type in AFFINE_BINARY:
        return node.input[1] if graph.const(node.input[0]) is not None else node.input[0]
    return node.input[0]


def _affine(graph: Graph, node):
    """(S, T) of a node that is an affine map of its data input x, shaped to broadcast over x with
    size 1 on the batch axis (float64); None when it is not one."""
    x = _data_input(graph, node)
    shape = graph.shape(x)
    if shape is None or len(shape) < 2 or graph.elem_type(x) not in FLOATS or graph.elem_type(node.output[0]) != graph.elem_type(x):
        return None
    rank = len(shape)
    if node.op_type == "BatchNormalization":
        if attr(node, "training_mode", 0) or any(graph.uses(o) for o in node.output[1:] if o):
            return None
        values = [graph.const(i) for i in node.input[1:5]]
        if any(v is None for v in values):
            return None
        scale, shift = affine_of_bn(*values, eps=attr(node, "epsilon", 1e-5))
        view = (1, -1) + (1,) * (rank - 2)
        return scale.reshape(view), shift.reshape(view)
    if node.op_type not in AFFINE_BINARY or len(node.input) != 2:
        return None
    const_first = graph.const(node.input[0]) is not None
    c = graph.const(node.input[0] if const_first else node.input[1])
    if c is None or graph.const(x) is not None or c.ndim > rank:
        return None
    c = c.reshape((1,) * (rank - c.ndim) + c.shape)
    # batch-independent, and no broadcasting that would enlarge x
    if c.shape[0] != 1 or any(d != 1 and d != s for d, s in zip(c.shape[1:], shape[1:])):
        return None
    return affine_of_elementwise(node.op_type, c, const_first)


def _kind(graph: Graph, node) -> str | None:
    """What a node is inside an affine chain: "affine", "layout", "maxpool", or None."""
    op = node.op_type
    if op in AFFINE_BINARY + ("BatchNormalization",):
        return "affine" if _affine(graph, node) is not None else None
    if op == "Transpose":
        perm = attr(node, "perm")
        return "layout" if perm is not None and perm[0] == 0 else None
    if op in ("Reshape", "Flatten"):
        return "layout" if _reshape_shapes(graph, node) is not None else None
    if op == "MaxPool":
        extra = len(node.output) > 1 and node.output[1] and graph.uses(node.output[1])
        shape = graph.shape(node.input[0])
        return "maxpool" if not extra and shape is not None and len(shape) >= 3 else None
    return None


def _reshape_shapes(graph: Graph, node):
    """(in, out) static shapes without the batch axis, for a Reshape/Flatten that keeps axis 0 as the
    batch and so keeps each item's elements in order; None otherwise."""
    a, b = graph.shape(node.input[0]), graph.shape(node.output[0])
    if a is None or b is None or len(a) < 1 or len(b) < 1 or a[0] is None or a[0] != b[0]:
        return None
    if node.op_type == "Flatten" and attr(node, "axis", 1) != 1:
        return None
    if not all(isinstance(d, int) and d > 0 for d in a[1:] + b[1:]) or np.prod(a[1:]) != np.prod(b[1:]):
        return None
    return tuple(a[1:]), tuple(b[1:])


# --- chains ----------------------------------------------------------------------------------------

def _chain(graph: Graph, anchor) -> list:
    """The longest run through `anchor` of chain nodes, each output read only by the next node."""
    chain = [anchor]
    while True:
        x = _data_input(graph, chain[0])
        p = graph.producer.get(x)
        if p is None or graph.uses(x) != 1 or _kind(graph, p) is None:
            break
        chain.insert(0, p)
    while True:
        y = chain[-1].output[0]
        c = graph.only_consumer(y)
        if c is None or _kind(graph, c) is None or _data_input(graph, c) != y:
            break
        chain.append(c)
    return chain


def _compress(a: np.ndarray) -> np.ndarray:
    """Shrink every axis along which `a` is constant to size 1 (so per-channel maps stay small)."""
    for axis in range(a.ndim):
        if a.shape[axis] > 1 and np.all(a == a.take([0], axis=axis)):
            a = a.take([0], axis=axis)
    return a


def _transport(graph: Graph, node, st, forward: bool):
    """Carry (S, T) through a layout op, from its input's coordinates to its output's (or back)."""
    if node.op_type == "Transpose":
        perm = attr(node, "perm")
        perm = perm if forward else list(np.argsort(perm))
        return tuple(a.transpose(perm) for a in st)
    src, dst = _reshape_shapes(graph, node)
    src, dst = (src, dst) if forward else (dst, src)
    return tuple(_compress(np.broadcast_to(a, (1,) + src).reshape((1,) + dst)) for a in st)


def _through_maxpool(node, st) -> str | None:
    """Why an affine map cannot move across this MaxPool (None when it can)."""
    s, t = (_compress(a) for a in st)
    if any(d != 1 for a in (s, t) for d in a.shape[2:]):
        return f"its scale/shift varies across spatial positions, so it does not commute with {describe(node)}"
    if not np.all(s > 0):
        return (f"{int((s <= 0).sum())} of its per-channel scales are <= 0, so it does not commute with "
                f"{describe(node)} (max would become min)")
    return None


def _accumulate(graph: Graph, chain, forward: bool):
    """The chain as one map in the coordinates of its last output (forward) or first input (backward):
    ((S, T), None), or (None, why not)."""
    start = chain[-1].output[0] if not forward else _data_input(graph, chain[0])
    if graph.shape(start) is None:
        return None, f"the shape of {start} is unknown"
    rank = len(graph.shape(start))
    st = (np.ones((1,) * rank), np.zeros((1,) * rank))
    for node in (chain if forward else reversed(chain)):
        kind = _kind(graph, node)
        if kind == "affine":
            own = _affine(graph, node)
            st = compose_affine(st, own) if forward else compose_affine(own, st)
            st = tuple(_compress(np.asarray(a)) for a in st)
        elif kind == "layout":
            st = _transport(graph, node, st, forward)
        elif kind == "maxpool":
            why = _through_maxpool(node, st)
            if why:
                return None, why
    return st, None


def _per_axis(a: np.ndarray, axis: int, size: int):
    """`a` as one value per index of `axis` (length `size`), or None if it varies along another axis."""
    a = _compress(a)
    axis = axis % a.ndim
    if any(d != 1 for i, d in enumerate(a.shape) if i != axis) or a.shape[axis] not in (1, size):
        return None
    return np.broadcast_to(a.reshape(-1), (size,)).copy()


# --- folding into a layer -----------------------------------------------------------------------------

def _weights(graph: Graph, layer):
    """(W, bias or None) of a Conv/Gemm/MatMul with constant weights, alpha/beta applied; bias as 1-D
    per output. None when the weights are not constants (or the bias is not per output)."""
    w = graph.const(layer.input[1]) if len(layer.input) > 1 else None
    if w is None or graph.const(layer.input[0]) is not None or w.dtype not in (np.float32, np.float64):
        return None
    if layer.op_type == "MatMul":
        return (w, None) if w.ndim == 2 else None
    b = graph.const(layer.input[2]) if len(layer.input) > 2 and layer.input[2] else None
    if len(layer.input) > 2 and layer.input[2] and b is None:
        return None
    if layer.op_type in ("Conv", "ConvTranspose"):
        return w, b
    n = w.shape[0] if attr(layer, "transB", 0) else w.shape[1]
    if b is not None:
        b = np.asarray(b, dtype=np.float64) * attr(layer, "beta", 1.0)
        if b.ndim > 2 or (b.ndim == 2 and b.shape[0] != 1) or b.size not in (1, n):
            return None
        b = np.broadcast_to(b.reshape(-1), (n,))
    return np.asarray(w, dtype=np.float64) * attr(layer, "alpha", 1.0), b


def _set_weights(graph: Graph, layer, w: np.ndarray, b: np.ndarray, new_bias_add: bool = False) -> None:
    """Write folded weights back (new initializers: the old ones may be shared with other nodes). A
    MatMul's bias goes into the Add after it, or into a new Add (always when `new_bias_add`)."""
    dtype = graph.const(layer.input[1]).dtype  # float32, or float64 in the exactness check
    layer.input[1] = graph.add_const(w.astype(dtype), f"{layer.name or layer.op_type}.weight")
    if layer.op_type == "MatMul":
        _set_matmul_bias(graph, layer, b, new_bias_add)
    else:
        bias = graph.add_const(b.astype(dtype), f"{layer.name or layer.op_type}.bias")
        if len(layer.input) > 2:
            layer.input[2] = bias
        else:
            layer.input.append(bias)
        if layer.op_type == "Gemm":
            set_attr(layer, "alpha", 1.0)
            set_attr(layer, "beta", 1.0)
    graph.refresh()


def _matmul_bias(graph: Graph, layer):
    """The Add right after a MatMul that holds its bias (a constant along the last axis), or None."""
    add = graph.only_consumer(layer.output[0])
    if add is None or add.op_type != "Add" or len(add.input) != 2:
        return None, None
    other = add.input[1] if add.input[0] == layer.output[0] else add.input[0]
    c = graph.const(other)
    n = graph.const(layer.input[1]).shape[1]
    if c is None or c.dtype != graph.const(layer.input[1]).dtype or c.ndim > len(graph.shape(layer.output[0]) or ()):
        return None, None
    per = _per_axis(c.reshape((1,) * (len(graph.shape(layer.output[0])) - c.ndim) + c.shape), -1, n) \
        if c.size in (1, n) else None
    return (add, per) if per is not None else (None, None)


def _set_matmul_bias(graph: Graph, layer, b: np.ndarray, new_bias_add: bool) -> None:
    add = None if new_bias_add else _matmul_bias(graph, layer)[0]
    dtype = graph.const(layer.input[1]).dtype
    if add is not None:
        index = 1 if add.input[0] == layer.output[0] else 0
        add.input[index] = graph.add_const(b.astype(dtype), f"{layer.name or 'MatMul'}.bias")
    elif np.any(b != 0):
        bias = graph.add_const(b.astype(dtype), f"{layer.name or 'MatMul'}.bias")
        node = helper.make_node("Add", [layer.output[0], bias], [graph.fresh(layer.output[0])],
                                name=graph.fresh(f"{layer.name or 'MatMul'}/bias"))
        graph.insert_after(layer.output[0], node)


def _weights_and_map(graph: Graph, chain, layer, forward: bool):
    """((W, bias), (S, T), None) for folding `chain` into `layer`, or ((None, None), None, why not)."""
    weights = _weights(graph, layer)
    if weights is None:
        return (None, None), None, f"{describe(layer)} has no constant weights (or a bias that is not per output) to fold into"
    st, why = _accumulate(graph, chain, forward=forward)
    return (weights if st is not None else (None, None)), st, why


def _out_channels(layer, w) -> tuple[int, int, int, int]:
    """(weight axis of the output channels, channel axis of the output, output channels, groups). A
    MatMul's bias Add right after it is part of the chain, so its fold starts from no bias."""
    rule = layer_rule(layer)
    return rule.out_axis, rule.channel_axis, _channels(layer, w, rule.out_axis), _groups(layer)


def _readers(graph: Graph, name: str) -> int:
    """The readers of `name`'s values: a Shape node reads only its shape, which a fold keeps."""
    return graph.uses(name) - sum(n.op_type == "Shape" for n in graph.consumers.get(name, []))


def _fold_backward(graph: Graph, chain, layer) -> str | None:
    """Fold the chain into the layer that produces its input. Returns why not, or None when done."""
    x0 = layer.output[0]
    if _readers(graph, x0) != 1:
        return f"the output of {describe(layer)} is read by {_readers(graph, x0)} consumers; a fold would change the others"
    (w, b), st, why = _weights_and_map(graph, chain, layer, forward=False)
    if why:
        return why
    out_axis, axis, n, groups = _out_channels(layer, w)
    s, t = (_per_axis(a, axis, n) for a in st)
    if s is None or t is None:
        return f"its scale/shift is not one value per output channel of {describe(layer)}"
    _set_weights(graph, layer, *fold_backward_arrays(w, b, s, t, out_axis=out_axis, groups=groups), new_bias_add=True)
    return None


def _fold_backward_concat(graph: Graph, chain, concat) -> tuple[list, str | None]:
    """Fold the chain into the layers whose outputs the Concat joins, each its slice of the channels:
    (the layers, None), or ([], why not)."""
    out, shape = concat.output[0], graph.shape(concat.output[0])
    if _readers(graph, out) != 1:
        return [], f"the output of {describe(concat)} is read by {_readers(graph, out)} consumers; a fold would change the others"
    if shape is None:
        return [], f"the shape of {out} is unknown"
    axis = attr(concat, "axis") % len(shape)
    parts = []
    for i, name in enumerate(concat.input):
        layer = graph.producer.get(name)
        if layer is None or layer_rule(layer) is None or list(concat.input).count(name) > 1:
            return [], f"input {i} of {describe(concat)}, {name}, is not the output of a Conv/ConvTranspose/Gemm/MatMul"
        if _readers(graph, name) != 1:
            return [], f"the output of {describe(layer)} is read by {_readers(graph, name)} consumers; a fold would change the others"
        weights = _weights(graph, layer)
        if weights is None:
            return [], f"{describe(layer)} has no constant weights (or a bias that is not per output) to fold into"
        out_axis, channel_axis, n, groups = _out_channels(layer, weights[0])
        if channel_axis % len(shape) != axis:
            return [], f"{describe(concat)} does not join the channel axis of {describe(layer)}"
        parts.append((layer, weights, out_axis, n, groups))
    st, why = _accumulate(graph, chain, forward=False)
    if why:
        return [], why
    total = sum(n for *_, n, _ in parts)
    s, t = (_per_axis(a, axis, total) for a in st)
    if s is None or t is None:
        return [], f"its scale/shift is not one value per channel of {describe(concat)}"
    start = 0
    for layer, (w, b), out_axis, n, groups in parts:
        new = fold_backward_arrays(w, b, s[start:start + n], t[start:start + n], out_axis=out_axis, groups=groups)
        _set_weights(graph, layer, *new, new_bias_add=True)
        start += n
    return [layer for layer, *_ in parts], None


def _padded(conv) -> bool:
    return any(attr(conv, "pads", [])) or attr(conv, "auto_pad", b"NOTSET") not in (b"NOTSET", b"VALID", "NOTSET", "VALID")


def _fold_forward(graph: Graph, chain, layer) -> str | None:
    """Fold the chain into the layer that reads its output. Returns why not, or None when done."""
    rule = layer_rule(layer)
    if rule.no_forward:
        return f"{rule.no_forward} ({describe(layer)})"
    if layer.input[0] != chain[-1].output[0]:
        return f"its output is not the data input of {describe(layer)}"
    if layer.op_type == "Conv" and _padded(layer):
        return (f"the next layer {describe(layer)} is zero-padded: its padded zeros would become the BN "
                f"shift after folding")
    if layer.op_type == "Gemm" and attr(layer, "transA", 0):
        return f"the next layer {describe(layer)} transposes its input (transA=1)"
    (w, b), st, why = _weights_and_map(graph, chain, layer, forward=True)
    if why:
        return why
    if layer.op_type == "MatMul":
        b = _matmul_bias(graph, layer)[1]
    s, t = (_per_axis(a, rule.channel_axis, _channels(layer, w, rule.in_axis)) for a in st)
    if s is None or t is None:
        return f"its scale/shift does not line up with the input channels of {describe(layer)}"
    new_w, new_b = fold_forward_arrays(w, b, s, t, out_axis=rule.out_axis, in_axis=rule.in_axis, groups=_groups(layer))
    _set_weights(graph, layer, new_w, new_b)
    return None


def _names(nodes) -> str:
    return ", ".join(describe(n) for n in nodes)


def _fold_affine_chains(graph: Graph, report: dict) -> None:
    anchors = [n for n in graph.nodes if _kind(graph, n) == "affine"]
    done = set()
    for anchor in anchors:
        if id(anchor) in done or anchor not in graph.nodes or _kind(graph, anchor) != "affine":
            continue
        chain = _chain(graph, anchor)
        affine = [n for n in chain if _kind(graph, n) == "affine"]
        done.update(id(n) for n in affine)
        source = graph.producer.get(_data_input(graph, chain[0]))
        bias_only = all(n.op_type == "Add" for n in affine)
        bn_like = any(_bn_like(graph, n) for n in affine)
        if bias_only and len(chain) == 1 and source is not None and source.op_type == "MatMul":
            continue  # the MatMul's own bias: already the form a fold would produce
        why_back = why_forward = None
        if source is not None and (layer_rule(source) is not None or source.op_type == "Concat"):
            if source.op_type == "Concat":
                layers, why_back = _fold_backward_concat(graph, chain, source)
            else:
                layers, why_back = [source], _fold_backward(graph, chain, source)
            if why_back is None:
                _remove(graph, affine)
                if bias_only and source.op_type != "Concat":
                    report["removed"] += [{"node": n.name or n.output[0], "op": "Add",
                                           "why": f"bias merged into {describe(source)}"} for n in affine]
                else:
                    _report_fold(graph, report, affine, bn_like, layers, "backward")
                continue
        end = chain[-1].output[0]
        target = graph.only_consumer(end)
        if target is None:
            why_forward = (f"{end} is a graph output" if end in graph.output_names else
                           f"{end} feeds {graph.uses(end)} consumers; a fold would change the others")
        elif layer_rule(target) is None:
            why_forward = f"it is followed by {describe(target)}, which a per-channel affine map cannot pass through"
        else:
            why_forward = _fold_forward(graph, chain, target)
            if why_forward is None:
                _remove(graph, affine)
                _report_fold(graph, report, affine, bn_like, [target], "forward")
                continue
        reason = why_forward if why_back is None else f"backward: {why_back}; forward: {why_forward}"
        if bn_like:
            report["kept"].append(_record(graph, affine, reason=reason))
        else:
            report["kept_affine"].append({"nodes": _names(affine), "reason": reason})


def _bn_like(graph: Graph, node) -> bool:
    """A BatchNormalization node, or an elementwise op whose constant has one value per channel."""
    if node.op_type == "BatchNormalization":
        return True
    other = node.input[0] if node.input[1] == _data_input(graph, node) else node.input[1]
    return graph.const(other).size > 1


def _bn_kind(graph: Graph, affine) -> str:
    """"batchnorm" for a chain that is a BatchNorm: a BatchNormalization node, or the per-channel
    mean subtraction exporters write for one (Keras: Sub → Mul → Add); else "affine" (a layer scale,
    a per-channel Mul/Add: folded the same way, but not a BatchNorm)."""
    return "batchnorm" if any(n.op_type == "BatchNormalization" or (
        n.op_type == "Sub" and n.input[0] == _data_input(graph, n) and _bn_like(graph, n))  # x - mean, not c - x
        for n in affine) else "affine"


def _record(graph: Graph, affine, **fields) -> FoldRecord:
    """The chain's record; its torch module is its BatchNormalization node's, else its last node's."""
    ordered = sorted(affine, key=lambda n: n.op_type == "BatchNormalization")
    module = next((m for n in reversed(ordered) if (m := torch_module_of(n))), None)
    return FoldRecord("onnx", _names(affine), _bn_kind(graph, affine), module,
                      nodes=tuple(n.name or n.output[0] for n in affine), **fields)


def _report_fold(graph: Graph, report: dict, affine, bn_like: bool, layers, direction: str) -> None:
    if bn_like:
        report["folded"].append(_record(graph, affine, layers=tuple(n.name or n.output[0] for n in layers),
                                        into=_names(layers), direction=direction))
    else:
        report["removed"] += [{"node": n.name or n.output[0], "op": n.op_type,
                               "why": f"scalar affine map (input scaling) folded {direction} into {_names(layers)}"}
                              for n in affine]


def _remove(graph: Graph, affine) -> None:
    for node in affine:
        if not graph.bypass(node, _data_input(graph, node)):
            # the chain ends in a graph output fed straight from a graph input: keep an Identity-free
            # map by leaving S=1, T=0 — cannot happen for a folded chain (its input is a layer output)
            raise AssertionError(f"could not remove {describe(node)}")


# --- Transpose → Flatten → MatMul/Gemm: permute the weight rows instead ------------------------------

def _fold_transpose_into_flatten(graph: Graph) -> list[dict]:
    removed = []
    for t in list(graph.nodes):
        if t.op_type != "Transpose" or t not in graph.nodes:
            continue
        perm = attr(t, "perm")
        flat = graph.only_consumer(t.output[0])
        if perm is None or perm[0] != 0 or flat is None or flat.op_type not in ("Reshape", "Flatten"):
            continue
        shapes = _reshape_shapes(graph, flat)
        layer = graph.only_consumer(flat.output[0])
        if shapes is None or len(shapes[1]) != 1 or layer is None or layer.op_type not in ("MatMul", "Gemm") \
                or layer.input[0] != flat.output[0] or (layer.op_type == "Gemm" and attr(layer, "transA", 0)):
            continue
        w = graph.const(layer.input[1])
        x_shape = graph.shape(t.input[0])
        if w is None or w.ndim != 2 or x_shape is None or not all(isinstance(d, int) for d in x_shape[1:]):
            continue
        # flat(T(x))[j] = flat(x)[index[j]], so flat(T(x)) @ W = flat(x) @ W' with W'[index[j]] = W[j]
        index = np.arange(int(np.prod(x_shape[1:]))).reshape(x_shape[1:]).transpose([p - 1 for p in perm[1:]]).reshape(-1)
        k_axis = 1 if layer.op_type == "Gemm" and attr(layer, "transB", 0) else 0
        new_w = np.empty_like(w)
        if k_axis == 0:
            new_w[index] = w
        else:
            new_w[:, index] = w
        layer.input[1] = graph.add_const(new_w, f"{layer.name or layer.op_type}.weight")
        flat.input[0] = t.input[0]
        graph.refresh()
        removed.append({"node": t.name or t.output[0], "op": "Transpose",
                        "why": f"folded into the row order of the weights of {describe(layer)}"})
    graph.remove_dead()
    graph.infer()
    return removed
