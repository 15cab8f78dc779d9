"""python -m training.ablation: the seed exercise -- the same model trained with and without dropout.
Writes a table (JSON + Markdown) and a plot of train vs validation loss for both."""
import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from training.artifacts import atomic_write, save_run, write_json  # noqa: E402
from training.data import DEFAULT_DATA_DIR, DataError  # noqa: E402
from training.train import resolve_config, train  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.ablation", description=__doc__.split("\n")[0])
    p.add_argument("--arch", default="seed-cnn", help="model family (default: seed-cnn)")
    p.add_argument("--data-dir", default=DEFAULT_DATA_DIR, help=f"Fashion-MNIST IDX files (default: {DEFAULT_DATA_DIR})")
    p.add_argument("--out", default="artifacts/ablation", help="table, JSON and plot (default: artifacts/ablation)")
    p.add_argument("--epochs", type=int, default=None, help="epochs (default: the family's own, training/train.py)")
    p.add_argument("--subset", type=int, default=0, help="train on this many images only (default: 0 = all)")
    p.add_argument("--quiet", action="store_true", help="no progress bars (default: off)")
    args = p.parse_args(argv)
    out = Path(args.out)
    runs = {}
    for label, dropout in (("with dropout", True), ("without dropout", False)):
        # No early stopping here: the point is to watch the whole curve, overfitting included.
        cfg = resolve_config({"arch": args.arch, "dropout": dropout, "subset": args.subset})
        if args.epochs:
            cfg["epochs"] = args.epochs
        cfg["patience"] = cfg["epochs"] + 1
        try:
            model, cfg = train(cfg, args.data_dir, progress=not args.quiet)
        except DataError as e:
            print(f"ablation: {e}", file=sys.stderr)
            return 2
        runs[label] = save_run(out / ("dropout" if dropout else "no_dropout"), model, cfg)

    rows = []
    for label, cfg in runs.items():
        last, m = cfg["history"][-1], cfg["metrics"]
        rows.append({"run": label, "best_epoch": cfg["best_epoch"], "test_accuracy": m["test_accuracy"],
                     "best_val_loss": min(r["val_loss"] for r in cfg["history"]),
                     "final_train_loss": last["train_eval_loss"], "final_val_loss": last["val_loss"],
                     "final_gap": last["val_loss"] - last["train_eval_loss"]})
    write_json(out / "ablation.json", rows)
    table = ["| run | test acc | best val loss | final train loss | final val loss | gap (val - train) |",
             "|---|---|---|---|---|---|"]
    table += [f"| {r['run']} | {r['test_accuracy']:.4f} | {r['best_val_loss']:.4f} | {r['final_train_loss']:.4f} "
              f"| {r['final_val_loss']:.4f} | {r['final_gap']:.4f} |" for r in rows]
    atomic_write(out / "ablation.md", lambda tmp: Path(tmp).write_text("\n".join(table) + "\n"))

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (label, cfg), color in zip(runs.items(), ("tab:blue", "tab:red")):
        epochs = [r["epoch"] for r in cfg["history"]]
        ax.plot(epochs, [r["train_eval_loss"] for r in cfg["history"]], "--", color=color, label=f"train, {label}")
        ax.plot(epochs, [r["val_loss"] for r in cfg["history"]], "-", color=color, label=f"validation, {label}")
    ax.set(xlabel="epoch", ylabel="cross-entropy (eval mode)", title=f"{args.arch}: dropout ablation")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write(out / "ablation.png", lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    print("\n".join(table))
    print(f"wrote {out}/ablation.png, ablation.md, ablation.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
