"""python -m export.keras_seeds [DIR]: fold, verify and measure the seed Keras models that
`python -m training.keras_seeds --out DIR` trained and exported (DIR/raw/<name>.onnx).

Each raw export goes through `python -m export --onnx` (our ONNX pass, parity against the input
graph run with ORT_DISABLE_ALL, contract-v2 metadata) into DIR/<name>/, and is then measured with
onnxruntime on all 10k test images: accuracy, parity against Keras' own outputs, nodes and
BN-derived nodes before and after. Writes DIR/results.json and DIR/results.md."""
import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import onnx

from common.files import write_json, write_text
from export.__main__ import main as export_main
from export.onnx_graph import bn_derived_nodes, node_counts
from export.verify import compare, ort_session, run_ort
from training.data import DEFAULT_DATA_DIR, DataError, load_split


def measure(raw: Path, published: Path, trained: dict, keras_probs, images, labels) -> dict:
    reference = run_ort(ort_session(onnx.load(raw), optimize=False), images)[0]
    before, after = onnx.load(raw), onnx.load(published)
    folded = run_ort(ort_session(after, optimize=True), images)[0]
    return {
        **trained,
        "ort_unfolded_test_accuracy": float((reference.argmax(1) == labels).mean()),
        "ort_folded_test_accuracy": float((folded.argmax(1) == labels).mean()),
        "parity_folded_vs_input_graph": compare(folded, reference),  # ORT_ENABLE_ALL vs ORT_DISABLE_ALL
        "parity_folded_vs_keras": compare(folded, keras_probs),
        "nodes_before": node_counts(before), "nodes_after": node_counts(after),
        "bn_derived_before": bn_derived_nodes(before), "bn_derived_after": bn_derived_nodes(after),
        "model": str(published), "raw_export": str(raw),
    }


def markdown(results: list[dict]) -> str:
    lines = ["| model | epochs | s/epoch | Keras acc | folded ORT acc | max abs diff vs input graph | within 1e-5 | "
             "argmax agree | nodes before → after | BN-derived before → after | Transposes before → after |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        p = r["parity_folded_vs_input_graph"]
        nb, na = sum(r["nodes_before"].values()), sum(r["nodes_after"].values())
        lines.append(f"| {r['name']} | {r['epochs']} | {np.mean(r['seconds_per_epoch']):.0f} | {r['keras_test_accuracy']:.4f} | "
                     f"{r['ort_folded_test_accuracy']:.4f} | {p['max_abs_diff']:.1e} | {'yes' if p['within_tolerance'] else 'NO'} | "
                     f"{p['argmax_agreement']:.2%} | {nb} → {na} | {r['bn_derived_before']} → {r['bn_derived_after']} | "
                     f"{r['nodes_before'].get('Transpose', 0)} → {r['nodes_after'].get('Transpose', 0)} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m export.keras_seeds", description=__doc__.split("\n\n")[1],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("dir", nargs="?", default="artifacts/keras", help="the --out of python -m training.keras_seeds")
    p.add_argument("--data-dir", default=DEFAULT_DATA_DIR, help="Fashion-MNIST IDX files (for the test labels)")
    args = p.parse_args(argv)
    out = Path(args.dir)
    raws = sorted((out / "raw").glob("*.onnx"))
    if not raws:
        print(f"keras_seeds: no exports in {out / 'raw'}: run `python -m training.keras_seeds --out {out}` "
              "(or `make keras-seeds`)", file=sys.stderr)
        return 2
    try:
        _, labels = load_split(args.data_dir, "test")
    except DataError as e:
        print(f"keras_seeds: {e}", file=sys.stderr)
        return 2
    sample, labels_file = out / "test_images_nhwc.npy", out / "labels.json"
    images = np.load(sample, allow_pickle=False)
    results, started = [], time.perf_counter()
    for raw in raws:
        name = raw.stem
        cmd = ["--onnx", str(raw), "--labels", str(labels_file), "--sample", str(sample), "--input-range", "0,1",
               "--background", "dark", "--name", name, "--out", str(out / name)]
        print("$ python -m export " + " ".join(cmd), flush=True)
        code = export_main(cmd)
        if code:
            return code
        trained = json.loads((out / "raw" / f"{name}.json").read_text())
        keras_probs = np.load(out / "raw" / f"{name}_keras_probs.npy", allow_pickle=False)
        results.append(measure(raw, out / name / "model.onnx", trained, keras_probs, images, labels))
        print(markdown(results[-1:]), flush=True)
    date = time.strftime("%Y-%m-%d")
    write_json(out / "results.json", {"command": "make keras-seeds", "date": date, "results": results,
                                      "fold_and_measure_seconds": round(time.perf_counter() - started)})
    first = results[0]
    write_text(out / "results.md", f"`make keras-seeds` ({date}, Keras {first['keras_version']} on the "
               f"{first['backend']} backend); accuracy on the 10k test images, parity of the folded graph "
               f"(ORT_ENABLE_ALL) against Keras' export run with ORT_DISABLE_ALL.\n\n" + markdown(results))
    print(f"wrote {out / 'results.json'} and {out / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
