"""python -m export.report artifacts: the results table (accuracy, parity, speed) from the reports
the pipeline wrote, printed and saved as artifacts/results.md (the README's results block is
generated from it by `make readme-results`)."""
import argparse
import json
import sys
from pathlib import Path

from common.files import write_text

# export_report.json's own format: 2 = every check an object with "status" (export/verify.py's types);
# the pipeline writes it, --if-stale re-exports a report of another format, this module refuses one
REPORT_FORMAT = 2


def results_table(artifacts: Path) -> str:
    export = json.loads((artifacts / "export_report.json").read_text())
    if export.get("report_format") != REPORT_FORMAT:
        raise ValueError(f"{artifacts / 'export_report.json'} was written by an older bnfold (its checks have no "
                         "status); export again: make pipeline (or python -m export ...)")
    parity = export["parity"]["variants"]
    if "run" in export:  # one of our training runs
        config = json.loads((Path(export["run"]) / "config.json").read_text())
        header = (f"Model `{export['arch']}` ({Path(export['run'])}), best epoch {config['best_epoch']}, "
                  f"trained in {config['train_seconds']:.0f}s on {config['threads']} threads.")
    else:  # --model / --onnx
        header = (f"Model `{export['name']}` ({export['source']['kind']}: {export['source']['path']}), verified on "
                  f"{export['parity']['images']} {export['parity'].get('inputs', 'inputs')}. {export.get('summary', '')}")
    exact = "; ".join(exactness_cell(name, r) for name, r in export["parity"].get("exactness", {}).items())
    lines = [header, "", f"Fold exactness in float64 (max |folded - unfolded| / max |unfolded|, exact below 1e-9): "
                         f"{exact or 'not checked'}.", "",
             f"| form | test accuracy | max abs diff vs {export['parity'].get('reference', 'torch eval')} | "
             f"error / tolerance (1e-5 + 1e-5·|ref|) | argmax agreement | verdict |", "|---|---|---|---|---|---|"]
    for name, row in parity.items():
        accuracy = f"{row['accuracy']:.4f}" if "accuracy" in row else "n/a"
        agreement = f"{row['argmax_agreement']:.2%}" if "argmax_agreement" in row else ""
        if "max_abs_diff" not in row:
            lines.append(f"| {name} | {accuracy} | FAILED: {row['why']} | | | NO |")
        else:
            verdict = {"passed": f"ok ({row.get('clause')})", "failed": f"FAILED: {row.get('why')}",
                       "skipped": row.get("why")}[row["status"]]
            lines.append(f"| {name} | {accuracy} | {row['max_abs_diff']:.2e} | {row.get('tol_error', 0):.2f} | "
                         f"{agreement} | {verdict} |")
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
    return "\n".join(lines) + "\n" + trained_table(artifacts)


def exactness_cell(name: str, check: dict) -> str:
    """One exactness check as the results say it: its figure when it passed, what happened otherwise
    (a skipped check proved nothing and says so)."""
    if check["status"] == "passed":
        return f"{name} {check['relative']:.1e}"
    return f"{name} {check['status']}: {check['why']}"


def trained_table(artifacts: Path) -> str:
    """Every model trained under artifacts/: our runs (artifacts/runs/*/config.json) and the Keras
    seeds (artifacts/keras/results.json, from `make keras-seeds`), side by side."""
    rows = []
    for config_path in sorted((artifacts / "runs").glob("*/config.json")):
        config = json.loads(config_path.read_text())
        accuracy = config.get("metrics", {}).get("test_accuracy")
        if accuracy is not None:
            rows.append(f"| {config.get('arch', config_path.parent.name)} | PyTorch (`make pipeline ARCH=...`) | "
                        f"{config.get('epochs', '')} | {config.get('train_seconds', 0):.0f} | {accuracy:.4f} | "
                        f"exported by `python -m export --run {config_path.parent}` |")
    keras_path = artifacts / "keras" / "results.json"
    if keras_path.exists():
        for r in json.loads(keras_path.read_text())["results"]:
            p = r["parity_folded_vs_input_graph"]
            rows.append(f"| {r['name']} | Keras {r.get('keras_version', '')} (`make keras-seeds`) | {r['epochs']} | "
                        f"{sum(r['seconds_per_epoch']):.0f} | {r['ort_folded_test_accuracy']:.4f} | folded ONNX: "
                        f"max abs diff {p['max_abs_diff']:.1e}, BN-derived nodes {r['bn_derived_before']} → "
                        f"{r['bn_derived_after']} |")
    if not rows:
        return ""
    return "\n".join(["", "| trained model | framework | epochs | training s | test accuracy | export |",
                      "|---|---|---|---|---|---|", *rows]) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m export.report", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("artifacts", nargs="?", default="artifacts", type=Path, help="where the pipeline wrote its reports")
    artifacts = p.parse_args(argv).artifacts
    try:
        table = results_table(artifacts)
    except FileNotFoundError as e:
        print(f"report: {e.filename} is missing; run `make pipeline` first", file=sys.stderr)
        return 2
    except ValueError as e:
        print(f"report: {e}", file=sys.stderr)
        return 2
    write_text(artifacts / "results.md", table)
    print(table, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
