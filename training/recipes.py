"""python -m training.recipes: seed-cnn's training recipes side by side on this machine.

Each recipe is trained with each seed, one run after another in one process, and the table gives
epochs, training seconds and test accuracy per run (and the mean per recipe). `before` is the
recipe seed-cnn had before issue 11 (the seed's own layers, 20 epochs); `default` is what
`python -m training` / `make pipeline` trains now. Writes results.json, results.md and recipes.png."""
import argparse
import multiprocessing
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import matplotlib
from tqdm import tqdm

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from training.artifacts import atomic_write, write_json  # noqa: E402
from training.data import DEFAULT_DATA_DIR, DataError  # noqa: E402
from training.train import resolve_config, train  # noqa: E402

# Every recipe spells out what it sets, so that later changes of the defaults do not change it.
_BEFORE = dict(lean=False, keep_freed=False, epochs=20, batch_size=128, lr=2e-3, weight_decay=5e-4,
               label_smoothing=0.1, ema=0.0, hflip=False, shift=0, patience=4)
RECIPES = {
    "before": ("the recipe before issue 11: the seed's layers, glibc malloc as is (main's step then was ~1.1x "
               "this one: float32 images in memory, for-loop AdamW)", _BEFORE),
    "lean-20": ("the same recipe trained through LeanSeedCNN", {**_BEFORE, "lean": True, "keep_freed": True}),
    "default": ("what `make pipeline` trains (training/train.py)", {}),
}


def mean(values):
    return statistics.fmean(values) if values else float("nan")


def table(rows: list[dict], command: str, started: str) -> str:
    lines = [f"`{command}`, {started}, {rows[0]['threads']} threads, one run after another on this machine:", "",
             "| recipe | seed | epochs (best) | training s | s/epoch | test acc | val acc |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['recipe']} | {r['seed']} | {r['epochs_run']} ({r['best_epoch']}) | {r['train_seconds']:.0f} "
                     f"| {r['train_seconds'] / r['epochs_run']:.1f} | {r['test_accuracy']:.2%} | {r['val_accuracy']:.2%} |")
    recipes = list(dict.fromkeys(r["recipe"] for r in rows))
    for k in recipes:
        mine = [r for r in rows if r["recipe"] == k]
        if len(mine) > 1:
            lines.append(f"| **{k}, mean of {len(mine)}** | | | {mean([r['train_seconds'] for r in mine]):.0f} | "
                         f"| **{mean([r['test_accuracy'] for r in mine]):.2%}** "
                         f"(min {min(r['test_accuracy'] for r in mine):.2%}) | {mean([r['val_accuracy'] for r in mine]):.2%} |")
    lines += ["", *(f"- `{k}`: {RECIPES[k][0]}: " + ", ".join(f"{n}={v}" for n, v in settings(k).items()) for k in recipes)]
    return "\n".join(lines) + "\n"


def settings(name: str) -> dict:
    cfg = resolve_config({"arch": "seed-cnn", **RECIPES[name][1]})
    keys = ("lean", "keep_freed", "epochs", "batch_size", "lr", "weight_decay", "label_smoothing", "ema", "hflip", "shift", "patience")
    return {k: cfg[k] for k in keys}


def plot(rows: list[dict], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, name in enumerate(dict.fromkeys(r["recipe"] for r in rows)):
        mine = [r for r in rows if r["recipe"] == name]
        ax.scatter([r["train_seconds"] for r in mine], [100 * r["test_accuracy"] for r in mine], s=50,
                   color=f"C{i}", label=f"{name} ({settings(name)['epochs']} epochs)")
    ax.axhline(92.0, color="gray", ls="--", lw=1, label="92.0% (issue 11)")
    ax.set(xlabel="training seconds (this machine, 2 threads)", ylabel="test accuracy, %",
           title="seed-cnn: training recipes side by side")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


def train_one(cfg: dict, data_dir: str, progress: bool) -> dict | str:
    try:
        return train(cfg, data_dir, progress=progress)[1]
    except DataError as e:
        return str(e)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.recipes", description=__doc__.split("\n")[0],
                                epilog="recipes: " + "; ".join(f"{k}: {v[0]}" for k, v in RECIPES.items()))
    p.add_argument("--recipes", default=",".join(RECIPES),
                   help="comma-separated; NAME@1+2+3 trains NAME with those seeds instead of --seeds "
                        f"(default: {','.join(RECIPES)})")
    p.add_argument("--seeds", default="0", help="comma-separated seeds, each recipe is trained once per seed (default: 0)")
    p.add_argument("--data-dir", default=DEFAULT_DATA_DIR, help=f"Fashion-MNIST IDX files (default: {DEFAULT_DATA_DIR})")
    p.add_argument("--out", default="artifacts/recipes", help="results.json, results.md, recipes.png (default: artifacts/recipes)")
    p.add_argument("--epochs", type=int, default=0, help="override every recipe's epochs, for smoke runs (default: 0 = theirs)")
    p.add_argument("--subset", type=int, default=0, help="train on this many images only, for smoke runs (default: 0 = all)")
    p.add_argument("--quiet", action="store_true", help="no per-epoch progress bars (default: off)")
    args = p.parse_args(argv)
    smoke = {k: v for k, v in (("epochs", args.epochs), ("subset", args.subset)) if v}
    try:
        runs = [(name, int(seed)) for item in args.recipes.split(",") if item
                for name, _, seeds in [item.partition("@")]
                for seed in (seeds.split("+") if seeds else args.seeds.split(","))]
    except ValueError:
        runs = None
    names = list(dict.fromkeys(name for name, _ in runs or []))
    unknown = [n for n in names if n not in RECIPES]
    if not runs or unknown:
        print(f"recipes: cannot read --recipes {args.recipes!r} --seeds {args.seeds!r}"
              + (f" (unknown {', '.join(unknown)})" if unknown else "")
              + f"; recipes are {', '.join(RECIPES)}, seeds integers", file=sys.stderr)
        return 2

    out, rows, started = Path(args.out), [], time.strftime("%Y-%m-%d %H:%M")
    for name, seed in tqdm(runs, desc="recipes", unit="run"):
        # each run in a fresh process, as `python -m training` would be (malloc settings are per process)
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            cfg = pool.submit(train_one, {"arch": "seed-cnn", **RECIPES[name][1], "seed": seed, **smoke},
                              args.data_dir, not args.quiet).result()
        if isinstance(cfg, str):
            print(f"recipes: {cfg}", file=sys.stderr)
            return 2
        rows.append({"recipe": name, "seed": seed, "epochs_run": len(cfg["history"]), "best_epoch": cfg["best_epoch"],
                     "train_seconds": cfg["train_seconds"], "test_accuracy": cfg["metrics"]["test_accuracy"],
                     "val_accuracy": cfg["metrics"]["val_accuracy"], "threads": cfg["threads"]})
        tqdm.write(f"{name} seed {seed}: test {rows[-1]['test_accuracy']:.2%}, {cfg['train_seconds']:.0f}s")
    command = "python -m training.recipes " + " ".join(argv if argv is not None else sys.argv[1:])
    write_json(out / "results.json", {"command": command.strip(), "started": started, "rows": rows,
                                      "recipes": {n: settings(n) for n in names}})
    text = table(rows, command.strip(), started)
    atomic_write(out / "results.md", lambda tmp: Path(tmp).write_text(text))
    plot(rows, out / "recipes.png")
    print(text + f"wrote {out}/results.md, results.json, recipes.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
