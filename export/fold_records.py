"""What the fold passes say they did: one record per BatchNorm (or BN-like per-channel affine chain),
folded into layers or kept and why, made the same way by the fx pass (export/fold.py) and the ONNX
graph pass (export/onnx_fold.py), and one per block of branches merged into one conv (or refused),
by both merges (export/merge_fx.py, export/merge_onnx.py); `as_dict` writes them into the contract's
`fold_report`.

No torch here: the ONNX pass imports it without torch.
"""
import ast
from dataclasses import dataclass


@dataclass(frozen=True)
class FoldRecord:
    """One BatchNorm (or per-channel affine chain): folded into `layers`, or kept because `reason`.

    The names are explicit fields, so readers (the merged report, INT8 bias correction) never parse
    the display strings: `module` is the torch module the BN belongs to ("layer1.0.bn1"; for the
    ONNX pass, from torch.onnx's name scopes when the graph has them), `layers` the layers it was
    folded into by name (torch module paths in the fx pass, node names in the ONNX pass), `nodes`
    the ONNX nodes of the chain."""
    pass_name: str                # "fx" or "onnx"
    bn: str                       # as people read it: "layer1.0.bn1 (BatchNorm2d)", "bn/Sub (Sub), bn/Mul (Mul)"
    kind: str = "batchnorm"       # "batchnorm", or "affine": a per-channel map that is no BatchNorm (a layer scale)
    module: str | None = None     # the torch module of the BN, None when not known
    layers: tuple[str, ...] = ()  # the layers it was folded into, by name; () when kept
    into: str | None = None       # the same layers as people read them: "conv1 (Conv2d), conv2 (Conv2d)"
    direction: str | None = None  # "backward" (into the layer before) or "forward" (into the layer after)
    reason: str | None = None     # why it was kept
    nodes: tuple[str, ...] = ()   # ONNX pass: the nodes of the affine chain

    @property
    def folded(self) -> bool:
        return self.direction is not None

    def as_dict(self) -> dict:
        entry = {"bn": self.bn, **({"into": self.into, "layers": list(self.layers), "direction": self.direction}
                                   if self.folded else {"reason": self.reason}),
                 "kind": self.kind, "pass": self.pass_name}
        if self.module is not None:
            entry["module"] = self.module
        if self.nodes:
            entry["nodes"] = list(self.nodes)
        return entry


@dataclass(frozen=True)
class MergeRecord:
    """Branches of one input merged into one conv (export/merge.py), or refused and why."""
    pass_name: str                   # "fx" or "onnx"
    block: str                       # the block: its modules' common path, or its sum's node
    input: str | None = None         # what every branch reads
    branches: tuple[str, ...] = ()   # each branch, from the input to its sum, as people read it
    into: str | None = None          # the merged conv: "stages.1.0.merged (Conv2d 3x3)"
    layer: str | None = None         # the same by name (torch module path / ONNX node name)
    branch_layers: tuple[str, ...] = ()  # the branches' convs (and pools) it replaced, by name
    after: tuple[str, ...] = ()      # affine ops on sums it also took in (a BN after the sum, a layer scale)
    bns: tuple[str, ...] = ()        # the BatchNorms it removed (identity branches, after the sum)
    bn_modules: tuple[str, ...] = () # their torch modules, where known
    nodes: tuple[str, ...] = ()      # ONNX pass: the nodes it replaced
    reason: str | None = None        # refused: why

    def as_dict(self) -> dict:
        if self.reason is not None:
            return {"block": self.block, "reason": self.reason, "pass": self.pass_name}
        entry = {"block": self.block, "input": self.input, "branches": list(self.branches), "into": self.into,
                 "layer": self.layer, "branch_layers": list(self.branch_layers), "pass": self.pass_name,
                 "after": list(self.after), "bns": list(self.bns)}
        if self.bn_modules:
            entry["bn_modules"] = list(self.bn_modules)
        if self.nodes:
            entry["nodes"] = list(self.nodes)
        return entry


def entry(record) -> dict:
    """A report entry as a dict, from a record or from a dict already (a stand-in pass's)."""
    return record.as_dict() if isinstance(record, (FoldRecord, MergeRecord)) else dict(record)


def torch_module_of(node) -> str | None:
    """The torch module an exported ONNX node came from (torch.onnx's name scopes), e.g. 'layer1.0.bn1'."""
    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            try:
                scopes = ast.literal_eval(prop.value)
            except (ValueError, SyntaxError):
                return None
            return scopes[-2] if len(scopes) >= 2 and scopes[-2] else None
    return None
