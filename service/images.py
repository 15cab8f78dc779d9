"""An uploaded PNG/JPEG of any size -> one input of the model's own shape (service/contract.py).

1. decode (PNG or JPEG, EXIF orientation applied, transparency composited onto the background);
   a picture much larger than the model's input is decoded at a fraction of its size (a JPEG's
   DCT scaling, `draft`) and box-reduced, down to no less than REDUCE_TO x the input's size, so a
   1920x1080 photo for a 224x224 model costs a few ms instead of tens (docs/service.md, "Uploads");
2. convert to the model's channels (grey 'L' for 1, 'RGB' for 3);
3. polarity: the border pixels say whether the picture is a dark or a light background; `invert`
   decides when given, else the picture is inverted when its background disagrees with the model's
   `image_background` (Fashion-MNIST: a light object on dark);
4. crop to the object's bounding box (pixels that differ from the background), add a margin of
   `margin` x its longer side, pad to the model's aspect ratio with the background colour, resize
   to H x W (an upload that already has the model's size is taken as it is: no crop, no resize);
5. scale 0..255 to `input_range` ([0, 1] when the model declares none) and lay out as NCHW/NHWC.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .contract import Contract
from .errors import too_large, unprocessable

ACCEPTED_FORMATS = {"PNG", "JPEG"}
# Far above any sensible photo, far below what would exhaust memory when decoded.
MAX_IMAGE_PIXELS = 40_000_000
# A pixel belongs to the object when it differs from the background by more than this (of 255):
# above JPEG noise, below any visible stroke.
OBJECT_THRESHOLD = 20.0
# Big pictures are worked on at no less than this many times the model's input size (each side).
REDUCE_TO = 2


def peek_image(data: bytes) -> Image.Image:
    """PNG/JPEG bytes -> a PIL image whose header is read (format, size checked), not yet decoded."""
    if not data:
        raise unprocessable("the uploaded image file is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise unprocessable("the uploaded file is not a PNG or JPEG image") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise too_large(f"image is too large to decode safely: {exc}") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise unprocessable(f"the uploaded image is corrupt or truncated: {exc}") from None
    if image.format not in ACCEPTED_FORMATS:
        raise unprocessable(f"image must be PNG or JPEG, got {image.format or 'unknown format'}")
    if image.width * image.height > MAX_IMAGE_PIXELS:
        raise too_large(f"image is {image.width}x{image.height} pixels, over the limit of {MAX_IMAGE_PIXELS:,}")
    return image


def decode_image(image: Image.Image, height: int | None = None, width: int | None = None) -> Image.Image:
    """Decode a peeked image (EXIF orientation applied); with the model's height/width, a much bigger
    picture is decoded/reduced to no less than REDUCE_TO x that size."""
    try:
        if height and width and image.format == "JPEG":
            image.draft(image.mode if image.mode in ("L", "RGB") else "RGB", (REDUCE_TO * width, REDUCE_TO * height))
        image.load()  # decode now: truncated or corrupt files fail here, not later
        image = ImageOps.exif_transpose(image) or image
        if height and width:
            factor = min(image.width // (REDUCE_TO * width), image.height // (REDUCE_TO * height))
            if factor >= 2:
                image = image.reduce(factor)
        return image
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise too_large(f"image is too large to decode safely: {exc}") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise unprocessable(f"the uploaded image is corrupt or truncated: {exc}") from None


def open_image(data: bytes) -> Image.Image:
    """PNG/JPEG bytes -> a decoded PIL image, or a 413/422 ClientError."""
    if not data:
        raise unprocessable("the uploaded image file is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            if image.format not in ACCEPTED_FORMATS:
                raise unprocessable(f"image must be PNG or JPEG, got {image.format or 'unknown format'}")
            if image.width * image.height > MAX_IMAGE_PIXELS:
                raise too_large(f"image is {image.width}x{image.height} pixels, over the limit of {MAX_IMAGE_PIXELS:,}")
            image.load()  # decode now: truncated or corrupt files fail here, not later
            return ImageOps.exif_transpose(image) or image
    except UnidentifiedImageError:
        raise unprocessable("the uploaded file is not a PNG or JPEG image") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise too_large(f"image is too large to decode safely: {exc}") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise unprocessable(f"the uploaded image is corrupt or truncated: {exc}") from None


def to_pixels(image: Image.Image, channels: int, fill: int) -> np.ndarray:
    """Any mode -> float32 [H, W, channels] in 0..255; transparent pixels become `fill` (0 or 255)."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):  # 16-bit/float PNGs: scale, don't clip
        array = np.asarray(image, dtype=np.float64)
        peak = array.max() or 1.0
        image = Image.fromarray((np.clip(array, 0, None) * (255.0 / peak)).astype(np.uint8), mode="L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (fill, fill, fill, 255)), rgba)
    pixels = np.asarray(image.convert("L" if channels == 1 else "RGB"), dtype=np.float32)
    return pixels.reshape(pixels.shape[0], pixels.shape[1], channels)


def border_level(pixels: np.ndarray) -> np.ndarray:
    """Per-channel median of the outer frame (1/20 of the shorter side, at least 1 px)."""
    h, w = pixels.shape[:2]
    k = max(1, min(h, w) // 20)
    frame = np.concatenate([pixels[:k].reshape(-1, pixels.shape[2]), pixels[-k:].reshape(-1, pixels.shape[2]),
                            pixels[:, :k].reshape(-1, pixels.shape[2]), pixels[:, -k:].reshape(-1, pixels.shape[2])])
    return np.median(frame, axis=0)


def crop_to_object(pixels: np.ndarray, background: np.ndarray, margin: float, aspect: float) -> np.ndarray:
    """The object's bounding box plus margin, padded with `background` to width/height = `aspect`."""
    distance = np.abs(pixels - background).max(axis=2)
    rows = np.flatnonzero((distance > OBJECT_THRESHOLD).any(axis=1))
    cols = np.flatnonzero((distance > OBJECT_THRESHOLD).any(axis=0))
    if rows.size == 0:  # nothing but background: keep the whole picture
        top, bottom, left, right = 0, pixels.shape[0], 0, pixels.shape[1]
    else:
        top, bottom, left, right = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    crop = pixels[top:bottom, left:right]
    h, w = crop.shape[:2]
    pad = int(round(margin * max(h, w)))
    out_h, out_w = h + 2 * pad, w + 2 * pad
    if out_w / out_h < aspect:
        out_w = int(round(out_h * aspect))
    else:
        out_h = int(round(out_w / aspect))
    canvas = np.empty((out_h, out_w, pixels.shape[2]), np.float32)
    canvas[:] = background
    y, x = (out_h - h) // 2, (out_w - w) // 2
    canvas[y : y + h, x : x + w] = crop
    return canvas


def resize(pixels: np.ndarray, height: int, width: int) -> np.ndarray:
    """Antialiased resize (PIL's Lanczos widens its support when shrinking)."""
    c = pixels.shape[2]
    image = Image.fromarray(np.clip(np.round(pixels), 0, 255).astype(np.uint8).squeeze(2) if c == 1
                            else np.clip(np.round(pixels), 0, 255).astype(np.uint8), "L" if c == 1 else "RGB")
    out = np.asarray(image.resize((width, height), Image.Resampling.LANCZOS), dtype=np.float32)
    return out.reshape(height, width, c)


def upload_to_input(data: bytes, contract: Contract, invert: bool | None = None, margin: float = 0.02) -> np.ndarray:
    """PNG/JPEG bytes -> float32 [1, *sample_shape] for an image model (contract.classify_refusal is None)."""
    return image_to_input(peek_image(data), contract, invert, margin)


def image_to_input(image: Image.Image, contract: Contract, invert: bool | None = None, margin: float = 0.02) -> np.ndarray:
    """A peeked image (peek_image) -> float32 [1, *sample_shape]: steps 1-5 of the module docstring."""
    channels, height, width = contract.channels, contract.height, contract.width
    image = decode_image(image, height, width)
    fill = 255 if contract.background == "light" else 0
    pixels = to_pixels(image, channels, fill)
    background = border_level(pixels)
    if invert is None:
        seen = "light" if background.mean() > 127.5 else "dark"
        invert = contract.background is not None and seen != contract.background
    if invert:
        pixels = 255.0 - pixels
        background = 255.0 - background
    if pixels.shape[:2] != (height, width):
        pixels = resize(crop_to_object(pixels, background, margin, width / height), height, width)
    lo, hi = contract.input_range or (0.0, 1.0)
    scaled = pixels / np.float32(255.0) * np.float32(hi - lo) + np.float32(lo)
    if contract.layout == "NCHW":
        scaled = scaled.transpose(2, 0, 1)
    return np.ascontiguousarray(scaled[None], dtype=np.float32)
