"""A small mutable view of an ONNX graph for the fold pass (export/onnx_fold.py), and the clean-ups
that make exporter graphs foldable: constants folded (including the Shape → Gather → Concat
arithmetic exporters emit for a dynamic batch), Identity / Dropout / no-op Cast removed, dead nodes
dropped, Transpose pairs cancelled.

`Graph` keeps the nodes as a plain list of NodeProto and the initializers as numpy arrays; index
maps (producer, consumers) are rebuilt after each edit with `refresh()` — graphs here have at most
a few thousand nodes, so plain rebuilding beats bookkeeping. `to_model()` writes it back in
topological order. Graph inputs and outputs keep their names and types."""
from collections import Counter, defaultdict

import numpy as np
import onnx
from onnx import helper, numpy_helper

FLOAT = onnx.TensorProto.FLOAT
# the element types the passes fold: float32 (what is published) and float64 (the same graph with
# float64 initializers, for verify's fold-exactness check)
FLOATS = (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE)

# Ops that never change a value or its layout-free meaning when fed by a Transpose: the Transpose
# can move from their inputs to their output (constants get the inverse permutation).
ELEMENTWISE_UNARY = {"Relu", "Clip", "Sigmoid", "Tanh", "LeakyRelu", "HardSigmoid", "HardSwish", "Neg",
                     "Abs", "Exp", "Log", "Sqrt", "Erf", "Softplus", "Elu", "Selu", "Cast", "Identity",
                     "Reciprocal", "Floor", "Ceil", "Round", "Sign", "Not", "Gelu", "Mish"}
ELEMENTWISE_NARY = {"Add", "Sub", "Mul", "Div", "Max", "Min", "Sum", "Mean", "Pow", "PRelu",
                    "Equal", "Greater", "Less", "GreaterOrEqual", "LessOrEqual", "And", "Or", "Where"}
REDUCE = {"ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
          "ReduceLogSumExp", "ReduceSumSquare"}
_NONDETERMINISTIC = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike",
                     "Multinomial", "Bernoulli"}
_MAX_FOLDED_ELEMENTS = 1 << 22  # don't materialize huge tensors (e.g. a ConstantOfShape of an image)


class Graph:
    def __init__(self, model: onnx.ModelProto):
        for init in model.graph.initializer:
            if init.data_location == onnx.TensorProto.EXTERNAL:
                raise ValueError(f"initializer {init.name!r} is stored as external data that was not loaded; "
                                 f"load the model with its .data file (onnx.load(path, load_external_data=True))")
        self.model = onnx.ModelProto()
        self.model.CopyFrom(model)
        self.opset = {o.domain: o.version for o in model.opset_import}
        self.nodes: list[onnx.NodeProto] = []
        for node in self.model.graph.node:
            copy = onnx.NodeProto()
            copy.CopyFrom(node)
            self.nodes.append(copy)
        self.arrays: dict[str, np.ndarray] = {i.name: numpy_helper.to_array(i) for i in self.model.graph.initializer}
        self.input_names = [i.name for i in self.model.graph.input]
        self.output_names = [o.name for o in self.model.graph.output]
        self._counter = 0
        self.constants_folded = 0  # nodes evaluated away by fold_constants / fold_shape_arithmetic
        self.types: dict[str, onnx.TypeProto] = {}
        self.refresh()
        self.infer()

    # --- indices -------------------------------------------------------------------------------
    def refresh(self) -> None:
        self.producer = {out: node for node in self.nodes for out in node.output if out}
        self.consumers: dict[str, list] = defaultdict(list)
        for node in self.nodes:
            for name in node.input:
                if name:
                    self.consumers[name].append(node)
        # names read from inside subgraphs (If/Loop bodies): never renamed, never counted as single-use
        self.pinned = set()
        for node in self.nodes:
            for attr in node.attribute:
                for sub in list(attr.g.node if attr.HasField("g") else []) + [n for g in attr.graphs for n in g.node]:
                    self.pinned.update(sub.input)

    def uses(self, name: str) -> int:
        """How many places read `name` (a graph output counts as one; a subgraph reference as two)."""
        return len(self.consumers.get(name, ())) + (name in self.output_names) + 2 * (name in self.pinned)

    def only_consumer(self, name: str):
        users = self.consumers.get(name, [])
        return users[0] if self.uses(name) == 1 and len(users) == 1 else None

    def const(self, name: str):
        """The value of `name` if it is a constant (initializer not fed as an input), else None."""
        if name in self.arrays and name not in self.input_names:
            return self.arrays[name]
        return None

    def add_const(self, array: np.ndarray, hint: str) -> str:
        name = self.fresh(hint)
        self.arrays[name] = np.ascontiguousarray(array)
        return name

    def fresh(self, hint: str) -> str:
        while True:
            self._counter += 1
            name = f"{hint}__bnfold{self._counter}"
            if name not in self.producer and name not in self.arrays and name not in self.input_names:
                return name

    # --- types and shapes (from ONNX shape inference) --------------------------------------------
    def infer(self) -> None:
        model = self.to_model(keep_value_info=False)
        try:
            model = onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
        except Exception:  # noqa: BLE001 -- inference is a help, not a requirement; unknown shapes fold less
            pass
        self.types = {v.name: v.type for v in list(model.graph.value_info) + list(model.graph.input)
                      + list(model.graph.output)}

    def elem_type(self, name: str):
        if name in self.arrays:
            return helper.np_dtype_to_tensor_dtype(self.arrays[name].dtype)
        t = self.types.get(name)
        return t.tensor_type.elem_type if t is not None and t.HasField("tensor_type") else None

    def shape(self, name: str):
        """A tuple of ints (static), strings (symbolic) or None (unknown) per axis; None if the rank is unknown."""
        if name in self.arrays:
            return tuple(self.arrays[name].shape)
        t = self.types.get(name)
        if t is None or not t.HasField("tensor_type") or not t.tensor_type.HasField("shape"):
            return None
        return tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                     for d in t.tensor_type.shape.dim)

    # --- edits -----------------------------------------------------------------------------------
    def rename_uses(self, old: str, new: str) -> None:
        for node in self.consumers.get(old, []):
            for i, name in enumerate(node.input):
                if name == old:
                    node.input[i] = new

    def bypass(self, node: onnx.NodeProto, data_input: str | None = None) -> bool:
        """Remove a node whose output equals `data_input` (default: its first input). When the output is a
        graph output, the producer of the input takes over the output's name instead; if that is
        impossible (the input is a graph input or constant, or is itself an output) the node stays."""
        src, out = data_input or node.input[0], node.output[0]
        if out in self.output_names or out in self.pinned:
            producer = self.producer.get(src)
            if producer is None or src in self.output_names or src in self.pinned or len(self.consumers[src]) != 1:
                return False
            producer.output[list(producer.output).index(src)] = out
        else:
            self.rename_uses(out, src)
        self.nodes.remove(node)
        self.refresh()
        return True

    def insert_after(self, name: str, node: onnx.NodeProto) -> None:
        """Add `node`, which reads `name`, and make every other reader of `name` read its output instead.
        When `name` is a graph output, the node takes over that name and the producer gets a new one."""
        if name in self.output_names:
            producer = self.producer[name]
            inner = self.fresh(name)
            producer.output[list(producer.output).index(name)] = inner
            self.rename_uses(name, inner)
            node.input[list(node.input).index(name)] = inner
            node.output[0] = name
        else:
            self.rename_uses(name, node.output[0])
        self.nodes.append(node)
        self.refresh()

    def remove_dead(self) -> int:
        """Drop nodes none of whose outputs are read, and unread initializers. Returns nodes removed."""
        removed = 0
        while True:
            live = [n for n in self.nodes if any(self.uses(o) for o in n.output if o)]
            if len(live) == len(self.nodes):
                break
            removed += len(self.nodes) - len(live)
            self.nodes = live
            self.refresh()
        used = {i for n in self.nodes for i in n.input} | set(self.output_names) | self.pinned | set(self.input_names)
        self.arrays = {k: v for k, v in self.arrays.items() if k in used}
        return removed

    def to_model(self, keep_value_info: bool = False) -> onnx.ModelProto:
        model = onnx.ModelProto()
        model.CopyFrom(self.model)
        graph = model.graph
        del graph.node[:]
        graph.node.extend(self._topological())
        del graph.initializer[:]
        graph.initializer.extend(numpy_helper.from_array(a, n) for n, a in self.arrays.items())
        if not keep_value_info:
            del graph.value_info[:]
        return model

    def _topological(self) -> list:
        known = set(self.arrays) | set(self.input_names) | self.pinned | {""}
        pending, order = list(self.nodes), []
        while pending:
            ready = [n for n in pending if all(i in known for i in n.input)]
            if not ready:  # a cycle or an input from nowhere: leave the rest as it was; the checker will say
                order.extend(pending)
                break
            ready_ids = {id(n) for n in ready}
            for n in ready:
                order.append(n)
                known.update(n.output)
            pending = [n for n in pending if id(n) not in ready_ids]
        return order


def attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def set_attr(node: onnx.NodeProto, name: str, value) -> None:
    for i, a in enumerate(node.attribute):
        if a.name == name:
            del node.attribute[i]
            break
    node.attribute.append(helper.make_attribute(name, value))


def describe(node: onnx.NodeProto) -> str:
    return f"{node.name or node.output[0]} ({node.op_type})"


# --- constant folding ----------------------------------------------------------------------------

def _evaluate(graph: Graph, node: onnx.NodeProto, inputs: list) -> list:
    from onnx.reference import ReferenceEvaluator

    names = [f"in{i}" for i in range(len(node.input))]
    call = onnx.NodeProto()
    call.CopyFrom(node)
    del call.input[:]
    call.input.extend(n if x else "" for n, x in zip(names, node.input))
    g = helper.make_graph([call], "fold", [helper.make_tensor_value_info(n, onnx.TensorProto.UNDEFINED, None)
                                           for n, x in zip(names, node.input) if x],
                          [helper.make_tensor_value_info(o, onnx.TensorProto.UNDEFINED, None) for o in node.output])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid(d, v) for d, v in graph.opset.items()])
    feeds = {n: v for n, v, x in zip(names, inputs, node.input) if x}
    return ReferenceEvaluator(model).run(None, feeds)


def fold_constants(graph: Graph) -> int:
    """Evaluate every node whose inputs are all constants; Constant nodes become initializers."""
    folded = 0
    for node in list(graph.nodes):
        if (node.domain not in ("", "ai.onnx") or node.op_type in _NONDETERMINISTIC
                or any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute)):
            continue
        values = [graph.const(i) if i else None for i in node.input]
        if node.op_type == "CastLike" and values[0] is not None and graph.elem_type(node.input[1]):
            # CastLike reads its second input only for its type (torch's export of a bias-free conv)
            graph.arrays[node.output[0]] = values[0].astype(helper.tensor_dtype_to_np_dtype(graph.elem_type(node.input[1])))
            graph.nodes.remove(node)
            folded += 1
            continue
        if any(v is None for v, i in zip(values, node.input) if i):
            continue
        if any(o in graph.output_names for o in node.output):
            continue  # a graph output stays the output of a node
        try:
            results = _evaluate(graph, node, values)
        except Exception:  # noqa: BLE001 -- an op the reference evaluator lacks: leave the node
            continue
        if any(np.asarray(r).size > _MAX_FOLDED_ELEMENTS for r in results):
            continue
        for name, value in zip(node.output, results):
            if name:
                graph.arrays[name] = np.asarray(value)
        graph.nodes.remove(node)
        folded += 1
    graph.refresh()
    graph.constants_folded += folded
    return folded


def fold_shape_arithmetic(graph: Graph) -> int:
    """Exporters compute a Reshape's target from Shape(x) (Shape → Gather → Unsqueeze → Concat ...)
    to keep the batch dynamic. Track those values symbolically: a dimension is an int, or the name of
    a symbolic axis of a known tensor. Values made only of ints become constants; a Reshape whose
    target keeps its input's own dims where they are symbolic gets a constant target with 0 there
    ("copy this dim", allowzero=0). Returns the number of tensors replaced."""
    values: dict[str, tuple[list, bool]] = {}  # name -> (dims, is_scalar)

    def dims_of(name):
        if name in values:
            return values[name]
        c = graph.const(name)
        if c is not None and c.dtype.kind in "iu" and c.ndim <= 1:
            return [int(v) for v in c.reshape(-1)], c.ndim == 0
        return None

    def symbol(tensor, axis, dim):
        return dim if isinstance(dim, int) else f"{tensor}#{axis}" if dim is None else f"sym:{dim}"

    for node in graph._topological():
        op, ins = node.op_type, [dims_of(i) if i else None for i in node.input]
        out = None
        if op == "Shape":
            shape = graph.shape(node.input[0])
            if shape is not None:
                full = [symbol(node.input[0], i, d) for i, d in enumerate(shape)]
                start, end = attr(node, "start", 0), attr(node, "end", None)
                out = (full[start:end], False)
        elif op == "Gather" and ins[0] and ins[1] and attr(node, "axis", 0) == 0 and not ins[0][1]:
            idx, scalar = ins[1]
            try:
                out = ([ins[0][0][i] for i in idx], scalar)
            except IndexError:
                out = None
        elif op == "Unsqueeze" and ins[0] and ins[0][1]:
            out = (ins[0][0], False)
        elif op in ("Squeeze", "Reshape") and ins[0] and len(ins[0][0]) == 1:
            out = (ins[0][0], op == "Squeeze" or (ins[1] is not None and ins[1][0] == []))
        elif op in ("Identity", "Cast") and ins[0]:
            out = ins[0]
        elif op == "Concat" and all(ins) and attr(node, "axis", 0) == 0:
            out = ([d for dims, _ in ins for d in dims], False)
        elif op == "Slice" and all(ins[:3]) and len(node.input) <= 5 and not ins[0][1]:
            steps = ins[4][0] if len(ins) > 4 and ins[4] else [1]
            if (len(ins) < 4 or ins[3] is None or ins[3][0] == [0]) and len(ins[1][0]) == 1 and len(steps) == 1:
                out = (ins[0][0][slice(ins[1][0][0], ins[2][0][0], steps[0])], False)
        elif op in ("Add", "Sub", "Mul", "Div") and ins[0] and ins[1]:
            a, b = ins[0][0], ins[1][0]
            if all(isinstance(d, int) for d in a + b) and (len(a) == len(b) or 1 in (len(a), len(b))):
                n = max(len(a), len(b))
                a, b = (a * n if len(a) == 1 else a), (b * n if len(b) == 1 else b)
                f = {"Add": lambda x, y: x + y, "Sub": lambda x, y: x - y, "Mul": lambda x, y: x * y,
                     "Div": lambda x, y: x // y if x * y >= 0 else -(-x // y)}[op]
                out = ([f(x, y) for x, y in zip(a, b)], ins[0][1] and ins[1][1])
        if out is not None:
            values[node.output[0]] = out

    replaced = 0
    for node in list(graph.nodes):
        name = node.output[0] if node.output else ""
        if node.op_type == "Reshape" and len(node.input) > 1 and graph.const(node.input[1]) is None \
                and node.input[1] in values:
            dims, _ = values[node.input[1]]
            shape = graph.shape(node.input[0])
            target = []
            for i, d in enumerate(dims):
                if isinstance(d, int):
                    target.append(d)
                elif shape is not None and i < len(shape) and symbol(node.input[0], i, shape[i]) == d:
                    target.append(0)
                else:
                    break
            if len(target) == len(dims) and (attr(node, "allowzero", 0) == 0 or 0 not in
                                             [d for d in dims if isinstance(d, int)]):
                node.input[1] = graph.add_const(np.array(target, dtype=np.int64), "shape")
                set_attr(node, "allowzero", 0)
                replaced += 1
        elif name in values and name not in graph.output_names and graph.const(name) is None \
                and node.op_type != "Constant" and all(isinstance(d, int) for d in values[name][0]):
            dims, scalar = values[name]
            dtype = helper.tensor_dtype_to_np_dtype(graph.elem_type(name) or onnx.TensorProto.INT64)
            array = np.array(dims[0] if scalar else dims, dtype=dtype)
            graph.nodes.remove(node)
            graph.arrays[name] = array
            replaced += 1
            graph.constants_folded += 1
    graph.refresh()
    return replaced


# --- clean-ups -----------------------------------------------------------------------------------

def remove_noops(graph: Graph) -> list[dict]:
    """Identity, Dropout (inference: its mask unread, training_mode absent or false) and Casts to the
    type the value already has. Returns report entries {"node", "op", "why"}."""
    removed = []
    for node in list(graph.nodes):
        why = None
        if node.op_type == "Identity":
            why = "Identity: passes its input through"
        elif node.op_type == "Dropout":
            mask_read = len(node.output) > 1 and node.output[1] and graph.uses(node.output[1])
            training = graph.const(node.input[2]) if len(node.input) > 2 and node.input[2] else np.array(False)
            if not mask_read and training is not None and not bool(training):
                why = "Dropout is the identity in inference"
        elif node.op_type == "Cast":
            source = graph.elem_type(node.input[0])
            if source is not None and source == attr(node, "to"):
                why = f"Cast to {helper.tensor_dtype_to_np_dtype(source)} of a value that already is"
        if why and graph.bypass(node):
            removed.append({"node": node.name or node.output[0], "op": node.op_type, "why": why})
    return removed


def clean(graph: Graph) -> list[dict]:
    """Constants and shape arithmetic folded, no-ops removed, dead nodes dropped, until nothing changes."""
    removed = []
    while True:
        changed = fold_constants(graph)
        changed += fold_shape_arithmetic(graph)
        entries = remove_noops(graph)
        removed += entries
        changed += len(entries) + graph.remove_dead()
        if not changed:
            return removed
        graph.infer()


# --- layout: Transposes ----------------------------------------------------------------------------

def _inverse(perm) -> list[int]:
    return [int(i) for i in np.argsort(perm)]


def _const_in_layout(array: np.ndarray, rank: int, perm) -> np.ndarray:
    """A constant operand seen through Transpose(perm): the operand to use before the transpose."""
    array = array.reshape((1,) * (rank - array.ndim) + array.shape) if array.ndim < rank else array
    return np.ascontiguousarray(array.transpose(_inverse(perm)))


def _transpose_node(graph: Graph, src: str, perm, hint: str) -> onnx.NodeProto:
    return helper.make_node("Transpose", [src], [graph.fresh(hint)], perm=list(perm), name=graph.fresh("Transpose"))


def optimize_transposes(graph: Graph) -> int:
    """Cancel Transpose pairs and move Transposes down through elementwise ops, Pad and reductions so
    that NHWC↔NCHW round trips meet and cancel. Returns how many Transpose nodes are gone."""
    before = sum(n.op_type == "Transpose" for n in graph.nodes)
    changed = True
    while changed:
        changed = False
        for node in list(graph.nodes):
            if node not in graph.nodes:
                continue
            if node.op_type == "Transpose":
                changed |= _merge_transposes(graph, node)
            elif node.op_type in ELEMENTWISE_UNARY | ELEMENTWISE_NARY | REDUCE | {"Pad"}:
                changed |= _push_through(graph, node)
        graph.remove_dead()
    graph.infer()
    return before - sum(n.op_type == "Transpose" for n in graph.nodes)


def _merge_transposes(graph: Graph, node) -> bool:
    first = graph.producer.get(node.input[0])
    if first is None or first.op_type != "Transpose":
        return False
    p1, p2 = attr(first, "perm"), attr(node, "perm")
    if p1 is None or p2 is None:
        return False
    total = [p1[i] for i in p2]
    if total == list(range(len(total))):
        return graph.bypass(node, first.input[0])
    node.input[0] = first.input[0]
    set_attr(node, "perm", total)
    graph.refresh()
    return True


def _push_through(graph: Graph, node) -> bool:
    """op(Transpose(x)) -> Transpose(op(x)) when every non-constant input is a Transpose with the same
    perm and at least one of them is read by this node only (so the count of Transposes never grows)."""
    op = node.op_type
    data = [0] if op in ELEMENTWISE_UNARY | REDUCE | {"Pad"} else list(range(len(node.input)))
    if op == "Clip" or op in REDUCE or op == "Pad":
        if any(graph.const(i) is None for i in node.input[1:] if i):
            return False
    sources, perm = {}, None
    for i in data:
        name = node.input[i]
        if not name or graph.const(name) is not None:
            continue
        t = graph.producer.get(name)
        if t is None or t.op_type != "Transpose" or attr(t, "perm") is None:
            return False
        if perm is not None and list(attr(t, "perm")) != perm:
            return False
        perm = list(attr(t, "perm"))
        sources[i] = t
    if perm is None or not any(graph.uses(t.output[0]) == 1 for t in sources.values()):
        return False
    rank = len(perm)
    new_inputs = list(node.input)
    for i in data:
        if i in sources:
            new_inputs[i] = sources[i].input[0]
        elif new_inputs[i]:
            value = graph.const(new_inputs[i])
            if value.ndim > rank:
                return False
            new_inputs[i] = graph.add_const(_const_in_layout(value, rank, perm), "transposed")
    out_perm = perm
    if op == "Pad":
        if attr(node, "mode", b"constant") not in (b"constant", "constant") or (len(node.input) > 3 and node.input[3]):
            return False
        pads = graph.const(node.input[1]).astype(np.int64)
        if pads.size != 2 * rank:
            return False
        begin, end = pads[:rank], pads[rank:]
        new_pads = np.zeros(2 * rank, dtype=np.int64)
        for i, p in enumerate(perm):  # output axis i is input axis p
            new_pads[p], new_pads[rank + p] = begin[i], end[i]
        new_inputs[1] = graph.add_const(new_pads, "pads")
    elif op in REDUCE:
        axes = attr(node, "axes")
        from_input = axes is None and len(node.input) > 1 and node.input[1]
        if from_input:
            axes = graph.const(node.input[1]).tolist()
        if axes is None:
            return False  # all axes: any layout gives the same result, nothing to gain
        axes = [a % rank for a in axes]
        new_axes = sorted(perm[a] for a in axes)
        if from_input:
            new_inputs[1] = graph.add_const(np.array(new_axes, dtype=np.int64), "axes")
        else:
            set_attr(node, "axes", new_axes)
        if attr(node, "keepdims", 1) == 0:
            kept = [perm[i] for i in range(rank) if i not in axes]
            out_perm = [sorted(kept).index(k) for k in kept]
    for i, name in enumerate(new_inputs):
        node.input[i] = name
    out = node.output[0]
    inner = graph.fresh(out)
    node.output[0] = inner
    graph.refresh()
    if out_perm == list(range(len(out_perm))):
        graph.rename_uses(out, inner)
        if out in graph.output_names:
            node.output[0] = out
            graph.refresh()
    else:
        t = helper.make_node("Transpose", [inner], [out], perm=out_perm, name=graph.fresh("Transpose"))
        graph.nodes.append(t)
    graph.refresh()
    return True


def fuse_pad_into_conv(graph: Graph) -> list[dict]:
    """Pad(constant zeros, spatial axes only) → Conv becomes the Conv's own pads."""
    removed = []
    for pad in list(graph.nodes):
        if pad.op_type != "Pad" or attr(pad, "mode", b"constant") not in (b"constant", "constant"):
            continue
        conv = graph.only_consumer(pad.output[0])
        pads = graph.const(pad.input[1]) if len(pad.input) > 1 else None
        value = graph.const(pad.input[2]) if len(pad.input) > 2 and pad.input[2] else np.zeros(1)
        if (conv is None or conv.op_type != "Conv" or conv.input[0] != pad.output[0] or pads is None or value is None
                or (len(pad.input) > 3 and pad.input[3]) or np.any(value != 0)
                or attr(conv, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET")):
            continue
        rank = pads.size // 2
        begin, end = pads[:rank], pads[rank:]
        if np.any(pads < 0) or np.any(begin[:2]) or np.any(end[:2]):
            continue
        spatial = rank - 2
        old = attr(conv, "pads", [0] * (2 * spatial))
        set_attr(conv, "pads", [int(old[i] + begin[2 + i]) for i in range(spatial)]
                 + [int(old[spatial + i] + end[2 + i]) for i in range(spatial)])
        conv.input[0] = pad.input[0]
        graph.nodes.remove(pad)
        graph.refresh()
        removed.append({"node": pad.name or pad.output[0], "op": "Pad", "why": f"zero padding moved into the pads of {describe(conv)}"})
    graph.remove_dead()
    return removed


# --- counting (tests, reports, the benchmark) ------------------------------------------------------

def node_counts(model: onnx.ModelProto) -> dict[str, int]:
    return dict(sorted(Counter(node.op_type for node in model.graph.node).items()))


def bn_derived_nodes(model: onnx.ModelProto) -> int:
    """BatchNormalization nodes plus float Sub/Mul/Div nodes whose other operand is a constant (an
    initializer, a Constant node, or an Identity of one) with more than one value — what a BatchNorm
    becomes in Keras/TF exports (per-channel constants). Scalar constants (input normalization,
    x/255) and bias Adds are not counted."""
    graph = model.graph
    inputs = {x.name for x in graph.input}
    consts = {i.name: (i.data_type, int(np.prod(i.dims))) for i in graph.initializer if i.name not in inputs}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].type == onnx.AttributeProto.TENSOR:
            t = node.attribute[0].t
            consts[node.output[0]] = (t.data_type, int(np.prod(t.dims)))
        elif node.op_type == "Identity" and node.input[0] in consts:
            consts[node.output[0]] = consts[node.input[0]]
    count = 0
    for node in graph.node:
        if node.op_type == "BatchNormalization":
            count += 1
        elif node.op_type in ("Sub", "Mul", "Div") and len(node.input) == 2:
            a, b = (consts.get(i) for i in node.input)
            if (a is None) != (b is None) and (a or b)[0] in FLOATS and (a or b)[1] > 1:
                count += 1
    return count
