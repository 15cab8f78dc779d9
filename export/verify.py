"""Numeric parity of every form of the model on the full 10k test set.

Tolerance: |a − b| ≤ ATOL + RTOL·|b| against the unfolded torch model in eval mode. Folding
rounds W·s to float32 once instead of applying BN at run time, and ORT sums in another order, so
each logit can move by a few float32 ulps times the length of the dot products behind it
(≈1e-6 on logits of magnitude ~10). 1e-5 leaves room for that and nothing more: a wrong fold (a
missed ε, a transposed scale, BN in train mode) moves logits by 1e-2 or more.
"""
import numpy as np
import onnx
import onnxruntime as ort
import torch

ATOL = 1e-5
RTOL = 1e-5


def ort_session(model: onnx.ModelProto | bytes | str, optimize: bool = True, threads: int = 0) -> ort.InferenceSession:
    """optimize=False runs with ORT_DISABLE_ALL: at ORT_ENABLE_BASIC onnxruntime folds Conv+BN on its
    own, and the unfolded reference would silently become a folded model."""
    options = ort.SessionOptions()
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    if isinstance(model, onnx.ModelProto):
        model = model.SerializeToString()
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def run_torch(module: torch.nn.Module, images: np.ndarray, batch: int = 1000) -> np.ndarray:
    module.eval()
    with torch.no_grad():
        return np.concatenate([module(torch.from_numpy(images[i:i + batch])).numpy()
                               for i in range(0, len(images), batch)])


def run_ort(session: ort.InferenceSession, images: np.ndarray, batch: int = 1000) -> np.ndarray:
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: images[i:i + batch]})[0]
                           for i in range(0, len(images), batch)])


def compare(logits: np.ndarray, reference: np.ndarray) -> dict:
    diff = np.abs(logits.astype(np.float64) - reference.astype(np.float64))
    rel = diff / np.maximum(np.abs(reference.astype(np.float64)), 1e-12)
    return {
        "max_abs_diff": float(diff.max()),
        "max_rel_diff": float(rel.max()),
        "argmax_agreement": float((logits.argmax(1) == reference.argmax(1)).mean()),
        "within_tolerance": bool(np.all(diff <= ATOL + RTOL * np.abs(reference))),
    }


def verify(unfolded_torch, folded_torch, folded_onnx, unfolded_onnx, images: np.ndarray, labels: np.ndarray) -> dict:
    """Every variant against the unfolded torch model in eval mode; passes when each is within
    tolerance and agrees on every argmax."""
    reference = run_torch(unfolded_torch, images)
    variants = {
        "torch folded": run_torch(folded_torch, images),
        "ORT folded": run_ort(ort_session(folded_onnx, optimize=True), images),
        "ORT unfolded (DISABLE_ALL)": run_ort(ort_session(unfolded_onnx, optimize=False), images),
    }
    rows = {"torch eval (reference)": {"accuracy": float((reference.argmax(1) == labels).mean())}}
    for name, logits in variants.items():
        rows[name] = {"accuracy": float((logits.argmax(1) == labels).mean()), **compare(logits, reference)}
    passed = all(r["within_tolerance"] and r["argmax_agreement"] == 1.0 for r in rows.values() if "within_tolerance" in r)
    return {"images": int(len(images)), "atol": ATOL, "rtol": RTOL, "passed": passed, "variants": rows}


def format_table(result: dict) -> str:
    lines = [f"parity on {result['images']} test images (atol {ATOL:g} + rtol {RTOL:g}, vs torch eval):",
             f"  {'variant':28s} {'accuracy':>9s} {'max |diff|':>11s} {'max rel':>10s} {'argmax agree':>13s}  ok"]
    for name, r in result["variants"].items():
        if "max_abs_diff" in r:
            lines.append(f"  {name:28s} {r['accuracy']:9.4f} {r['max_abs_diff']:11.2e} {r['max_rel_diff']:10.2e} "
                         f"{r['argmax_agreement']:13.4%}  {'yes' if r['within_tolerance'] else 'NO'}")
        else:
            lines.append(f"  {name:28s} {r['accuracy']:9.4f}")
    lines.append("PARITY PASSED" if result["passed"] else "PARITY FAILED")
    return "\n".join(lines)
