"""Structural re-parameterization: a sum of branches that are each linear in the same input is one
convolution. One rule for both passes (export/merge_fx.py, export/merge_onnx.py), which read their
graphs through a small view (each node as an `Op`); numpy only, float64 throughout.

The rule. Below a sum (Add/Sub, n-ary as chains of them) the branches are followed down through
per-channel affine ops (BatchNorm, Mul/Add/Div by a per-channel or scalar constant, a layer scale,
Identity/Dropout) and at most one convolution each, as long as every value on the way is read by
that branch alone. What a branch starts from is its input: a Conv's input (any kernel, groups,
stride, dilation, zero padding), an AvgPool's that counts its padding (a depthwise conv of 1/k…),
or the value itself (the identity). When two or more branches start from the same input x, one of
them through a conv, or one is a BatchNorm of x itself (the identity-branch BN that no fold can
remove), the whole sub-graph is x's linear map

    y = Σ ± Affine(… Conv_i(x) …)  (with affine ops after sums too: a BN after the sum, a layer scale)

and becomes one Conv over x whose kernel is the sum of the branches' kernels placed in one window
and whose bias collects every shift, computed in float64:

- windows must be aligned: the same stride, the same dilation (a 1-wide kernel fits any), and
  output positions reading the same grid — per axis the taps of branch i start at −pad_i and step
  by the dilation, so the merged window starts at −max pad_i and every (max pad − pad_i) must be a
  multiple of the dilation, and the output length (pad_begin + pad_end − dilation·(k−1)) the same;
- the identity is a kernel with one 1, at the window's centre tap of input channel c mod (C/groups)
  of output channel c (so it respects groups); it needs C_in = C_out and stride 1;
- the convs' groups must agree (the identity and an AvgPool, one input per output, fit any);
- affine ops scale the kernel's output channels and map the bias: W·s, b·s + t.

Refused, each with its reason: an activation, SE (a product of two tensors) or attention on a branch;
branches that read different inputs; an AvgPool that excludes its padding from the average (or rounds
its output size up); mismatched stride, groups or dilation; misaligned windows; anything in training
mode. A sum that is no re-parameterizable block (a residual add of a conv and some other input, as in
every ResNet) is neither merged nor reported.
"""
from dataclasses import dataclass, field

import numpy as np

SUM, AFFINE, CONV, PASS, OTHER = "sum", "affine", "conv", "pass", "other"


@dataclass(frozen=True)
class Conv:
    """A convolution as the rule reads it: weight [out, in/groups, k…] and bias [out] (or None), in
    float64, and its window: stride, dilation and zero padding (begin, end) per spatial axis."""
    weight: np.ndarray
    bias: np.ndarray | None
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    pads: tuple[tuple[int, int], ...]
    groups: int = 1
    diagonal: bool = False  # output channel c reads input channel c alone (an AvgPool): fits any groups


@dataclass(frozen=True)
class Op:
    """One graph node as the rule sees it."""
    kind: str                          # SUM, AFFINE, CONV, PASS or OTHER
    inputs: tuple = ()                 # its data inputs (graph values); SUM: the terms
    signs: tuple = ()                  # SUM: +1 or −1 per term
    scale: np.ndarray | None = None    # AFFINE: one value per channel, or one value (float64)
    shift: np.ndarray | None = None
    conv: Conv | None = None           # CONV
    what: str = ""                     # as people read it: "stages.0.1.identity (BatchNorm2d)"
    module: str | None = None          # the torch module it belongs to, when known
    batchnorm: bool = False            # AFFINE: a BatchNorm (the merge removes it)
    why: str | None = None             # OTHER: what it is, why it is not linear ("an activation (ReLU)")
    branch_op: bool = False            # OTHER: a branch op but for one thing (an AvgPool excluding its padding, a BN in training mode)


def identity_op(source, what: str = "") -> Op:
    return Op(AFFINE, (source,), scale=np.ones(1), shift=np.zeros(1), what=what)


@dataclass
class Block:
    """A merge the rule found: `root`'s value is conv(x) with this kernel."""
    x: object
    root: object
    conv: Conv
    nodes: list                         # every node the merged conv replaces (the root among them)
    input: str                          # x as people read it
    branches: list[str]                 # each branch, from x to its sum, as people read it
    after: list[str]                    # affine ops after a sum (a BN after it, a layer scale)
    bns: list[Op]                       # the BatchNorms it removes
    convs: list = field(default_factory=list)  # the branches' conv (and pool) nodes
    name: str = ""                      # the block: the modules' common path (or the sum's node)


@dataclass
class Refusal:
    root: object
    reason: str
    nodes: list = field(default_factory=list)
    name: str = ""
    term: object = None                 # the branch value it refused for, when it was one branch
    elsewhere: bool = False             # that branch reads another input: it is no branch of the block


# --- the sub-graph below a sum ---------------------------------------------------------------------

@dataclass
class _Tree:
    node: object
    op: Op
    children: list = field(default_factory=list)   # [(sign, _Tree)]; AFFINE/PASS: one child


def _expand(view, node, root: bool = False) -> _Tree:
    """The sub-tree of linear ops below `node`, descending only into values read by one node."""
    op = view.op(node)
    if not root and view.readers(node) != 1:
        return _Tree(node, Op(OTHER, what=op.what, why="read elsewhere too"))  # a term: the value itself
    if op.kind == SUM:
        return _Tree(node, op, [(sign, _expand(view, i)) for i, sign in zip(op.inputs, op.signs)])
    if op.kind in (AFFINE, PASS):
        return _Tree(node, op, [(1, _expand(view, op.inputs[0]))])
    return _Tree(node, op)  # CONV (a branch's own conv: its input is the term's input) or OTHER


def _has_sum(tree: _Tree) -> bool:
    return tree.op.kind == SUM or (tree.op.kind in (AFFINE, PASS) and _has_sum(tree.children[0][1]))


def _terms(tree: _Tree, path=()):
    """(term, the affine/pass trees from it up to its sum) for each leaf of the tree."""
    if tree.op.kind == SUM:
        for _, child in tree.children:
            yield from _terms(child, ())
    elif tree.op.kind in (AFFINE, PASS):
        yield from _terms(tree.children[0][1], (tree,) + path)
    else:
        yield tree, path


def _source(term: _Tree):
    """What a term starts from: a conv's input, or the value itself."""
    return term.op.inputs[0] if term.op.kind == CONV else term.node


def _inner(tree: _Tree) -> list:
    """Every node of the tree the merged conv replaces (all but the terms' sources)."""
    nodes = [tree.node] if tree.op.kind != OTHER else []
    for _, child in tree.children:
        nodes += _inner(child)
    return nodes


def match(view, root) -> Block | Refusal | None:
    """The block whose value `root` is, a refusal with its reason, or None when `root` is no sum of
    branches of one input (nothing to report)."""
    if view.op(root).kind not in (SUM, AFFINE, PASS):
        return None
    tree = _expand(view, root, root=True)
    if not _has_sum(tree):
        return None
    terms = list(_terms(tree))
    by_source: dict = {}
    for term, path in terms:
        by_source.setdefault(_source(term), []).append((term, path))
    refused = [t for t, _ in terms if t.op.kind == OTHER and t.op.branch_op]  # a conv/pool it refuses, on a branch
    eligible = [s for s, ts in by_source.items() if (len(ts) >= 2 and any(t.op.kind == CONV for t, _ in ts))
                or any(t.op.kind == OTHER and any(p.op.batchnorm for p in path) for t, path in ts)
                or any(s in view.producers(t.node) for t in refused)]
    if not eligible:
        return None
    x = max(eligible, key=lambda s: len(by_source[s]))
    nodes, name = _inner(tree), view.block_name(_inner(tree), root)
    for term, path in terms:
        if _source(term) != x:
            why = _why_not_on(view, term, x)
            return Refusal(root, why, nodes, name, _source(term), why.startswith(DIFFERENT_INPUTS))
    try:
        conv = _merged(view, tree, x)
    except _Refused as e:
        return Refusal(root, str(e), nodes, name)
    return Block(x, root, conv, nodes, view.op(x).what or "the input", [_branch(t, p) for t, p in terms], _after(tree),
                 [n.op for n in _walk(tree) if n.op.batchnorm], [t.node for t, _ in terms if t.op.kind == CONV], name)


DIFFERENT_INPUTS = "its branches read different inputs"


def reported(refusals: list, blocks: list) -> list:
    """The refusals worth reporting, once each: not a sum whose other-input branch merely sits beside
    a block that merged inside it (RepGhost's residual add around its merged module)."""
    roots, seen, out = {b.root for b in blocks}, set(), []
    for r in refusals:
        inner = any(n in roots for n in r.nodes if n != r.root)
        if (r.elsewhere and inner) or (r.term, r.reason) in seen:
            continue
        seen.add((r.term, r.reason))
        out.append(r)
    return out


def _walk(tree: _Tree):
    yield tree
    for _, child in tree.children:
        yield from _walk(child)


def _branch(term: _Tree, path) -> str:
    """A branch from x to its sum: "a (Conv2d 3x3) → b (BatchNorm2d)", or "identity → b (BatchNorm2d)"."""
    ops = [term.op.what if term.op.kind == CONV else "identity"]
    return " → ".join(ops + [p.op.what for p in path if _shows(p.op)])


def _shows(op: Op) -> bool:
    """An affine op worth naming: not x + 0 (MobileOne's sums start from 0)."""
    return op.kind == AFFINE and bool(op.what) and not (np.all(op.scale == 1) and np.all(op.shift == 0))


def _after(tree: _Tree) -> list[str]:
    """The affine ops that act on sums (a BN after the sum, a layer scale on a difference)."""
    out = []
    for node in _walk(tree):
        if _shows(node.op) and _has_sum(node.children[0][1]):
            out.append(node.op.what)
    return out


def _why_not_on(view, term: _Tree, x) -> str:
    """Why a branch that does not start from x is not merged: what sits between x and the sum on
    it, when x is below it (an activation, SE, attention), else that it reads another input."""
    start, the_input = _source(term), "the input"
    seen, todo = set(), [(start, 0)]
    while todo:
        node, depth = todo.pop(0)
        if node == x:
            op = view.op(start)
            if op.kind == OTHER:
                return f"{op.why} on a branch, between {view.op(x).what or the_input} and the sum"
            return (f"{op.what} feeds {term.op.what} on a branch: a branch is merged through one conv "
                    f"(and per-channel ops after it), not a chain of them")
        if depth < 12 and id(node) not in seen:
            seen.add(id(node))
            todo += [(p, depth + 1) for p in view.producers(node)]
    return (f"{DIFFERENT_INPUTS}: {view.op(x).what or the_input} and "
            f"{view.op(start).what or 'another value'}")


# --- the math: one kernel --------------------------------------------------------------------------

class _Refused(Exception):
    pass


def culprit(names: list, wrong):
    """A block that is wrong on its own, found by bisection; `wrong(subset)` says whether merging only
    `subset` makes the model inexact. None when no single block is."""
    names = list(names)
    while len(names) > 1:
        half = names[:len(names) // 2]
        names = half if wrong(half) else names[len(names) // 2:]
    return names[0] if names and wrong(names) else None


def _merged(view, tree: _Tree, x) -> Conv:
    convs = [n.op for n in _walk(tree) if n.op.kind == CONV]
    shape = view.shape(x)
    if shape is None or len(shape) < 3 or not isinstance(shape[1], int):
        raise _Refused(f"the shape of {view.op(x).what or 'the input'} is unknown (a conv merge needs [N, C, spatial…])")
    c_in, spatial = shape[1], len(shape) - 2
    identity = any(n.op.kind == OTHER for n in _walk(tree))  # a term that is x itself
    dense = [c for c in convs if not c.conv.diagonal]
    groups = {c.conv.groups for c in dense}
    if len(groups) > 1:
        raise _Refused("mismatched groups: " + ", ".join(f"{c.what} has {c.conv.groups}" for c in dense))
    c_out = dense[0].conv.weight.shape[0] if dense else c_in
    g = groups.pop() if groups else c_in
    if any(c.conv.weight.ndim - 2 != spatial for c in convs):
        raise _Refused("a conv of another rank than its input")
    if (identity or any(c.conv.diagonal for c in convs)) and c_out != c_in:
        raise _Refused(f"the identity (or an AvgPool) needs as many output channels as input channels ({c_out} vs {c_in})")
    windows = [(c.conv.weight.shape[2:], c.conv.stride, c.conv.dilation, c.conv.pads, c.what) for c in convs]
    if identity:
        windows.append(((1,) * spatial, (1,) * spatial, (1,) * spatial, ((0, 0),) * spatial, "the identity"))
    stride, dilation, pads, size = _window(windows, spatial)
    if not getattr(view, "asymmetric_pads", True) and any(begin != end for begin, end in pads):
        raise _Refused(f"the merged window would pad its axes unevenly ({pads}), which this graph's conv cannot hold")
    weight = np.zeros((c_out, c_in // g, *size))
    w, b = _value(tree, x, weight, pads, dilation, g, c_out)
    return Conv(w, b, stride, dilation, pads, g)


def _window(windows, spatial: int):
    """The merged window: (stride, dilation, pads, kernel size) per axis; raises _Refused when the
    branches' windows do not line up."""
    stride, dilation, pads, size = [], [], [], []
    for axis in range(spatial):
        strides = {w[1][axis] for w in windows}
        if len(strides) > 1:
            raise _Refused("mismatched stride: " + ", ".join(f"{w[4]} {w[1][axis]}" for w in windows))
        wide = {w[2][axis] for w in windows if w[0][axis] > 1}
        if len(wide) > 1:
            raise _Refused("mismatched dilation: " + ", ".join(f"{w[4]} {w[2][axis]}" for w in windows if w[0][axis] > 1))
        d = wide.pop() if wide else 1
        begin = max(w[3][axis][0] for w in windows)
        ends = {w[3][axis][0] + w[3][axis][1] - w[2][axis] * (w[0][axis] - 1) for w in windows}
        if len(ends) > 1 or any((begin - w[3][axis][0]) % d for w in windows):
            raise _Refused("misaligned windows: " + ", ".join(
                f"{w[4]} (kernel {w[0][axis]}, pads {w[3][axis]}, dilation {w[2][axis]})" for w in windows)
                + f" do not read the same positions on spatial axis {axis}")
        k = max((begin - w[3][axis][0]) // d + w[0][axis] for w in windows)
        end = ends.pop() + d * (k - 1) - begin
        if end < 0:
            raise _Refused(f"misaligned windows on spatial axis {axis}")
        stride.append(strides.pop())
        dilation.append(d)
        pads.append((begin, end))
        size.append(k)
    return tuple(stride), tuple(dilation), tuple(pads), tuple(size)


def identity_kernel(channels: int, groups: int, size: tuple, centre: tuple) -> np.ndarray:
    """The identity as a conv kernel [C, C/groups, k…]: output channel c reads input channel c, which
    is channel c mod (C/groups) of its group, at the tap `centre`."""
    kernel = np.zeros((channels, channels // groups, *size))
    for c in range(channels):
        kernel[(c, c % (channels // groups), *centre)] = 1.0
    return kernel


def placed(conv: Conv, pads, dilation, groups: int, size: tuple) -> np.ndarray:
    """A branch's kernel placed in the merged window, as a kernel of `groups` groups."""
    w = conv.weight
    if conv.diagonal:  # one input per output: spread it onto its channel within each group
        diag = np.zeros((w.shape[0], w.shape[0] // groups, *w.shape[2:]))
        for c in range(w.shape[0]):
            diag[c, c % (w.shape[0] // groups)] = w[c, 0]
        w = diag
    out = np.zeros((w.shape[0], w.shape[1], *size))
    index = [slice(None), slice(None)]  # taps of a branch kernel are consecutive taps of the merged one
    for axis, (begin, _) in enumerate(pads):
        first = (begin - conv.pads[axis][0]) // dilation[axis]
        index.append(slice(first, first + w.shape[2 + axis]))
    out[tuple(index)] = w
    return out


def _value(tree: _Tree, x, weight: np.ndarray, pads, dilation, groups: int, c_out: int):
    """The tree's value as (kernel, bias) in the merged window."""
    size = weight.shape[2:]
    op = tree.op
    if op.kind == SUM:
        w, b = np.zeros_like(weight), np.zeros(c_out)
        for sign, child in tree.children:
            cw, cb = _value(child, x, weight, pads, dilation, groups, c_out)
            w, b = w + sign * cw, b + sign * cb
        return w, b
    if op.kind in (AFFINE, PASS):
        w, b = _value(tree.children[0][1], x, weight, pads, dilation, groups, c_out)
        if op.kind == PASS:
            return w, b
        s, t = (_per_channel(a, c_out, op.what) for a in (op.scale, op.shift))
        return w * s.reshape(-1, *(1,) * (w.ndim - 1)), b * s + t
    if op.kind == CONV:
        bias = np.zeros(c_out) if op.conv.bias is None else np.asarray(op.conv.bias, dtype=np.float64)
        return placed(op.conv, pads, dilation, groups, size), bias
    centre = tuple(begin // d for (begin, _), d in zip(pads, dilation))
    return identity_kernel(c_out, groups, size, centre), np.zeros(c_out)


def _per_channel(a, channels: int, what: str) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64).reshape(-1)
    if a.size not in (1, channels):
        raise _Refused(f"{what} has {a.size} values, not one per channel ({channels})")
    return np.broadcast_to(a, (channels,))
