"""`python -m export … --int8`: the folded graph → equalized → quantized → verified on this host → published
beside model.onnx as model_int8.onnx (+ .sha256) with its fingerprint (docs/int8.md).

Runs after every float32 form passed, in memory; the pipeline writes the files (export/pipeline.py):
FP32 always when it passed, INT8 only when every INT8 check passed. When INT8 fails, model.onnx is
still published, model_int8.onnx is not (a stale one is removed), and the export exits 1 naming the
failed INT8 step.

Steps (each in the report's `int8`):
  statistics     each folded layer's BN (β, γ): its output's per-channel mean and spread
  equalization   cross-layer equalization (export/int8_graph.py), proven exact in float64 like a fold
  absorption     high-bias absorption (changes the float model a little; the INT8 verdict covers it)
  quantization   onnxruntime's quantize_static: QDQ, per-channel symmetric weights, MinMax calibration
  correction     analytic bias correction in the quantized graph
  consistency, fidelity, layers, speed, fingerprint   (export/int8_check.py)
"""
import copy
import io
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from export.errors import BadInput, one_line
from export.float64 import Float64Graph, Float64Unavailable, to_float64
from export.int8_check import (Int8Equalization, Int8Fidelity, Int8Quantization, consistency, fidelity, layer_sqnr, run,
                               seconds_per_input, service_session, speed)
from export.verify import Check
from export.int8_graph import Net, Stats, absorb_high_bias, equalize
from export.int8_quant import TYPES, choose_types, correct_biases, host_isa, quantizable, quantize

INT8, FINGERPRINT = "model_int8.onnx", "model_int8.fingerprint.npz"
CALIB_ROWS = 1024              # training images calibrated on (a --run); at most this many of --calib
CALIB_SEED, CALIB_RANDOM_SEED = 0, 1
FINGERPRINT_SECONDS = 0.5      # the start-up check's INT8 work, on this host
FINGERPRINT_ROWS = (8, 256)
FINGERPRINT_BYTES = 16 << 20
FINGERPRINT_BATCH = 32
FINGERPRINT_TOLERANCE = 0.1    # service/precision.py: INT8 here may differ from INT8 at export by ≤ 0.1x its error
EQUALIZE_ROWS = 1


@dataclass
class Options:
    """What --int8 and its flags asked for (validated before anything runs)."""
    calib: str | None = None            # X.npy, "random", or None (a --run's training set)
    max_drop: float = 0.5               # percentage points
    equalize: bool = True
    absorb: bool = True
    bias_correction: bool = True
    types: str = "auto"
    per_channel: bool = True
    data_dir: str | None = None
    calibration: np.ndarray | None = field(default=None, repr=False)
    calibration_desc: str = ""

    def request(self) -> dict:
        return {"calib": self.calib, "max_drop": self.max_drop, "equalize": self.equalize, "absorb": self.absorb,
                "bias_correction": self.bias_correction, "types": self.types, "per_channel": self.per_channel}


def parse_max_drop(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise BadInput(f"--max-drop {text!r}: want a number of percentage points, 0 to 100") from None
    if not 0.0 <= value <= 100.0 or value != value:
        raise BadInput(f"--max-drop {value:g}: want 0 to 100 percentage points")
    return value


def prepare(options: Options, source) -> Options:
    """The calibration rows: --calib X.npy (checked like --sample: shape, dtype, finite, in the input range),
    --calib random (seeded, uniform in the input range; the report says so), or a --run's training images.
    BadInput for anything else, before anything is written."""
    from export.sources import read_sample  # torch & co. load here

    if options.types != "auto" and options.types not in TYPES:
        raise BadInput(f"--int8-types {options.types!r}: want auto or one of {', '.join(TYPES)}")
    dims = source.input_shape[1:]
    if options.calib == "random":
        lo, hi = source.input_range or (0.0, 1.0)
        rng = np.random.default_rng(CALIB_RANDOM_SEED)
        rows = max(len(source.inputs), 16)
        options.calibration = rng.uniform(lo, hi, size=(rows, *dims)).astype(np.float32)
        options.calibration_desc = (f"random inputs as asked (--calib random): {rows} rows uniform in [{lo:g}, {hi:g}], "
                                    f"seed {CALIB_RANDOM_SEED}; real data calibrates better")
    elif options.calib is not None:
        try:
            rows = read_sample(options.calib, dims, source.input_range)
        except BadInput as e:
            raise BadInput(str(e).replace("--sample", "--calib", 1)) from None
        if len(rows) > CALIB_ROWS:  # more calibrates no better with MinMax, only slower
            rows = rows[np.sort(np.random.default_rng(CALIB_SEED).choice(len(rows), CALIB_ROWS, replace=False))]
        options.calibration = np.ascontiguousarray(rows)
        options.calibration_desc = f"{len(rows)} rows of --calib {options.calib}" + (
            f" (a seeded sample of its rows, seed {CALIB_SEED})" if len(rows) == CALIB_ROWS else "")
    elif source.kind == "run":
        from training.data import load_split

        images, _ = load_split(options.data_dir, "train")
        pick = np.sort(np.random.default_rng(CALIB_SEED).choice(len(images), CALIB_ROWS, replace=False))
        options.calibration = np.ascontiguousarray(images[pick])
        options.calibration_desc = f"{CALIB_ROWS} Fashion-MNIST training images (seeded, seed {CALIB_SEED})"
    else:
        raise BadInput("--int8 needs calibration data: --calib X.npy (real inputs, [N, "
                       f"{', '.join(map(str, dims))}]), or --calib random to calibrate on random inputs")
    return options


def check_quantizable(folded: onnx.ModelProto) -> None:
    if not quantizable(folded):
        ops = sorted({n.op_type for n in folded.graph.node})
        raise BadInput(f"--int8: nothing to quantize: the folded graph has no Conv, ConvTranspose, Gemm or MatMul with "
                       f"constant weights (its ops: {', '.join(ops) or 'none'})")


# --- the folded BNs' statistics ---------------------------------------------------------------------------

def _name(text: str) -> str:
    return str(text).split(" (")[0]


def bn_statistics(folded: onnx.ModelProto, fold_report: dict, module=None, pass_input=None,
                  unfolded: onnx.ModelProto | None = None) -> tuple[dict, dict]:
    """{layer node name in `folded`: Stats(β, |γ|)} for every BatchNorm folded backward into one layer.
    A fold record that names its nodes (`into_nodes`: the layer in model.onnx, `bn_nodes`: the BN in
    model_unfolded.onnx) is read by them; otherwise fx-pass folds through the torch module names (the BN
    module's weight and bias; the layer by the name scope of its ONNX node), ONNX-pass folds through the
    BatchNormalization node of the pass's input graph (its scale and B) or, for a torch source, the BN
    module its node came from."""
    from export.fold_report import torch_module_of

    layers = {n.name: n for n in folded.graph.node if n.op_type in ("Conv", "Gemm")}
    by_scope = {}
    for node in layers.values():
        by_scope.setdefault(torch_module_of(node), []).append(node.name)
    inits = {t.name: t for t in pass_input.graph.initializer} if pass_input is not None else {}
    bn_nodes = {n.name: n for n in pass_input.graph.node} if pass_input is not None else {}
    reference = {n.name: n for n in unfolded.graph.node} if unfolded is not None else {}
    reference_inits = {t.name: t for t in unfolded.graph.initializer} if unfolded is not None else {}
    stats, missing = {}, []
    for entry in fold_report.get("folded", []):
        if entry.get("direction") != "backward" or entry.get("kind", "batchnorm") != "batchnorm":
            continue
        into = str(entry.get("into", ""))
        if ", " in into:  # a BN after a concat, split over several layers: no one layer's statistics
            missing.append({"bn": entry.get("bn"), "why": "folded into several layers (after a concat)"})
            continue
        gamma_beta, layer = None, None
        named = [reference[n] for n in entry.get("bn_nodes") or [] if n in reference
                 and reference[n].op_type == "BatchNormalization"]
        if len(entry.get("into_nodes") or []) == 1 and len(named) == 1:  # the record names both nodes
            layer = entry["into_nodes"][0] if entry["into_nodes"][0] in layers else None
            bn = named[0]
            if bn.input[1] in reference_inits and bn.input[2] in reference_inits:
                gamma_beta = tuple(onnx.numpy_helper.to_array(reference_inits[bn.input[i]]).astype(np.float64)
                                   for i in (1, 2))
        elif entry.get("pass") == "fx":
            names = by_scope.get(_name(into), [])
            layer = names[0] if len(names) == 1 else None
            gamma_beta = _module_gamma_beta(module, _name(entry.get("bn", "")))
        else:
            layer = _name(into) if _name(into) in layers else None
            bn = next((bn_nodes[n] for n in entry.get("nodes", []) if n in bn_nodes
                       and bn_nodes[n].op_type == "BatchNormalization"), None)
            if bn is not None and bn.input[1] in inits and bn.input[2] in inits:
                gamma_beta = tuple(onnx.numpy_helper.to_array(inits[bn.input[i]]).astype(np.float64) for i in (1, 2))
            elif entry.get("module"):
                gamma_beta = _module_gamma_beta(module, entry["module"])
        if layer is None or gamma_beta is None:
            missing.append({"bn": entry.get("bn"), "why": "its layer in the folded graph was not found" if layer is None
                            else "its BatchNorm's gamma and beta were not found"})
            continue
        gamma, beta = gamma_beta
        stats[layer] = Stats(np.asarray(beta, np.float64), np.abs(np.asarray(gamma, np.float64)))
    return stats, {"layers": sorted(stats), "missing": missing}


def _module_gamma_beta(module, name: str):
    if module is None or not name:
        return None
    try:
        bn = module.get_submodule(name)
    except AttributeError:
        return None
    if getattr(bn, "running_var", None) is None:
        return None
    var = bn.running_var.detach().double().numpy()
    gamma = np.ones_like(var) if getattr(bn, "weight", None) is None else bn.weight.detach().double().numpy()
    beta = np.zeros_like(var) if getattr(bn, "bias", None) is None else bn.bias.detach().double().numpy()
    return gamma, beta


# --- the whole INT8 step ------------------------------------------------------------------------------------

@dataclass
class Result:
    report: dict
    model: bytes | None = None          # model_int8.onnx, when every check passed
    fingerprint: bytes | None = None

    @property
    def passed(self) -> bool:
        return self.report["status"] == "passed"


def build(options: Options, source, folded: onnx.ModelProto, fold_report: dict, reference: list, reference_what: str,
          exact_rows: np.ndarray | None, steps, pass_input=None, unfolded: onnx.ModelProto | None = None) -> Result:
    """Everything in memory: equalize, absorb, quantize, correct, check; the files' bytes when it passed.
    `folded` is model.onnx as it will be published (with its metadata); `reference` the float64 outputs on
    source.inputs (or, when none runs, the float32 model's)."""
    started = time.perf_counter()
    isa = host_isa()
    types, types_why = (choose_types(isa) if options.types == "auto" else (options.types, "asked (--int8-types)"))
    activation, weight, reduce_range = TYPES[types]
    report = {"status": "failed", "host": isa, "types": types, "types_why": types_why, "format": "QDQ",
              "per_channel": options.per_channel, "calibration": options.calibration_desc,
              "options": options.request(), "checks": {}}
    checks = report["checks"]
    fp32_bytes = folded.SerializeToString()
    work = copy.deepcopy(folded)
    with steps("int8: BN statistics of the folded layers"):
        stats, report["statistics"] = bn_statistics(folded, fold_report, source.module, pass_input, unfolded)
    if options.equalize:
        with steps("int8: cross-layer equalization"):
            net = Net(work)
            report["equalization"] = equalize(net, stats)
            work = net.flush()
        checks["int8 equalization"] = _prove_equalization(folded, exact_rows, steps) if report["equalization"]["pairs"] \
            else Int8Equalization(status="skipped", why="no Conv/Gemm pair to equalize")
        if checks["int8 equalization"].status == "failed":
            return _failed(report, "int8 equalization", started)
    else:
        checks["int8 equalization"] = Int8Equalization(status="skipped", why="off (--no-equalize)")
    if options.absorb:
        with steps("int8: high-bias absorption"):
            net = Net(work)
            report["absorption"] = absorb_high_bias(net, stats)
            work = net.flush()
    with steps(f"int8: quantize_static ({types}, {'per-channel' if options.per_channel else 'per-tensor'} weights, "
               f"{len(options.calibration)} calibration rows)"):
        try:
            quantized, ranges = quantize(work, options.calibration, types, options.per_channel)
        except Exception as e:  # onnxruntime's quantizer refuses this graph: FP32 is still good, INT8 is not made
            checks["int8 quantization"] = Int8Quantization(
                status="failed", why=f"onnxruntime.quantization cannot quantize this graph: {type(e).__name__}: "
                                     f"{one_line(e, 300)}")
            return _failed(report, "int8 quantization", started)
    shifts = {}
    if options.bias_correction:
        with steps("int8: bias correction"):
            report["bias_correction"], shifts = correct_biases(work, quantized, stats)
    from onnxruntime.quantization.quant_utils import get_qmin_qmax_for_qType
    from onnxruntime.quantization import QuantType

    qmin, qmax = get_qmin_qmax_for_qType(getattr(QuantType, weight).tensor_type, reduce_range, symmetric=True)
    with steps("int8: consistency of the quantized graph"):
        checks["int8 consistency"] = consistency(work, quantized, ranges, shifts, (int(qmin), int(qmax)))
    if checks["int8 consistency"].status == "failed":
        return _failed(report, "int8 consistency", started)
    names = [o["name"] for o in source.outputs]
    int8_bytes = quantized.SerializeToString()
    with steps(f"int8: served form on {len(source.inputs)} rows (onnxruntime, the service's session settings)"):
        try:
            session = service_session(int8_bytes)
            served = time.perf_counter()
            outputs = _named(session, run(session, source.inputs), names)
        except Exception as e:  # onnxruntime cannot run the graph its quantizer wrote (an op without INT8 kernels...)
            checks["int8 fidelity"] = Int8Fidelity(status="failed", why=f"onnxruntime cannot run the INT8 model here: "
                                                                       f"{type(e).__name__}: {one_line(e, 300)}")
            return _failed(report, "int8 fidelity", started)
        served_seconds = time.perf_counter() - served
        checks["int8 fidelity"] = fidelity(outputs, reference, names, source.scores, source.targets, options.max_drop,
                                           reference_what)
    with steps("int8: per-layer SQNR"):
        report["layers"] = layer_sqnr(work, quantized, source.inputs, seconds_per_row=served_seconds / len(source.inputs))
    with steps("int8: speed against FP32 (the service's session settings, one thread)"):
        fp32 = service_session(fp32_bytes)
        report["speed"] = speed({"fp32": fp32, "int8": session}, source.inputs, batches=(1, FINGERPRINT_BATCH))
        for row in report["speed"].values():
            row["int8_vs_fp32"] = round(row["int8"] / row["fp32"], 3)
    if checks["int8 fidelity"].status == "failed":
        return _failed(report, "int8 fidelity", started)
    with steps("int8: fingerprint"):
        fingerprint, report["fingerprint"] = _fingerprint(session, source.inputs, outputs, reference, names)
    report.update(status="passed", checks=_as_dicts(checks))
    meta = {**{p.key: p.value for p in folded.metadata_props}, "precision": "int8",
            "int8": json.dumps(_metadata(report, fp32_bytes, fingerprint))}
    from export.onnx_export import with_metadata

    published = with_metadata(quantized, meta)
    report["seconds"] = round(time.perf_counter() - started, 2)
    return Result(report, published.SerializeToString(), fingerprint)


def _named(session, outputs: list[np.ndarray], names: list[str]) -> list[np.ndarray]:
    order = [o.name for o in session.get_outputs()]
    return [outputs[order.index(n)] for n in names]


def _as_dicts(checks: dict) -> dict:
    return {name: c.as_dict() if isinstance(c, Check) else c for name, c in checks.items()}


def _failed(report: dict, step: str, started: float) -> Result:
    report.update(status="failed", failed_step=step, why=report["checks"][step].why, checks=_as_dicts(report["checks"]),
                  seconds=round(time.perf_counter() - started, 2))
    return Result(report)


def _prove_equalization(folded: onnx.ModelProto, rows: np.ndarray | None, steps) -> Int8Equalization:
    """Equalization changes no function: the same pass on the float64 copy of the folded graph must agree with
    that copy to EXACT_RTOL of the output's scale, export/verify.py's rule for folds. (Not against the unfolded
    float64 model: the published folded weights are rounded to float32, 1e-7 each, which a deep net amplifies
    past 1e-9; MobileNetV2: 2.4e-6.) On EQUALIZE_ROWS rows: a wrong rescaling shows on every input."""
    from export.verify import EXACT_RTOL

    if rows is None:
        return Int8Equalization(status="skipped", why="no float64 copy of the model runs")
    rows = rows[:EQUALIZE_ROWS]
    with steps(f"int8: equalization exactness (float64, {len(rows)} rows)"):
        try:
            before = Float64Graph(folded)(rows)
            net = Net(to_float64(folded))
            equalize(net, {})
            after = Float64Graph(net.flush())(rows)
        except Float64Unavailable as e:
            return Int8Equalization(status="skipped", why=str(e))
    rel = max(float(np.abs(a - b).max(initial=0.0)) / max(float(np.abs(b).max(initial=0.0)), 1e-300)
              for a, b in zip(after, before))
    figures = {"relative": rel, "rows": int(len(rows)),
               "max_abs_diff": max(float(np.abs(a - b).max(initial=0.0)) for a, b in zip(after, before))}
    if rel <= EXACT_RTOL:
        return Int8Equalization(status="passed", **figures)
    return Int8Equalization(status="failed", why=f"the equalized float64 graph is {rel:.2e} of the output's scale from "
                            f"the folded one (exact rescaling agrees to {EXACT_RTOL:g}): a wrong equalization", **figures)


def _fingerprint(session, inputs: np.ndarray, outputs: list, reference: list, names: list[str]) -> tuple[bytes, dict]:
    """A few hundred rows (fewer for slow models: ≤ FINGERPRINT_SECONDS of INT8 work here, ≤ FINGERPRINT_BYTES),
    their INT8 outputs as served here and their float64 outputs, as an .npz (no pickle)."""
    per_input = seconds_per_input(session, inputs, 1, budget=0.1)
    rows = int(np.clip(min(FINGERPRINT_SECONDS / per_input, FINGERPRINT_BYTES / inputs[0].nbytes),
                       *FINGERPRINT_ROWS))
    rows = min(rows, len(inputs))
    x = np.ascontiguousarray(inputs[:rows])
    expected = _named(session, run(session, x, FINGERPRINT_BATCH), names)
    arrays = {"inputs": x, **{f"int8_{i}": a for i, a in enumerate(expected)},
              **{f"float64_{i}": np.asarray(r[:rows], np.float64) for i, r in enumerate(reference)}}
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue(), {"rows": rows, "batch": FINGERPRINT_BATCH, "tolerance": FINGERPRINT_TOLERANCE,
                               "outputs": names, "int8_ms_per_input": round(1000 * per_input, 4)}


def _metadata(report: dict, fp32_bytes: bytes, fingerprint: bytes) -> dict:
    import hashlib

    fidelity_ = report["checks"]["int8 fidelity"]  # as a dict by now
    return {"fp32_sha256": hashlib.sha256(fp32_bytes).hexdigest(), "types": report["types"], "format": report["format"],
            "per_channel": report["per_channel"], "host": report["host"]["isa"], "calibration": report["calibration"],
            "fingerprint": {"file": FINGERPRINT, "sha256": hashlib.sha256(fingerprint).hexdigest(), **report["fingerprint"]},
            "verified": {k: fidelity_[k] for k in ("rule", "rows", "top1_agreement", "accuracy_reference",
                                                   "accuracy_int8", "drop_pp", "disagreement_pp", "outputs", "max_drop_pp")
                         if k in fidelity_},
            "speed": report["speed"]}


def summary(report: dict) -> str:
    """The INT8 lines of the CLI's output."""
    checks = report.get("checks", {})
    lines = [f"INT8 ({report['types']}, {report['format']}, {'per-channel' if report['per_channel'] else 'per-tensor'} "
             f"weights) on {report['host']['isa']}: {report['types_why']}", f"  calibration: {report['calibration']}"]
    for name, c in checks.items():
        text = c.get("why") or ", ".join(f"{k} {v}" for k, v in c.items() if k in ("relative", "layers", "activations",
                                                                                   "accuracy_int8", "drop_pp", "top1_agreement"))
        lines.append(f"  {name:20s} {c['status']:8s} {one_line(text, 240)}")
    if "layers" in report and report["layers"].get("layers"):
        worst = sorted(report["layers"]["layers"], key=lambda r: r["sqnr_db"])[:5]
        lines.append("  worst layers (SQNR): " + ", ".join(f"{r['node']} {r['sqnr_db']:.1f} dB" for r in worst))
    for batch, row in report.get("speed", {}).items():
        lines.append(f"  batch {batch}: FP32 {row['fp32']:,.0f} img/s, INT8 {row['int8']:,.0f} img/s ({row['int8_vs_fp32']:.2f}x)")
    lines.append("INT8 PUBLISHED" if report["status"] == "passed" else
                 f"INT8 NOT PUBLISHED: {report.get('failed_step')}: {report.get('why')}")
    return "\n".join(lines)


def remove_stale(out: Path) -> list[str]:
    """INT8 files left from an earlier export, removed when this export publishes no INT8."""
    gone = []
    for name in (INT8, INT8 + ".sha256", FINGERPRINT, FINGERPRINT + ".sha256"):
        path = out / name
        if path.exists():
            path.unlink()
            gone.append(name)
    return gone
