"""The one fold report of both passes (the contract's `fold_report`): what the fx pass and the ONNX
graph pass folded, and one `kept` entry per BatchNorm left in the published graph, with why."""
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


def merge_fold_reports(fx: dict | None, onnx_pass: dict, before: onnx.ModelProto, after: onnx.ModelProto) -> dict:
    """One fold report for both passes (the contract's `fold_report`). `folded`: every fold,
    tagged with the pass that made it. `kept`: one entry per BatchNormalization node still in
    `after` ("node"), with the fx pass's reason (a BN it kept that the ONNX pass did not fold;
    "onnx_reason" too when that pass said why it could not either), else the ONNX pass's, else
    that neither pass explains it; then the ONNX pass's other kept entries (BN-like chains)."""
    module_of = {n.name: torch_module_of(n) for n in before.graph.node if n.op_type in BN_OPS}

    def node_of(entry: dict) -> str | None:  # the BN node an ONNX-pass entry names
        text = str(entry.get("bn", ""))
        return next((name for name in module_of if text == name or text.startswith(name + " ")), None)

    folded = [dict(e, **{"pass": "fx"}) for e in (fx or {}).get("folded", [])]
    for entry in onnx_pass.get("folded", []):
        module = module_of.get(node_of(entry))
        folded.append(dict(entry, **{"pass": "onnx"}, **({"module": module} if module else {})))
    fx_kept = [dict(e, **{"pass": "fx"}) for e in (fx or {}).get("kept", [])]
    onnx_kept = [(node_of(e), dict(e, **{"pass": "onnx"})) for e in onnx_pass.get("kept", [])]
    kept = []
    for node in after.graph.node:
        if node.op_type not in BN_OPS:
            continue
        # A node exported from inside a module fx called whole carries that module's scope ("3"),
        # not the BN's ("3.bn").
        scope = torch_module_of(node) or module_of.get(node.name)
        modules = [e["bn"].split(" (")[0] for e in fx_kept]
        at = next((i for i, m in enumerate(modules) if m == scope), None)
        if at is None:
            at = next((i for i, m in enumerate(modules) if scope is not None and m.startswith(scope + ".")), None)
        onnx_at = next((i for i, (name, _) in enumerate(onnx_kept) if name == node.name), None)
        onnx_entry = onnx_kept.pop(onnx_at)[1] if onnx_at is not None else None
        if at is not None:
            entry = fx_kept.pop(at)
            if onnx_entry:
                entry["onnx_reason"] = onnx_entry.get("reason")
        elif onnx_entry:
            entry = onnx_entry
        else:
            entry = {"bn": f"{node.name} ({node.op_type})", "pass": None,
                     "reason": "left in the graph; " + ("neither pass reported why" if fx else "the ONNX graph pass did not say why")}
        kept.append(dict(entry, node=node.name))
    kept += [entry for _, entry in onnx_kept]
    merged = {"folded": folded, "kept": kept, "removed_dropout": (fx or {}).get("removed_dropout", []),
              "removed": onnx_pass.get("removed", []), "untraceable": (fx or {}).get("untraceable", []),
              "notes": onnx_pass.get("notes", [])}
    merged.update({f"onnx_{k}": v for k, v in onnx_pass.items() if k not in ("folded", "kept", "removed", "notes")})
    return merged


def summary(fold_report: dict, torch_source: bool) -> str:
    by_pass = {p: sum(e.get("pass") == p for e in fold_report["folded"]) for p in ("fx", "onnx")}
    if not fold_report["folded"] and not fold_report["kept"] and not fold_report.get("removed"):
        return "nothing to fold: no BatchNorm in the graph; exported and verified as is"
    if not torch_source:
        return f"folded {by_pass['onnx']} BatchNorm(s) with the ONNX graph pass, kept {len(fold_report['kept'])}"
    return (f"folded {len(fold_report['folded'])} BatchNorm(s) ({by_pass['fx']} by the fx pass, {by_pass['onnx']} by "
            f"the ONNX graph pass), kept {len(fold_report['kept'])}")
