"""python -m training.keras_seeds --out artifacts/keras [--data-dir DIR] [--epochs-mlp 3] [--epochs-cnn 1]

The two seed models as the seeds write them in Keras 3 (on the torch backend, no TensorFlow),
trained on Fashion-MNIST, exported with Keras' own ONNX export, then folded, verified and published
through `python -m export --onnx` (the graph pass of export/onnx_fold.py), and measured with
onnxruntime on all 10k test images: artifacts/keras/results.json + results.md.

  keras3-mlp  Flatten → Dense(128, relu) → BatchNormalization → Dense(10, softmax)
  keras3-cnn  Conv2D(32, 3, relu) → BatchNormalization → MaxPooling2D → Flatten → Dense(128, relu)
              → Dropout(0.5) → Dense(10, softmax)

Both take [N, 28, 28, 1] (NHWC, Keras' default) in [0, 1] and end in softmax (probabilities). In the
exported graphs each BatchNormalization is a Sub → Mul → Add in NHWC, after the activation (the
Keras habit), so it can only fold forward: into the last Dense (mlp), or through MaxPool and the
NHWC Flatten into the first Dense (cnn; exact only when every BN scale is > 0, else it stays).
"""
import os

os.environ.setdefault("KERAS_BACKEND", "torch")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from training.data import DEFAULT_DATA_DIR, LABELS, DataError, load_split  # noqa: E402

INPUT_SHAPE = (28, 28, 1)


def keras_mlp():
    import keras
    from keras import layers

    return keras.Sequential([keras.Input(INPUT_SHAPE), layers.Flatten(), layers.Dense(128, activation="relu"),
                             layers.BatchNormalization(), layers.Dense(10, activation="softmax")], name="keras3_mlp")


def keras_cnn():
    import keras
    from keras import layers

    return keras.Sequential([keras.Input(INPUT_SHAPE), layers.Conv2D(32, 3, activation="relu"),
                             layers.BatchNormalization(), layers.MaxPooling2D(), layers.Flatten(),
                             layers.Dense(128, activation="relu"), layers.Dropout(0.5),
                             layers.Dense(10, activation="softmax")], name="keras3_cnn")


SEEDS = {"keras3-mlp": keras_mlp, "keras3-cnn": keras_cnn}


def randomize_bn(model, seed: int, positive: bool = False) -> None:
    """Random, far-from-identity moving statistics and γ/β on every BatchNormalization layer (tests and
    the benchmark use untrained models; default statistics would make the BN an identity). With
    `positive` every γ is > 0; otherwise about half are negative, as in some trained models."""
    import keras

    rng = np.random.default_rng(seed)
    for layer in model.layers if hasattr(model, "layers") else []:
        if isinstance(layer, keras.layers.BatchNormalization):
            c = layer.moving_mean.shape[0]
            sign = 1 if positive else rng.choice([-1, 1], c)
            layer.gamma.assign((rng.uniform(0.5, 1.5, c) * sign).astype("float32"))
            layer.beta.assign(rng.normal(0, 0.5, c).astype("float32"))
            layer.moving_mean.assign(rng.normal(0, 0.5, c).astype("float32"))
            layer.moving_variance.assign(rng.uniform(0.5, 2.0, c).astype("float32"))


def export_onnx(model, path: str | Path) -> Path:
    """Keras' own ONNX export (`model.export(path, format="onnx")`), after one call so the model is
    built; its tracer warnings and prints are silenced. Written atomically."""
    from common.files import atomic_write

    model(np.zeros((1, *model.input_shape[1:]), dtype="float32"))

    def write(tmp):
        with tempfile.TemporaryDirectory() as d, warnings.catch_warnings(), \
                contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            model.export(os.path.join(d, "model.onnx"), format="onnx", verbose=False)
            os.replace(os.path.join(d, "model.onnx"), tmp)

    return atomic_write(path, write)


def save_npy(path, array: np.ndarray) -> None:
    with open(path, "wb") as f:  # a file object: np.save would append ".npy" to a temp file's name
        np.save(f, array, allow_pickle=False)


def train(model, x, y, epochs: int, batch_size: int, seed: int) -> list[float]:
    """Adam + sparse cross-entropy, Keras' own loop (its progress line per epoch). Returns seconds per epoch."""
    import keras

    keras.utils.set_random_seed(seed)
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    times = []

    class Timer(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.started = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            times.append(time.perf_counter() - self.started)

    model.fit(x, y, batch_size=batch_size, epochs=epochs, shuffle=True, verbose=2, callbacks=[Timer()])
    return times


def export_cli_has_onnx() -> bool:
    """`python -m export --onnx` is written on branch export-byo; until it is merged we fold directly."""
    result = subprocess.run([sys.executable, "-m", "export", "--help"], capture_output=True, text=True)
    return "--onnx" in result.stdout


def publish(raw: Path, name: str, out: Path, sample: Path, labels: Path, images, reference) -> dict:
    """Fold + verify + write `out/model.onnx`: through `python -m export --onnx` when it exists,
    else with fold_onnx directly (folded model, checksum and fold report only)."""
    if export_cli_has_onnx():
        cmd = [sys.executable, "-m", "export", "--onnx", str(raw), "--labels", str(labels), "--sample", str(sample),
               "--input-range", "0,1", "--background", "dark", "--name", name, "--out", str(out)]
        print("$", " ".join(cmd[1:]), flush=True)
        subprocess.run(cmd, check=True)
        return {"published_by": "python -m export --onnx", "command": " ".join(["python"] + cmd[1:])}
    import onnx

    from common.files import write_json, write_with_checksum
    from export.onnx_fold import fold_onnx
    from export.verify import compare, ort_session, run_ort

    folded, report = fold_onnx(onnx.load(raw))
    parity = compare(run_ort(ort_session(folded, optimize=False), images), reference)
    if not (parity["within_tolerance"] and parity["argmax_agreement"] == 1.0):
        raise RuntimeError(f"{name}: folded graph does not match the Keras export: {parity}")
    write_with_checksum(out / "model.onnx", folded.SerializeToString())
    write_json(out / "fold_report.json", {"fold": report, "parity_vs_input_graph": parity})
    return {"published_by": "export.onnx_fold.fold_onnx (python -m export --onnx not on this branch yet)"}


def measure(name: str, model, raw: Path, published: Path, images, labels, epoch_times, how: dict) -> dict:
    import onnx

    from export.onnx_graph import bn_derived_nodes, node_counts
    from export.verify import compare, ort_session, run_ort

    keras_probs = model.predict(images, batch_size=1000, verbose=0)
    reference = run_ort(ort_session(onnx.load(raw), optimize=False), images)
    folded_model = onnx.load(published)
    folded = run_ort(ort_session(folded_model, optimize=True), images)
    before, after = onnx.load(raw), folded_model
    return {
        "name": name, "epochs": len(epoch_times), "seconds_per_epoch": [round(t, 1) for t in epoch_times],
        "keras_test_accuracy": float((keras_probs.argmax(1) == labels).mean()),
        "ort_unfolded_test_accuracy": float((reference.argmax(1) == labels).mean()),
        "ort_folded_test_accuracy": float((folded.argmax(1) == labels).mean()),
        "parity_folded_vs_input_graph": compare(folded, reference),  # ORT_ENABLE_ALL vs ORT_DISABLE_ALL
        "parity_folded_vs_keras": compare(folded, keras_probs),
        "nodes_before": node_counts(before), "nodes_after": node_counts(after),
        "bn_derived_before": bn_derived_nodes(before), "bn_derived_after": bn_derived_nodes(after),
        "model": str(published), "raw_export": str(raw), **how,
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
    p = argparse.ArgumentParser(prog="python -m training.keras_seeds", description=__doc__.split("\n\n")[1],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="artifacts/keras", help="directory for the exports and results")
    p.add_argument("--data-dir", default=DEFAULT_DATA_DIR, help="Fashion-MNIST IDX files")
    p.add_argument("--models", default=",".join(SEEDS), help="comma-separated subset of " + ", ".join(SEEDS))
    p.add_argument("--epochs-mlp", type=int, default=3, help="epochs for keras3-mlp")
    p.add_argument("--epochs-cnn", type=int, default=1, help="epochs for keras3-cnn (~4 min an epoch on 2 busy cores)")
    p.add_argument("--batch-size", type=int, default=128, help="training batch size")
    p.add_argument("--subset", type=int, default=0, help="train on the first N training images (0 = all 60k)")
    p.add_argument("--seed", type=int, default=0, help="random seed (Python, NumPy, torch via keras.utils)")
    args = p.parse_args(argv)
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in SEEDS]
    if unknown or not names or min(args.epochs_mlp, args.epochs_cnn, args.batch_size) < 1 or args.subset < 0:
        print(f"keras_seeds: bad arguments: models must be among {', '.join(SEEDS)}, epochs and batch size >= 1",
              file=sys.stderr)
        return 2
    started = time.perf_counter()
    try:
        x_train, y_train = load_split(args.data_dir, "train")
        x_test, y_test = load_split(args.data_dir, "test")
    except DataError as e:
        print(f"keras_seeds: {e}", file=sys.stderr)
        return 2

    from common.files import atomic_write, write_json, write_text

    out = Path(args.out)
    nhwc = lambda a: np.ascontiguousarray(a.transpose(0, 2, 3, 1))  # noqa: E731 -- [N,1,28,28] -> [N,28,28,1]
    x_train, x_test = nhwc(x_train), nhwc(x_test)
    if args.subset:
        x_train, y_train = x_train[:args.subset], y_train[:args.subset]
    sample, labels_file = out / "test_images_nhwc.npy", out / "labels.json"
    atomic_write(sample, lambda tmp: save_npy(tmp, x_test))
    write_json(labels_file, LABELS)

    import keras
    import onnx

    # verification and measurement use export/'s own code (the one place this training-stage driver
    # reaches forward into export/: it runs the whole Keras path end to end, like `make pipeline`)
    from export.verify import ort_session, run_ort

    results = []
    for name in names:
        print(f"== {name}", flush=True)
        keras.utils.set_random_seed(args.seed)
        model = SEEDS[name]()
        epochs = args.epochs_mlp if name == "keras3-mlp" else args.epochs_cnn
        times = train(model, x_train, y_train, epochs, args.batch_size, args.seed)
        raw = export_onnx(model, out / "raw" / f"{name}.onnx")
        reference = run_ort(ort_session(onnx.load(raw), optimize=False), x_test)
        how = publish(raw, name, out / name, sample, labels_file, x_test, reference)
        results.append(measure(name, model, raw, out / name / "model.onnx", x_test, y_test, times, how))
        print(markdown(results[-1:]), flush=True)

    command = "python -m training.keras_seeds " + " ".join(argv if argv is not None else sys.argv[1:])
    write_json(out / "results.json", {"command": command.strip(), "date": time.strftime("%Y-%m-%d"),
                                      "keras_version": keras.__version__, "backend": keras.backend.backend(),
                                      "seconds_total": round(time.perf_counter() - started), "results": results})
    write_text(out / "results.md", f"`{command.strip()}` ({time.strftime('%Y-%m-%d')}, Keras {keras.__version__}, "
                                   f"backend {keras.backend.backend()}, {time.perf_counter() - started:.0f} s in all); accuracy on the 10k test images, parity of the "
                                   f"folded graph (ORT_ENABLE_ALL) against Keras' export run with ORT_DISABLE_ALL.\n\n"
               + markdown(results))
    print(f"wrote {out / 'results.json'} and {out / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
