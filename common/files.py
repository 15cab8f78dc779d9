"""Atomic writes and checksums: a reader never sees a half-written artifact, even if we are
killed midway (temp file in the same directory, then rename)."""
import hashlib
import json
import os
import tempfile
from pathlib import Path


def atomic_write(path: str | Path, write) -> Path:
    """Call `write(tmp_path)` on a temp file beside `path`, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the artifact the usual permissions
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def write_json(path: str | Path, obj) -> Path:
    return write_text(path, json.dumps(obj, indent=2) + "\n")


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_with_checksum(path: str | Path, data: bytes) -> str:
    """`path` and `path.sha256` (sha256sum format), each atomically. Returns the sha256."""
    path = Path(path)
    write_bytes(path, data)
    digest = hashlib.sha256(data).hexdigest()
    write_text(path.with_name(path.name + ".sha256"), f"{digest}  {path.name}\n")
    return digest
