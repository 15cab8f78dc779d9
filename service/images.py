"""Uploaded PNG/JPEG of any size -> one [1, 1, 28, 28] float32 image in [0, 1].

Fashion-MNIST images are a light object on a dark (black) background. A photo of a garment on a
white table is the opposite, so callers pass `invert=True` for dark-on-light pictures.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import too_large, unprocessable

ACCEPTED_FORMATS = {"PNG", "JPEG"}
# Far above any sensible photo, far below what would exhaust memory when decoded.
MAX_IMAGE_PIXELS = 40_000_000


def to_grayscale(image: Image.Image) -> Image.Image:
    """Any mode -> 'L'. Transparent pixels become background (black), as in Fashion-MNIST."""
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        image = Image.alpha_composite(background, rgba)
    if image.mode == "I;16" or image.mode == "I":
        # 16-bit PNGs: scale to 8 bits rather than clip.
        array = np.asarray(image, dtype=np.float64)
        peak = array.max() or 1.0
        image = Image.fromarray((array * (255.0 / peak)).astype(np.uint8), mode="L")
    return image.convert("L")


def fit_on_canvas(image: Image.Image, size: int) -> Image.Image:
    """Resize keeping the aspect ratio so the longer side is `size`, centred on black."""
    width, height = image.size
    scale = size / max(width, height)
    new_size = (max(1, round(width * scale)), max(1, round(height * scale)))
    resized = image.resize(new_size, Image.Resampling.LANCZOS)
    canvas = Image.new("L", (size, size), 0)
    canvas.paste(resized, ((size - new_size[0]) // 2, (size - new_size[1]) // 2))
    return canvas


def decode_image(data: bytes, invert: bool = False, size: int = 28) -> np.ndarray:
    """PNG/JPEG bytes -> float32 [1, 1, size, size] in [0, 1]; ClientError for anything else."""
    if not data:
        raise unprocessable("the uploaded image file is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            if image.format not in ACCEPTED_FORMATS:
                raise unprocessable(f"image must be PNG or JPEG, got {image.format or 'unknown format'}")
            if image.width * image.height > MAX_IMAGE_PIXELS:
                raise too_large(
                    f"image is {image.width}x{image.height} pixels, over the limit of {MAX_IMAGE_PIXELS:,}"
                )
            image.load()  # decode now: truncated or corrupt files fail here, not later
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        if isinstance(exc, UnidentifiedImageError):
            raise unprocessable("the uploaded file is not a PNG or JPEG image") from None
        raise too_large(f"image is too large to decode safely: {exc}") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise unprocessable(f"the uploaded image is corrupt or truncated: {exc}") from None
    gray = to_grayscale(ImageOps.exif_transpose(image) or image)
    if invert:
        gray = ImageOps.invert(gray)
    canvas = fit_on_canvas(gray, size)
    pixels = np.asarray(canvas, dtype=np.float32) / 255.0
    return pixels.reshape(1, 1, size, size)
