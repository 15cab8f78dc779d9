"""python -m export.report artifacts: the results table (accuracy, parity, speed) from the reports
the pipeline wrote, printed and saved as artifacts/results.md. The README's table is pasted from it."""
import json
import sys
from pathlib import Path

from training.artifacts import atomic_write


def results_table(artifacts: Path) -> str:
    export = json.loads((artifacts / "export_report.json").read_text())
    parity = export["parity"]["variants"]
    if "run" in export:  # one of our training runs
        config = json.loads((Path(export["run"]) / "config.json").read_text())
        header = (f"Model `{export['arch']}` ({Path(export['run'])}), best epoch {config['best_epoch']}, "
                  f"trained in {config['train_seconds']:.0f}s on {config['threads']} threads.")
    else:  # --model / --onnx
        header = (f"Model `{export['name']}` ({export['source']['kind']}: {export['source']['path']}), verified on "
                  f"{export['parity']['images']} {export['parity'].get('inputs', 'inputs')}. {export.get('summary', '')}")
    lines = [header, "",
             f"| variant | test accuracy | max abs diff vs {export['parity'].get('reference', 'torch eval')} | "
             f"argmax agreement | within 1e-5 |", "|---|---|---|---|---|"]
    for name, row in parity.items():
        accuracy = f"{row['accuracy']:.4f}" if "accuracy" in row else "n/a"
        if "error" in row:
            lines.append(f"| {name} | {accuracy} | FAILED: {row['error']} | | NO |")
        elif "max_abs_diff" in row:
            lines.append(f"| {name} | {accuracy} | {row['max_abs_diff']:.2e} | "
                         f"{row['argmax_agreement']:.2%} | {'yes' if row['within_tolerance'] else 'NO'} |")
        else:
            lines.append(f"| {name} | {accuracy} | reference | | |")
    lines += ["", f"Folded graph nodes: {export['nodes_folded']}",
              f"Unfolded graph nodes: {export['nodes_unfolded']}"]
    kept = export["fold"]["kept"]
    lines.append("BatchNorms kept: " + ("; ".join(f"{k['bn']}: {k['reason']}" for k in kept) if kept else "none"))
    bench_path = artifacts / "bench_model.json"
    if bench_path.exists():
        bench = json.loads(bench_path.read_text())
        lines += ["", "| images/s, 1 thread | " + " | ".join(f"batch {b}" for b in bench["results"]) + " |",
                  "|---|" + "---|" * len(bench["results"])]
        for name in next(iter(bench["results"].values())):
            cells = [f"{rows[name]['images_per_s']:,.0f} ({rows[name]['vs_torch_eager']:.2f}x)"
                     for rows in bench["results"].values()]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    artifacts = Path((argv or sys.argv[1:] or ["artifacts"])[0])
    try:
        table = results_table(artifacts)
    except FileNotFoundError as e:
        print(f"report: {e.filename} is missing; run `make pipeline` first", file=sys.stderr)
        return 2
    atomic_write(artifacts / "results.md", lambda tmp: Path(tmp).write_text(table))
    print(table, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
