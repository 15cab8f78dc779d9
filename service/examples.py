"""Write example request bodies from real Fashion-MNIST test images (for the curl examples).

    python -m service.examples --out /tmp/fmnist

writes predict.json (2 images, [N,28,28]), batch64.f32 (64 images as raw little-endian float32),
batch8.npy, ankle_boot.png (one 28x28 test image, light on dark) and photo_dark_on_light.jpg
(the same image inverted and enlarged, as a phone photo of a garment on white would look),
v2_infer.json (an Open Inference Protocol request for 2 images).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
from pathlib import Path

import numpy as np
from PIL import Image


def read_test_images(data_dir: Path, count: int) -> np.ndarray:
    """The first `count` test images as uint8 [count,28,28], via the pipeline's IDX reader (numpy
    only; this script is a docs helper, not part of the served bento)."""
    from training import data

    try:
        return data.read_idx(data.find_file(data_dir, data.FILES["test"][0]))[:count]
    except data.DataError as e:
        raise SystemExit(f"examples: {e}") from None


def atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/fmnist"))
    parser.add_argument("--data-dir", type=Path, default=Path(os.environ.get("DATA_DIR", "/usr/share/datasets/fashion-mnist")))
    args = parser.parse_args(argv)
    pixels = read_test_images(args.data_dir, 64)
    images = pixels.astype(np.float32) / 255.0
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write(args.out / "predict.json", json.dumps({"images": np.round(images[:2], 6).tolist()}).encode())
    atomic_write(args.out / "batch64.f32", images[:, None].astype("<f4").tobytes())
    npy = io.BytesIO()
    np.save(npy, images[:8])
    atomic_write(args.out / "batch8.npy", npy.getvalue())
    png = io.BytesIO()
    Image.fromarray(pixels[0], "L").save(png, format="PNG")
    atomic_write(args.out / "ankle_boot.png", png.getvalue())
    jpg = io.BytesIO()
    Image.fromarray(255 - pixels[0], "L").resize((300, 300), Image.Resampling.BICUBIC).convert("RGB").save(jpg, format="JPEG")
    atomic_write(args.out / "photo_dark_on_light.jpg", jpg.getvalue())
    v2 = {"id": "example-1", "inputs": [{"name": "image", "shape": [2, 1, 28, 28], "datatype": "FP32",
                                         "data": np.round(images[:2], 6).ravel().tolist()}]}
    atomic_write(args.out / "v2_infer.json", json.dumps(v2).encode())
    print(f"wrote example requests to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
