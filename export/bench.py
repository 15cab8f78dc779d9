"""python -m export.bench: torch eager vs onnxruntime (folded / unfolded, default optimization and
ORT_DISABLE_ALL) at batch 1 and 64, one thread each, measured side by side in the same process; and,
when the export made one (--int8), the INT8 model beside them, with its ratio to the folded FP32 model
and both models' accuracy on the 10,000 test images.

Rounds are interleaved across variants so that machine noise hits all of them alike; we report
the median round. Writes a JSON (atomically) and prints a table with ratios to torch eager."""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import torch

from export.int8_quant import host_isa
from export.verify import ort_session
from training.artifacts import load_run, write_json
from training.data import DEFAULT_DATA_DIR, load_split


def images_per_second(fn, batch: np.ndarray, seconds: float) -> float:
    done, started = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - started) < seconds:
        fn(batch)
        done += len(batch)
    return done / elapsed


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m export.bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model-dir", default="artifacts", help="where model.onnx and model_unfolded.onnx are")
    p.add_argument("--run", default=None, help="training run (None: the one model.onnx came from, runs/<arch>)")
    p.add_argument("--data-dir", default=DEFAULT_DATA_DIR, help="Fashion-MNIST IDX files (the timed inputs)")
    p.add_argument("--out", default="artifacts/bench_model.json", help="the JSON report")
    p.add_argument("--batches", default="1,64", help="comma-separated batch sizes to time")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (the median is reported)")
    p.add_argument("--seconds", type=float, default=0.25, help="seconds per variant per round")
    args = p.parse_args(argv)
    model_dir = Path(args.model_dir)
    try:
        folded, unfolded = onnx.load(model_dir / "model.onnx"), onnx.load(model_dir / "model_unfolded.onnx")
        arch = next(p.value for p in folded.metadata_props if p.key == "arch")
        module, _ = load_run(args.run or model_dir / "runs" / arch)
        images, labels = load_split(args.data_dir, "test")
    except (FileNotFoundError, StopIteration, ValueError) as e:
        print(f"bench: {e} (run `make pipeline` first)", file=sys.stderr)
        return 2

    torch.set_num_threads(1)
    sessions = {
        "ORT folded": ort_session(folded, optimize=True, threads=1),
        "ORT unfolded": ort_session(unfolded, optimize=True, threads=1),
        "ORT unfolded (DISABLE_ALL)": ort_session(unfolded, optimize=False, threads=1),
    }
    int8_path = model_dir / "model_int8.onnx"
    int8 = None
    if int8_path.exists():
        sessions["ORT INT8"] = ort_session(str(int8_path), optimize=True, threads=1)
        int8 = json.loads(next(p.value for p in onnx.load(int8_path).metadata_props if p.key == "int8"))

    def torch_eager(x):
        with torch.inference_mode():
            return module(torch.from_numpy(x))

    variants = {"torch eager": torch_eager}
    for name, session in sessions.items():
        variants[name] = lambda x, s=session: s.run(None, {"image": x})

    results = {}
    for batch_size in [int(b) for b in args.batches.split(",")]:
        batch = np.ascontiguousarray(images[:batch_size])
        for fn in variants.values():  # warm-up
            images_per_second(fn, batch, 0.1)
        rounds = {name: [] for name in variants}
        for _ in range(args.rounds):
            for name, fn in variants.items():
                rounds[name].append(images_per_second(fn, batch, args.seconds))
        base = statistics.median(rounds["torch eager"])
        results[str(batch_size)] = {name: {"images_per_s": round(statistics.median(r), 1),
                                           "vs_torch_eager": round(statistics.median(r) / base, 2)}
                                    for name, r in rounds.items()}
        if int8 is not None:
            fp32 = statistics.median(rounds["ORT folded"])
            results[str(batch_size)]["ORT INT8"]["vs_fp32"] = round(statistics.median(rounds["ORT INT8"]) / fp32, 2)

    report = {"arch": arch, "threads": 1, "rounds": args.rounds, "seconds_per_round": args.seconds,
              "torch_version": torch.__version__, "cpu": host_isa(), "results": results}
    if int8 is not None:  # accuracy on all test images, FP32 (folded) and INT8, as onnxruntime runs them here
        accuracy = {name: float(np.mean(np.concatenate([sessions[name].run(None, {"image": images[i:i + 1000]})[0]
                                                        for i in range(0, len(images), 1000)]).argmax(1) == labels))
                    for name in ("ORT folded", "ORT INT8")}
        report["int8"] = {"types": int8["types"], "format": int8["format"], "exported_on": int8["host"],
                          "host": host_isa()["isa"], "accuracy": accuracy,
                          "drop_pp": round(100 * (accuracy["ORT folded"] - accuracy["ORT INT8"]), 3)}
    write_json(args.out, report)
    print(f"{arch}, one thread, median of {args.rounds} interleaved rounds (images/s, ratio to torch eager):")
    for batch_size, rows in results.items():
        print(f"  batch {batch_size}:")
        for name, r in rows.items():
            print(f"    {name:28s} {r['images_per_s']:>10,.0f} img/s  {r['vs_torch_eager']:5.2f}x"
                  + (f"  ({r['vs_fp32']:.2f}x FP32)" if "vs_fp32" in r else ""))
    if int8 is not None:
        q = report["int8"]
        print(f"  INT8 ({q['types']}, {q['format']}, on {q['host']}): accuracy {100 * q['accuracy']['ORT INT8']:.2f}% "
              f"against FP32 {100 * q['accuracy']['ORT folded']:.2f}% ({q['drop_pp']:+.2f} points lost)")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
