"""The one fold report of both passes (the contract's `fold_report`): what the fx pass and the ONNX
graph pass folded, and one `kept` entry per BatchNorm left in the published graph, with why — the
fx pass's reason and the ONNX pass's joined by the torch module the BN belongs to (each record's
`module` field; for an ONNX-pass record without one, the name scope of its nodes)."""
import onnx

from export.fold_records import entry, torch_module_of  # noqa: F401 (torch_module_of: public here too)
from export.onnx_export import BN_OPS


def _same_bn(scope: str | None, fx_entry: dict) -> bool:
    """Whether an exported node of torch module `scope` is the BN an fx entry names: that module, or
    a module fx called whole that holds it (its nodes carry the caller's scope "3", not "3.bn")."""
    module = fx_entry.get("module")
    return scope is not None and module is not None and (module == scope or module.startswith(scope + "."))


def merge_fold_reports(fx: dict | None, onnx_pass: dict, before: onnx.ModelProto, after: onnx.ModelProto,
                       merge: bool = True, reference: onnx.ModelProto | None = None) -> dict:
    """One fold report for both passes. `folded`: every fold, tagged with the pass that made it
    (`pass`), the torch module of an ONNX-pass fold (`module`) and what it is (`kind`: "batchnorm",
    or "affine" for a per-channel map that is not a BatchNorm, such as a layer scale). `kept`: one
    entry per BatchNorm left in `after`: the fx pass's entry (named after the module), with the ONNX
    pass's reason as "onnx_reason" when that pass could not fold it either; "node" names its
    BatchNormalization node. A BN the fx pass kept and the ONNX pass folded (or merged) is not kept.
    `merged` / `merge_refused`: both passes' merges of branches into one conv (export/merge.py), and
    the blocks they refused with why; with merge=False (--no-merge) both empty and a note says so.
    Each folded entry also names its layers' nodes in `after` (`into_nodes`: the merged conv's, when a
    merge took the layer in) and its BN's nodes in `reference`, the unfolded graph (`bn_nodes`).
    Entries are records (or dicts, from a stand-in pass)."""
    module_of = {n.name: torch_module_of(n) for n in before.graph.node}
    op_of = {n.name: n.op_type for n in before.graph.node}
    left = [n for n in after.graph.node if n.op_type in BN_OPS]

    def scope_of(e: dict) -> str | None:  # its own module, else its BatchNormalization node's, else its last node's
        if e.get("module") is not None:
            return e["module"]
        names = sorted(e.get("nodes", []), key=lambda n: op_of.get(n) in BN_OPS)
        return next((module_of[n] for n in reversed(names) if module_of.get(n)), None)

    fx = fx or {}
    fx_kept = [dict(e, **{"pass": "fx", "kind": e.get("kind", "batchnorm")}) for e in fx.get("kept", [])]
    bn_modules = [e["module"] for e in fx.get("folded", []) + fx.get("kept", []) if e.get("module") is not None]

    def pop_fx(scope: str | None) -> dict | None:  # the fx kept entry of that module, taken off the list
        at = next((i for i, e in enumerate(fx_kept) if scope is not None and e.get("module") == scope), None)
        at = at if at is not None else next((i for i, e in enumerate(fx_kept) if _same_bn(scope, e)), None)
        return fx_kept.pop(at) if at is not None else None

    def kind(e: dict, scope: str | None) -> str:  # the ONNX pass cannot tell a FrozenBatchNorm's Mul/Add from a layer scale; fx can
        # the node lies in a BN module (not merely in a module that holds one: YOLO's Detect decodes its boxes
        # with per-position Sub/Add/Mul beside the BNs of its convs)
        known = scope is not None and any(scope == m or scope.startswith(m + ".") for m in bn_modules)
        return "batchnorm" if known else e.get("kind", "batchnorm")

    folded = [dict(e, **{"pass": "fx", "kind": e.get("kind", "batchnorm")}) for e in fx.get("folded", [])]
    for e in map(entry, onnx_pass.get("folded", [])):
        scope = scope_of(e)
        pop_fx(scope)  # an fx-kept BN the ONNX pass folded: not kept
        folded.append(dict(e, **{"pass": "onnx", "kind": kind(e, scope)}, **({"module": scope} if scope else {})))

    merged_blocks = [entry(e) for e in fx.get("merged", [])] + [entry(e) for e in onnx_pass.get("merged", [])]
    for e in map(entry, onnx_pass.get("merged", [])):
        for module in e.get("bn_modules", []):
            pop_fx(module)  # an fx-kept BN the ONNX pass merged away: not kept
    _name_nodes(folded, merged_blocks, after, reference if reference is not None else before)

    kept, explained = [], set()
    for e in map(entry, onnx_pass.get("kept", [])):
        scope = scope_of(e)
        node = next((n.name for n in left if n.name in e.get("nodes", [])), None)
        explained.add(node)
        own = dict(e, **{"pass": "onnx", "kind": kind(e, scope)}, **({"module": scope} if scope else {}))
        fx_entry = pop_fx(scope)
        merged = dict(fx_entry, onnx_reason=e.get("reason"), nodes=e.get("nodes", [])) if fx_entry else own
        kept.append(dict(merged, **({"node": node} if node else {})))
    for node in left:
        if node.name in explained:
            continue
        fx_entry = pop_fx(torch_module_of(node) or module_of.get(node.name))
        kept.append(dict(fx_entry, node=node.name) if fx_entry else {
            "bn": f"{node.name} ({node.op_type})", "pass": None, "kind": "batchnorm", "node": node.name,
            "reason": "left in the graph; " + ("neither pass reported why" if fx else "the ONNX graph pass did not say why")})
    kept += fx_kept  # kept by fx, seen by neither the ONNX pass nor as a BatchNormalization node
    refused = [entry(e) for e in fx.get("merge_refused", []) + onnx_pass.get("merge_refused", [])]
    notes = list(onnx_pass.get("notes", [])) + ([] if merge else ["merging off (--no-merge): branches kept as they are"])
    report = {"folded": folded, "kept": kept, "merged": merged_blocks, "merge_refused": refused,
              "removed_dropout": fx.get("removed_dropout", []), "removed": onnx_pass.get("removed", []),
              "untraceable": fx.get("untraceable", []), "notes": notes}
    report.update({f"onnx_{k}": v for k, v in onnx_pass.items()
                   if k not in ("folded", "kept", "removed", "notes", "merged", "merge_refused")})
    return report


_LAYER_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def _name_nodes(folded: list[dict], merged: list[dict], after: onnx.ModelProto, reference: onnx.ModelProto) -> None:
    """`into_nodes` and `bn_nodes` of each folded entry (for readers that work on the graphs: INT8's bias
    correction needs each folded conv's BN). A layer a merge took in is the merged conv now."""
    now = {layer: m["layer"] for m in merged for layer in m.get("branch_layers", []) if m.get("layer")}
    by_scope, names = {}, {n.name for n in after.graph.node}
    for n in after.graph.node:
        if n.op_type in _LAYER_OPS:
            by_scope.setdefault(torch_module_of(n), []).append(n.name)
    bns = {}
    for n in reference.graph.node:
        if n.op_type in BN_OPS:
            bns.setdefault(torch_module_of(n), []).append(n.name)
    for e in folded:
        layers = [now.get(layer, layer) for layer in e.get("layers", [])]
        e["into_nodes"] = [n for layer in layers for n in ([layer] if layer in names else by_scope.get(layer, []))]
        e["bn_nodes"] = bns.get(e.get("module"), []) if e.get("module") else [
            n for n in e.get("nodes", []) if n in {m.name for m in reference.graph.node if m.op_type in BN_OPS}]


def summary(fold_report: dict, torch_source: bool) -> str:
    """One line: BatchNorms folded (per pass), other per-channel affine ops folded, blocks of branches
    merged into one conv (and refused), what stayed."""
    folded, kept = fold_report["folded"], fold_report["kept"]
    merged, refused = fold_report.get("merged", []), fold_report.get("merge_refused", [])
    merges = ""
    if merged or refused:
        bns = sum(len(e.get("bns", [])) for e in merged)
        merges = (f", merged {len(merged)} block(s) of branches into one conv each"
                  + (f" ({bns} BatchNorm(s) with them)" if bns else "") + (f", refused {len(refused)}" if refused else ""))
    if not folded and not kept and not fold_report.get("removed") and not merged and not refused:
        return "nothing to fold: no BatchNorm in the graph; exported and verified as is"
    bns = [e for e in folded if e.get("kind", "batchnorm") == "batchnorm"]
    affine = len(folded) - len(bns)
    by_pass = {p: sum(e.get("pass") == p for e in bns) for p in ("fx", "onnx")}
    kept_affine = sum(e.get("kind") == "affine" for e in kept)
    text = f"folded {affine} per-channel affine op(s), " if affine else "folded "
    text += (f"{len(bns)} BatchNorm(s) ({by_pass['fx']} by the fx pass, {by_pass['onnx']} by the ONNX graph pass)"
             if torch_source else f"{len(bns)} BatchNorm(s) with the ONNX graph pass")
    text += merges + f", kept {len(kept) - kept_affine}"
    return text + (f" and {kept_affine} per-channel affine op(s)" if kept_affine else "")
