"""python -m export.bench_int8: the INT8 benchmarks of docs/int8.md (not tests; run them on an idle machine).

  ablation  our runs (--runs artifacts/runs/mobile-cnn,...): per-tensor and per-channel INT8, with and
            without each of cross-layer equalization, high-bias absorption and bias correction; accuracy
            on the 10,000 test images (the served form: onnxruntime at the service's session settings)
            against the float64 model. Writes ablation.json and ablation.png.
  speed     exported models (--model-dirs DIR,...): FP32 (model.onnx) against the published INT8
            (model_int8.onnx, when there is one) and against QDQ and QOperator quantizations made here (S8S8,
            U8S8; seeded random calibration: for speed only), img/s at batch 1 and 8 on one thread with the
            service's session settings. Writes speed.json.
  all       both, into results.json (what `make bench-int8` runs and the README shows).

Every figure is measured in this process, rounds interleaved; the JSON records the command, date, host
ISA and load average before and after.
"""
import argparse
import contextlib
import copy
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import onnx

from common.files import write_json
from export.int8_quant import TYPES, host_isa, quantize
from training.data import DEFAULT_DATA_DIR

VARIANTS = {  # name -> (per_channel, equalize, absorb, bias_correction)
    "per-tensor naive": (False, False, False, False),
    "per-tensor + BC": (False, False, False, True),
    "per-tensor + CLE": (False, True, False, False),
    "per-tensor + CLE + absorb": (False, True, True, False),
    "per-tensor + CLE + BC": (False, True, False, True),
    "per-tensor + CLE + absorb + BC": (False, True, True, True),
    "per-channel naive": (True, False, False, False),
    "per-channel + BC": (True, False, False, True),
    "per-channel + CLE": (True, True, False, False),
    "per-channel + CLE + absorb + BC": (True, True, True, True),
}


class Quiet:
    @contextlib.contextmanager
    def __call__(self, name: str):
        yield


def _record(command: str) -> dict:
    return {"command": command, "date": time.strftime("%Y-%m-%d %H:%M"), "cpu": host_isa(),
            "load_average_before": [round(x, 2) for x in os.getloadavg()]}


def ablation(runs: list[str], data_dir: str, out: Path, variants: list[str]) -> dict:
    import torch
    from tqdm import tqdm

    from export.__main__ import main as export_main
    from export.int8 import Options, build, prepare
    from export.sources import from_run
    from export.verify import run_torch

    results = {}
    for run in runs:
        name = Path(run).name
        export_dir = out / "exports" / name
        if export_main(["--run", run, "--out", str(export_dir), "--data-dir", data_dir, "--if-stale"]) != 0:
            raise SystemExit(f"bench_int8: the FP32 export of {run} failed")
        source = from_run(run, data_dir)
        folded = onnx.load(export_dir / "model.onnx")
        fold_report = json.loads((export_dir / "export_report.json").read_text())["fold"]
        module64 = copy.deepcopy(source.module).double()
        reference = run_torch(module64, source.inputs.astype(np.float64), dtype=torch.float64)
        rows = {}
        for variant in tqdm(variants, desc=name):
            per_channel, equalize, absorb, correct = VARIANTS[variant]
            options = prepare(Options(per_channel=per_channel, equalize=equalize, absorb=absorb,
                                      bias_correction=correct, data_dir=data_dir, max_drop=100.0), source)
            result = build(options, source, folded, fold_report, reference, "the unfolded model in float64",
                           source.inputs[:8].astype(np.float64), Quiet())
            fidelity = result.report["checks"]["int8 fidelity"]
            rows[variant] = {"accuracy_float64": fidelity["accuracy_reference"], "accuracy_int8": fidelity["accuracy_int8"],
                             "drop_pp": fidelity["drop_pp"], "top1_agreement": fidelity["top1_agreement"],
                             "sqnr_db": fidelity["outputs"]["logits"]["sqnr_db"],
                             "worst_layers": result.report["layers"].get("worst", [])[:3],
                             "equalized_pairs": len(result.report.get("equalization", {}).get("pairs", [])),
                             "absorbed": len(result.report.get("absorption", {}).get("absorbed", [])),
                             "corrected": len(result.report.get("bias_correction", {}).get("corrected", [])),
                             "speed": result.report["speed"]}
        results[name] = rows
    return results


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(results)
    variants = list(next(iter(results.values())))
    fig, ax = plt.subplots(figsize=(11, 4.8))
    width = 0.8 / len(models)
    for i, model in enumerate(models):
        drops = [max(results[model][v]["drop_pp"], 0.01) for v in variants]
        ax.bar(np.arange(len(variants)) + i * width, drops, width, label=model)
    ax.set_yscale("log")
    ax.set_xticks(np.arange(len(variants)) + width * (len(models) - 1) / 2, variants, rotation=30, ha="right")
    ax.set_ylabel("accuracy drop vs float64 (points, log)")
    ax.axhline(0.5, color="grey", ls="--", lw=0.8)
    ax.axhline(1.0, color="grey", ls=":", lw=0.8)
    ax.set_title("INT8 on Fashion-MNIST (10,000 test images): what equalization and bias correction buy")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def speed(model_dirs: list[str], calib: str | None, rounds: int, seconds: float, batches=(1, 8)) -> dict:
    from export.int8_check import seconds_per_input, service_session

    results = {}
    for directory in model_dirs:
        model = onnx.load(Path(directory) / "model.onnx")
        published = Path(directory) / "model_int8.onnx"
        shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim][1:]
        rng = np.random.default_rng(0)
        calibration = (np.load(calib, allow_pickle=False) if calib else
                       rng.uniform(0, 1, size=(32, *shape)).astype(np.float32))
        rows = rng.uniform(0, 1, size=(64, *shape)).astype(np.float32)
        sessions = {"FP32": service_session(model)}
        if published.exists():
            sessions["INT8 (published)"] = service_session(published.read_bytes())
        for fmt in ("QDQ", "QOperator"):
            for types in ("S8S8", "U8S8"):
                quantized, _ = quantize(model, calibration, types, True, fmt)
                sessions[f"{fmt} {types}"] = service_session(quantized)
        table = {}
        for batch in batches:
            times = {name: [] for name in sessions}
            for _ in range(rounds):
                for name, s in sessions.items():
                    times[name].append(seconds_per_input(s, rows, batch, seconds))
            fp32 = float(np.median(times["FP32"]))
            table[str(batch)] = {name: {"images_per_s": round(1 / float(np.median(t)), 1),
                                        "vs_fp32": round(fp32 / float(np.median(t)), 3)} for name, t in times.items()}
        results[Path(directory).name] = {"batches": table, **({"int8": json.loads(next(
            p.value for p in onnx.load(published).metadata_props if p.key == "int8"))["verified"]} if published.exists() else {})}
        print(json.dumps({Path(directory).name: table}, indent=1), flush=True)
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m export.bench_int8", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("what", choices=("ablation", "speed", "all"))
    p.add_argument("--runs", default="artifacts/runs/mobile-cnn", help="ablation: comma-separated training runs")
    p.add_argument("--variants", default=",".join(VARIANTS), help="ablation: which variants")
    p.add_argument("--model-dirs", default="artifacts", help="speed: comma-separated export directories")
    p.add_argument("--calib", default=None, help="speed: calibration .npy (default: 32 seeded uniform rows)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seconds", type=float, default=0.3, help="speed: seconds per variant per round")
    p.add_argument("--data-dir", default=DEFAULT_DATA_DIR)
    p.add_argument("--out", default="artifacts/bench_int8")
    args = p.parse_args(argv)
    out = Path(args.out)
    record = _record("python -m export.bench_int8 " + " ".join(argv if argv is not None else sys.argv[1:]))
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        print(f"bench_int8: unknown variant {unknown[0]!r}; choose from {', '.join(VARIANTS)}", file=sys.stderr)
        return 2
    if args.what in ("ablation", "all"):
        record["ablation"] = ablation(args.runs.split(","), args.data_dir, out, variants)
        plot(record["ablation"], out / "ablation.png")
        for model, rows in record["ablation"].items():
            print(f"{model}: accuracy float64 {100 * next(iter(rows.values()))['accuracy_float64']:.2f}%")
            for variant, r in rows.items():
                print(f"  {variant:34s} INT8 {100 * r['accuracy_int8']:6.2f}%  drop {r['drop_pp']:6.2f} pp  "
                      f"agreement {100 * r['top1_agreement']:6.2f}%  SQNR {r['sqnr_db']:5.1f} dB")
    if args.what in ("speed", "all"):
        dirs = [d for d in args.model_dirs.split(",") if d]
        if args.what == "all":  # our runs' exports too (made by the ablation)
            dirs = [str(out / "exports" / Path(r).name) for r in args.runs.split(",")] + dirs
        record["speed"] = speed(dirs, args.calib, args.rounds, args.seconds)
        for model, row in record["speed"].items():
            print(f"{model}: " + "; ".join(f"batch {b}: " + ", ".join(f"{n} {r['vs_fp32']:.2f}x" for n, r in t.items()
                                                                     if n != "FP32")
                                         for b, t in row["batches"].items()))
    record["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    name = {"ablation": "ablation.json", "speed": "speed.json", "all": "results.json"}[args.what]
    write_json(out / name, record)
    print(f"wrote {out / name}" + (f", {out / 'ablation.png'}" if "ablation" in record else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
