"""A training run on disk: safetensors weights with a JSON config beside them (which records the
weights' sha256). Atomic writes and checksums come from common.files."""
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from common.files import atomic_write, sha256_file, write_json  # noqa: F401  (re-exported for the stages)

WEIGHTS = "weights.safetensors"
CONFIG = "config.json"


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
