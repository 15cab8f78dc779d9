"""The one fold report of both passes (the contract's `fold_report`): what the fx pass and the ONNX
graph pass folded, and one `kept` entry per BatchNorm left in the published graph, with why — the
fx pass's reason and the ONNX pass's joined by the torch module the BN belongs to."""
import ast

import onnx

from export.onnx_export import BN_OPS


def torch_module_of(node: onnx.NodeProto) -> str | None:
    """The torch module an exported node came from (torch.onnx's name scopes), e.g. 'layer1.0.bn1'."""
    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            try:
                scopes = ast.literal_eval(prop.value)
            except (ValueError, SyntaxError):
                return None
            return scopes[-2] if len(scopes) >= 2 and scopes[-2] else None
    return None


def _same_bn(scope: str | None, entry: dict) -> bool:
    """Whether an exported node of torch module `scope` is the BN an fx entry names: that module, or
    a module fx called whole that holds it (its nodes carry the caller's scope "3", not "3.bn")."""
    module = entry["bn"].split(" (")[0]
    return scope is not None and (module == scope or module.startswith(scope + "."))


def merge_fold_reports(fx: dict | None, onnx_pass: dict, before: onnx.ModelProto, after: onnx.ModelProto) -> dict:
    """One fold report for both passes. `folded`: every fold, tagged with the pass that made it
    (`pass`), the torch module of an ONNX-pass fold (`module`) and what it is (`kind`: "batchnorm",
    or "affine" for a per-channel map that is not a BatchNorm, such as a layer scale). `kept`: one
    entry per BatchNorm left in `after`: the fx pass's entry (named after the module), with the ONNX
    pass's reason as "onnx_reason" when that pass could not fold it either; "node" names its
    BatchNormalization node. A BN the fx pass kept and the ONNX pass folded is in `folded` only."""
    module_of = {n.name: torch_module_of(n) for n in before.graph.node}
    op_of = {n.name: n.op_type for n in before.graph.node}
    left = [n for n in after.graph.node if n.op_type in BN_OPS]

    def nodes_of(entry: dict) -> list[str]:  # the nodes an ONNX-pass entry names ("nodes", else its "bn" text)
        text = str(entry.get("bn", ""))
        return entry.get("nodes") or [n for n in module_of if text == n or text.startswith(n + " ")][:1]

    def scope_of(entry: dict) -> str | None:  # its BatchNormalization node's module, else its last node's
        names = sorted(nodes_of(entry), key=lambda n: op_of.get(n) in BN_OPS)
        return next((module_of[n] for n in reversed(names) if module_of.get(n)), None)

    fx = fx or {}
    fx_kept = [dict(e, **{"pass": "fx", "kind": e.get("kind", "batchnorm")}) for e in fx.get("kept", [])]
    bn_modules = [e["bn"].split(" (")[0] for e in fx.get("folded", []) + fx.get("kept", [])]

    def pop_fx(scope: str | None) -> dict | None:  # the fx kept entry of that module, taken off the list
        at = next((i for i, e in enumerate(fx_kept) if e["bn"].split(" (")[0] == scope), None)
        at = at if at is not None else next((i for i, e in enumerate(fx_kept) if _same_bn(scope, e)), None)
        return fx_kept.pop(at) if at is not None else None

    def kind(entry: dict, scope: str | None) -> str:  # the ONNX pass cannot tell a FrozenBatchNorm's Mul/Add from a layer scale; fx can
        # the node lies in a BN module (not merely in a module that holds one: YOLO's Detect decodes its boxes
        # with per-position Sub/Add/Mul beside the BNs of its convs)
        known = scope is not None and any(scope == m or scope.startswith(m + ".") for m in bn_modules)
        return "batchnorm" if known else entry.get("kind", "batchnorm")

    folded = [dict(e, **{"pass": "fx", "kind": e.get("kind", "batchnorm")}) for e in fx.get("folded", [])]
    for entry in onnx_pass.get("folded", []):
        scope = scope_of(entry)
        pop_fx(scope)  # an fx-kept BN the ONNX pass folded: not kept
        folded.append(dict(entry, **{"pass": "onnx", "kind": kind(entry, scope)}, **({"module": scope} if scope else {})))

    kept, explained = [], set()
    for entry in onnx_pass.get("kept", []):
        scope = scope_of(entry)
        node = next((n.name for n in left if n.name in nodes_of(entry)), None)
        explained.add(node)
        own = dict(entry, **{"pass": "onnx", "kind": kind(entry, scope)}, **({"module": scope} if scope else {}))
        fx_entry = pop_fx(scope)
        merged = dict(fx_entry, onnx_reason=entry.get("reason"), nodes=nodes_of(entry)) if fx_entry else own
        kept.append(dict(merged, **({"node": node} if node else {})))
    for node in left:
        if node.name in explained:
            continue
        fx_entry = pop_fx(torch_module_of(node) or module_of.get(node.name))
        kept.append(dict(fx_entry, node=node.name) if fx_entry else {
            "bn": f"{node.name} ({node.op_type})", "pass": None, "kind": "batchnorm", "node": node.name,
            "reason": "left in the graph; " + ("neither pass reported why" if fx else "the ONNX graph pass did not say why")})
    kept += fx_kept  # kept by fx, seen by neither the ONNX pass nor as a BatchNormalization node
    merged = {"folded": folded, "kept": kept, "removed_dropout": fx.get("removed_dropout", []),
              "removed": onnx_pass.get("removed", []), "untraceable": fx.get("untraceable", []),
              "notes": onnx_pass.get("notes", [])}
    merged.update({f"onnx_{k}": v for k, v in onnx_pass.items() if k not in ("folded", "kept", "removed", "notes")})
    return merged


def summary(fold_report: dict, torch_source: bool) -> str:
    """One line: BatchNorms folded (per pass), other per-channel affine ops folded, what stayed."""
    folded, kept = fold_report["folded"], fold_report["kept"]
    if not folded and not kept and not fold_report.get("removed"):
        return "nothing to fold: no BatchNorm in the graph; exported and verified as is"
    bns = [e for e in folded if e.get("kind", "batchnorm") == "batchnorm"]
    affine = len(folded) - len(bns)
    by_pass = {p: sum(e.get("pass") == p for e in bns) for p in ("fx", "onnx")}
    kept_affine = sum(e.get("kind") == "affine" for e in kept)
    text = f"folded {affine} per-channel affine op(s), " if affine else "folded "
    text += (f"{len(bns)} BatchNorm(s) ({by_pass['fx']} by the fx pass, {by_pass['onnx']} by the ONNX graph pass)"
             if torch_source else f"{len(bns)} BatchNorm(s) with the ONNX graph pass")
    text += f", kept {len(kept) - kept_affine}"
    return text + (f" and {kept_affine} per-channel affine op(s)" if kept_affine else "")
