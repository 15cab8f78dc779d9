"""Turn request bodies into a validated float32 [N, C, H, W] batch, or raise a ClientError.

Pure functions on bytes and numpy arrays, so they are unit-testable without a server.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import orjson

from .errors import ClientError, bad_request, too_large, unprocessable

# float, int and unsigned int arrays are pixel values; bool, str, object (ragged / null) are not.
NUMERIC_KINDS = "fiu"


@dataclass(frozen=True)
class InputSpec:
    """The geometry and limits every request is checked against."""

    image_shape: tuple[int, int, int]  # (C, H, W)
    value_range: tuple[float, float] = (0.0, 1.0)
    max_images: int = 1024

    @property
    def pixels_per_image(self) -> int:
        c, h, w = self.image_shape
        return c * h * w

    @property
    def bytes_per_image(self) -> int:
        return 4 * self.pixels_per_image


def parse_json(body: bytes) -> object:
    if not body:
        raise bad_request("empty request body: send JSON like {\"images\": [[[...28 floats...] x28]]}")
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise bad_request(f"malformed JSON: {exc}") from None


def as_numeric_array(value: object, what: str) -> np.ndarray:
    """Nested lists -> ndarray, refusing ragged lists and non-numbers (strings, bools, null)."""
    try:
        array = np.asarray(value)
    except (ValueError, TypeError):
        raise unprocessable(f"{what} must be a rectangular nested list of numbers (got ragged lists)") from None
    if array.dtype.kind not in NUMERIC_KINDS:
        kind = "booleans" if array.dtype.kind == "b" else "ragged lists, strings or nulls"
        raise unprocessable(f"{what} must contain only numbers, got {kind} (dtype {array.dtype})")
    return array


def check_batch(array: np.ndarray, spec: InputSpec, what: str = "images") -> np.ndarray:
    """[N,H,W] or [N,C,H,W] numbers -> contiguous float32 [N,C,H,W] in range, or ClientError."""
    c, h, w = spec.image_shape
    if array.ndim == 3 and c == 1 and array.shape[1:] == (h, w):
        array = array.reshape(array.shape[0], 1, h, w)
    elif array.ndim != 4 or array.shape[1:] != (c, h, w):
        want = f"[N,{h},{w}] or [N,{c},{h},{w}]" if c == 1 else f"[N,{c},{h},{w}]"
        raise unprocessable(f"{what} must have shape {want}, got {list(array.shape)}")
    n = array.shape[0]
    if n == 0:
        raise unprocessable(f"{what} is an empty batch (N=0)")
    if n > spec.max_images:
        raise too_large(f"batch of {n} images is over the limit of {spec.max_images} per request")
    batch = np.ascontiguousarray(array, dtype=np.float32)
    lo, hi = spec.value_range
    # One min and one max pass catch everything: NaN fails both comparisons, +-Inf is out of range.
    low, high = batch.min(), batch.max()
    if not (lo <= low and high <= hi):
        if not np.isfinite(batch).all():
            raise unprocessable(f"{what} contains NaN or Inf")
        raise unprocessable(
            f"{what} values must lie in [{lo:g}, {hi:g}] (pixel intensities), "
            f"got min {float(low):g}, max {float(high):g}"
        )
    return batch


def images_from_json(body: bytes, spec: InputSpec) -> np.ndarray:
    payload = parse_json(body)
    if not isinstance(payload, dict) or "images" not in payload:
        raise unprocessable('JSON body must be an object with an "images" field')
    return check_batch(as_numeric_array(payload["images"], '"images"'), spec, '"images"')


def images_from_raw_float32(body: bytes, spec: InputSpec) -> np.ndarray:
    """application/octet-stream: little-endian float32 pixels, N*C*H*W of them, no header."""
    if not body:
        raise bad_request("empty request body: send N*784 little-endian float32 values")
    if len(body) % spec.bytes_per_image:
        raise unprocessable(
            f"raw float32 body must be a multiple of {spec.bytes_per_image} bytes "
            f"(one {'x'.join(map(str, spec.image_shape))} image), got {len(body)}"
        )
    flat = np.frombuffer(body, dtype="<f4")
    return check_batch(flat.reshape(-1, *spec.image_shape), spec, "raw float32 images")


def images_from_npy(body: bytes, spec: InputSpec) -> np.ndarray:
    """application/x-npy: one .npy array (no pickles), [N,H,W] or [N,C,H,W] numbers."""
    if not body:
        raise bad_request("empty request body: send one .npy array")
    try:
        array = np.load(io.BytesIO(body), allow_pickle=False)
    except ValueError as exc:
        raise unprocessable(f"not a readable .npy array without pickles: {exc}") from None
    except (OSError, EOFError) as exc:
        raise unprocessable(f"not a readable .npy array: {exc}") from None
    if not isinstance(array, np.ndarray) or array.dtype.kind not in NUMERIC_KINDS:
        raise unprocessable(f".npy array must hold numbers, got dtype {getattr(array, 'dtype', '?')}")
    return check_batch(array, spec, ".npy images")


def parse_bool(value: str | None, name: str) -> bool:
    if value is None or value == "":
        return False
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise unprocessable(f"{name} must be true or false, got {value!r}")


__all__ = [
    "ClientError",
    "InputSpec",
    "check_batch",
    "images_from_json",
    "images_from_npy",
    "images_from_raw_float32",
    "parse_bool",
    "parse_json",
]
