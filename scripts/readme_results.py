"""python scripts/readme_results.py [--artifacts artifacts] [--readme README.md]

Rewrites the README's results block (between `<!-- results:begin -->` and `<!-- results:end -->`)
from the latest reports under artifacts/, each with the command that made it and its date, and
copies their plots to docs/img/results/. A section whose report is not in artifacts/ (a fresh clone
that did not rerun it) keeps what the README already says, which names its own command and date; a
section never measured says which command makes it. Never invented. Standard library only
(`make readme-results`)."""
import argparse
import json
import re
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common.files import write_text  # noqa: E402 -- stdlib only, like this script

BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"

# (title, report, command that writes it, plots to copy); `make recipes` (the training recipes side by
# side) and `make keras-seeds` are kept in docs/training.md and docs/onnx-fold.md, not here
SECTIONS = [
    ("Model: accuracy, fold parity, onnxruntime speed", "results.md", "make pipeline", []),
    ("`make pipeline`: wall seconds per stage", "pipeline_times.tsv", "make pipeline", []),
    ("Real models: torchvision and timm through `python -m export`, beside the tools people use instead",
     "bench_zoo/results.json", "make bench-zoo", ["bench_zoo/bn_left.png"]),
    ("ONNX fold pass vs onnxoptimizer / onnxsim / onnxslim", "bench_onnx_fold/results.json", "make bench-onnx-fold",
     ["bench_onnx_fold/throughput.png"]),
    ("Serving benchmark: `make bench-serve` on the model exported last", "bench_serve/results.json", "make bench-serve",
     ["bench_serve/bench_serve.png"]),
    ("Serving real models: ours vs the in-process ceiling and the peers", "bench_real/summary.json", "make bench-real",
     ["bench_real/resnet50/bench/bench_serve.png"]),
    ("Soak", "soak/soak.json", "make soak", ["soak/soak.png"]),
    ("Fault battery", "faults/faults.json", "make faults", []),
    ("Container image and rolling replace", "deploy/deploy_check.json", "make deploy-check", []),
]
PEERS = ("dynamo optimize", "onnxsim", "onnxslim", "onnxoptimizer", "fx fuse")  # bench/zoo.py's names


def date_of(path: Path) -> str:
    return time.strftime("%Y-%m-%d", time.localtime(path.stat().st_mtime))


def render(path: Path, command: str) -> str:
    if path.suffix == ".tsv":  # stage<TAB>seconds
        rows = [line.split("\t") for line in path.read_text().splitlines() if "\t" in line]
        total = sum(float(s) for _, s in rows)
        return (f"`{command}`, {date_of(path)}, wall seconds: " + " · ".join(f"{n} {float(s):.0f}" for n, s in rows)
                + f" → **total {total:.0f} s** ({total / 60:.1f} min).")
    if path.name == "faults.json":  # every figure of the battery against its goal
        f = json.loads(path.read_text())
        rows = [f"| {name} | " + "; ".join(f"{c['figure']}: {c['value']}" + ("" if c["pass"] else f" **(goal {c['goal']})**")
                                          for c in scenario["checks"])
                + f" | {'PASS' if all(c['pass'] for c in scenario['checks']) else '**FAIL**'} |"
                for name, scenario in f["scenarios"].items()]
        return "\n".join([f"`{f['command']}`, {f['date']}, {f['workers']} workers, load average before "
                          f"{f['load_average_before'][0]:.1f} (the load generator shares the 2 cores); every goal "
                          "in docs/service.md:", "", "| scenario | figures | |", "|---|---|---|", *rows])
    if path.parent.name in ("bench_real", "bench_serve"):  # a row per model: ours at the most clients, the ceiling, peers
        real, rows, short = json.loads(path.read_text()), [], []
        if path.parent.name == "bench_serve":
            real = {"date": real["meta"]["date"], "models": {real["meta"]["model_name"]: real}}
            command = real["models"][next(iter(real["models"]))]["meta"]["command"]
        for name, res in real["models"].items():
            got = [r for r in res.get("rows", []) if r["round"] == 1 and r["kind"] in ("closed", "ceiling")]
            ceil = next((r for r in got if r["kind"] == "ceiling"), None)
            top = max((r["clients"] for r in got if r["setup"] == "ours"), default=None)
            at = {r["setup"]: r for r in got if r["clients"] == top and r["kind"] == "closed"}
            if not ceil or "ours" not in at:
                short.append(f"{name}: not measured ({'; '.join(res.get('failed', []))})")
                continue
            ours, peers = at.pop("ours"), sorted(at.values(), key=lambda r: -r["img_s"])
            met = [g["met"] for g in res["goals"]]
            rows.append(f"| {name} | {ceil['img_s']:,.1f} | {ours['img_s']:,.1f} ({ours['img_s'] / ceil['img_s']:.2f}x) | "
                        f"{ours['p99_ms']:,.0f} | {ours['server_cpu_ms_per_img'] / ceil['server_cpu_ms_per_img']:.2f}x | "
                        + (f"{peers[0]['setup']} {peers[0]['img_s']:,.1f}, p99 {peers[0]['p99_ms']:,.0f}" if peers else "–")
                        + f" | {sum(met)} of {len(met)} |")
            short += [f"{name}: {g['goal'].split(': ', 1)[1].split('; short at')[0]}" for g in res["goals"] if not g["met"]]
        text = [f"`{command}`, {real['date']} (every step, layout and load: docs/service.md, \"Serving real models\", or "
                "the results.md beside it); one image per request, keep-alive clients, at the most clients:", "",
                "| model | in-process ceiling img/s | ours img/s (× ceiling) | ours p99 ms | ours server CPU/img × in-process "
                "| best other setup: img/s, p99 ms | goals met |", "|---|---|---|---|---|---|---|", *rows]
        return "\n".join(text + ([""] + [f"- Short: {s}" for s in short] if short else ["", "Every goal met."]))
    if path.parent.name == "bench_zoo":  # one paragraph: published, BNs left per tool, what we keep and why
        z = json.loads(path.read_text())
        models = [m for m in z["models"] if m.get("ours", {}).get("exit") is not None]
        ours = [m["ours"] for m in models]
        total = sum(m.get("peers", {}).get("unfolded", {}).get("bn_nodes", m["bns"]) for m in models)
        left = {"ours": sum(o["bn_left"] if o.get("published") else o.get("kept", o["bn_left"]) for o in ours)}
        wrong = {"ours": sum(o.get("check", {}).get("matches") is False for o in ours)}
        for tool in PEERS:
            entries = [m.get("peers", {}).get(tool, {}) for m in models]
            left[tool] = sum(e.get("left") or 0 for e in entries)
            wrong[tool] = sum(e.get("check", {}).get("matches") is False for e in entries)
        kept = "; ".join(f"{m['name']} {m['ours'].get('kept')}" for m in models if m["ours"].get("kept"))
        r50 = next((m["ours"] for m in models if m["name"] == "resnet50"), None)
        meta = z["meta"]
        text = (f"`make bench-zoo`, {meta['dates']}, each model holding the benchmark lock, load average "
                f"{meta['load']}, {meta['versions']}: **{sum(o.get('published', False) for o in ours)} of {len(models)} "
                f"published**. BatchNorms left of the {total:,} the models run: **ours {left['ours']}**, "
                + ", ".join(f"{t} {left[t]}" for t in PEERS) + ". Outputs that no longer match the float64 model "
                f"(within 1e-5, or ≤ 2x float32's own error): ours {wrong['ours']}, "
                + ", ".join(f"{t} {wrong[t]}" for t in PEERS) + " (the peers publish without checking).")
        if kept:
            text += f" Kept by us, each with its reason in the report: {kept}."
        if r50:
            text += f" ResNet-50 at 224x224 exported and verified in {r50['seconds']:.0f} s ({r50['rows']} rows)."
        return text + " Every model, tool and reason: [docs/zoo.md](docs/zoo.md)."
    if path.name == "deploy_check.json":  # with the image make container built (artifacts/container.json)
        d, image = json.loads(path.read_text()), path.parent.parent / "container.json"
        lines = []
        if image.exists():
            c = json.loads(image.read_text())
            lines.append(f"`make container` (`{c['command']}`), {c['date']}, load average {c['load_average'][0]:.1f}: "
                         f"image {c['image']}, **{c['size_mb']:.0f} MB** (goal ≤ 500), user `{c['user']}`, ready in "
                         f"{c['ready_s']:.1f} s, `docker stop` drained and exited {c['exit_code']} after {c['stop_s']:.1f} s.")
        r, k = d["rolling"], d["kill"]
        out_after = " and ".join(f"{step['sigterm_to_balancer_down_s']:.2f}" for step in r["steps"])
        lines.append(f"`make deploy-check` (`{d['command']}`), {d['date']}, load average before "
                     f"{d['load_average_before'][0]:.1f}: {d['pod']['replicas']} replicas behind HAProxy at "
                     f"{d['rate_rps']:.0f} req/s. Rolling replace: **{r['failed']} failed of {r['requests']:,}**, "
                     f"{d['wrong_labels']} wrong labels, p99 {r['p99_ms']:.0f} ms; the balancer took each old replica out "
                     f"{out_after} s after its SIGTERM. One replica SIGKILLed: {k['failed']} failed of {k['requests']:,} "
                     f"(requests in flight on it: {k['victim_sessions_in_flight']}), marked down after "
                     f"{k['balancer_down_after_s']:.2f} s, p99 {k['p99_ms']:.0f} ms (1 s connect timeouts before a retry). "
                     f"{'PASS' if d['passed'] else '**FAIL**'}.")
        return "\n\n".join(lines)
    if path.parent.name == "bench_onnx_fold":  # one row per model: ours against the original and the best tool
        b = json.loads(path.read_text())
        rows = []
        for r in b["results"]:
            v, a = r["variants"], r["acceptance"]
            rows.append(f"| {r['model']} | {v['original']['bn_derived_left']} → {v['ours']['bn_derived_left']} | "
                        f"{v['original']['nodes']} → {v['ours']['nodes']} | {v['ours']['parity']['max_abs_diff']:.1e} | "
                        f"{a['batch1_ours_over_best_tool']:.2f} / {a['batch64_ours_over_best_tool']:.2f} | "
                        f"{a['batch1_ours_over_original']:.2f} / {a['batch64_ours_over_original']:.2f} |")
        return "\n".join([f"`{b['command']}`, {b['date']}, onnxruntime {b['onnxruntime']}, 1 thread, median of "
                          f"{b['rounds']} interleaved rounds (every variant and tool: docs/onnx-fold.md):", "",
                          "| model | BN-derived nodes, original → ours | nodes | parity (max abs diff) | "
                          "ours ÷ best tool, batch 1 / 64 | ours ÷ original, batch 1 / 64 |", "|---|---|---|---|---|---|", *rows])
    if path.suffix == ".json":  # the soak's summary
        s = json.loads(path.read_text())
        verdict = "PASS" if s["ok"] else "FAIL: " + "; ".join(s["reasons"])
        return (f"`{s.get('command', command)}`, {s.get('date', date_of(path))}: **{verdict}** — {s['time']} at "
                f"{s['offered_rps']:.0f} req/s offered ({s['achieved_rps']:.0f} achieved), {s['requests']:,} requests, "
                f"{s['failures']} failures, p50 {s['p50_ms']:.0f} ms, p99 {s['p99_ms']:.0f} ms, server RSS "
                f"{s['rss_baseline_mib']:.0f} → {s['rss_final_mib']:.0f} MiB ({s['rss_growth']:+.1%}) after "
                f"{s['warmup_s']:.0f} s of warm-up.")
    text = path.read_text().strip()
    text = re.sub(r"^!\[.*$", "", text, flags=re.M).strip()  # plots are linked from docs/img/results below
    text = re.sub(r"^(Folded|Unfolded) graph nodes: .*(\n|$)", "", text, flags=re.M).strip()  # in export_report.json
    goals = re.findall(r"^- (.*) — (met|SHORT)$", text, flags=re.M)  # goal lists: one line, name what is short
    if goals:
        short = [g for g, verdict in goals if verdict == "SHORT"]
        text = re.sub(r"^Goals:\n(- .* — (met|SHORT)\n?)+", "", text, flags=re.M).rstrip()
        text += "\n\nGoals: " + "".join(f"{g} — **short**; " for g in short) + f"{len(goals) - len(short)} of {len(goals)} met."
    first = text.splitlines()[0]
    if command not in first and "Command:" not in first and not first.startswith("`"):  # say what made it, and when
        text = f"`{command}`, {date_of(path)}:\n\n{text}"
    return text


def sections_of(old_block: str) -> dict[str, str]:
    """The README's current results block, section title -> its text."""
    found = re.split(r"^### (.+)\n", old_block, flags=re.M)
    return {title: text.strip() for title, text in zip(found[1::2], found[2::2])}


def block(artifacts: Path, img_dir: Path, repo: Path, old_block: str = "") -> str:
    parts = [BEGIN, "<!-- generated by `make readme-results` from the latest reports; edit scripts/readme_results.py -->"]
    kept = sections_of(old_block)
    for title, report, command, plots in SECTIONS:
        path = artifacts / report
        parts.append(f"\n### {title}\n")
        if not path.exists():
            old = kept.get(title, "")
            parts.append(old if old and not old.startswith("Not measured yet") else
                         f"Not measured yet: `{command}` writes {artifacts / report}.")
            continue
        parts.append(render(path, command))
        links = []
        for plot in plots:
            if (artifacts / plot).exists():
                img_dir.mkdir(parents=True, exist_ok=True)
                target = img_dir / plot.replace("/", "-")
                shutil.copyfile(artifacts / plot, target)
                links.append(f"![{Path(plot).stem}]({target.relative_to(repo)})")
        if links:
            parts.append("\n" + " ".join(links))
    parts.append(END)
    return "\n".join(parts)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python scripts/readme_results.py", description=__doc__.split("\n\n")[1],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--artifacts", default="artifacts", type=Path, help="where the reports are")
    p.add_argument("--readme", default="README.md", type=Path, help="the file whose results block is rewritten")
    args = p.parse_args(argv)
    readme = args.readme.read_text()
    if BEGIN not in readme or END not in readme:
        print(f"readme_results: {args.readme} has no {BEGIN} ... {END} block", file=sys.stderr)
        return 2
    repo = args.readme.resolve().parent
    head, rest = readme.split(BEGIN, 1)
    new = block(args.artifacts, repo / "docs" / "img" / "results", repo, rest.split(END, 1)[0])
    write_text(args.readme, head + new + rest.split(END, 1)[1])
    print(f"readme_results: {args.readme} results block rewritten from {args.artifacts}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
