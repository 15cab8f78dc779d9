"""One path for every source: fold -> export -> verify -> publish.

Torch sources (`--run`, `--model`): the fx pass folds the module (export/fold.py), torch.onnx
exports the unfolded model (the reference, model_unfolded.onnx) and the folded one, which is
cleaned up (constant folding; no BN fusion) and given to the ONNX graph pass (export/onnx_fold.py)
to fold what fx could not reach.
ONNX sources: the ONNX graph pass alone, on the input graph (which is the reference).
Then every variant is checked against the reference (export/verify.py), and only when all pass
are model.onnx, model_unfolded.onnx (+ .sha256) and export_report.json written, atomically.
"""
import copy
import json
import time
from pathlib import Path

import numpy as np
import onnx
import torch

from common.files import sha256_file, write_json
from export.errors import BadInput
from export.fold import fold_batchnorm
from export.fold_report import merge_fold_reports, summary
from export.onnx_export import (BN_OPS, contract_metadata, export_to_proto, node_counts, output_kind, read_metadata,
                                rename_value, save_model, simplify, with_metadata)
from export.onnx_fold import fold_onnx
from export.sources import Source
from export.verify import format_table, ort_session, parity, run_ort, run_torch

FOLDED, UNFOLDED, REPORT = "model.onnx", "model_unfolded.onnx", "export_report.json"


def is_current(source: Source, out: Path) -> bool:
    """--if-stale: `out` already holds a verified export of exactly this source and these options."""
    try:
        report = json.loads((out / REPORT).read_text())
        return (report["request"] == json.loads(json.dumps(source.request)) and report["parity"]["passed"]
                and json.loads(read_metadata(out / FOLDED)["source"])["sha256"] == source.sha256
                and all(sha256_file(out / name) == entry["sha256"] for name, entry in report["files"].items()))
    except Exception:  # missing, unreadable or corrupt: any doubt means export again
        return False


# --- building the graphs -----------------------------------------------------------------------

def build_torch(source: Source, out: Path, verify_only: bool):
    """fx fold, both exports, clean-up, the ONNX pass on the folded graph. Returns the two graphs,
    the merged fold report and the folded torch module."""
    folded_module, fx_report = fold_batchnorm(source.module)
    if verify_only:
        return (*_published(source, out), folded_module)
    example = (2, *source.input_shape[1:])
    try:
        unfolded = export_to_proto(source.module, example, source.input_name, source.output_name)
    except BadInput as e:
        untraceable = "; ".join(f"{u['module']}: {u['reason']}" for u in fx_report.untraceable)
        raise BadInput(f"{e}; nor can fx trace {untraceable}" if untraceable else str(e)) from None
    folded_raw = export_to_proto(folded_module, example, source.input_name, source.output_name)
    if source.kind == "pytorch" and output_kind(unfolded, source.output_name) == "probabilities":
        for graph in (unfolded, folded_raw):
            rename_value(graph, source.output_name, "probabilities")
        source.output_name = "probabilities"
    print(f"nodes of our folded module as exported: {node_counts(folded_raw)}")
    cleaned = simplify(folded_raw)  # constant folding first: exporter artefacts (zero biases made at run time, ...) go
    folded_graph, onnx_report = fold_onnx(cleaned)
    fold_report = merge_fold_reports(fx_report.as_dict(), onnx_report, cleaned, folded_graph)
    return unfolded, folded_graph, fold_report, folded_module


def build_onnx(source: Source, out: Path, verify_only: bool):
    if verify_only:
        return (*_published(source, out), None)
    folded_graph, onnx_report = fold_onnx(source.graph)
    return source.graph, folded_graph, merge_fold_reports(None, onnx_report, source.graph, folded_graph), None


def _published(source: Source, out: Path):
    """--verify-only: the graphs already in `out`, which must come from this source."""
    try:
        folded, unfolded = onnx.load(out / FOLDED), onnx.load(out / UNFOLDED)
    except FileNotFoundError as e:
        raise BadInput(f"{e.filename} is missing; export first (without --verify-only)") from None
    meta = read_metadata(folded)
    recorded = json.loads(meta["source"])["sha256"] if "source" in meta else meta.get("weights_sha256")
    if recorded != source.sha256:
        raise BadInput(f"{out / FOLDED} was not exported from {source.path}")
    source.output_name = meta.get("output_name", source.output_name)
    return unfolded, folded, json.loads(meta["fold_report"])


# --- verification ------------------------------------------------------------------------------

def verify_source(source: Source, unfolded: onnx.ModelProto, folded: onnx.ModelProto, folded_module) -> dict:
    inputs, name = source.inputs, source.output_name
    variants = {}
    if source.module is not None:
        reference_name = "torch eval (reference)"
        reference = run_torch(source.module, inputs)
        variants["torch folded"] = lambda: run_torch(folded_module, inputs)

        def reference64():
            return run_torch(copy.deepcopy(source.module).double(), inputs.astype(np.float64), dtype=torch.float64)
    else:
        reference_name = "input graph, DISABLE_ALL (reference)"
        session = ort_session(source.reference_graph, optimize=False)
        feed, output = session.get_inputs()[0].name, source.reference_graph.graph.output[0].name
        step = source.reference_batch or 1000
        reference = np.concatenate([session.run([output], {feed: inputs[i:i + step]})[0] for i in range(0, len(inputs), step)])
        reference64 = None
    variants["ORT folded"] = lambda: run_ort(ort_session(folded, optimize=True), inputs, name)
    variants["ORT folded (DISABLE_ALL)"] = lambda: run_ort(ort_session(folded, optimize=False), inputs, name)
    variants["ORT unfolded (DISABLE_ALL)"] = lambda: run_ort(ort_session(unfolded, optimize=False), inputs, name)
    result = parity(reference_name, reference, variants, source.targets, reference64)
    result["inputs"] = source.inputs_desc
    return result


# --- the whole path ----------------------------------------------------------------------------

def export(source: Source, out: str | Path, verify_only: bool = False) -> int:
    """Fold, export, verify, publish. Returns 0, or 1 when parity fails (nothing published).
    Raises BadInput for input that cannot be exported as given (nothing written)."""
    out = Path(out)
    for note in source.notes:
        print(f"note: {note}")
    started = time.perf_counter()
    build = build_torch if source.module is not None else build_onnx
    unfolded, folded, fold_report, folded_module = build(source, out, verify_only)
    if not verify_only:
        print(f"{'exported' if source.module is not None else 'folded'} in {time.perf_counter() - started:.1f}s")
        kind = output_kind(unfolded, source.output_name)
        fields = {
            "name": source.name, "input_name": source.input_name, "input_shape": source.input_shape,
            "input_layout": source.layout, "input_range": source.input_range, "image_background": source.background,
            "output_name": source.output_name, "output_kind": kind, "labels": source.labels,
            "source": {"kind": source.kind, "path": source.path, "sha256": source.sha256,
                       **{k: v for k, v in source.source_extra.items() if v is not None}},
            "fold_report": fold_report, "producer": "bnfold (python -m export)", **source.extra_metadata}
        if source.module is not None:
            fields["torch_version"] = torch.__version__
        unfolded = with_metadata(unfolded, contract_metadata({**fields, "folded": "false"}))
        folded = with_metadata(folded, contract_metadata({**fields, "folded": "true"}))

    before, after = node_counts(unfolded), node_counts(folded)
    print(f"nodes before folding: {before}\nnodes after folding{' (and clean-up)' if source.module is not None else ''}: {after}")
    for entry in fold_report.get("untraceable", []):  # .get: --verify-only may read a version-1 report
        print(f"  fx cannot trace {entry['module']}: {entry['reason']}; it is called whole")
    for entry in fold_report["folded"]:
        print(f"  folded {entry['bn']} {entry['direction']} into {entry['into']} ({entry.get('pass')} pass)")
    for entry in fold_report["kept"]:
        print(f"  kept {entry['bn']}: {entry['reason']}")
    for note in fold_report.get("notes", []):
        print(f"  ONNX graph pass: {note}")
    print(summary(fold_report, source.module is not None))

    result = verify_source(source, unfolded, folded, folded_module)
    print(format_table(result))
    meta = read_metadata(folded)
    report = {
        "contract_version": int(meta.get("contract_version", 1)), "name": meta.get("name", source.name),
        "source": json.loads(meta["source"]) if "source" in meta else {"kind": source.kind, "path": source.path},
        "request": source.request,
        "input": {"name": source.input_name, "shape": source.input_shape, "layout": source.layout,
                  "range": source.input_range, "background": source.background},
        "output": {"name": source.output_name, "kind": meta.get("output_kind", "logits"), "classes": len(source.labels)},
        "labels": source.labels, "notes": source.notes,
        "fold": fold_report, "summary": summary(fold_report, source.module is not None), "nodes_unfolded": before, "nodes_folded": after,
        "bn_dropout_left_in_folded": {op: n for op, n in after.items() if op in (*BN_OPS, "Dropout")},
        "parity": result, "versions": versions(),
    }
    if source.kind == "run":  # kept from version 1 (python -m export.report reads them)
        report.update(run=source.path, arch=source.extra_metadata["arch"], weights_sha256=source.sha256,
                      torch_test_accuracy=float(source.extra_metadata["test_accuracy"]))
    if result["passed"] and not verify_only:
        report["files"] = {name: {"sha256": save_model(m, out / name)} for name, m in ((UNFOLDED, unfolded), (FOLDED, folded))}
    elif result["passed"]:  # the files on disk are the ones just verified
        report["files"] = {name: {"sha256": sha256_file(out / name)} for name in (UNFOLDED, FOLDED)}
    write_json(out / REPORT, report)
    if not result["passed"]:
        return 1
    print(f"wrote {out / FOLDED}, {out / UNFOLDED}, {out / REPORT}" if not verify_only else f"verified {out / FOLDED}")
    return 0


def versions() -> dict:
    import onnxruntime
    import onnxscript

    return {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
            "onnxscript": onnxscript.__version__}
