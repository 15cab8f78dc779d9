"""The bench-zoo summary: results.json (every model's record), results.md (the table and the
reasons), bn_left.png (BNs left per model and tool). Written atomically."""
import os
import re
import time
from pathlib import Path

from bench.zoo import CHAOTIC, FACTOR, PEERS
from bench.zoo_merge import table as merge_table
from common.files import atomic_write, write_json, write_text

TOOLS = ("ours", *PEERS)


def bns(record: dict):
    """BatchNorms the model runs in eval mode (the unfolded export's; GoogLeNet's and Inception's aux heads
    hold BNs that only train mode runs), else its BN modules."""
    return record.get("peers", {}).get("unfolded", {}).get("bn_nodes", record.get("bns"))


def left(record: dict, tool: str):
    """BNs left by `tool` on this model (None: the tool failed or did not run), and whether its
    published output matches the float64 model (None: not checked)."""
    if tool == "ours":
        ours = record.get("ours", {})
        if "bn_left" not in ours:
            return None, None
        return ours["bn_left"] if ours.get("published") else ours.get("kept", ours["bn_left"]), \
            ours.get("check", {}).get("matches")  # unpublished: not checked
    entry = record.get("peers", {}).get(tool, {})
    return entry.get("left"), entry.get("check", {}).get("matches")


def cell(record: dict, tool: str) -> str:
    n, matches = left(record, tool)
    entry = record.get("ours", {}) if tool == "ours" else record.get("peers", {}).get(tool, {})
    if n is None:
        return "fail" if entry else "–"
    seconds = entry.get("seconds")
    return f"{n}{'' if matches in (True, None) else ' ✗'} · {seconds:.0f}s" if seconds is not None else str(n)


def ours_cells(record: dict) -> list[str]:
    ours = record.get("ours", {})
    if not ours:
        return ["–"] * 5
    published = "yes" if ours.get("published") else f"no ({ours.get('exit')})"
    rows = f" ({ours['rows']})" if ours.get("rows") else ""
    return [published, f"{ours.get('seconds', 0):.0f}{rows}", str(ours.get("folded_fx", "–")), str(ours.get("folded_onnx", "–")),
            str(ours.get("kept", "–"))]


def why_not(record: dict) -> str:
    ours = record.get("ours", {})
    if record.get("error"):
        return f"benchmark error: {record['error']}"
    if ours.get("exit") == 1:
        step = f" at {ours['failed_step']}" if ours.get("failed_step") else ""
        return f"verification failed{step} ({', '.join(ours.get('failing', [])) or '?'}): {ours.get('diagnosis') or ours.get('stderr')}"
    if ours.get("exit") is None and ours:
        return ours.get("stderr", "timed out")
    return ours.get("stderr", "")


def markdown(results: list[dict], meta: dict) -> str:
    head = ["model", "lib", "BNs", "ours: published", "s (rows)", "fx", "onnx", "kept", "f32 vs f64 (rel)",
            *[f"{t}: left · s" for t in PEERS]]
    lines = [f"# make bench-zoo, {meta['date']}", "",
             f"`{meta['command']}` on {meta['host']}; models run {meta['dates']}, holding the benchmark lock; "
             f"1-minute load average at each model's start {meta['load']} (other agents' work); {meta['versions']}.", "",
             "BNs: BatchNormalization nodes in the model's eval-mode export (in brackets when its BN modules are more: aux heads "
             "that only train mode runs). ours: published = exit 0 (else the exit code), s = wall seconds of "
             "`python -m export` (rows: the inputs it verified on), fx / onnx = BNs folded by each pass, kept = BNs left with a reason. Peers: "
             "BatchNormalization nodes (fx fuse: BN modules and batch_norm calls) left in what the tool publishes, and its seconds; "
             f"✗ = its output does not match the float64 model (within 1e-5 + 1e-5·|ref|, or at most {FACTOR:g}x float32's "
             "own error with argmax agreement no worse). f32 vs f64: the unfolded float32 model's max |error| against "
             f"the same model in float64, relative to max |logit|; **bold** = numerically chaotic (> {CHAOTIC:g}).", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        f32 = r.get("f32", {})
        rel = f"{f32['max_abs']:.1e} ({f32['rel']:.0e})" if f32 else "–"
        rel = f"**{rel}**" if f32.get("chaotic") else rel
        modules = f" ({r['bns']})" if r.get("bns") not in (None, bns(r)) else ""
        lines.append("| " + " | ".join([r["name"], r.get("library", "?"), f"{bns(r)}{modules}", *ours_cells(r), rel,
                                        *[cell(r, t) for t in PEERS]]) + " |")
    published = sum(bool(r.get("ours", {}).get("published")) for r in results)
    lines += ["", f"Published by ours: **{published} of {len(results)}**. BNs left, all models "
              f"(failed runs not counted): " + ", ".join(
                  f"{t} {sum(left(r, t)[0] or 0 for r in results)} ({sum(left(r, t)[0] is None for r in results)} failed)"
                  for t in TOOLS) + f", of {sum(bns(r) or 0 for r in results)} BNs.", ""]
    lines += merge_table(results)
    lines += ["## Not published by ours, and why", ""]
    lines += [f"- **{r['name']}**: {why_not(r)}" for r in results if not r.get("ours", {}).get("published")] or ["- none"]
    lines += ["", "## How ours passed (the new verification: clause per float32 form, worst ratio to float32's own error)", ""]
    for r in results:
        ours = r.get("ours", {})
        if ours.get("published") and ours.get("clauses"):
            clauses = [c for c in ours["clauses"].values() if c]
            counts = ", ".join(f"{clauses.count(c)}x {c}" for c in sorted(set(clauses)))
            ratio = f"; worst ratio {ours['worst_ratio']:.2f}" if ours.get("worst_ratio") is not None else ""
            steps = f"; export_report timings total {ours['timings']['total']:.0f} s" if "total" in (ours.get("timings") or {}) else ""
            lines.append(f"- **{r['name']}**: {counts}{ratio}{steps}")
    lines += ["", "## BNs ours kept, with the reasons", ""]
    for r in results:
        reasons = {}
        for why, n in r.get("ours", {}).get("kept_reasons", {}).items():  # node names aside, one line per reason
            why = re.sub(r"\b\w+(\.\w+)+\b|\b(node_)?[a-z]+(_[a-z]+)*_\d+\b", "…", why)
            reasons[why] = reasons.get(why, 0) + n
        lines += [f"- **{r['name']}**: " + "; ".join(f"{n}x {why}" for why, n in reasons.items())] if reasons else []
    lines += ["", "## Peer failures", ""]
    for r in results:
        errors = {t: e["error"] for t, e in r.get("peers", {}).items() if isinstance(e, dict) and "error" in e}
        lines += [f"- **{r['name']}** {t}: {e}" for t, e in errors.items()]
    return "\n".join(lines) + "\n"


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = [r for r in results if bns(r)]
    frac = np.full((len(rows), len(TOOLS)), np.nan)
    fig, ax = plt.subplots(figsize=(9, 0.32 * len(rows) + 1.6))
    for i, r in enumerate(rows):
        for j, tool in enumerate(TOOLS):
            n, matches = left(r, tool)
            if n is not None:
                frac[i, j] = n / bns(r)
            failed = f"exit {r['ours'].get('exit')}" if tool == "ours" and "ours" in r else "fail"
            text = failed if n is None else f"{n}" + ("" if matches in (True, None) else " ✗")
            if tool == "ours" and n is not None:
                text += "" if r["ours"].get("published") else " (unpub.)"
            ax.text(j, i, text, ha="center", va="center", fontsize=7)
    cmap = matplotlib.colormaps["RdYlGn_r"].copy()
    cmap.set_bad("lightgrey")
    ax.imshow(frac, cmap=cmap, vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(TOOLS)), TOOLS, fontsize=8)
    ax.set_yticks(range(len(rows)), [f"{r['name']} ({bns(r)})" for r in rows], fontsize=7)
    ax.xaxis.tick_top()
    ax.set_title("BatchNorms left (of the model's, in brackets); ✗ = output differs from float64; "
                 "unpub. = ours refused to publish", fontsize=8, pad=24)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


def write_report(results: list[dict], out: Path) -> None:
    import sys

    import torch

    loads = [r["load_before"][0] for r in results if r.get("load_before")]
    dates = sorted(r["date"] for r in results if r.get("date"))
    meta = {"date": time.strftime("%Y-%m-%d %H:%M %Z"), "command": "python -m bench.zoo " + " ".join(sys.argv[1:]),
            "host": f"{os.cpu_count()} cores", "dates": f"{dates[0]} to {dates[-1]}" if dates else "?",
            "load": f"{min(loads):.1f} to {max(loads):.1f}" if loads else "?", "versions": f"torch {torch.__version__}"}
    write_json(out / "results.json", {"meta": meta, "models": results})
    write_text(out / "results.md", markdown(results, meta))
    plot(results, out / "bn_left.png")
    print(f"wrote {out / 'results.json'}, {out / 'results.md'}, {out / 'bn_left.png'}")
