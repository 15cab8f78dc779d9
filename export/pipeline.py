"""One path for every source: fold -> check -> export -> verify -> publish.

Torch sources (`--run`, `--model`): the fx pass (export/fold.py) folds a float64 copy of the
module, where the folds are proven exact before anything is exported, and the float32 copy of the
result is what is exported (bit for bit the pass's float32 fold); torch.onnx exports the unfolded
model (the reference, model_unfolded.onnx) and the folded one (one export when the fx pass folded
nothing), which is cleaned up (constant folding; no BN fusion) and given to the ONNX graph pass
(export/onnx_fold.py) to fold what fx could not reach; that pass is proven exact the same way, on
its input graph in float64, when it changed anything. (A model that cannot run in float64 is
folded in float32 and judged by the float32 clause alone.)
ONNX sources: the ONNX graph pass alone, on the input graph (which is the reference).
Then every float32 form is checked against the float64 model (export/verify.py), and only when
every check passes are model.onnx, model_unfolded.onnx (+ .sha256) and export_report.json
written, atomically. A failure stops at the step where it happened and the report says which.
"""
import contextlib
import copy
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch

from common.files import sha256_file, write_json, write_with_checksum
from export.errors import BadInput, one_line
from export.float64 import Float64Graph, Float64Unavailable, to_float64
from export.fold import fold_batchnorm
from export.fold_report import merge_fold_reports, summary
from export.merge import culprit
from export.merge_fx import merge_branches
from export.merge_onnx import merge_onnx
from export.onnx_export import (BN_OPS, contract_metadata, export_to_proto, node_counts, output_kind, read_metadata,
                                rename_value, save_model, simplify, with_metadata)
from export.onnx_fold import fold_onnx
from export.report import REPORT_FORMAT
from export.sources import STALE_RUN, Source
from export.verify import (ATOL, EXACT_RTOL, FACTOR, RTOL, Exactness, batch_plan, check_dict, exactness, fidelity, tally,
                           format_table, ort_session, run_ort, run_torch, ulp_perturbed)

FOLDED, UNFOLDED, REPORT = "model.onnx", "model_unfolded.onnx", "export_report.json"
# The exactness checks run on the first EXACT_ROWS verification rows: a wrong fold shows on every
# input (tests/test_verify.py), and float64 is slow on CPU (~0.6 s per row for ImageNet-sized nets in
# torch, more through onnx.reference); the other rows (16 to 256, the 10k test images of a --run)
# are for float32 error statistics and accuracy.
EXACT_ROWS = 8


@dataclass(frozen=True, kw_only=True)
class MergeExactness(Exactness):
    """A merge step's exactness; when it failed, the block found wrong on its own by bisecting the merged
    blocks (`culprit`, None when none is alone) after `tried` partial merges."""
    culprit: str | None = None
    tried: int | None = None


class VerificationFailed(Exception):
    def __init__(self, step: str, why: str):
        super().__init__(f"{step}: {why}")
        self.step, self.why = step, why


class Steps:
    """Each step's wall time: a line when it starts (flushed, so a slow step shows what it is doing)
    and its seconds when it ends; `times` goes into the report."""

    def __init__(self):
        self.times = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        print(f"  {name} ...", end="", flush=True)
        started = time.perf_counter()
        try:
            yield
        finally:
            seconds = time.perf_counter() - started
            self.times[name] = round(seconds, 2)
            print(f" {seconds:.1f} s", flush=True)


def why_export(source: Source, out: Path) -> str | None:
    """--if-stale: None when `out` already holds a verified export of exactly this source, these options and
    (a run) these data files, the run not stale; else why it must be exported (again)."""
    try:
        report = json.loads((out / REPORT).read_text())
    except FileNotFoundError:
        return f"{out / REPORT} does not exist yet"
    except (OSError, ValueError):
        return f"{out / REPORT} cannot be read"
    try:
        if report.get("report_format") != REPORT_FORMAT:
            return f"{out / REPORT} was written by an older bnfold"
        if not report["parity"]["passed"]:
            return "the last export failed verification"
        request, had = json.loads(json.dumps(source.request)), report["request"]
        if request.get("data_sha256") != had.get("data_sha256"):
            return "the data files differ from the ones it was verified on"
        if request != had:
            changed = sorted(k for k in set(request) | set(had) if request.get(k) != had.get(k))
            return f"{', '.join(changed)} changed since the last export"
        if "int8" in request and report.get("int8", {}).get("status") != "passed":
            return "its INT8 model was not published (the report's int8 says why)"
        if json.loads(read_metadata(out / FOLDED)["source"])["sha256"] != source.sha256:
            return f"{out / FOLDED} was exported from other weights"
        for name, entry in report["files"].items():
            if sha256_file(out / name) != entry["sha256"]:
                return f"{out / name} is not the file the last export wrote (its sha256 differs)"
    except Exception as e:  # missing, unreadable or corrupt: any doubt means export again
        return f"the last export cannot be checked ({type(e).__name__}: {one_line(e, 120)})"
    stale = next((n for n in source.notes if n.startswith(STALE_RUN)), None)
    if stale:  # an export of a stale run is stale: exported again, with the note that says why
        return "its run is stale (" + stale[len(STALE_RUN):].split(":")[0].strip() + ")"
    return None


# --- the float64 ground truth and the exactness checks -------------------------------------------

class Checks:
    """What verification has found so far: the float64 reference, the exactness checks, the float32
    forms to judge. Filled step by step by the build; judged at the end (or at the first failure)."""

    def __init__(self, source: Source, steps: Steps):
        self.source, self.steps = source, steps
        self.names = [o["name"] for o in source.outputs]
        self.inputs64 = source.inputs.astype(np.float64)
        self.exact_rows = self.inputs64[:EXACT_ROWS]
        self.ref64, self.why64 = None, None
        self.exact, self.variants, self.own, self.notes = {}, {}, None, []
        self.runs = None  # k -> outputs of the k-th ulp-perturbed float32 run of the unfolded model

    def float64_reference(self, run, what: str) -> None:
        with self.steps(f"float64 reference ({what}, {len(self.inputs64)} rows)"):
            try:
                self.ref64 = run()
            except Float64Unavailable as e:
                self.why64 = str(e)
            except Exception as e:  # a forward that makes float32 tensors of its own, ...
                self.why64 = f"the model cannot run in float64: {type(e).__name__}: {one_line(e, 200)}"

    def exact_or_fail(self, step: str, run_folded, reference: list[np.ndarray]) -> None:
        """The folded float64 model against the unfolded one in float64; a failure stops the export here."""
        try:
            result = exactness(run_folded(), [r[:len(self.exact_rows)] for r in reference], self.names)
        except Float64Unavailable:
            raise
        except Exception as e:  # the folded model does not run: the fold broke it
            result = Exactness(status="failed", why=f"the folded float64 model does not run: {type(e).__name__}: "
                                                    f"{one_line(e)}")
        self.exact[step] = result
        if not result.passed:
            raise VerificationFailed(step, result.why)

    def onnx_pass(self, before: onnx.ModelProto, report: dict, folded: onnx.ModelProto,
                  published: onnx.ModelProto) -> None:
        """The ONNX pass's exactness: the same pass on `before` in float64, run against `before` in float64;
        then the same for its merge (`published` is `folded` merged), when it merged anything."""
        merged = bool(report.get("merged"))
        if not changed_numerics(report):
            self.exact["ONNX pass"] = Exactness(status="skipped", why="it changed nothing but Identity/Dropout nodes")
        if self.ref64 is None:
            for step, done in (("ONNX pass", changed_numerics(report)), ("ONNX merge", merged)):
                if done:
                    self.exact[step] = Exactness(status="skipped", why=f"no float64 copy runs ({self.why64})")
            return
        if not changed_numerics(report) and not merged:
            return
        step = "ONNX pass"
        with self.steps("ONNX pass exactness (float64)" + (", and of its merge" if merged else "")):
            try:
                folded64 = fold_onnx(to_float64(before))[0]
                if node_counts(folded64) != node_counts(folded):
                    raise VerificationFailed("ONNX pass", "the float64 copy was folded differently "
                                             f"({node_counts(folded64)} vs {node_counts(folded)})")
                # an ONNX source's input graph is the reference itself; a torch source's is the exported fx-folded graph
                reference = self.ref64 if self.source.module is None else Float64Graph(before)(self.exact_rows)
                if changed_numerics(report):
                    self.exact_or_fail("ONNX pass", lambda: Float64Graph(folded64)(self.exact_rows), reference)
                if merged:
                    step = "ONNX merge"
                    merged64 = merge_onnx(folded64, {})[0]
                    if node_counts(merged64) != node_counts(published):
                        raise VerificationFailed("ONNX merge", "the float64 copy was merged differently "
                                                 f"({node_counts(merged64)} vs {node_counts(published)})")
                    self.merged_or_fail("ONNX merge", [e.block for e in report["merged"]],
                                        lambda only: Float64Graph(merge_onnx(folded64, {}, only)[0])(self.exact_rows),
                                        reference)
            except Float64Unavailable as e:
                self.exact[step] = Exactness(status="skipped", why=str(e))
                self.notes.append(f"the ONNX pass's {'merges' if step == 'ONNX merge' else 'folds'} are not proven exact: {e}")

    def merged_or_fail(self, step: str, blocks: list[str], run_merged, reference: list[np.ndarray]) -> None:
        """A merge in float64 against the unfolded model in float64, as exact_or_fail; a failure names a
        block that is wrong on its own (merging only it, bisecting the blocks: run_merged(only=blocks))."""
        try:
            self.exact_or_fail(step, lambda: run_merged(None), reference)
        except VerificationFailed as failure:
            result = self.exact[step]
            if result.relative is None:  # it does not run, or has other outputs: that says enough
                raise
            rows = [r[:len(self.exact_rows)] for r in reference]
            errors = {}

            def wrong(only):
                errors[tuple(only)] = exactness(run_merged(set(only)), rows, self.names).relative
                return errors[tuple(only)] > EXACT_RTOL

            block = culprit(blocks, wrong)
            why = (f"the merged float64 model is {result.relative:.2e} of the output's scale from the unfolded one "
                   f"(exact merges agree to {EXACT_RTOL:g}): a wrong merge")
            why += f"; block {block} merged alone is {errors[(block,)]:.2e} off" if block else "; no block is wrong on its own"
            self.exact[step] = MergeExactness(status="failed", why=why, relative=result.relative, outputs=result.outputs,
                                              max_abs_diff=result.max_abs_diff, culprit=block, tried=len(errors))
            raise VerificationFailed(step, why) from failure

    def judge(self) -> dict:
        s = self.source
        available = self.ref64 is not None
        with self.steps(f"deployment fidelity ({len(self.variants)} float32 forms)"):
            if available:
                result = fidelity(self.variants, self.ref64, self.own, s.scores, s.targets, runs=self.runs)
            else:  # no float64 copy runs: the float32 clause alone, against the unfolded float32 model
                own = self.variants[self.own]
                reference = own() if callable(own) else own
                result = fidelity({**self.variants, self.own: reference}, reference, self.own, s.scores, s.targets,
                                  against_float64=False)
        result.pop("passed")
        failing = {n: c for n, c in result["variants"].items() if c.status == "failed"}
        return self.result(passed=not failing, **({} if not failing else {
            "failed_step": "deployment fidelity", "why": "; ".join(f"{n}: {c.why}" for n, c in failing.items())}),
            **result)

    def result(self, passed: bool, **fields) -> dict:
        """The report's `parity`: every check in its report form (status, why, figures); passed = no check failed."""
        s = self.source
        if "variants" in fields:
            fields["variants"] = {name: check_dict(c) for name, c in fields["variants"].items()}
        exactness = {step: check_dict(c) for step, c in self.exact.items()}
        return {"passed": passed, "checks": tally({**exactness, **fields.get("variants", {})}),
                "images": int(len(s.inputs)), "inputs": s.inputs_desc,
                "batch_sizes": sorted(set(batch_plan(len(s.inputs)))),
                "rule": {"exact_rtol": EXACT_RTOL, "atol": ATOL, "rtol": RTOL, "factor": FACTOR},
                "reference": "the unfolded model in float64" if self.ref64 is not None else "the unfolded float32 model",
                "float64": {"available": self.ref64 is not None, **({"why": self.why64} if self.why64 else {})},
                "exactness": exactness, "notes": self.notes, **fields}


def changed_numerics(onnx_report: dict) -> bool:
    """Whether the ONNX pass did more than drop Identity/Dropout nodes."""
    return bool(onnx_report.get("folded") or onnx_report.get("transposes_removed")
                or any(r.get("op") not in ("Identity", "Dropout") for r in onnx_report.get("removed", [])))


# --- building the graphs -----------------------------------------------------------------------

def build_torch(source: Source, out: Path, verify_only: bool, checks: Checks, merge: bool = True):
    """fx fold and merge, their float64 proofs, both exports, clean-up, the ONNX pass and merge (and
    their proofs). Returns the two graphs and the merged fold report; fills `checks` with the float32
    forms to judge."""
    steps, inputs, module = checks.steps, source.inputs, source.module
    module64 = copy.deepcopy(module).double()
    checks.float64_reference(lambda: run_torch(module64, checks.inputs64, dtype=torch.float64), "torch, double")
    if checks.ref64 is not None:
        # One fx pass, on the float64 copy: every fold is decided and computed in float64 either way and
        # rounded once, so the float32 copy of the result is bit for bit what the pass makes of the
        # float32 model (tests/test_fold_coverage.py), and the module proven here is the one exported.
        with steps("fx pass (float64; each trace checked on 2 rows)"):
            folded64, fx_report = fold_batchnorm(module64, (torch.from_numpy(checks.inputs64[:2]),))
        if not fx_report.folded:  # nothing folded: its traces were checked against the forward, nothing to prove
            checks.exact["fx pass"] = Exactness(status="skipped", why="it folded nothing")
        else:
            with steps("fx pass exactness (float64)"):
                checks.exact_or_fail("fx pass", lambda: run_torch(folded64, checks.exact_rows, dtype=torch.float64),
                                     checks.ref64)
        if merge:
            fx_merge(module64, folded64, fx_report, checks)
        folded_module = folded64.float()  # in place: GraphModule.__deepcopy__ drops plain attributes (ultralytics m.f)
        del module64, folded64
    else:
        with steps("fx pass (each trace checked on 2 rows)"):
            folded_module, fx_report = fold_batchnorm(module, (torch.from_numpy(inputs[:2]),))
            if merge:
                merge_branches(folded_module, fx_report, (torch.from_numpy(inputs[:2]),))
    checks.own = "torch eval (float32)"
    checks.runs = lambda k: run_torch(ulp_perturbed(module, k), inputs)
    with steps("torch forms (float32)"):
        try:
            checks.variants[checks.own] = run_torch(module, inputs)
        except Exception as e:  # the user's model itself, on the verification inputs: their input, not our bug
            raise BadInput(f"the model raises on the verification inputs ({len(inputs)} rows, batches of up to 1000): "
                           f"{type(e).__name__}: {one_line(e)}") from None
        try:
            checks.variants["torch folded"] = run_torch(folded_module, inputs)
        except Exception as e:
            raise VerificationFailed("fx pass", f"the folded module does not run: {type(e).__name__}: {one_line(e)}")
    if verify_only:
        checks.exact["ONNX pass"] = Exactness(status="skipped",
                                              why="not re-run by --verify-only (the published graph is judged below)")
        return _published(source, out)
    example, names = (2, *source.input_shape[1:]), checks.names
    with steps("torch.onnx.export, unfolded"):
        try:
            unfolded = export_to_proto(module, example, source.input_name, names)
        except BadInput as e:
            untraceable = "; ".join(f"{u['module']}: {u['reason']}" for u in fx_report.untraceable)
            raise BadInput(f"{e}; nor can fx trace {untraceable}" if untraceable else str(e)) from None
    if fx_report.folded or fx_report.merged:
        with steps("torch.onnx.export, folded"):
            folded_raw = export_to_proto(folded_module, example, source.input_name, names)
    else:  # the fx pass folded nothing: the unfolded export is the folded module's too (Dropout is Identity in eval)
        folded_raw = unfolded
    if source.kind == "pytorch" and names == ["logits"] and output_kind(unfolded, "logits") == "probabilities":
        for graph in {id(g): g for g in (unfolded, folded_raw)}.values():
            rename_value(graph, "logits", "probabilities")
        source.output_name = source.outputs[0]["name"] = checks.names[0] = "probabilities"
    print(f"  nodes of our folded module as exported: {node_counts(folded_raw)}")
    with steps("clean-up and ONNX pass" + (" and merge" if merge else "")):
        cleaned = simplify(folded_raw)  # constant folding first: exporter artefacts (zero biases made at run time, ...) go
        folded_graph, onnx_report = fold_onnx(cleaned)
        merged_graph, onnx_report = merge_onnx(folded_graph, onnx_report) if merge else (folded_graph, onnx_report)
    checks.onnx_pass(cleaned, onnx_report, folded_graph, merged_graph)
    return unfolded, merged_graph, merge_fold_reports(fx_report.as_dict(), onnx_report, cleaned, merged_graph, merge,
                                                      reference=unfolded)


def fx_merge(module64, folded64, fx_report, checks: Checks) -> None:
    """The fx merge on the folded float64 module (in place), and its proof: the merged float64 model
    against the unfolded one; a failure names a block wrong on its own (each try folds module64 anew)."""
    example = (torch.from_numpy(checks.inputs64[:2]),)
    with checks.steps("fx merge (float64)"):
        merge_branches(folded64, fx_report, example)
    if not fx_report.merged:
        checks.exact["fx merge"] = Exactness(status="skipped", why="it merged nothing")
        return

    def run_merged(only):
        model = folded64
        if only is not None:
            model, report = fold_batchnorm(module64, example)
            merge_branches(model, report, example, only)
        return run_torch(model, checks.exact_rows, dtype=torch.float64)

    with checks.steps("fx merge exactness (float64)"):
        checks.merged_or_fail("fx merge", [r.block for r in fx_report.merged], run_merged, checks.ref64)


def build_onnx(source: Source, out: Path, verify_only: bool, checks: Checks, merge: bool = True):
    graph = source.graph
    checks.float64_reference(lambda: Float64Graph(graph)(checks.inputs64), "the graph with float64 initializers")
    checks.own = "input graph (float32, DISABLE_ALL)"
    reference, step = ort_session(source.reference_graph, optimize=False), source.reference_batch or 1000
    checks.variants[checks.own] = lambda: run_ort(reference, source.inputs, plan=[step] * -(-len(source.inputs) // step))
    checks.runs = lambda k: run_ort(ort_session(ulp_perturbed(source.reference_graph, k), optimize=False), source.inputs,
                                    plan=[step] * -(-len(source.inputs) // step))
    if verify_only:
        checks.exact["ONNX pass"] = Exactness(status="skipped",
                                              why="not re-run by --verify-only (the published graph is judged below)")
        return _published(source, out)
    with checks.steps("ONNX pass" + (" and merge" if merge else "")):
        folded_graph, onnx_report = fold_onnx(graph)
        merged_graph, onnx_report = merge_onnx(folded_graph, onnx_report) if merge else (folded_graph, onnx_report)
    checks.onnx_pass(graph, onnx_report, folded_graph, merged_graph)
    return graph, merged_graph, merge_fold_reports(None, onnx_report, graph, merged_graph, merge)


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
    if "outputs" in meta:
        source.outputs = json.loads(meta["outputs"])
    source.output_name = meta.get("output_name") if "outputs" in meta else meta.get("output_name", source.output_name)
    if source.outputs and source.output_name and len(source.outputs) == 1:
        source.outputs[0]["name"] = source.output_name
    return unfolded, folded, json.loads(meta["fold_report"])


def onnx_forms(checks: Checks, unfolded: onnx.ModelProto, folded: onnx.ModelProto) -> None:
    inputs, names = checks.source.inputs, checks.names
    checks.variants["ORT folded"] = lambda: run_ort(ort_session(folded, optimize=True), inputs, names)
    checks.variants["ORT folded (DISABLE_ALL)"] = lambda: run_ort(ort_session(folded, optimize=False), inputs, names)
    checks.variants["ORT unfolded (DISABLE_ALL)"] = lambda: run_ort(ort_session(unfolded, optimize=False), inputs, names)


# --- the whole path ----------------------------------------------------------------------------

def export(source: Source, out: str | Path, verify_only: bool = False, merge: bool = True, int8=None) -> int:
    """Fold, merge, check, export, verify, publish. Returns 0, or 1 when a check fails (nothing published;
    when only an INT8 check fails, the FP32 files are published and the INT8 ones are not).
    Raises BadInput for input that cannot be exported as given (nothing written). verify_only: judge
    the files already in `out` and report on stdout only; nothing is written (not even the report).
    merge=False (--no-merge) keeps branches of one input as they are (export/merge.py).
    `int8`: export.int8.Options (docs/int8.md)."""
    out = Path(out)
    for note in source.notes:
        print(f"note: {note}")
    started = time.perf_counter()
    steps = Steps()
    checks = Checks(source, steps)
    build = build_torch if source.module is not None else build_onnx
    try:
        unfolded, folded, fold_report = build(source, out, verify_only, checks, merge)
    except VerificationFailed as e:
        result = checks.result(passed=False, failed_step=e.step, why=e.why, variants={})
        print(format_table(result))
        if verify_only:
            print(read_only(out))
        else:
            write_json(out / REPORT, {"report_format": REPORT_FORMAT, "name": source.name, "request": source.request,
                                      "parity": result, "timings": steps.times, "versions": versions()})
        return 1
    if not verify_only:
        print(f"{'exported' if source.module is not None else 'folded'} in {time.perf_counter() - started:.1f}s")
        unfolded = with_metadata(unfolded, contract_metadata({**contract_fields(source, unfolded, fold_report),
                                                              "folded": "false"}))
        folded = with_metadata(folded, contract_metadata({**contract_fields(source, unfolded, fold_report),
                                                          "folded": "true"}))

    if int8 is not None:
        from export.int8 import check_quantizable
        check_quantizable(folded)  # bad input: before anything is written
    before, after = node_counts(unfolded), node_counts(folded)
    print(f"nodes before folding: {before}\nnodes after folding{' (and clean-up)' if source.module is not None else ''}: {after}")
    for entry in fold_report.get("untraceable", []):  # .get: --verify-only may read a version-1 report
        print(f"  fx cannot trace {entry['module']}: {entry['reason']}; it is called whole")
    for entry in fold_report["folded"]:
        print(f"  folded {entry['bn']} {entry['direction']} into {entry['into']} ({entry.get('pass')} pass"
              + (", not a BatchNorm)" if entry.get("kind") == "affine" else ")"))
    for entry in fold_report["kept"]:
        print(f"  kept {entry['bn']}: {entry['reason']}"
              + (f"; ONNX pass: {entry['onnx_reason']}" if entry.get("onnx_reason") else ""))
    for entry in fold_report.get("merged", []):
        print(f"  merged {entry['block']}: {' + '.join(entry['branches'])}"
              + (f", then {', '.join(entry['after'])}" if entry.get("after") else "") + f" into {entry['into']} "
              f"({entry['pass']} pass)")
    for entry in fold_report.get("merge_refused", []):
        print(f"  not merged {entry['block']}: {entry['reason']} ({entry['pass']} pass)")
    for note in fold_report.get("notes", []):
        print(f"  ONNX graph pass: {note}")
    print(summary(fold_report, source.module is not None))

    onnx_forms(checks, unfolded, folded)
    result = checks.judge()
    print(format_table(result))
    meta = read_metadata(folded)
    report = {
        "report_format": REPORT_FORMAT, "contract_version": int(meta.get("contract_version", 1)),
        "name": meta.get("name", source.name),
        "source": json.loads(meta["source"]) if "source" in meta else {"kind": source.kind, "path": source.path},
        "request": source.request,
        "input": {"name": source.input_name, "shape": source.input_shape, "layout": source.layout,
                  "range": source.input_range, "background": source.background},
        "output": ({"name": source.output_name, "kind": meta.get("output_kind", "logits"), "classes": len(source.labels)}
                   if source.output_name else None),
        "outputs": source.outputs, "labels": source.labels, "notes": source.notes,
        "fold": fold_report, "summary": summary(fold_report, source.module is not None), "nodes_unfolded": before,
        "nodes_folded": after, "bn_dropout_left_in_folded": {op: n for op, n in after.items() if op in (*BN_OPS, "Dropout")},
        "parity": result, "timings": steps.times, "versions": versions(),
    }
    if source.kind == "run":  # kept from version 1 (python -m export.report reads them)
        report.update(run=source.path, arch=source.extra_metadata["arch"], weights_sha256=source.sha256,
                      torch_test_accuracy=float(source.extra_metadata["test_accuracy"]))
    if verify_only:  # a re-check reports; it changes nothing on disk
        print(("verified " if result["passed"] else "NOT verified: ") + f"{out / FOLDED}; " + read_only(out))
        return 0 if result["passed"] else 1
    quantized = None
    if int8 is not None and result["passed"]:  # in memory first: an internal error publishes nothing
        quantized = build_int8(int8, checks, folded, unfolded, fold_report, source.graph if source.module is None else None)
        report["int8"] = quantized.report
    if result["passed"]:
        report["files"] = {name: {"sha256": save_model(m, out / name)} for name, m in ((UNFOLDED, unfolded), (FOLDED, folded))}
        report["files"].update(publish_int8(quantized, out))
    report["timings"]["total"] = round(time.perf_counter() - started, 2)
    write_json(out / REPORT, report)
    if not result["passed"]:
        return 1
    if quantized is not None:
        from export.int8 import summary as int8_summary
        print(int8_summary(quantized.report))
        if not quantized.passed:
            print(f"wrote {out / FOLDED}, {out / UNFOLDED}, {out / REPORT} (FP32 only)")
            return 1
    written = f"{out / FOLDED}, {out / UNFOLDED}" + (", model_int8.onnx and its fingerprint" if quantized else "")
    print(f"wrote {written}, {out / REPORT}")
    return 0


def build_int8(options, checks: Checks, folded: onnx.ModelProto, unfolded: onnx.ModelProto, fold_report: dict, pass_input):
    """The INT8 step (export/int8.py), in memory, against the float64 reference (or, when none runs, the
    published float32 model as onnxruntime runs it)."""
    from export.int8 import build

    if checks.ref64 is not None:
        reference, what, rows = checks.ref64, "the unfolded model in float64", checks.exact_rows
    else:
        reference = run_ort(ort_session(folded, optimize=True), checks.source.inputs, checks.names)
        what, rows = "the published float32 model (no float64 copy runs)", None
    return build(options, checks.source, folded, fold_report, reference, what, rows, checks.steps, pass_input, unfolded)


def publish_int8(quantized, out: Path) -> dict:
    """model_int8.onnx and its fingerprint (+ .sha256) when INT8 passed; else no INT8 file is left beside
    the FP32 model just published (an earlier one would be another model's)."""
    from export.int8 import FINGERPRINT, INT8, remove_stale

    if quantized is None or not quantized.passed:
        remove_stale(out)
        return {}
    return {FINGERPRINT: {"sha256": write_with_checksum(out / FINGERPRINT, quantized.fingerprint)},
            INT8: {"sha256": write_with_checksum(out / INT8, quantized.model)}}


def read_only(out: Path) -> str:
    return (f"--verify-only wrote nothing: {out / FOLDED}, {out / UNFOLDED} and {out / REPORT} are as they were "
            "(the table above is the re-check)")


def contract_fields(source: Source, unfolded: onnx.ModelProto, fold_report: dict) -> dict:
    """The metadata of docs/onnx-contract.md for this source (None values are left out)."""
    classifier = source.output_name is not None
    fields = {
        "name": source.name, "input_name": source.input_name, "input_shape": source.input_shape,
        "input_layout": source.layout, "input_range": source.input_range, "image_background": source.background,
        "outputs": source.outputs, "output_name": source.output_name,
        "output_kind": output_kind(unfolded, source.output_name) if classifier else None,
        "labels": source.labels if classifier else None,
        "source": {"kind": source.kind, "path": source.path, "sha256": source.sha256,
                   **{k: v for k, v in source.source_extra.items() if v is not None}},
        "fold_report": fold_report, "producer": "bnfold (python -m export)", **source.extra_metadata}
    if source.module is not None:
        fields["torch_version"] = torch.__version__
    return fields


def versions() -> dict:
    import onnxruntime
    import onnxscript

    return {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
            "onnxscript": onnxscript.__version__}
