"""Verification: every fold is exact, and every float32 form is as close to the model as float32 allows.

The ground truth is the unfolded model in float64: the torch module in double, or an ONNX graph
with float64 initializers (export/float64.py). float32 arithmetic itself does not meet a fixed
tolerance on deep nets (ResNet-50's own float32 outputs are ~1.5e-4 from float64), so a rule that
compares float32 forms with each other either refuses exact folds or lets wrong ones through.
Two checks instead, each where it can decide (docs/export.md, "What verified means"):

1. Fold exactness. The same fold passes run on the float64 copy of the model, so no weight is
   rounded to float32 in this check; the folded float64 model and the unfolded one must agree to
   EXACT_RTOL of the output's scale (max |a − b| ≤ 1e-9 · max |b|, per output). float64 rounding
   is ~1e-16 per operation, amplified by the depth and conditioning of the net: ~1e-13 on
   ResNet-50, so 1e-9 has orders of magnitude of room; a wrong fold (a channel's scale off by
   1e-4, a dropped bias, two channels swapped, a shift folded through zero padding) is 1e-6 or
   more. Each pass is checked on its own: the fx pass (torch module in double, before any ONNX
   export) and the ONNX graph pass (its input graph in float64, when it changed anything).
2. Deployment fidelity. Each float32 form (torch folded, ORT folded, ORT folded with
   ORT_DISABLE_ALL, the unfolded graph with ORT_DISABLE_ALL) is compared with the float64
   reference. It passes when every output is within ATOL + RTOL·|ref| (1e-5 + 1e-5·|ref|, the rule
   `make export` always had), or when its error adds at most FACTOR (2x) over the unfolded float32
   model's own error against float64 (the torch module in float32; for an ONNX source the input
   graph in float32) and it has at most FACTOR times that model's argmax disagreements with
   float64. Error is measured in units of the tolerance: max |v − ref| / (ATOL + RTOL·|ref|).
   Two float32 programs that sum in different orders have errors of the same size, not the same
   errors; 2x leaves room for that and for nothing a wrong fold does (check 1 catches those).
   One float32 run is one sample of float32's error, and on an ill-conditioned net (random BN
   statistics that amplify rounding a thousandfold) samples differ by 10x or more. So when a form
   fails against that one run, float32's own error becomes the worst of up to SPREAD_RUNS more runs
   of the unfolded model with every parameter moved one ulp, up or down at random (ulp_perturbed):
   the smallest change a float32 parameter can carry, the size of the rounding every folded weight
   carries. Drawing them only when a form needs them changes no verdict (the worst of more runs is
   never smaller), and keeps well-conditioned models at one run.

When no float64 copy can run (a forward that makes float32 tensors of its own, an op without a
float64 implementation), the float32 clause alone decides: every form within 1e-5 of the
unfolded float32 model and every argmax the same, and the report says that exactness was not
proven and why.

Each check's result is one small frozen type (Check: Exactness, Float32VsFloat64, Float32VsFloat32,
Float32Own; the INT8 and merge checks build on it) with a status (passed, failed or skipped), why,
its figures and as_dict() for the report. A skipped check proved nothing: it is never "passed".

ONNX forms run in batches of 1, then 7 (an odd size), then the rest, so every check also
exercises the dynamic batch axis. Outputs are lists of arrays, one per model output (a model
may return tuples, lists or dicts of tensors; they are flattened in torch's pytree order).
"""
import copy
import time
from dataclasses import dataclass, fields
from typing import ClassVar

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper
import torch

from export.errors import InternalError, one_line

ATOL = 1e-5
RTOL = 1e-5
EXACT_RTOL = 1e-9
FACTOR = 2.0
SPREAD_RUNS = 5
FIRST_BATCHES = (1, 7)


def ort_session(model: onnx.ModelProto | bytes | str, optimize: bool = True, threads: int = 0) -> ort.InferenceSession:
    """optimize=False runs with ORT_DISABLE_ALL: at ORT_ENABLE_BASIC onnxruntime folds Conv+BN on its
    own, and the unfolded reference would silently become a folded model."""
    options = ort.SessionOptions()
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    options.intra_op_num_threads = threads
    options.log_severity_level = 4  # errors reach the caller as exceptions; no second copy on stderr
    if isinstance(model, onnx.ModelProto):
        model = model.SerializeToString()
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def batch_plan(n: int, size: int = 1000) -> list[int]:
    """Batch sizes that cover n rows: 1, 7, then up to `size` each."""
    plan, done = [], 0
    for b in FIRST_BATCHES:
        if done < n:
            plan.append(min(b, n - done))
            done += plan[-1]
    while done < n:
        plan.append(min(size, n - done))
        done += plan[-1]
    return plan


def flat_outputs(out) -> list[torch.Tensor]:
    """A model's return value (a tensor, or tuples/lists/dicts of them) as a flat list, in pytree order."""
    return torch.utils._pytree.tree_leaves(out)


def run_torch(module: torch.nn.Module, inputs: np.ndarray, batch: int = 1000, dtype=torch.float32) -> list[np.ndarray]:
    module.eval()
    parts = []
    with torch.no_grad():
        for i in range(0, len(inputs), batch):
            parts.append([t.numpy() for t in flat_outputs(module(torch.from_numpy(inputs[i:i + batch]).to(dtype)))])
    return [np.concatenate(p) for p in zip(*parts)]


def run_ort(session: ort.InferenceSession, inputs: np.ndarray, names: list[str] | None = None,
            plan: list[int] | None = None) -> list[np.ndarray]:
    """Every output (or the named ones), in batches of `plan` (default: 1, 7, the rest)."""
    feed = session.get_inputs()[0].name
    parts, start = [], 0
    for size in plan or batch_plan(len(inputs)):
        parts.append(session.run(names, {feed: inputs[start:start + size]}))
        start += size
    return [np.concatenate(p) for p in zip(*parts)]


# --- what a check found: one small type per kind of check ----------------------------------------------

STATUSES = ("passed", "failed", "skipped")


@dataclass(frozen=True, kw_only=True)
class Check:
    """One check's result: `status` passed, failed or skipped; `why` (required unless it passed);
    the figures are the subclass's own fields. A skipped check proved nothing, so it is never
    "passed": as_dict() writes "passed" only for a check that ran (true or false)."""
    status: str
    why: str = ""
    kind: ClassVar[str] = "check"

    def __post_init__(self):
        if self.status not in STATUSES:
            raise InternalError(f"{type(self).__name__}: status {self.status!r}, want one of {', '.join(STATUSES)}")
        if self.status != "passed" and not self.why:
            raise InternalError(f"{type(self).__name__}: a {self.status} check must say why")

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    def figures(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name not in ("status", "why") and getattr(self, f.name) is not None}

    def as_dict(self) -> dict:
        """The report's form: {"kind", "status"[, "passed"][, "why"], figures...}."""
        head = {"kind": self.kind, "status": self.status}
        if self.status != "skipped":
            head["passed"] = self.passed
        if self.why:
            head["why"] = self.why
        return {**head, **self.figures()}


@dataclass(frozen=True, kw_only=True)
class Exactness(Check):
    """A fold (or merge) step run on the float64 copy of the model, against the unfolded model in
    float64: max |a − b| ≤ EXACT_RTOL · max |b| per output (`outputs`: name -> its figures)."""
    kind: ClassVar[str] = "exactness"
    relative: float | None = None
    max_abs_diff: float | None = None
    outputs: dict | None = None


@dataclass(frozen=True, kw_only=True)
class FormCheck(Check):
    """A float32 form's outputs against a reference: max |diff|, the error in units of ATOL + RTOL·|ref|
    (`tol_error`), its ratio to float32's own error, the clause that passed, argmax and accuracy."""
    kind: ClassVar[str] = "float32 form"
    max_abs_diff: float | None = None
    max_rel_diff: float | None = None
    tol_error: float | None = None
    within_tolerance: bool | None = None
    ratio: float | None = None
    clause: str | None = None
    argmax_disagreements: int | None = None
    argmax_agreement: float | None = None
    accuracy: float | None = None
    seconds: float | None = None


@dataclass(frozen=True, kw_only=True)
class Float32VsFloat64(FormCheck):
    """A float32 form against the unfolded model in float64: within 1e-5, or ≤ FACTOR x float32's own error."""
    kind: ClassVar[str] = "float32 vs float64"


@dataclass(frozen=True, kw_only=True)
class Float32VsFloat32(FormCheck):
    """A float32 form against a float32 reference (no float64 copy runs; `compare`): the fixed clause only."""
    kind: ClassVar[str] = "float32 vs float32"


@dataclass(frozen=True, kw_only=True)
class Float32Own(FormCheck):
    """The unfolded float32 model itself: the yardstick the other forms are judged by, never judged
    (skipped, `why` says so); failed when it does not run."""
    kind: ClassVar[str] = "float32's own error"


def check_dict(check) -> dict:
    """A check in the report's form (a dict read back from a report stays as it is)."""
    return check.as_dict() if isinstance(check, Check) else check


def tally(checks: dict) -> dict:
    """Check names by status, {"passed": [...], "failed": [...], "skipped": [...]}: what the verification
    proved, what it refuted, and what it did not check (which is not counted as passed)."""
    out = {status: [] for status in STATUSES}
    for name, check in checks.items():
        out[check_dict(check)["status"]].append(name)
    return out


# --- comparing ------------------------------------------------------------------------------------

def compare(outputs: np.ndarray, reference: np.ndarray) -> dict:
    """One array against a float32 reference with the fixed tolerance (float32 forms against each other:
    the ONNX pass tests and the Keras seeds use it); passed = within it and every argmax the same."""
    if outputs.shape != reference.shape:
        return Float32VsFloat32(status="failed", argmax_agreement=0.0, within_tolerance=False,
                                why=f"outputs of shape {list(outputs.shape)}, the reference's are "
                                    f"{list(reference.shape)}").as_dict()
    diff = np.abs(outputs.astype(np.float64) - reference.astype(np.float64))
    rel = diff / np.maximum(np.abs(reference.astype(np.float64)), 1e-12)
    within = bool(np.all(diff <= ATOL + RTOL * np.abs(reference)))
    agreement = float((outputs.argmax(1) == reference.argmax(1)).mean())
    why = "" if within and agreement == 1.0 else (
        f"max |diff| {float(diff.max()):.2e}" + ("" if within else f" beyond {ATOL:g} + {RTOL:g}|ref|")
        + ("" if agreement == 1.0 else f", argmax agreement {agreement:.2%}"))
    return Float32VsFloat32(status="failed" if why else "passed", why=why, max_abs_diff=float(diff.max()),
                            max_rel_diff=float(rel.max()), argmax_agreement=agreement, within_tolerance=within).as_dict()


def _shapes_differ(outputs: list, reference: list) -> str | None:
    if len(outputs) != len(reference):
        return f"{len(outputs)} outputs, the reference has {len(reference)}"
    for i, (a, b) in enumerate(zip(outputs, reference)):
        if a.shape != b.shape:
            return f"output {i} of shape {list(a.shape)}, the reference's is {list(b.shape)}"
    return None


def exactness(folded: list[np.ndarray], unfolded: list[np.ndarray], names: list[str]) -> Exactness:
    """A fold in float64 against the unfolded model in float64: max |a − b| ≤ EXACT_RTOL · max |b| per output."""
    if (why := _shapes_differ(folded, unfolded)) is not None:
        return Exactness(status="failed", why=why)
    outputs = {}
    for name, a, b in zip(names, folded, unfolded):
        diff, scale = float(np.abs(a - b).max(initial=0.0)), float(np.abs(b).max(initial=0.0))
        outputs[name] = {"max_abs_diff": diff, "scale": scale, "relative": diff / scale if scale else diff,
                         "exact": bool(diff <= EXACT_RTOL * scale) if scale else diff == 0.0}
    worst = max(outputs.values(), key=lambda r: r["relative"])
    exact = all(r["exact"] for r in outputs.values())
    return Exactness(status="passed" if exact else "failed", relative=worst["relative"], outputs=outputs,
                     max_abs_diff=max(r["max_abs_diff"] for r in outputs.values()),
                     why="" if exact else f"the folded float64 model is {worst['relative']:.2e} of the output's scale "
                                          f"from the unfolded one (exact folds agree to {EXACT_RTOL:g}): a wrong fold")


def _error(outputs: list[np.ndarray], reference: list[np.ndarray]) -> tuple[float, float]:
    """(max |v − ref|, the same in units of ATOL + RTOL·|ref|) over every output."""
    abs_diff = tol_units = 0.0
    for a, b in zip(outputs, reference):
        b = b.astype(np.float64)
        diff = np.abs(a.astype(np.float64) - b)
        abs_diff = max(abs_diff, float(diff.max(initial=0.0)))
        tol_units = max(tol_units, float((diff / (ATOL + RTOL * np.abs(b))).max(initial=0.0)))
    return abs_diff, tol_units


def measure(outputs, reference: list[np.ndarray], scores: int | None, targets: np.ndarray | None) -> dict | str:
    """One form's outputs (or a function computing them) against the reference: its figures (max
    |diff|, error in tolerance units, argmax disagreements for class scores, accuracy with targets),
    or why it could not be measured (it raised, or its outputs have other shapes)."""
    started = time.perf_counter()
    try:
        outputs = outputs() if callable(outputs) else outputs
    except Exception as e:
        return f"{type(e).__name__}: {one_line(e)}"
    if (why := _shapes_differ(outputs, reference)) is not None:
        return why
    abs_diff, error = _error(outputs, reference)
    row = {"max_abs_diff": abs_diff, "tol_error": error, "seconds": round(time.perf_counter() - started, 2)}
    if scores is not None:
        wrong = int((outputs[scores].argmax(1) != reference[scores].argmax(1)).sum())
        row.update(argmax_disagreements=wrong, argmax_agreement=1.0 - wrong / len(reference[scores]))
        if targets is not None:
            row["accuracy"] = float((outputs[scores].argmax(1) == targets).mean())
    return row


def _one_ulp(a: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return np.where(rng.random(a.shape) < 0.5, np.nextafter(a, np.inf), np.nextafter(a, -np.inf)).astype(a.dtype)


def ulp_perturbed(model, seed: int):
    """A copy of a torch module or an ONNX graph with every floating parameter, buffer, initializer
    and Constant moved by one ulp, up or down at random (seeded): a float32 model that differs from
    the original only by the rounding a float32 copy of it may carry."""
    rng, model = np.random.default_rng(seed), copy.deepcopy(model)
    if isinstance(model, torch.nn.Module):
        with torch.no_grad():
            for t in [*model.parameters(), *model.buffers()]:
                if t.is_floating_point():
                    t.copy_(torch.from_numpy(_one_ulp(t.detach().cpu().numpy(), rng)))
        return model
    tensors = list(model.graph.initializer) + [a.t for n in model.graph.node if n.op_type == "Constant"
                                               for a in n.attribute if a.name == "value"]
    for t in tensors:
        if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16):
            t.CopyFrom(numpy_helper.from_array(_one_ulp(numpy_helper.to_array(t), rng), t.name))
    return model


def judge(row: dict, own: dict | None) -> FormCheck:
    """The verdict on one measured form (its figures), given float32's own figures (None: `row` was
    measured against the float32 model itself, so the plain clause alone applies)."""
    own_wrong = (own or {}).get("argmax_disagreements") or 0
    argmax_ok = row.get("argmax_disagreements", 0) <= FACTOR * own_wrong
    within = row["tol_error"] <= 1.0
    ratio = row["tol_error"] / own["tol_error"] if own and own["tol_error"] > 0 else None
    if within and argmax_ok:
        clause = "within 1e-5"
    elif own and (ratio if ratio is not None else np.inf) <= FACTOR and argmax_ok:
        clause = f"<= {FACTOR:g}x float32's own"
    else:
        clause = None
    cls = Float32VsFloat64 if own is not None else Float32VsFloat32
    return cls(status="passed" if clause else "failed", why="" if clause else _miss(row, ratio), clause=clause,
               within_tolerance=within, ratio=ratio, **row)


def _miss(row: dict, ratio: float | None) -> str:
    text = f"{row['max_abs_diff']:.2e} from the reference ({row['tol_error']:.1f}x the tolerance"
    text += f", {ratio:.1f}x float32's own error)" if ratio is not None else ")"
    if row.get("argmax_disagreements"):
        text += f", {row['argmax_disagreements']} argmax disagreements"
    return text


def fidelity(variants: dict, reference: list[np.ndarray], own: str, scores: int | None,
             targets: np.ndarray | None = None, against_float64: bool = True, runs=None) -> dict:
    """Every float32 form against `reference`: the float64 model, or (against_float64=False, when no
    float64 copy runs) the outputs of the float32 model `own` itself, with the plain clause only.
    `variants` maps a name to outputs or to a function computing them, `own` among them; `scores` is
    the index of the class-score output (argmax checked) or None. `runs(k)` computes the outputs of
    the k-th ulp-perturbed float32 run of the unfolded model (k = 1 … SPREAD_RUNS), drawn only while
    a form fails against float32's own error so far. Returns {"variants": {name: FormCheck}, "own",
    "own_error", "passed" (no check failed)[, "float32_runs"]}."""
    rows = {name: measure(outputs, reference, scores, targets) for name, outputs in variants.items()}
    base = rows[own] if isinstance(rows[own], dict) else None
    judged = [n for n, r in rows.items() if n != own and isinstance(r, dict)]
    floor, drawn = base, []

    def verdicts() -> dict:
        return {name: judge(rows[name], floor if against_float64 else None) for name in judged}

    checks = verdicts()
    while (not all(c.passed for c in checks.values()) and against_float64 and base is not None
           and runs is not None and len(drawn) < SPREAD_RUNS):
        k = len(drawn) + 1
        run = measure(lambda: runs(k), reference, scores, None)
        if not isinstance(run, dict):  # a perturbed copy that does not run tells nothing: judge with what is there
            break
        drawn.append(run)
        floor = {"tol_error": max(r["tol_error"] for r in (base, *drawn)),
                 **({"argmax_disagreements": max(r["argmax_disagreements"] for r in (base, *drawn))}
                    if "argmax_disagreements" in base else {})}
        checks = verdicts()
    result = {}
    for name, row in rows.items():
        if name == own:
            result[name] = (Float32Own(status="skipped", **row, why="float32's own error (not judged)" if against_float64
                                       else "the reference (float32)") if base is not None
                            else Float32Own(status="failed", why=row))
        else:
            result[name] = checks.get(name) or (Float32VsFloat64 if against_float64 else Float32VsFloat32)(
                status="failed", why=row)
    out = {"variants": result, "own": own, "own_error": floor["tol_error"] if floor else None,
           "passed": not any(c.status == "failed" for c in result.values())}
    if drawn:
        out["float32_runs"] = {"tol_errors": [base["tol_error"], *(r["tol_error"] for r in drawn)],
                               **({"argmax_disagreements": [base["argmax_disagreements"],
                                                            *(r["argmax_disagreements"] for r in drawn)]}
                                  if "argmax_disagreements" in base else {})}
    return out


# --- the report's table -----------------------------------------------------------------------------

def format_table(result: dict) -> str:
    """The verification as people read it: the exactness checks, then every float32 form."""
    lines = [f"verified on {result['images']} {result.get('inputs', 'inputs')}; batches "
             f"{', '.join(map(str, result.get('batch_sizes', [])))}"]
    exact = {name: check_dict(r) for name, r in result.get("exactness", {}).items()}
    if exact:
        lines.append(f"fold exactness, float64 (max |folded - unfolded| <= {EXACT_RTOL:g} x max |unfolded|):")
        for name, r in exact.items():
            if r["status"] == "skipped":
                lines.append(f"  {name:34s} skipped: {r['why']}")
            elif "relative" not in r:
                lines.append(f"  {name:34s} FAILED: {r['why']}")
            else:
                lines.append(f"  {name:34s} {r['relative']:10.2e} of the output's scale  "
                             f"{'exact' if r['status'] == 'passed' else 'NOT EXACT: a wrong fold'}")
    f64 = result.get("float64", {})
    against = "the unfolded model in float64" if f64.get("available") else "the unfolded float32 model"
    lines.append(f"deployment fidelity vs {against} (pass: within {ATOL:g} + {RTOL:g}|ref|, or at most "
                 f"{FACTOR:g}x float32's own error):")
    rows = {name: check_dict(r) for name, r in result.get("variants", {}).items()}
    with_accuracy = any("accuracy" in r for r in rows.values())
    with_argmax = any("argmax_agreement" in r for r in rows.values())
    head = f"  {'variant':30s} {'max |diff|':>10s} {'err/tol':>8s} {'ratio':>6s}"
    head += f" {'argmax':>8s}" if with_argmax else ""
    head += f" {'accuracy':>9s}" if with_accuracy else ""
    lines.append(head + "  verdict")
    for name, r in rows.items():
        if "max_abs_diff" not in r:
            lines.append(f"  {name:30s} FAILED: {r['why']}")
            continue
        ratio = f"{r['ratio']:6.2f}" if r.get("ratio") is not None and np.isfinite(r["ratio"]) else f"{'':6s}"
        line = f"  {name:30s} {r['max_abs_diff']:10.2e} {r['tol_error']:8.2f} {ratio}"
        line += f" {r['argmax_agreement']:8.2%}" if with_argmax else ""
        line += f" {r['accuracy']:9.4f}" if with_accuracy else ""
        verdict = {"passed": f"ok ({r.get('clause')})", "failed": "FAILED", "skipped": r.get("why")}[r["status"]]
        lines.append(f"{line}  {verdict}")
    if "float32_runs" in result:
        errors = result["float32_runs"]["tol_errors"]
        lines.append(f"  float32's own error: the worst of {len(errors)} float32 runs of the unfolded model (as it is, "
                     f"then every parameter one ulp off): err/tol {', '.join(f'{e:.3g}' for e in errors)}")
    if not f64.get("available", True):
        lines.append(f"  float64: not available ({f64.get('why')}); fold exactness not proven, the float32 clause decided")
    for note in result.get("notes", []):
        lines.append(f"  {note}")
    if not result["passed"]:
        lines.append(f"VERIFICATION FAILED at {result.get('failed_step', '?')}: {result.get('why', '')}")
    else:
        counts = result.get("checks") or tally({**exact, **rows})
        checks = {**exact, **rows}  # float32's own error is the yardstick, skipped by nature: not listed
        skipped = [f"{n} ({checks[n]['why']})" for n in counts["skipped"]
                   if n in checks and checks[n].get("kind") != Float32Own.kind]
        lines.append(f"VERIFICATION PASSED: {len(counts['passed'])} checks passed"
                     + (f"; not checked: {'; '.join(skipped)}" if skipped else ""))
    return "\n".join(lines)
