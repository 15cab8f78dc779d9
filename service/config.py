"""Service settings, all from environment variables so `bentoml serve`, `make serve` and a
container take the same knobs. Read once per process."""

from __future__ import annotations

import os
from dataclasses import dataclass


def _env_int(name: str, default: int, minimum: int = 1) -> int:
    raw = os.environ.get(name, "")
    if raw.strip() == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SystemExit(f"{name} must be an integer, got {raw!r}") from None
    if value < minimum:
        raise SystemExit(f"{name} must be >= {minimum}, got {value}")
    return value


def _env_bool(name: str, default: bool) -> bool:
    raw = os.environ.get(name, "").strip().lower()
    if raw == "":
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise SystemExit(f"{name} must be true or false, got {raw!r}")


@dataclass(frozen=True)
class Settings:
    model_path: str  # MODEL_PATH: the exported model.onnx (with model.onnx.sha256 beside it)
    model_tag: str  # MODEL_TAG: load from the BentoML model store instead (set inside a bento)
    provider: str  # ORT_PROVIDER: auto | cpu | cuda
    intra_op_threads: int  # ORT_INTRA_OP_THREADS
    chunk_images: int  # ORT_CHUNK_IMAGES: bigger batches run as several onnxruntime calls
    workers: int  # SERVICE_WORKERS: processes, each with its own session
    max_images: int  # MAX_IMAGES_PER_REQUEST
    max_body_bytes: int  # MAX_BODY_BYTES
    batch_max_images: int  # BATCH_MAX_IMAGES: cap of one coalesced onnxruntime call
    batch_inline_max_images: int  # BATCH_INLINE_MAX_IMAGES: bigger requests skip the queue
    batch_mode: str  # BATCH_MODE: thread | inline (service/batching.py)
    request_timeout_s: int  # REQUEST_TIMEOUT_S: BentoML's per-request timeout (answers 504)
    gc_freeze: bool  # GC_FREEZE: gc.freeze() after start-up (service.py)
    access_log: bool  # ACCESS_LOG
    metrics: bool  # METRICS: BentoML's Prometheus middleware and /metrics
    tracing: bool  # TRACING: OpenTelemetry spans per request (BentoML's tracing config decides export)

    def __post_init__(self) -> None:
        if self.batch_mode not in ("inline", "thread"):
            raise SystemExit(f"BATCH_MODE must be inline or thread, got {self.batch_mode!r}")

    @classmethod
    def from_env(cls, bento_arguments: dict[str, object] | None = None) -> "Settings":
        """bento_arguments: `bentoml build --arg model_tag=...` (stored in the bento, see Makefile)."""
        arguments = bento_arguments or {}
        return cls(
            model_path=os.environ.get("MODEL_PATH", "artifacts/model.onnx"),
            model_tag=os.environ.get("MODEL_TAG", "") or str(arguments.get("model_tag", "") or ""),
            provider=os.environ.get("ORT_PROVIDER", "auto").strip().lower(),
            intra_op_threads=_env_int("ORT_INTRA_OP_THREADS", 1),
            chunk_images=_env_int("ORT_CHUNK_IMAGES", 32),
            workers=_env_int("SERVICE_WORKERS", 2),
            max_images=_env_int("MAX_IMAGES_PER_REQUEST", 1024),
            max_body_bytes=_env_int("MAX_BODY_BYTES", 32 * 1024 * 1024),
            batch_max_images=_env_int("BATCH_MAX_IMAGES", 32),
            batch_inline_max_images=_env_int("BATCH_INLINE_MAX_IMAGES", 64),
            batch_mode=os.environ.get("BATCH_MODE", "inline").strip().lower(),
            request_timeout_s=_env_int("REQUEST_TIMEOUT_S", 60),
            gc_freeze=_env_bool("GC_FREEZE", True),
            access_log=_env_bool("ACCESS_LOG", False),
            metrics=_env_bool("METRICS", True),
            tracing=_env_bool("TRACING", False),
        )
