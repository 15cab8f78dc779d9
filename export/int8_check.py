"""How an INT8 model is judged (docs/int8.md, "What verified means for INT8"), and its fingerprint.

1. Consistency (`consistency`): the quantized graph is a quantization of the float graph it came from,
   checked constant by constant, like a fold's exactness: every integer weight dequantizes to within
   half a step of its float weight, with symmetric zero points, and the largest weight of each channel
   uses the type's range; every bias within half a step of the float bias (plus the bias correction
   applied), at the scale input·weight the fused kernels assume; every activation grid covers the
   range calibration saw (0 included) and is no coarser than that range needs. A weight scale that is
   off (one channel's doubled), a zero point moved by one, a correction applied twice or to another
   channel: each breaks one of these.
2. Fidelity (`fidelity`): the INT8 model as it is served (onnxruntime, the service's session settings,
   this host) against the float64 model on every verification row: accuracy where there are labels
   (the drop ≤ --max-drop percentage points), else, for a classifier, top-1 disagreement with float64
   ≤ --max-drop points (each lost correct answer is a disagreement, so this bounds the drop on those
   inputs whatever their labels), else every output's SQNR ≥ MIN_SQNR_DB. Always reported: top-1
   agreement and SQNR per output, and a per-layer SQNR table (`layer_sqnr`) naming the worst layers.
3. The fingerprint (`fingerprint`): rows, their INT8 outputs here and their float64 outputs, which the
   service re-runs at start on its own host (service/precision.py).
"""
import time
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from export.int8_graph import Net
from export.int8_quant import QParam, qparam, quantized_layers
from export.verify import Check, Exactness

MIN_SQNR_DB = 20.0
HALF_STEP = 0.5 * (1 + 1e-4)  # rounding to the nearest step, with float32's own rounding on top
SCALE_RTOL = 1e-5
LAYER_ROWS = 256       # at most, and as many as LAYER_SECONDS of served INT8 work allow (at least 4)
LAYER_SECONDS = 0.5


@dataclass(frozen=True, kw_only=True)
class Int8Equalization(Exactness):
    """Cross-layer equalization on the float64 copy of the folded graph against that copy (a rescaling
    changes no function): max |a − b| ≤ EXACT_RTOL · max |b|."""
    kind: ClassVar[str] = "int8 equalization exactness"
    rows: int | None = None


@dataclass(frozen=True, kw_only=True)
class Int8Quantization(Check):
    """onnxruntime.quantization made a quantized graph of this one (failed: it refused, and why)."""
    kind: ClassVar[str] = "int8 quantization"


@dataclass(frozen=True, kw_only=True)
class Int8Consistency(Check):
    """Check 1: the quantized graph against the float graph it quantizes, constant by constant."""
    kind: ClassVar[str] = "int8 consistency"
    layers: int | None = None
    activations: int | None = None
    faults: tuple | None = None


@dataclass(frozen=True, kw_only=True)
class Int8Fidelity(Check):
    """Check 2: the INT8 model as served, against the float64 model (`against`), by `rule`."""
    kind: ClassVar[str] = "int8 fidelity"
    rule: str | None = None
    against: str | None = None
    rows: int | None = None
    max_drop_pp: float | None = None
    min_sqnr_db: float | None = None
    accuracy_reference: float | None = None
    accuracy_int8: float | None = None
    drop_pp: float | None = None
    top1_agreement: float | None = None
    disagreement_pp: float | None = None
    outputs: dict | None = None


def service_session(model: onnx.ModelProto | bytes, threads: int = 1) -> ort.InferenceSession:
    """A session as service/model.py builds it (ORT_ENABLE_ALL, `threads` intra-op threads, one inter-op
    thread, no spinning): the form that is served is the form that is verified."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 4
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])


def sqnr_db(values: np.ndarray, reference: np.ndarray) -> float:
    """10·log10(Σ ref² / Σ (v − ref)²): how far above its quantization noise a signal stands."""
    ref = reference.astype(np.float64)
    noise = float(np.sum((values.astype(np.float64) - ref) ** 2))
    signal = float(np.sum(ref ** 2))
    if noise == 0.0:
        return float("inf")
    return 10.0 * np.log10(signal / noise) if signal > 0 else float("-inf")


# --- 1. consistency ---------------------------------------------------------------------------------------

def _type_range(dtype: np.dtype) -> tuple[int, int]:
    info = np.iinfo(dtype)
    return int(info.min), int(info.max)


def _channels(p: QParam, a: np.ndarray) -> np.ndarray:
    """`a` (shaped like p.q) as [channel, rest]: one row per scale."""
    if p.scale.ndim == 0 or p.scale.size == 1:
        return a.reshape(1, -1)
    return np.moveaxis(a, p.axis, 0).reshape(p.scale.size, -1)


def _weight_faults(name: str, w: QParam, weight: np.ndarray, weight_bound: int, midpoint: int) -> list[str]:
    faults = []
    if np.any(w.zero_point.astype(np.int64) != midpoint):
        bad = np.flatnonzero(w.zero_point.ravel().astype(np.int64) != midpoint)
        faults.append(f"{name}: weight zero point {int(w.zero_point.ravel()[bad[0]])} in channel {int(bad[0])}, "
                      f"symmetric weights have {midpoint}")
    steps = _channels(w, np.abs(w.dequantized() - weight)) / np.maximum(
        np.abs(w.scale.astype(np.float64)).reshape(-1, 1), 1e-300)
    worst = steps.max(axis=1)
    if worst.max(initial=0.0) > HALF_STEP:
        c = int(worst.argmax())
        faults.append(f"{name}: channel {c}'s integer weights are up to {worst[c]:.3g} steps from its float weights "
                      f"(rounding allows 0.5)")
    used = _channels(w, np.abs(w.q.astype(np.int64) - midpoint)).max(axis=1)
    live = _channels(w, np.abs(weight)).max(axis=1) > 0
    short = live & (used < weight_bound - 1)
    if short.any():
        c = int(np.flatnonzero(short)[0])
        faults.append(f"{name}: channel {c} uses integer weights up to {int(used[c])} of {weight_bound}: its scale "
                      f"is coarser than its weights need")
    return faults


def consistency(float_model: onnx.ModelProto, quantized: onnx.ModelProto, ranges: dict, bias_shifts: dict,
                weight_range: tuple[int, int]) -> dict:
    """Check 1 (module docstring). `ranges`: calibrated (min, max) per float tensor; `bias_shifts`: the float
    shift bias correction applied per layer; `weight_range`: the symmetric integer range of the weights."""
    fnet, qnet = Net(float_model), Net(quantized)
    midpoint = int(np.round((weight_range[0] + weight_range[1]) / 2))
    weight_bound = min(weight_range[1] - midpoint, midpoint - weight_range[0])
    faults, layers = [], quantized_layers(fnet, qnet)
    for name, (node, qnode, w, b) in layers.items():
        faults += _weight_faults(name, w, fnet.weight(node), weight_bound, midpoint)
        if b is None:
            continue
        x = qparam(qnet, qnode.input[0])
        if x is not None:
            want = x.scale.astype(np.float64) * w.scale.astype(np.float64)
            if not np.allclose(b.scale.astype(np.float64) * np.ones_like(want), want, rtol=SCALE_RTOL, atol=0):
                faults.append(f"{name}: bias scale is not input scale x weight scale, as the integer kernels assume")
        target = fnet.bias(node) + bias_shifts.get(name, 0.0)
        steps = np.abs(b.dequantized() - target) / np.maximum(np.abs(b.scale.astype(np.float64)), 1e-300)
        if steps.max(initial=0.0) > HALF_STEP:
            faults.append(f"{name}: bias of channel {int(steps.argmax())} is {steps.max():.3g} steps from its float "
                          f"value{' (corrected)' if name in bias_shifts else ''}")
    # activations: every QuantizeLinear's grid covers its tensor's calibrated range, and shared grids are no
    # coarser than the widest range among the tensors that use them
    grids, checked = {}, 0
    for node in quantized.graph.node:
        if node.op_type != "QuantizeLinear" or node.input[1] not in qnet.inits:
            continue
        tensor = node.input[0].removesuffix("_QuantizeLinear_Input")
        scale = float(numpy_helper.to_array(qnet.inits[node.input[1]]))
        zp_name = node.input[2] if len(node.input) > 2 else ""
        zp_array = numpy_helper.to_array(qnet.inits[zp_name]) if zp_name in qnet.inits else np.zeros((), np.uint8)
        zp, (qmin, qmax) = int(zp_array), _type_range(zp_array.dtype)
        if tensor not in ranges:
            continue
        lo, hi = min(ranges[tensor][0], 0.0), max(ranges[tensor][1], 0.0)
        checked += 1
        if not qmin <= zp <= qmax:
            faults.append(f"activation {tensor}: zero point {zp} outside [{qmin}, {qmax}]")
        elif (qmin - zp) * scale > lo + HALF_STEP * scale or (qmax - zp) * scale < hi - HALF_STEP * scale:
            faults.append(f"activation {tensor}: its grid [{(qmin - zp) * scale:.4g}, {(qmax - zp) * scale:.4g}] "
                          f"(scale {scale:.4g}, zero point {zp}) does not cover the calibrated range [{lo:.4g}, {hi:.4g}]")
        key = (node.input[1], zp_name)
        grids[key] = (scale, max(grids.get(key, (0, 0.0))[1], (hi - lo) / (qmax - qmin)))
    # every DequantizeLinear of an activation reads it back with the scale and zero point it was quantized with
    for node in quantized.graph.node:
        q = qnet.producer.get(node.input[0])
        if node.op_type != "DequantizeLinear" or q is None or q.op_type != "QuantizeLinear":
            continue
        for i, what in ((1, "scale"), (2, "zero point")):
            a, b = (qnet.array(n.input[i]) if len(n.input) > i and n.input[i] else None for n in (q, node))
            if a is None or b is None or not np.array_equal(np.asarray(a), np.asarray(b)):
                faults.append(f"activation {q.input[0]}: {node.name or 'a DequantizeLinear'} reads it back with another "
                              f"{what} than it was quantized with")
    for (scale_name, _), (scale, needed) in grids.items():
        if needed > 0 and scale > needed * (1 + SCALE_RTOL):
            faults.append(f"activation scale {scale_name} is {scale / needed:.3g}x what its widest calibrated range needs")
    figures = {"layers": len(layers), "activations": checked}
    if not layers:
        return Int8Consistency(status="failed", why="the quantized graph holds no integer weights", **figures)
    if faults:
        return Int8Consistency(status="failed", why="; ".join(faults[:3]) + (
            f"; and {len(faults) - 3} more" if len(faults) > 3 else ""), faults=tuple(faults), **figures)
    return Int8Consistency(status="passed", **figures)


# --- 2. fidelity ------------------------------------------------------------------------------------------

def run(session: ort.InferenceSession, rows: np.ndarray, batch: int = 1000) -> list[np.ndarray]:
    feed = session.get_inputs()[0].name
    parts = [session.run(None, {feed: rows[i:i + batch]}) for i in range(0, len(rows), batch)]
    return [np.concatenate(p) for p in zip(*parts)]


def fidelity(outputs: list[np.ndarray], reference: list[np.ndarray], names: list[str], scores: int | None,
             targets: np.ndarray | None, max_drop: float, against: str) -> Int8Fidelity:
    """Check 2 on the INT8 outputs against the float64 (or, when none runs, float32) reference."""
    per_output = {}
    for name, q, ref in zip(names, outputs, reference):
        per_output[name] = {"sqnr_db": round(sqnr_db(q, ref), 2)}
    figures = {"outputs": per_output, "max_drop_pp": max_drop, "rows": int(len(outputs[0])), "against": against}
    if scores is not None:
        q, ref = outputs[scores].argmax(1), reference[scores].argmax(1)
        agreement = float((q == ref).mean())
        per_output[names[scores]]["top1_agreement"] = agreement
        figures["top1_agreement"] = agreement
        if targets is not None:
            acc_ref, acc_q = float((ref == targets).mean()), float((q == targets).mean())
            drop = 100.0 * (acc_ref - acc_q)
            figures.update(rule="accuracy drop", accuracy_reference=acc_ref, accuracy_int8=acc_q, drop_pp=round(drop, 4))
            ok = drop <= max_drop
            why = f"accuracy {100 * acc_q:.2f}% against {100 * acc_ref:.2f}%: a drop of {drop:.2f} points > --max-drop {max_drop:g}"
        else:
            disagree = 100.0 * (1.0 - agreement)
            figures.update(rule="top-1 disagreement (no labels)", disagreement_pp=round(disagree, 4))
            ok = disagree <= max_drop
            why = (f"top-1 agrees with float64 on {100 * agreement:.2f}% of {len(q)} rows: {disagree:.2f} points disagree "
                   f"> --max-drop {max_drop:g} (without labels, disagreement bounds the accuracy drop)")
    else:
        worst = min(per_output, key=lambda n: per_output[n]["sqnr_db"])
        figures.update(rule=f"SQNR >= {MIN_SQNR_DB:g} dB (not a classifier)", min_sqnr_db=MIN_SQNR_DB)
        ok = per_output[worst]["sqnr_db"] >= MIN_SQNR_DB
        why = f"output {worst}: SQNR {per_output[worst]['sqnr_db']:.1f} dB < {MIN_SQNR_DB:g} dB"
    return Int8Fidelity(status="passed" if ok else "failed", **({} if ok else {"why": why}), **figures)


def layer_sqnr(float_model: onnx.ModelProto, quantized: onnx.ModelProto, rows: np.ndarray, worst: int = 5,
               seconds_per_row: float = 0.0) -> dict:
    """Each quantized activation (what the next layer reads, DequantizeLinear's output) against the same
    tensor of the float graph, SQNR over `rows`. The QDQ graph runs unfused here (its intermediate tensors
    are outputs): the figures locate error, the served form is judged by `fidelity`."""
    pairs = {}
    float_names = {o for n in float_model.graph.node for o in n.output} | {i.name for i in float_model.graph.input}
    producers = {o: n for n in quantized.graph.node for o in n.output}
    for node in quantized.graph.node:
        if node.op_type == "DequantizeLinear" and producers.get(node.input[0], None) is not None \
                and producers[node.input[0]].op_type == "QuantizeLinear":
            tensor = producers[node.input[0]].input[0].removesuffix("_QuantizeLinear_Input")
            if tensor in float_names:
                pairs.setdefault(tensor, node.output[0])
    if not pairs:
        return {"layers": [], "worst": []}
    fexp, qexp = _with_outputs(float_model, list(pairs)), _with_outputs(quantized, list(pairs.values()))
    plain = ort.SessionOptions()
    plain.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    plain.log_severity_level = 4
    fs = ort.InferenceSession(fexp.SerializeToString(), plain, providers=["CPUExecutionProvider"])
    qs = ort.InferenceSession(qexp.SerializeToString(), plain, providers=["CPUExecutionProvider"])
    rows = rows[:int(np.clip(LAYER_SECONDS / max(seconds_per_row, 1e-9), 4, LAYER_ROWS))]
    fo = dict(zip([o.name for o in fs.get_outputs()], run(fs, rows, 64)))
    qo = dict(zip([o.name for o in qs.get_outputs()], run(qs, rows, 64)))
    producer = {o: n for n in float_model.graph.node for o in n.output}
    table = [{"tensor": t, "op": producer[t].op_type if t in producer else "input",
              "node": producer[t].name if t in producer else t, "sqnr_db": round(sqnr_db(qo[q], fo[t]), 2)}
             for t, q in pairs.items()]
    order = sorted(table, key=lambda r: r["sqnr_db"])
    return {"rows": int(len(rows)), "layers": table, "worst": [r["tensor"] for r in order[:worst]]}


def _with_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    have = {o.name for o in out.graph.output}
    for name in names:
        if name not in have:
            out.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    return out


# --- speed and the fingerprint ------------------------------------------------------------------------

def seconds_per_input(session: ort.InferenceSession, rows: np.ndarray, batch: int, budget: float = 0.3) -> float:
    """Median seconds per input over calls of `batch` rows, for about `budget` seconds (at least 2 calls, after a warm-up)."""
    feed = session.get_inputs()[0].name
    x = np.ascontiguousarray(rows[:batch])
    session.run(None, {feed: x})
    times, started = [], time.perf_counter()
    while len(times) < 2 or time.perf_counter() - started < budget:
        t = time.perf_counter()
        session.run(None, {feed: x})
        times.append((time.perf_counter() - t) / len(x))
    return float(np.median(times))


def speed(sessions: dict, rows: np.ndarray, batches=(1, 32), rounds: int = 3, budget: float = 0.15) -> dict:
    """Inputs per second of each session at each batch size, rounds interleaved, median round."""
    result = {}
    for batch in batches:
        batch = min(batch, len(rows))
        times = {name: [] for name in sessions}
        for _ in range(rounds):
            for name, s in sessions.items():
                times[name].append(seconds_per_input(s, rows, batch, budget))
        result[str(batch)] = {name: round(1.0 / float(np.median(t)), 1) for name, t in times.items()}
    return result
