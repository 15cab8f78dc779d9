"""An uploaded PNG/JPEG of any size -> one input of the model's own shape (service/contract.py).

1. decode (PNG or JPEG, EXIF orientation applied, transparency composited onto the background);
   a picture much larger than the model's input is decoded at a fraction of its size (a JPEG's
   DCT scaling, `draft`) and box-reduced, down to no less than REDUCE_TO x the input's size, so a
   1920x1080 photo for a 224x224 model costs a few ms instead of tens (docs/service.md, "Uploads");
2. convert to the model's channels (grey 'L' for 1, 'RGB' for 3);
3. polarity: the border pixels say whether the picture is a dark or a light background; `invert`
   decides when given, else the picture is inverted when its background disagrees with the model's
   `image_background` (Fashion-MNIST: a light object on dark);
4. crop to the object's bounding box (pixels that differ from the background, found on a copy of
   at most PROBE_SIDE pixels a side), add a margin of `margin` x its longer side, pad to the
   model's aspect ratio with the background colour, resize to H x W (an upload that already has
   the model's size is taken as it is: no crop, no resize);
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
# The object's box and the background are found on a copy of at most this many pixels a side.
PROBE_SIDE = 128
REDUCING_GAP = 2.0  # PIL's resize: box-reduce first when shrinking more than this (what its thumbnail() uses)


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
    return decode_image(peek_image(data))


def to_mode(image: Image.Image, channels: int, fill: int) -> Image.Image:
    """Any mode -> 'L' (1 channel) or 'RGB' (3); transparent pixels become `fill` (0 or 255),
    16-bit/float pictures are scaled to 0..255, not clipped."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        peak = array.max() or 1.0
        image = Image.fromarray((np.clip(array, 0, None) * (255.0 / peak)).astype(np.uint8), mode="L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (fill, fill, fill, 255)), rgba)
    want = "L" if channels == 1 else "RGB"
    return image if image.mode == want else image.convert(want)


def pixels_of(image: Image.Image) -> np.ndarray:
    """An 'L' or 'RGB' image -> float32 [H, W, channels] in 0..255."""
    pixels = np.asarray(image, dtype=np.float32)
    return pixels.reshape(pixels.shape[0], pixels.shape[1], -1)


def to_pixels(image: Image.Image, channels: int, fill: int) -> np.ndarray:
    """Any mode -> float32 [H, W, channels] in 0..255; transparent pixels become `fill` (0 or 255)."""
    return pixels_of(to_mode(image, channels, fill))


def border_level(pixels: np.ndarray) -> np.ndarray:
    """Per-channel median of the outer frame (1/20 of the shorter side, at least 1 px)."""
    h, w = pixels.shape[:2]
    k = max(1, min(h, w) // 20)
    frame = np.concatenate([pixels[:k].reshape(-1, pixels.shape[2]), pixels[-k:].reshape(-1, pixels.shape[2]),
                            pixels[:, :k].reshape(-1, pixels.shape[2]), pixels[:, -k:].reshape(-1, pixels.shape[2])])
    return np.median(frame, axis=0)


def object_box(pixels: np.ndarray, background: np.ndarray) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of the pixels that differ from `background`; the whole picture
    when nothing does."""
    distance = np.abs(pixels - background).max(axis=2) if pixels.shape[2] > 1 else np.abs(pixels[..., 0] - background[0])
    rows = np.flatnonzero((distance > OBJECT_THRESHOLD).any(axis=1))
    cols = np.flatnonzero((distance > OBJECT_THRESHOLD).any(axis=0))
    if rows.size == 0:
        return 0, pixels.shape[0], 0, pixels.shape[1]
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def framed(h: int, w: int, margin: float, aspect: float) -> tuple[int, int]:
    """The size of an h x w crop plus `margin` x its longer side, padded to width/height = `aspect`."""
    pad = int(round(margin * max(h, w)))
    out_h, out_w = h + 2 * pad, w + 2 * pad
    if out_w / out_h < aspect:
        out_w = int(round(out_h * aspect))
    else:
        out_h = int(round(out_w / aspect))
    return out_h, out_w


def crop_to_object(pixels: np.ndarray, background: np.ndarray, margin: float, aspect: float) -> np.ndarray:
    """The object's bounding box plus margin, padded with `background` to width/height = `aspect`."""
    top, bottom, left, right = object_box(pixels, background)
    crop = pixels[top:bottom, left:right]
    h, w = crop.shape[:2]
    out_h, out_w = framed(h, w, margin, aspect)
    canvas = np.empty((out_h, out_w, pixels.shape[2]), np.float32)
    canvas[:] = background
    y, x = (out_h - h) // 2, (out_w - w) // 2
    canvas[y : y + h, x : x + w] = crop
    return canvas


def probe_of(image: Image.Image) -> Image.Image:
    """A box-reduced copy of at most PROBE_SIDE pixels a side (the picture itself when smaller)."""
    factor = -(-max(image.size) // PROBE_SIDE)
    return image.reduce(factor) if factor > 1 else image


def crop_and_resize(image: Image.Image, background: np.ndarray, margin: float, height: int, width: int,
                    probe: Image.Image | None = None) -> Image.Image:
    """crop_to_object + an antialiased resize to height x width, on the uint8 picture: the object's
    box is found on a copy of at most PROBE_SIDE pixels a side; only the crop is resized (Lanczos,
    which widens its support when shrinking; PIL box-reduces first when shrinking more than
    REDUCING_GAP times, as its own thumbnail() does: 1.5 instead of 5.2 ms for 960x540 -> 224) and
    placed in its frame."""
    probe = probe or probe_of(image)
    top, bottom, left, right = object_box(pixels_of(probe), background)
    sy, sx = image.height / probe.height, image.width / probe.width  # back to the picture's pixels, outward
    box = (int(left * sx), int(top * sy), min(image.width, int(np.ceil(right * sx))), min(image.height, int(np.ceil(bottom * sy))))
    crop = image.crop(box)
    out_h, out_w = framed(crop.height, crop.width, margin, width / height)
    scale = width / out_w
    size = (max(1, round(crop.width * scale)), max(1, round(crop.height * scale)))
    fill = tuple(int(round(v)) for v in background) if len(background) > 1 else int(round(float(background[0])))
    canvas = Image.new(image.mode, (width, height), fill)
    canvas.paste(crop.resize(size, Image.Resampling.LANCZOS, reducing_gap=REDUCING_GAP),
                 ((width - size[0]) // 2, (height - size[1]) // 2))
    return canvas


def upload_to_input(data: bytes, contract: Contract, invert: bool | None = None, margin: float = 0.02) -> np.ndarray:
    """PNG/JPEG bytes -> float32 [1, *sample_shape] for an image model (contract.classify_refusal is None)."""
    return image_to_input(peek_image(data), contract, invert, margin)


def image_to_input(image: Image.Image, contract: Contract, invert: bool | None = None, margin: float = 0.02) -> np.ndarray:
    """A peeked image (peek_image) -> float32 [1, *sample_shape]: steps 1-5 of the module docstring."""
    channels, height, width = contract.channels, contract.height, contract.width
    fill = 255 if contract.background == "light" else 0
    image = to_mode(decode_image(image, height, width), channels, fill)
    exact = image.size == (width, height)  # the model's size: taken as it is, no crop, no resize
    probe = image if exact else probe_of(image)
    background = border_level(pixels_of(probe))
    if invert is None:
        seen = "light" if background.mean() > 127.5 else "dark"
        invert = contract.background is not None and seen != contract.background
    pixels = pixels_of(image if exact else crop_and_resize(image, background, margin, height, width, probe))
    if invert:
        pixels = 255.0 - pixels
    lo, hi = contract.input_range or (0.0, 1.0)
    scaled = pixels / np.float32(255.0) * np.float32(hi - lo) + np.float32(lo)
    if contract.layout == "NCHW":
        scaled = scaled.transpose(2, 0, 1)
    return np.ascontiguousarray(scaled[None], dtype=np.float32)
