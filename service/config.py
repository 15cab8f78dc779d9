"""Every service setting, from environment variables, so `bentoml serve`, `make serve` and a container
take the same knobs. Read once per process into a frozen Settings (docs/service.md lists them all)."""

from __future__ import annotations

import os
from dataclasses import dataclass, fields


STORE_MODEL_FILE = "model.onnx"  # the file inside a BentoML store model (service/store.py)


def _env(name: str, default, kind=int, minimum=None):
    raw = os.environ.get(name, "").strip()
    if raw == "" or (default is None and raw.lower() == "auto"):
        return default
    if kind is bool:
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise SystemExit(f"{name} must be true or false, got {raw!r}")
    try:
        value = kind(raw)
    except ValueError:
        raise SystemExit(f"{name} must be {'an integer' if kind is int else 'a number'}, got {raw!r}") from None
    if minimum is not None and value < minimum:
        raise SystemExit(f"{name} must be >= {minimum}, got {value}")
    return value


@dataclass(frozen=True)
class Settings:
    # the model
    model_path: str = "artifacts/model.onnx"  # MODEL_PATH (its .sha256 beside it)
    model_tag: str = ""  # MODEL_TAG: from the BentoML model store instead (set inside a bento)
    provider: str = "auto"  # ORT_PROVIDER: auto | cpu | cuda
    intra_op_threads: int = 1  # ORT_INTRA_OP_THREADS (workers x threads <= usable cores)
    chunk_images: int = 32  # ORT_CHUNK_IMAGES: bigger batches run as several onnxruntime calls
    inline_budget_ms: float = 2.0  # INLINE_BUDGET_MS: calls expected to take longer leave the event loop
    # None = derived from the model's measured cost at start (service/tuning.py); a number overrides it
    latency_budget_ms: float | None = None  # LATENCY_BUDGET_MS: longest coalesced call (default 500 ms)
    batch_max_images: int | None = None  # BATCH_MAX_IMAGES: cap of one coalesced call (1 = no batching)
    precision: str = "auto"  # PRECISION: auto | int8 | fp32 (service/precision.py, docs/int8.md)
    # requests
    workers: int = 2  # SERVICE_WORKERS (from_env: default one per usable core)
    max_images: int = 1024  # MAX_IMAGES_PER_REQUEST
    max_body_bytes: int = 16 * 1024 * 1024  # MAX_BODY_BYTES
    classify_margin: float = 0.02  # CLASSIFY_MARGIN: border around the cropped object, x its longer side
    # faults (service/guard.py)
    queue_delay_ms: float | None = None  # QUEUE_DELAY_MS: shed new work while requests wait longer than this
    queue_max: int = 128  # QUEUE_MAX: requests in a worker before new work is shed with 503
    shed_pace_ms: float | None = None  # SHED_PACE_MS: an overload 503 goes no sooner than this after its headers
    retry_after_s: int = 1  # RETRY_AFTER_S
    max_connections: int = 1024  # MAX_CONNECTIONS per worker
    header_timeout_s: float = 10.0  # HEADER_TIMEOUT_S: connect (or last answer) -> complete headers
    body_timeout_s: float = 10.0  # BODY_TIMEOUT_S: longest pause inside a request body
    drain_s: float = 5.0  # DRAIN_S: after SIGTERM: not ready, still serving, Connection: close
    shutdown_timeout_s: float = 20.0  # SHUTDOWN_TIMEOUT_S: then in-flight requests get this long
    fast_respawn: bool = True  # FAST_RESPAWN: respawn a dead worker at once, containerized too
    # BentoML
    request_timeout_s: int = 60  # REQUEST_TIMEOUT_S: BentoML's per-request timeout (504)
    gc_freeze: bool = True  # GC_FREEZE
    access_log: bool = False  # ACCESS_LOG
    metrics: bool = True  # METRICS
    tracing: bool = False  # TRACING

    @classmethod
    def from_env(cls, bento_arguments: dict | None = None) -> "Settings":
        """bento_arguments: `bentoml build --arg model_tag=...` (kept in the bento, see Makefile)."""
        d = cls()
        arguments = bento_arguments or {}
        provider = os.environ.get("ORT_PROVIDER", d.provider).strip().lower() or d.provider
        if provider not in ("auto", "cpu", "cuda"):
            raise SystemExit(f"ORT_PROVIDER must be auto, cpu or cuda, got {provider!r}")
        precision = os.environ.get("PRECISION", d.precision).strip().lower() or d.precision
        if precision not in ("auto", "int8", "fp32"):
            raise SystemExit(f"PRECISION must be auto, int8 or fp32, got {precision!r}")
        from .tuning import usable_cores

        cores = usable_cores()
        workers = _env("SERVICE_WORKERS", None, minimum=1) or cores
        threads = _env("ORT_INTRA_OP_THREADS", d.intra_op_threads, minimum=1)
        if workers * threads > cores and provider != "cuda":
            raise SystemExit(f"SERVICE_WORKERS={workers} x ORT_INTRA_OP_THREADS={threads} = {workers * threads} "
                             f"onnxruntime threads on {cores} usable core{'s' * (cores != 1)}: lower one of them "
                             "(threads beyond the cores only take turns, and the HTTP work waits behind them)")
        return cls(
            precision=precision,
            model_path=os.environ.get("MODEL_PATH", "").strip() or d.model_path,
            model_tag=os.environ.get("MODEL_TAG", "").strip() or str(arguments.get("model_tag", "") or ""),
            provider=provider,
            intra_op_threads=threads,
            chunk_images=_env("ORT_CHUNK_IMAGES", d.chunk_images, minimum=1),
            inline_budget_ms=_env("INLINE_BUDGET_MS", d.inline_budget_ms, float, minimum=0.0),
            latency_budget_ms=_env("LATENCY_BUDGET_MS", None, float, minimum=0.1),
            batch_max_images=_env("BATCH_MAX_IMAGES", None, minimum=1),
            workers=workers,
            max_images=_env("MAX_IMAGES_PER_REQUEST", d.max_images, minimum=1),
            max_body_bytes=_env("MAX_BODY_BYTES", d.max_body_bytes, minimum=1024),
            classify_margin=_env("CLASSIFY_MARGIN", d.classify_margin, float, minimum=0.0),
            queue_delay_ms=_env("QUEUE_DELAY_MS", None, float, minimum=1.0),
            queue_max=_env("QUEUE_MAX", d.queue_max, minimum=1),
            shed_pace_ms=_env("SHED_PACE_MS", None, float, minimum=0.0),
            retry_after_s=_env("RETRY_AFTER_S", d.retry_after_s, minimum=0),
            max_connections=_env("MAX_CONNECTIONS", d.max_connections, minimum=1),
            header_timeout_s=_env("HEADER_TIMEOUT_S", d.header_timeout_s, float, minimum=0.1),
            body_timeout_s=_env("BODY_TIMEOUT_S", d.body_timeout_s, float, minimum=0.1),
            drain_s=_env("DRAIN_S", d.drain_s, float, minimum=0.0),
            shutdown_timeout_s=_env("SHUTDOWN_TIMEOUT_S", d.shutdown_timeout_s, float, minimum=0.1),
            fast_respawn=_env("FAST_RESPAWN", d.fast_respawn, bool),
            request_timeout_s=_env("REQUEST_TIMEOUT_S", d.request_timeout_s, minimum=1),
            gc_freeze=_env("GC_FREEZE", d.gc_freeze, bool),
            access_log=_env("ACCESS_LOG", d.access_log, bool),
            metrics=_env("METRICS", d.metrics, bool),
            tracing=_env("TRACING", d.tracing, bool),
        )

    def resolve_model_path(self) -> str:
        """A model from the BentoML store (MODEL_TAG, set inside a bento) wins over MODEL_PATH."""
        if not self.model_tag:
            return self.model_path
        import bentoml

        from .contract import ModelLoadError

        try:
            return bentoml.models.get(self.model_tag).path_of(STORE_MODEL_FILE)
        except bentoml.exceptions.NotFound:
            raise ModelLoadError(f"model {self.model_tag!r} is not in the BentoML model store; run `make bento`") from None

    def public(self) -> dict:
        """For /metadata: every setting except where the model came from."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("model_path", "model_tag")}
