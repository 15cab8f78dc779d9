"""What a training run was trained on, and whether a run on disk still is what training would make now.

config.json records `trained_on`: the sha256 of each data file's contents (the four IDX files,
decompressed when they are .gz, so the same data plain or gzipped is the same data), the recipe
(every setting that changes the weights: training/config.py's values as resolved for the run) and
the seed. `why_stale` compares a run with what `python -m training` would train now and says, in
words, what changed. No torch here: `make pipeline` asks this before it decides to train.
"""
import gzip
import hashlib
import json
from pathlib import Path

from training.config import DEFAULTS
from training.data import FILES, find_file

# settings that do not change what is learned, only how fast or where: not part of the recipe
NOT_RECIPE = ("seed", "threads", "keep_freed")


def file_digest(path: Path) -> str:
    """sha256 of the file's contents, decompressed when it is .gz."""
    h = hashlib.sha256()
    with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def data_digest(data_dir: str | Path) -> dict:
    """{"dir": the directory, "files": {IDX name: sha256 of its contents}} for the four Fashion-MNIST files."""
    data_dir = Path(data_dir)
    files = {name: file_digest(find_file(data_dir, name)) for pair in FILES.values() for name in pair}
    return {"dir": str(data_dir), "files": files}


def recipe_of(cfg: dict) -> dict:
    """The settings of a resolved config that decide the weights (arch included)."""
    return {k: cfg[k] for k in ("arch", *DEFAULTS) if k in cfg and k not in NOT_RECIPE}


def trained_on(cfg: dict, data_dir: str | Path) -> dict:
    return {"data": data_digest(data_dir), "recipe": recipe_of(cfg), "seed": cfg["seed"]}


def _short(digest: str) -> str:
    return digest[:12] + "…"


def why_stale(run_dir: str | Path, wanted: dict) -> list[str]:
    """Why the run in `run_dir` is not what training `wanted` (trained_on(...)) would make; [] when it is."""
    run_dir = Path(run_dir)
    try:
        config = json.loads((run_dir / "config.json").read_text())
    except FileNotFoundError:
        return [f"there is no run in {run_dir} yet"]
    except (OSError, ValueError) as e:
        return [f"its config.json cannot be read ({e})"]
    if not (run_dir / "weights.safetensors").exists():
        return ["its weights.safetensors is missing"]
    had = config.get("trained_on")
    if not had:
        return ["it does not record what it was trained on (trained by an older bnfold)"]
    reasons = []
    old_files, new_files = had["data"]["files"], wanted["data"]["files"]
    changed = [n for n in new_files if old_files.get(n) != new_files[n]]
    if changed:
        reasons.append("the data changed: " + ", ".join(
            f"{n} in {wanted['data']['dir']} is {_short(new_files[n])}, it was trained on "
            f"{_short(old_files[n]) if n in old_files else 'no such file'} (from {had['data']['dir']})" for n in changed))
    old_recipe, new_recipe = had["recipe"], wanted["recipe"]
    diffs = [f"{k} {old_recipe.get(k)!r} → {new_recipe.get(k)!r}" for k in sorted(set(old_recipe) | set(new_recipe))
             if old_recipe.get(k) != new_recipe.get(k)]
    if diffs:
        reasons.append("the recipe changed: " + ", ".join(diffs))
    if had["seed"] != wanted["seed"]:
        reasons.append(f"the seed changed: {had['seed']} → {wanted['seed']}")
    return reasons
