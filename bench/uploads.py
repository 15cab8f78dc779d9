"""What an uploaded picture costs before the model sees it (issue 25 item 5; docs/service.md, "Uploads").

    python -m bench.uploads                 # the service's own path, and PIL / OpenCV / simplejpeg side by side

Times (CPU time of this process, one thread), JPEG bytes -> the model's input (RGB 224x224 for an ImageNet
model, grey 28x28 for Fashion-MNIST), for a 224x224 and a 1920x1080 photo-like JPEG (quality 90):

- `service`: service/images.py `upload_to_input`, what /classify runs (decode with PIL's JPEG draft
  scaling and a box reduce for big pictures, object crop, Lanczos resize, scaling);
- `pil`: PIL decode at full size + resize (the path before issue 25);
- `pil-draft`: PIL with draft + reduce + resize only (the decode part of `service`);
- `opencv`: cv2.imdecode (IMREAD_REDUCED_* for big pictures) + cv2.resize INTER_AREA;
- `simplejpeg`: libjpeg-turbo with DCT scaling (min_width/min_height) + cv2.resize.

Libraries that are not installed are skipped (`pip install opencv-python-headless simplejpeg` to
include them). Prints a markdown table of median ms per image over --rounds rounds.
"""

from __future__ import annotations

import argparse
import io
import json
import time

import numpy as np
from PIL import Image


def photo(width: int, height: int, seed: int = 0) -> bytes:
    """A photo-like JPEG: smooth gradients, an object, noise (so it compresses like a photo)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    base = np.stack([120 + 80 * np.sin(6 * x + c) * np.cos(4 * y - c) for c in (0.0, 1.0, 2.0)], axis=-1)
    cy, cx, r = height / 2, width / 2, min(width, height) / 4
    disk = ((np.mgrid[0:height, 0:width][0] - cy) ** 2 + (np.mgrid[0:height, 0:width][1] - cx) ** 2) < r * r
    base[disk] = [30, 200, 60]
    pixels = np.clip(base + rng.normal(0, 6, base.shape), 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(out, "JPEG", quality=90)
    return out.getvalue()


class Target:
    """The few contract fields service/images.py reads."""

    def __init__(self, channels: int, size: int) -> None:
        self.channels, self.height, self.width = channels, size, size
        self.background = None
        self.input_range = (0.0, 1.0)
        self.layout = "NCHW"


def ways(target: Target) -> dict:
    from service.images import upload_to_input

    size, grey = target.height, target.channels == 1
    found = {"service": lambda data: upload_to_input(data, target),
             "pil": lambda data: np.asarray(Image.open(io.BytesIO(data)).convert("L" if grey else "RGB")
                                            .resize((size, size), Image.Resampling.LANCZOS)),
             "pil-draft": lambda data: pil_draft(data, size, grey)}
    try:
        import cv2

        cv2.setNumThreads(1)
        found["opencv"] = lambda data: opencv(cv2, data, size, grey)
    except ImportError:
        pass
    try:
        import cv2
        import simplejpeg

        found["simplejpeg"] = lambda data: cv2.resize(
            simplejpeg.decode_jpeg(data, colorspace="GRAY" if grey else "RGB", min_width=2 * size, min_height=2 * size),
            (size, size), interpolation=cv2.INTER_AREA)
    except ImportError:
        pass
    return found


def pil_draft(data: bytes, size: int, grey: bool) -> np.ndarray:
    image = Image.open(io.BytesIO(data))
    image.draft("L" if grey else "RGB", (2 * size, 2 * size))
    image = image.convert("L" if grey else "RGB")
    factor = min(image.width, image.height) // (2 * size)
    if factor >= 2:
        image = image.reduce(factor)
    return np.asarray(image.resize((size, size), Image.Resampling.LANCZOS))


def opencv(cv2, data: bytes, size: int, grey: bool) -> np.ndarray:
    buf = np.frombuffer(data, np.uint8)
    header = Image.open(io.BytesIO(data))
    scale = max(1, min(header.width, header.height) // (2 * size))
    flags = {1: 0, 2: 16, 4: 32}.get(min(8, 1 << (scale.bit_length() - 1)), 48)  # IMREAD_REDUCED_*_2/4/8
    image = cv2.imdecode(buf, (cv2.IMREAD_GRAYSCALE if grey else cv2.IMREAD_COLOR) | flags if flags else
                         (cv2.IMREAD_GRAYSCALE if grey else cv2.IMREAD_COLOR))
    return cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)


def median_ms(fn, data: bytes, rounds: int) -> float:
    """Median CPU time of this process per call (one thread does the work: on an idle machine this is
    the wall time; on a busy one it is not inflated by waiting for a core)."""
    fn(data)
    times = []
    for _ in range(rounds):
        start = time.process_time()
        fn(data)
        times.append(time.process_time() - start)
    return 1000 * float(np.median(times))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args(argv)
    pictures = {"224x224": photo(224, 224), "1920x1080": photo(1920, 1080)}
    rows = []
    for target in (Target(3, 224), Target(1, 28)):
        for picture, data in pictures.items():
            for name, fn in ways(target).items():
                rows.append({"model input": f"{target.channels}x{target.height}x{target.width}", "upload": picture,
                             "bytes": len(data), "way": name, "ms": round(median_ms(fn, data, args.rounds), 2)})
    print("| model input | upload | way | ms per image (median) |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['model input']} | {r['upload']} ({r['bytes'] // 1024} KiB) | {r['way']} | {r['ms']:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
