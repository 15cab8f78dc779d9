"""Which precision this worker serves: the FP32 model (model.onnx) or its INT8 form (model_int8.onnx beside
it), INT8 only where it is proven on this host (docs/int8.md, docs/onnx-contract.md "INT8").

`choose(contract, data, settings)` is the one entry point: Classifier.__init__ calls it once, after
load_contract and before Model(...). It returns the model bytes to load and what /metadata shows as
`runtime.precision` (what is served and why). `PRECISION` (service/config.py):

  fp32  model.onnx, no check.
  int8  model_int8.onnx when its start-up check passes here, else model.onnx with the reason.
  auto  (default) INT8 when its check passes here and it is faster here than FP32 (by AUTO_MARGIN, 5%:
        workers that time on their own should not split over a near-tie) at batch 1 and at the largest
        batch up to ORT_CHUNK_IMAGES whose INT8 call takes ≤ 50 ms (ResNet-50: batch 1 only), medians of
        interleaved rounds; else FP32, with the reason and the figures.

The start-up check re-runs the export's fingerprint on this host: the stored inputs through the INT8
model with the service's session settings, against the INT8 outputs the export stored. On a host that
computes what the export host computed (same integer kernels, no saturation) they agree exactly, or to
a last bit of requantization; the check allows FINGERPRINT_TOLERANCE (0.1x) of INT8's own error against
float64 (rms, per output) and refuses more: a host whose kernels saturate (AVX2 u8·s8 with 8-bit
weights, onnxruntime#16105), or a file that is not the verified model even with a fresh .sha256
(one channel's weight scale doubled, a zero point moved). The export sizes the fingerprint to about
0.5 s of INT8 work on its host, so the check takes ≤ 2 s. Only numpy and onnxruntime here.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import platform
import time
from pathlib import Path

import numpy as np

from .contract import Contract, ModelLoadError, read_header, read_verified

logger = logging.getLogger("bentoml.service.precision")

PRECISIONS = ("auto", "int8", "fp32")
INT8_SUFFIX = "_int8.onnx"
FINGERPRINT_TOLERANCE = 0.1
TIMING_SECONDS = 0.02  # per model, batch size and round, for `auto` (at least one call)
TIMING_ROUNDS = 3
TIMING_CALL_S = 0.05  # `auto` compares batch 1 and the largest batch up to ORT_CHUNK_IMAGES whose INT8 call takes this
AUTO_MARGIN = 1.05  # `auto` wants INT8 at least 5% faster: workers that time a near-tie apart should not split


class Refused(Exception):
    """Why INT8 is not served here (one line)."""


def int8_path(contract: Contract) -> Path:
    """model_int8.onnx beside model.onnx (the export's names: <stem>_int8.onnx beside <stem>.onnx)."""
    path = Path(contract.path)
    return path.with_name(path.stem + INT8_SUFFIX)


# widest first, as common/machine.py names them (the service ships without common/)
ISAS = (("avx512_vnni", "AVX-512 VNNI"), ("avx512f", "AVX-512"), ("avx_vnni", "AVX-VNNI"), ("avx2", "AVX2"),
        ("avx", "AVX"), ("sse4_2", "SSE4.2"))


def host_isa() -> str:
    """The widest vector ISA of this host, named as the export's report names it."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    flags = next((set(line.partition(":")[2].split()) for line in text.splitlines()
                  if line.split(":")[0].strip() in ("flags", "Features")), set())
    return next((name for flag, name in ISAS if flag in flags), platform.machine() or "unknown")


def session(ort, data: bytes, threads: int):
    """A CPU session as service/model.py builds it (ORT_ENABLE_ALL, no spinning)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = max(1, int(threads))
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 4
    return ort.InferenceSession(data, sess_options=options, providers=["CPUExecutionProvider"])


def _rms(a: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(a.astype(np.float64))))) if a.size else 0.0


def _run(sess, names: list[str], feed: str, rows: np.ndarray, batch: int) -> list[np.ndarray]:
    parts = [sess.run(names, {feed: rows[i : i + batch]}) for i in range(0, len(rows), batch)]
    return [np.concatenate(p) for p in zip(*parts)]


def load_int8(contract: Contract) -> tuple[bytes, dict, dict]:
    """model_int8.onnx's bytes, its `int8` metadata and its fingerprint arrays, each checked against what
    binds it (its .sha256, the FP32 model it was made from, the fingerprint's sha256 in its metadata)."""
    path = int8_path(contract)
    if not path.is_file():
        raise Refused(f"no INT8 model beside {contract.path} (export with --int8)")
    try:
        data, sha256 = read_verified(path)
        header = read_header(data)
    except ModelLoadError as exc:
        raise Refused(str(exc)) from None
    try:
        meta = json.loads(header.metadata["int8"])
    except (KeyError, ValueError):
        raise Refused(f"{path.name} has no readable 'int8' metadata; it was not written by python -m export --int8") from None
    if meta.get("fp32_sha256") != contract.sha256:
        raise Refused(f"{path.name} was made from another model than {Path(contract.path).name} "
                      f"(sha256 {str(meta.get('fp32_sha256'))[:12]}…, served {contract.sha256[:12]}…); export again")
    if list(header.inputs) != [contract.input_name] or list(header.outputs) != list(contract.output_names):
        raise Refused(f"{path.name} has inputs {list(header.inputs)} / outputs {list(header.outputs)}, "
                      f"the FP32 model {[contract.input_name]} / {list(contract.output_names)}")
    spec = meta.get("fingerprint") or {}
    fingerprint = path.with_name(str(spec.get("file", "")))
    if not spec.get("file") or not fingerprint.is_file():
        raise Refused(f"the INT8 fingerprint {fingerprint.name or '(unnamed)'} is missing")
    raw = fingerprint.read_bytes()
    if hashlib.sha256(raw).hexdigest() != spec.get("sha256"):
        raise Refused(f"{fingerprint.name} is not the fingerprint {path.name} was verified with (sha256 differs)")
    try:
        with np.load(io.BytesIO(raw), allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except Exception as exc:  # noqa: BLE001 -- any unreadable archive is a refusal, never a dead worker
        raise Refused(f"{fingerprint.name} is not a readable .npz ({type(exc).__name__})") from None
    n = len(contract.output_names)
    if "inputs" not in arrays or any(f"int8_{i}" not in arrays or f"float64_{i}" not in arrays for i in range(n)):
        raise Refused(f"{fingerprint.name} lacks inputs or one output's expected values")
    return data, {**meta, "sha256": sha256, "path": str(path)}, arrays


def fingerprint_check(ort, data: bytes, contract: Contract, meta: dict, arrays: dict, threads: int) -> tuple[object, dict]:
    """The stored inputs through the INT8 model here, against the INT8 outputs stored at export (see the
    module docstring). Returns the session and the figures; raises Refused when it does not hold."""
    try:
        sess = session(ort, data, threads)
    except Exception as exc:  # noqa: BLE001
        raise Refused(f"onnxruntime cannot load the INT8 model here: {str(exc).splitlines()[0][:200]}") from None
    rows = np.ascontiguousarray(arrays["inputs"], dtype=np.float32)
    batch = int((meta.get("fingerprint") or {}).get("batch", 32))
    started = time.perf_counter()
    try:
        outputs = _run(sess, list(contract.output_names), contract.input_name, rows, max(1, batch))
    except Exception as exc:  # noqa: BLE001
        raise Refused(f"the INT8 model does not run here on its fingerprint: {str(exc).splitlines()[0][:200]}") from None
    seconds = time.perf_counter() - started
    figures, failures = {}, []
    for i, (name, here) in enumerate(zip(contract.output_names, outputs)):
        expected, float64 = arrays[f"int8_{i}"], arrays[f"float64_{i}"]
        if here.shape != expected.shape:
            raise Refused(f"output {name}: shape {list(here.shape)} here, {list(expected.shape)} at export")
        diff, error = _rms(here - expected), _rms(expected - float64)
        allowed = FINGERPRINT_TOLERANCE * error if error > 0 else 1e-6 * _rms(float64)
        row = {"rms_vs_export": diff, "int8_error_rms": error, "ratio": round(diff / error, 4) if error else None,
               "sqnr_db_vs_float64": round(10 * np.log10(max(_rms(float64), 1e-300) ** 2 / max(_rms(here - float64), 1e-300) ** 2), 2)}
        if name == contract.output_name:
            row["top1_agreement_with_export"] = float((here.argmax(1) == expected.argmax(1)).mean())
        figures[name] = row
        if not diff <= allowed:
            failures.append(f"output {name} is {diff:.3g} (rms) from the INT8 outputs stored at export, "
                            f"{diff / error if error else float('inf'):.2f}x INT8's own error against float64 "
                            f"(allowed {FINGERPRINT_TOLERANCE:g}x)")
    result = {"rows": int(len(rows)), "run_seconds": round(seconds, 3), "outputs": figures}
    if failures:
        raise Refused("its fingerprint check failed here: " + "; ".join(failures) +
                      f" — this host ({host_isa()}) does not compute what the export's ({meta.get('host')}) verified")
    return sess, result


def _timings(sessions: dict, contract: Contract, rows: np.ndarray, batch: int) -> dict[str, float]:
    """Seconds per input of each session at `batch`: a warm-up call each, then TIMING_ROUNDS interleaved rounds
    of at least TIMING_SECONDS (one call at least) each; the median round."""
    x = np.ascontiguousarray(np.resize(rows, (batch, *rows.shape[1:])), dtype=np.float32)
    names, feed = list(contract.output_names), contract.input_name
    for sess in sessions.values():
        sess.run(names, {feed: x})
    per: dict[str, list] = {name: [] for name in sessions}
    for _ in range(TIMING_ROUNDS):
        for name, sess in sessions.items():
            calls, started = 0, time.perf_counter()
            while calls == 0 or time.perf_counter() - started < TIMING_SECONDS:
                sess.run(names, {feed: x})
                calls += 1
            per[name].append((time.perf_counter() - started) / (calls * batch))
    return {name: float(np.median(t)) for name, t in per.items()}


def choose(contract: Contract, data: bytes, settings, decided: dict | None = None, ort=None) -> tuple[bytes, dict]:
    """The model bytes to serve and `runtime.precision` for /metadata (module docstring).

    `decided`: the `runtime.precision` of a decision already made for this model at this start (by `bentoml
    serve`'s measuring process, handed to the workers): honoured without re-checking when it names FP32, or INT8
    whose file still has the sha256 that was checked; decided again here otherwise."""
    if ort is None:
        import onnxruntime as ort

    setting = settings.precision
    if decided and decided.get("setting") == setting:
        if decided.get("what") == "fp32":
            return data, decided
        try:
            int8_data, meta, _ = load_int8(contract)
            if meta["sha256"] == (decided.get("int8") or {}).get("sha256"):
                return int8_data, decided
        except Refused:
            pass
    info: dict = {"setting": setting, "what": "fp32", "host": host_isa()}
    if setting == "fp32":
        return data, {**info, "why": "PRECISION=fp32"}
    started = time.perf_counter()
    from .model import CUDA, choose_providers

    try:
        if CUDA in choose_providers(settings.provider, ort.get_available_providers()):
            raise Refused("INT8 is verified for onnxruntime's CPU provider; this worker runs on CUDA")
        int8_data, meta, arrays = load_int8(contract)
        info["int8"] = {k: meta.get(k) for k in ("path", "sha256", "types", "format", "host", "verified")}
        sess, info["check"] = fingerprint_check(ort, int8_data, contract, meta, arrays, settings.intra_op_threads)
        if setting == "auto":
            fp32 = session(ort, data, settings.intra_op_threads)
            rows, timing = arrays["inputs"], {}
            per_input = info["check"]["run_seconds"] / max(1, info["check"]["rows"])  # INT8 here, from the check
            largest = int(min(settings.chunk_images, len(rows), max(1, TIMING_CALL_S // max(per_input, 1e-9))))
            for batch in sorted({1, largest}):
                t = _timings({"int8": sess, "fp32": fp32}, contract, rows, batch)
                i8, f32 = t["int8"], t["fp32"]
                timing[str(batch)] = {"int8_ms": round(1000 * i8, 4), "fp32_ms": round(1000 * f32, 4),
                                      "int8_vs_fp32": round(f32 / i8, 3)}
            info["speed"] = timing
            slower = [b for b, t in timing.items() if t["int8_vs_fp32"] < AUTO_MARGIN]
            if slower:
                raise Refused(f"INT8 passed its check here but is not {AUTO_MARGIN:g}x as fast here at batch {', '.join(slower)} ("
                              + "; ".join(f"batch {b}: INT8 {t['int8_ms']:.3g} ms vs FP32 {t['fp32_ms']:.3g} ms per input"
                                          for b, t in timing.items()) + "); PRECISION=int8 serves it anyway")
    except Refused as exc:
        info.update(why=f"{'PRECISION=int8' if setting == 'int8' else 'auto'}: FP32 served: {exc}",
                    seconds=round(time.perf_counter() - started, 3))
        (logger.warning if setting == "int8" or "int8" in info else logger.info)("precision: %s", info["why"])
        return data, info
    why = ("PRECISION=int8 and its fingerprint check passed here" if setting == "int8" else
           "auto: its fingerprint check passed here and it is faster here at batch " + " and ".join(info["speed"]))
    info.update(what="int8", why=why, seconds=round(time.perf_counter() - started, 3))
    logger.info("precision: INT8 (%s) served: %s (%.2f s)", info["int8"]["types"], why, info["seconds"])
    return int8_data, info
