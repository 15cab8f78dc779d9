"""Numeric parity of every form of the model against its reference.

Tolerance: |a − b| ≤ ATOL + RTOL·|b| against the reference (the unfolded torch model in eval
mode, or for an ONNX input the input graph run with ORT_DISABLE_ALL), and the same argmax on
every input. Folding rounds W·s to float32 once instead of applying BN at run time, and ORT sums
in another order, so each output can move by a few float32 ulps times the length of the dot
products behind it (≈1e-6 on logits of magnitude ~10). 1e-5 leaves room for that and nothing
more: a wrong fold (a missed ε, a transposed scale, BN in train mode) moves logits by 1e-2 or more.

When a variant misses the tolerance, the unfolded model is run again in float64 and every
variant, the float32 reference included, is compared with that: it tells a wrong fold (the
float32 reference is close to float64, the variant is not) from a model whose float32 arithmetic
cannot meet 1e-5 at all. The verdict does not change: it still fails.

ONNX variants run in batches of 1, then 7 (an odd size), then up to 1000, so every check also
exercises the dynamic batch axis.
"""
import numpy as np
import onnx
import onnxruntime as ort
import torch

from export.errors import one_line

ATOL = 1e-5
RTOL = 1e-5
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


def run_torch(module: torch.nn.Module, inputs: np.ndarray, batch: int = 1000, dtype=torch.float32) -> np.ndarray:
    module.eval()
    with torch.no_grad():
        return np.concatenate([module(torch.from_numpy(inputs[i:i + batch]).to(dtype)).numpy()
                               for i in range(0, len(inputs), batch)])


def run_ort(session: ort.InferenceSession, inputs: np.ndarray, output_name: str | None = None) -> np.ndarray:
    name = session.get_inputs()[0].name
    outputs, start = [], 0
    for size in batch_plan(len(inputs)):
        outputs.append(session.run([output_name] if output_name else None, {name: inputs[start:start + size]})[0])
        start += size
    return np.concatenate(outputs)


def compare(outputs: np.ndarray, reference: np.ndarray) -> dict:
    if outputs.shape != reference.shape:
        return failed(f"outputs of shape {list(outputs.shape)}, the reference's are {list(reference.shape)}")
    diff = np.abs(outputs.astype(np.float64) - reference.astype(np.float64))
    rel = diff / np.maximum(np.abs(reference.astype(np.float64)), 1e-12)
    return {
        "max_abs_diff": float(diff.max()),
        "max_rel_diff": float(rel.max()),
        "argmax_agreement": float((outputs.argmax(1) == reference.argmax(1)).mean()),
        "within_tolerance": bool(np.all(diff <= ATOL + RTOL * np.abs(reference))),
    }


def failed(why: str) -> dict:
    return {"error": why, "within_tolerance": False, "argmax_agreement": 0.0}


def parity(reference_name: str, reference: np.ndarray, variants: dict, targets: np.ndarray | None = None,
           reference64=None) -> dict:
    """Every variant (outputs, or a function computing them) against the reference; passes when
    each is within tolerance and agrees on every argmax. A variant that raises fails with the
    error. `reference64()` (the unfolded model in float64) is called only on a failure."""
    def accuracy(outputs):
        return {} if targets is None else {"accuracy": float((outputs.argmax(1) == targets).mean())}

    rows, computed = {reference_name: accuracy(reference)}, {}
    for name, outputs in variants.items():
        try:
            computed[name] = outputs() if callable(outputs) else outputs
        except Exception as e:
            rows[name] = failed(f"{type(e).__name__}: {one_line(e)}")
            continue
        rows[name] = {**accuracy(computed[name]), **compare(computed[name], reference)}
    passed = all(r["within_tolerance"] and r["argmax_agreement"] == 1.0 for r in rows.values() if "within_tolerance" in r)
    result = {"images": int(len(reference)), "atol": ATOL, "rtol": RTOL, "passed": passed,
              "batch_sizes": sorted(set(batch_plan(len(reference)))), "reference": reference_name, "variants": rows}
    if not passed and reference64 is not None:
        result["float64"] = float64_diagnosis(reference64, reference_name, reference, computed)
    return result


def float64_diagnosis(reference64, reference_name: str, reference: np.ndarray, variants: dict[str, np.ndarray]) -> dict:
    """Each float32 output against the unfolded model run in float64, and what that says."""
    try:
        exact = reference64()
    except Exception as e:  # a model that cannot run in float64 (float32 constants made in forward, ...)
        return {"available": False, "why": f"the model cannot run in float64: {type(e).__name__}: {e}"[:300]}
    rows = {name: compare(outputs, exact) for name, outputs in {reference_name: reference, **variants}.items()}
    own = rows[reference_name]
    failing = [name for name, r in rows.items() if name != reference_name and not r["within_tolerance"]]
    if not own["within_tolerance"]:
        verdict = (f"float32 itself misses the tolerance on this model (the unfolded float32 model is "
                   f"{own['max_abs_diff']:.2e} from float64): 1e-5 cannot be met in float32 here")
    elif failing:
        verdict = f"the float32 reference is within tolerance of float64 but {', '.join(failing)} is not: a real error"
    else:
        verdict = "every variant is within tolerance of float64; they differ from the float32 reference by float32 rounding"
    return {"available": True, "reference": "the unfolded model in float64", "variants": rows, "diagnosis": verdict}


def format_table(result: dict) -> str:
    rows = [result["variants"]] + ([result["float64"]["variants"]] if result.get("float64", {}).get("available") else [])
    with_accuracy = any("accuracy" in r for table in rows for r in table.values())
    acc_head = f" {'accuracy':>9s}" if with_accuracy else ""
    lines = [f"parity on {result['images']} {result.get('inputs', 'inputs')} (atol {ATOL:g} + rtol {RTOL:g}, "
             f"vs {result.get('reference', 'the reference')}; batches {result.get('batch_sizes', '')}):",
             f"  {'variant':40s}{acc_head} {'max |diff|':>11s} {'max rel':>10s} {'argmax agree':>13s}  ok"]
    for prefix, table in zip(("", "vs float64: "), rows):
        for name, r in table.items():
            acc = (f" {r['accuracy']:9.4f}" if "accuracy" in r else f" {'':9s}") if with_accuracy else ""
            if "error" in r:
                lines.append(f"  {prefix + name:40s}{acc} FAILED: {r['error']}")
            elif "max_abs_diff" in r:
                lines.append(f"  {prefix + name:40s}{acc} {r['max_abs_diff']:11.2e} {r['max_rel_diff']:10.2e} "
                             f"{r['argmax_agreement']:13.4%}  {'yes' if r['within_tolerance'] else 'NO'}")
            else:
                lines.append(f"  {prefix + name:40s}{acc} {'reference':>11s}")
    if "float64" in result:
        lines.append("  float64: " + result["float64"].get("diagnosis", result["float64"].get("why", "")))
    lines.append("PARITY PASSED" if result["passed"] else "PARITY FAILED")
    return "\n".join(lines)
