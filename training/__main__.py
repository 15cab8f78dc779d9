"""python -m training --arch seed-cnn --data-dir DIR --out artifacts/runs/seed-cnn [--if-stale]"""
import argparse
import sys
from pathlib import Path

from training.config import ARCH_DEFAULTS, DEFAULTS, resolve_config
from training.data import DEFAULT_DATA_DIR, DataError
from training.models import ARCHS
from training.provenance import trained_on, why_stale


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m training", description="Train a BN/Dropout model on Fashion-MNIST. "
                                "Defaults are seed-cnn's; other families change some (training/config.py ARCH_DEFAULTS).")
    p.add_argument("--arch", choices=list(ARCHS), default=DEFAULTS["arch"], help=f"model family (default: {DEFAULTS['arch']})")
    p.add_argument("--data-dir", default=DEFAULT_DATA_DIR,
                   help=f"directory with the Fashion-MNIST IDX files, .gz ok (default: {DEFAULT_DATA_DIR})")
    p.add_argument("--out", default=None, help="run directory (default: artifacts/runs/<arch>)")
    helps = {"epochs": "training epochs", "batch_size": "images per step", "patience": "early stop after this many "
             "epochs without a better validation accuracy", "val_size": "training images held out for validation",
             "seed": "random seed (weights, split, batches, dropout)", "subset": "train on this many images only (0 = all)",
             "threads": "torch threads (0 = one per usable core)", "shift": "random shifts of up to this many pixels",
             "lr": "peak learning rate of the one-cycle schedule", "weight_decay": "AdamW decoupled weight decay "
             "(weight matrices only)", "label_smoothing": "cross-entropy label smoothing",
             "ema": "decay per step of the weights' exponential moving average that is evaluated and kept (0 = off)"}
    for key, help_text in helps.items():
        arch_default = ARCH_DEFAULTS.get(DEFAULTS["arch"], {}).get(key, DEFAULTS[key])
        p.add_argument(f"--{key.replace('_', '-')}", type=float if isinstance(DEFAULTS[key], float) else int,
                       default=None, help=f"{help_text} (default: {arch_default})")
    p.add_argument("--no-dropout", action="store_true", help="replace every Dropout with Identity")
    p.add_argument("--hflip", action="store_true", help="augment with random horizontal flips")
    p.add_argument("--no-lean", action="store_true",
                   help="seed-cnn: train the seed's own layers instead of LeanSeedCNN (same function, slower)")
    p.add_argument("--if-stale", action="store_true",
                   help="train only when --out holds no run trained on these data files (their sha256), this recipe "
                        "and this seed; say what changed when it trains again (make pipeline uses it)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    cfg = {k: v for k, v in vars(args).items() if k in DEFAULTS and v is not None}
    cfg["dropout"] = not args.no_dropout
    if args.hflip:
        cfg["hflip"] = True
    if args.no_lean:
        cfg["lean"] = False
    out = Path(args.out or f"artifacts/runs/{args.arch}")
    try:
        if args.if_stale:  # a current run is reused without loading any data
            wanted = trained_on(resolve_config(cfg), args.data_dir)
            reasons = why_stale(out, wanted)
            if not reasons:
                print(f"train: {out} is current (trained on the data in {args.data_dir}, this recipe and seed "
                      f"{wanted['seed']}), reused; delete it or `make clean` to train it again")
                return 0
            print(f"train: training {out}: " + "; ".join(reasons), flush=True)
        from training.artifacts import save_run
        from training.plots import plot_history
        from training.train import train

        model, cfg = train(cfg, args.data_dir, progress=not args.quiet)
    except (DataError, ValueError) as e:
        print(f"training: {e}", file=sys.stderr)
        return 2
    cfg = save_run(out, model, cfg)
    plot_history(cfg["history"], f"{cfg['arch']} (best epoch {cfg['best_epoch']})", out / "training_curves.png")
    m = cfg["metrics"]
    print(f"{cfg['arch']}: test accuracy {m['test_accuracy']:.4f}  val accuracy {m['val_accuracy']:.4f}  "
          f"best epoch {cfg['best_epoch']}  {cfg['train_seconds']:.0f}s  -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
