"""Fashion-MNIST from the original IDX files (plain or .gz), and the train/validation/test split.

IDX: a big-endian header -- two zero bytes, a dtype code (0x08 = uint8), the number of dimensions --
then one big-endian uint32 per dimension, then the data. Short enough to read ourselves.
"""
import gzip
import struct
from pathlib import Path

import numpy as np

DEFAULT_DATA_DIR = "/usr/share/datasets/fashion-mnist"
LABELS = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
          "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


class DataError(Exception):
    """A missing, corrupt or truncated data file; the message says which and why."""


def read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:  # gzip raises these for a truncated or non-gzip file
        raise DataError(f"{path}: cannot read ({e})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DataError(f"{path}: not an IDX file (bad magic number)")
    if raw[2] != 0x08:
        raise DataError(f"{path}: IDX dtype code {raw[2]:#x}, expected 0x08 (uint8)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise DataError(f"{path}: truncated IDX header")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    expected = int(np.prod(shape))
    if len(raw) - header != expected:
        raise DataError(f"{path}: IDX header says {shape} = {expected} bytes, file holds {len(raw) - header}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def find_file(data_dir: Path, name: str) -> Path:
    for candidate in (data_dir / name, data_dir / f"{name}.gz"):
        if candidate.exists():
            return candidate
    raise DataError(f"{data_dir}: no {name} or {name}.gz (install dataset-fashion-mnist or pass --data-dir)")


def load_split_uint8(data_dir: str | Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images as the file stores them, uint8 [N,28,28], and labels as int64 [N]. Training keeps
    these in memory (a quarter of the float32 bytes) and converts one batch at a time (`to_float`)."""
    data_dir = Path(data_dir)
    images = read_idx(find_file(data_dir, FILES[split][0]))
    labels = read_idx(find_file(data_dir, FILES[split][1]))
    if images.ndim != 3 or images.shape[1:] != (28, 28):
        raise DataError(f"{data_dir}: {split} images have shape {images.shape}, expected [N,28,28]")
    if labels.ndim != 1 or len(labels) != len(images):
        raise DataError(f"{data_dir}: {split} has {len(images)} images but labels of shape {labels.shape}")
    if labels.max() >= len(LABELS):
        raise DataError(f"{data_dir}: {split} labels go up to {labels.max()}, expected < {len(LABELS)}")
    return images, labels.astype(np.int64)


def to_float(images):
    """uint8 [N,28,28] -> float32 [N,1,28,28] in [0,1], the models' input; numpy or torch, the same
    bits either way (one IEEE division by 255)."""
    if isinstance(images, np.ndarray):
        return (images.astype(np.float32) / 255.0)[:, None]
    return images.float().div_(255.0).unsqueeze(1)


def load_split(data_dir: str | Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images as float32 [N,1,28,28] in [0,1] and labels as int64 [N]."""
    images, labels = load_split_uint8(data_dir, split)
    return to_float(images), labels


def train_val_split(n: int, val_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded permutation: the validation images are held out of training, the test set is untouched."""
    order = np.random.default_rng(seed).permutation(n)
    return order[val_size:], order[:val_size]
