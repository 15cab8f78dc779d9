"""Files the stages share: atomic writes, checksums, safetensors weights with a JSON config beside them."""
import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

WEIGHTS = "weights.safetensors"
CONFIG = "config.json"


def atomic_write(path: str | Path, write) -> Path:
    """Call `write(tmp_path)` on a temp file in the same directory, then rename it over `path`,
    so a reader never sees a half-written artifact, even if we are killed midway."""
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


def write_json(path: str | Path, obj) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=2) + "\n"))


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_run(run_dir: str | Path, model: torch.nn.Module, config: dict) -> dict:
    """weights.safetensors + config.json (which records the weights' sha256)."""
    run_dir = Path(run_dir)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    weights = atomic_write(run_dir / WEIGHTS, lambda tmp: save_file(state, tmp))
    config = dict(config, weights_sha256=sha256_file(weights))
    write_json(run_dir / CONFIG, config)
    return config


def load_run(run_dir: str | Path) -> tuple[torch.nn.Module, dict]:
    """Rebuild the model from config.json and load its safetensors weights (no unpickling anywhere)."""
    from training.models import build

    run_dir = Path(run_dir)
    for name in (WEIGHTS, CONFIG):
        if not (run_dir / name).exists():
            raise FileNotFoundError(f"{run_dir / name} is missing; train first (python -m training --out {run_dir})")
    config = json.loads((run_dir / CONFIG).read_text())
    actual = sha256_file(run_dir / WEIGHTS)
    if config.get("weights_sha256") not in (None, actual):
        raise ValueError(f"{run_dir / WEIGHTS}: sha256 {actual[:12]}… does not match config.json "
                         f"({config['weights_sha256'][:12]}…); the weights were changed after training")
    model = build(config["arch"], dropout=config.get("dropout", True))
    model.load_state_dict(load_file(run_dir / WEIGHTS), strict=True)
    return model.eval(), config
