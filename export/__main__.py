"""python -m export --run artifacts/runs/seed-cnn --out artifacts [--data-dir DIR] [--verify-only]

Fold BN, strip Dropout, export model.onnx (folded) and model_unfolded.onnx (reference), verify
parity on the 10k test images, write export_report.json. Nothing is published unless parity
passes; exit 1 when it fails, 2 on bad input."""
import argparse
import json
import sys
import time
from pathlib import Path

import onnx

from export.fold import FoldError, fold_batchnorm
from export.onnx_export import (contract_metadata, export_to_proto, node_counts, read_metadata, save_model,
                                simplify, with_metadata)
from export.verify import format_table, verify
from training.artifacts import load_run, sha256_file, write_json
from training.data import DEFAULT_DATA_DIR, DataError, load_split

FOLDED, UNFOLDED, REPORT = "model.onnx", "model_unfolded.onnx", "export_report.json"


def is_current(out: Path, weights_sha256: str) -> bool:
    try:
        report = json.loads((out / REPORT).read_text())
        return (report["weights_sha256"] == weights_sha256 and report["parity"]["passed"]
                and read_metadata(out / FOLDED).get("weights_sha256") == weights_sha256
                and all(sha256_file(out / name) == entry["sha256"] for name, entry in report["files"].items()))
    except Exception:  # missing, unreadable or corrupt: any doubt means export again
        return False


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m export", description=__doc__.split("\n\n")[1])
    p.add_argument("--run", default="artifacts/runs/seed-cnn", help="training run directory")
    p.add_argument("--out", default="artifacts", help="where model.onnx and the report go")
    p.add_argument("--data-dir", default=DEFAULT_DATA_DIR)
    p.add_argument("--verify-only", action="store_true", help="re-verify the ONNX files already in --out")
    p.add_argument("--if-stale", action="store_true",
                   help="do nothing when --out already holds a verified export of these weights")
    args = p.parse_args(argv)
    out = Path(args.out)
    try:
        model, config = load_run(args.run)
        if args.if_stale and is_current(out, config["weights_sha256"]):
            print(f"export: {out / FOLDED} is already a verified export of {args.run}")
            return 0
        folded_module, fold_report = fold_batchnorm(model)
        images, labels = load_split(args.data_dir, "test")
        if args.verify_only:
            folded_onnx, unfolded_onnx = onnx.load(out / FOLDED), onnx.load(out / UNFOLDED)
            if read_metadata(folded_onnx).get("weights_sha256") != config["weights_sha256"]:
                raise ValueError(f"{out / FOLDED} was not exported from {args.run}/weights.safetensors")
        else:
            started = time.perf_counter()
            unfolded_onnx = with_metadata(export_to_proto(model), contract_metadata(config, fold_report.as_dict(), False))
            folded_raw = export_to_proto(folded_module)
            raw_counts = node_counts(folded_raw)
            print(f"nodes of our folded module as exported: {raw_counts}")
            # Our fold, not an optimizer, removed BN: check the raw export before any clean-up.
            unexplained_bn = raw_counts.get("BatchNormalization", 0) - len(fold_report.kept)
            if unexplained_bn > 0 or raw_counts.get("Dropout"):
                raise ValueError(f"the folded module still exports {raw_counts}; the fold pass missed a layer")
            folded_onnx = with_metadata(simplify(folded_raw), contract_metadata(config, fold_report.as_dict(), True))
            print(f"exported in {time.perf_counter() - started:.1f}s")
    except (FileNotFoundError, DataError, FoldError, ValueError, onnx.checker.ValidationError) as e:
        print(f"export: {e}", file=sys.stderr)
        return 2

    before, after = node_counts(unfolded_onnx), node_counts(folded_onnx)
    print(f"nodes before folding: {before}\nnodes after folding (and clean-up): {after}")
    for entry in fold_report.folded:
        print(f"  folded {entry['bn']} {entry['direction']} into {entry['into']}")
    for entry in fold_report.kept:
        print(f"  kept {entry['bn']}: {entry['reason']}")
    leftover = {op: n for op, n in after.items() if op in ("BatchNormalization", "Dropout")}

    parity = verify(model, folded_module, folded_onnx, unfolded_onnx, images, labels)
    print(format_table(parity))
    report = {
        "run": str(args.run), "arch": config["arch"], "weights_sha256": config["weights_sha256"],
        "torch_test_accuracy": config["metrics"]["test_accuracy"],
        "fold": fold_report.as_dict(), "nodes_unfolded": before, "nodes_folded": after,
        "bn_dropout_left_in_folded": leftover, "parity": parity,
    }
    # A BN may stay only when the fold report says why; anything else left over is a failure.
    unexplained = leftover.get("Dropout", 0) or leftover.get("BatchNormalization", 0) > len(fold_report.kept)
    ok = parity["passed"] and not unexplained
    if ok and not args.verify_only:
        report["files"] = {name: {"sha256": save_model(m, out / name)}
                           for name, m in ((UNFOLDED, unfolded_onnx), (FOLDED, folded_onnx))}
    elif ok:  # the files on disk are the ones just verified
        report["files"] = {name: {"sha256": sha256_file(out / name)} for name in (UNFOLDED, FOLDED)}
    write_json(out / REPORT, report)
    if not ok:
        print(f"export: verification failed; see {out / REPORT}" + ("" if args.verify_only else "; no model written"),
              file=sys.stderr)
        return 1
    print(f"wrote {out / FOLDED}, {out / UNFOLDED}, {out / REPORT}" if not args.verify_only else f"verified {out / FOLDED}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
