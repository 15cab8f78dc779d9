"""The merge rule (export/merge.py) in ONNX graphs exported without re-parameterization, after the
ONNX fold pass (export/onnx_fold.py): Conv, AveragePool (counting its padding), BatchNormalization,
Add/Sub/Mul/Div with a constant, Neg, Sum, Identity/Dropout. Each block it merges becomes one Conv
node on the block's input. No torch here.

    merge_onnx(model, report, only=None) -> (model, report)

`report` is fold_onnx's report, updated: "merged" and "merge_refused" (MergeRecords), and the BN
chains a merge removed leave "kept". `only`, a set of block names, limits the merges to those.
"""
import numpy as np
import onnx
from onnx import helper

from export import merge
from export.fold_records import MergeRecord, torch_module_of
from export.merge import AFFINE, CONV, OTHER, PASS, SUM, Op
from export.onnx_fold import _affine, _check_signature, _data_input, _per_axis, _readers
from export.onnx_graph import Graph, attr, describe

ACTIVATIONS = {"Relu", "Clip", "Sigmoid", "Tanh", "LeakyRelu", "HardSigmoid", "HardSwish", "Elu", "Selu", "Gelu",
               "Mish", "Softplus", "Softsign", "PRelu", "ThresholdedRelu", "Celu", "Swish"}
ATTENTION = {"MatMul", "Softmax", "Einsum", "Attention", "MultiHeadAttention"}


def merge_onnx(model: onnx.ModelProto, report: dict, only=None) -> tuple[onnx.ModelProto, dict]:
    graph = Graph(model)
    view = OnnxView(graph)
    report.setdefault("merged", [])
    report.setdefault("merge_refused", [])
    explained, refusals, blocks, merged_nodes = set(), [], [], set()
    for node in reversed(list(graph._topological())):
        if not node.output or node.output[0] in explained:
            continue
        found = merge.match(view, node.output[0])
        if isinstance(found, merge.Refusal):  # refused for one branch: the sums inside may merge without it
            refusals.append(found)
            if found.term is None:
                explained.update(found.nodes)
        elif found is not None:
            explained.update(found.nodes)
            if only is None or found.name in only:
                nodes = [graph.producer[v].name or v for v in found.nodes]
                layers = tuple(graph.producer[v].name or v for v in found.convs)
                layer, into = _apply(graph, view, found)
                blocks.append(found)
                merged_nodes.update(nodes)
                report["merged"].append(MergeRecord(
                    "onnx", found.name, found.input, tuple(found.branches), into, layer, layers, tuple(found.after),
                    tuple(op.what for op in found.bns), tuple(op.module for op in found.bns if op.module), tuple(nodes)))
    report["merge_refused"] += [MergeRecord("onnx", r.name, reason=r.reason) for r in merge.reported(refusals, blocks)]
    report["kept"] = [r for r in report.get("kept", []) if not set(_nodes(r)) & merged_nodes]
    if not report["merged"]:
        return model, report
    graph.remove_dead()
    merged = graph.to_model()
    onnx.checker.check_model(merged, full_check=True)
    _check_signature(model, merged)
    return merged, report


def _nodes(record) -> list:
    return list(getattr(record, "nodes", None) or (record.get("nodes", []) if isinstance(record, dict) else []))


class OnnxView:
    """Each value of the graph (named by its tensor) as the rule's Op, from the node that makes it."""
    asymmetric_pads = True  # an ONNX Conv pads each end of an axis on its own

    def __init__(self, graph: Graph):
        self.graph = graph
        self._ops: dict = {}

    def readers(self, name: str) -> int:
        return _readers(self.graph, name)

    def producers(self, name: str) -> list:
        node = self.graph.producer.get(name)
        return [] if node is None else [i for i in node.input if i and self.graph.const(i) is None]

    def shape(self, name: str):
        return self.graph.shape(name)

    def op(self, name: str) -> Op:
        if name not in self._ops:
            node = self.graph.producer.get(name)
            self._ops[name] = Op(OTHER, what=f"the input {name}", why="a graph input") if node is None else self._op(node)
        return self._ops[name]

    def block_name(self, values, root) -> str:
        scopes = [m for m in (torch_module_of(self.graph.producer[v]) for v in values) if m]
        parts = [s.split(".") for s in scopes]
        common = []
        for level in zip(*parts) if parts else ():
            if len(set(level)) != 1:
                break
            common.append(level[0])
        return ".".join(common) or (self.graph.producer[root].name or root)

    def _op(self, node) -> Op:
        op, g, what = node.op_type, self.graph, describe(node)
        module = torch_module_of(node)
        if node.domain not in ("", "ai.onnx"):
            return Op(OTHER, what=what, why=f"{what}, an op of domain {node.domain}")
        if op in ("Identity", "Dropout") and len([o for o in node.output if o and g.uses(o)]) == 1:
            return Op(PASS, (node.input[0],), what=what)
        if op in ("Add", "Sub") and len(node.input) == 2 and all(g.const(i) is None for i in node.input):
            return Op(SUM, tuple(node.input), (1, 1 if op == "Add" else -1), what=what)
        if op == "Sum" and all(g.const(i) is None for i in node.input):
            return Op(SUM, tuple(node.input), (1,) * len(node.input), what=what)
        if op == "Mul" and len(node.input) == 2 and all(g.const(i) is None for i in node.input):
            return Op(OTHER, what=what, why=f"a product of two tensors, as in SE or attention ({what})")
        if op == "Neg":
            return Op(AFFINE, (node.input[0],), scale=-np.ones(1), shift=np.zeros(1), what=what)
        if op in ("Add", "Sub", "Mul", "Div", "BatchNormalization"):
            return self._affine(node, what, module)
        if op == "Conv":
            return self._conv(node, what, module)
        if op == "AveragePool":
            return self._pool(node, what, module)
        if op in ACTIVATIONS:
            return Op(OTHER, what=what, why=f"an activation ({what})")
        if op in ATTENTION:
            return Op(OTHER, what=what, why=f"attention ({what})")
        return Op(OTHER, what=what, why=f"{what}, which the merge does not read as linear")

    def _affine(self, node, what: str, module) -> Op:
        g = self.graph
        if node.op_type == "BatchNormalization" and attr(node, "training_mode", 0):
            return Op(OTHER, what=what, why=f"a BatchNormalization in training mode ({what})", branch_op=True)
        st = _affine(g, node)
        x = _data_input(g, node)
        shape = g.shape(x)
        if st is None or shape is None or len(shape) < 3 or not isinstance(shape[1], int):
            return Op(OTHER, what=what, why=f"{what}, which the merge does not read as one value per channel")
        s, t = (_per_axis(a, 1, shape[1]) for a in st)
        if s is None or t is None:
            return Op(OTHER, what=what, why=f"{what}: its constant varies along another axis than the channels")
        return Op(AFFINE, (x,), scale=s, shift=t, what=what, module=module,
                  batchnorm=node.op_type == "BatchNormalization")

    def _window(self, node, spatial: int):
        if attr(node, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET", b"VALID", "VALID"):
            return None
        pads = list(attr(node, "pads", [0] * (2 * spatial)))
        return (tuple(attr(node, "strides", [1] * spatial)), tuple(attr(node, "dilations", [1] * spatial)),
                tuple((pads[i], pads[spatial + i]) for i in range(spatial)))

    def _conv(self, node, what: str, module) -> Op:
        g = self.graph
        w = g.const(node.input[1]) if len(node.input) > 1 else None
        b = g.const(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        if w is None or (len(node.input) > 2 and node.input[2] and b is None) or g.const(node.input[0]) is not None:
            return Op(OTHER, what=what, why=f"{what} without constant weights")
        window = self._window(node, w.ndim - 2)
        if window is None:
            return Op(OTHER, what=what, why=f"{what} pads by auto_pad", branch_op=True)
        conv = merge.Conv(np.asarray(w, np.float64), None if b is None else np.asarray(b, np.float64), *window,
                          groups=attr(node, "group", 1))
        return Op(CONV, (node.input[0],), conv=conv, what=f"{what[:-1]} {'x'.join(map(str, w.shape[2:]))})",
                  module=module)

    def _pool(self, node, what: str, module) -> Op:
        shape, k = self.graph.shape(node.input[0]), list(attr(node, "kernel_shape"))
        window = self._window(node, len(k))
        if shape is None or not isinstance(shape[1], int) or window is None:
            return Op(OTHER, what=what, why=f"{what} of unknown shape, or padded by auto_pad", branch_op=True)
        if attr(node, "ceil_mode", 0):
            return Op(OTHER, what=what, why=f"an AveragePool with ceil_mode=1 ({what}): its last window may be partial",
                      branch_op=True)
        if not attr(node, "count_include_pad", 0) and any(p for pair in window[2] for p in pair):
            return Op(OTHER, what=what, why=f"an AveragePool that excludes its padding from the average ({what}, "
                                            f"count_include_pad=0)", branch_op=True)
        if any(d != 1 for d in window[1]):
            return Op(OTHER, what=what, why=f"a dilated AveragePool ({what})", branch_op=True)
        weight = np.full((shape[1], 1, *k), 1.0 / np.prod(k))
        return Op(CONV, (node.input[0],), conv=merge.Conv(weight, None, *window, groups=shape[1], diagonal=True),
                  what=what, module=module)


def _apply(graph: Graph, view: OnnxView, block: merge.Block) -> tuple[str, str]:
    """One Conv node on x in place of the block's nodes; its output keeps the root's name."""
    conv, root = block.conv, block.root
    dtype = next((graph.const(graph.producer[v].input[1]).dtype for v in block.nodes
                  if graph.producer[v].op_type == "Conv"), None) or np.dtype(np.float32)
    if graph.elem_type(block.x) == onnx.TensorProto.DOUBLE:
        dtype = np.dtype(np.float64)
    name = graph.fresh(f"{block.name}/merged")
    w = graph.add_const(conv.weight.astype(dtype), f"{name}.weight")
    b = graph.add_const(conv.bias.astype(dtype), f"{name}.bias")
    spatial = conv.weight.ndim - 2
    new = helper.make_node("Conv", [block.x, w, b], [root], name=name, kernel_shape=list(conv.weight.shape[2:]),
                           strides=list(conv.stride), dilations=list(conv.dilation), group=conv.groups,
                           pads=[p[0] for p in conv.pads] + [p[1] for p in conv.pads])
    scope = next((p for p in graph.producer[root].metadata_props if p.key == "pkg.torch.onnx.name_scopes"), None)
    if scope is not None:
        new.metadata_props.add().CopyFrom(scope)
    gone = {id(graph.producer[v]) for v in block.nodes}
    for value in block.nodes:
        if value != root:  # what is left reading it: Shape nodes (its shape is the root's)
            for reader in graph.consumers.get(value, []):
                if id(reader) not in gone:
                    reader.input[:] = [root if i == value else i for i in reader.input]
    graph.nodes = [n for n in graph.nodes if id(n) not in gone] + [new]
    graph.refresh()
    size = "x".join(map(str, conv.weight.shape[2:]))
    return name, f"{name} (Conv {size}" + (f", group {conv.groups})" if conv.groups > 1 else ")")
