"""python scripts/readme_results.py [--artifacts artifacts] [--readme README.md]

Rewrites the README's results block (between `<!-- results:begin -->` and `<!-- results:end -->`)
from the latest reports under artifacts/ and copies their plots to docs/img/results/. Every section
opens with the same line: the command that made it, when, and on which CPU when its numbers depend
on one; then, when needed, a line that says it is stale (the code it measures changed after it was
measured: the commit that changed it) or that a goal is short or a check failed (each with one line
of why). A section whose report is not in artifacts/ (a fresh clone that did not rerun it) keeps
what the README already says, its freshness checked again from the date it records. A section never
measured says which command makes it. Nothing is invented. Standard library only
(`make readme-results`).

Adding a section (the other branches' results): write a function `render(path) -> Rendered` that
reads the report and returns the body (without command and date: the framework writes those), the
date and command the report records, the CPU it recorded, and what fell short; then add a
`Section(...)` to SECTIONS with the code paths it measures. tests/test_readme_results.py shows both.
"""
import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common.files import write_text  # noqa: E402 -- stdlib only, like this script
from common.machine import cpu_text  # noqa: E402

BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
MARK = re.compile(r"<!-- section: (?P<key>[\w-]+) · measured: (?P<date>[^·]*?) · command: (?P<command>.*?) -->")


@dataclass
class Rendered:
    """What a renderer read from its report."""
    body: str
    date: str = ""                       # when it was measured, as the report says ("2026-12-02 00:36"); else the file's
    command: str = ""                    # the command as the report records it (else the section's)
    cpu: str = ""                        # the CPU the report recorded ("AMD EPYC, AVX-512 VNNI, 2 cores")
    short: list[str] = field(default_factory=list)  # goals short or checks failed, one phrase each
    note: str = ""                       # e.g. a run that reused stages says so here (shown under the date line)


@dataclass
class Section:
    key: str                             # stable id, written into the README beside the section
    title: str
    report: str                          # under artifacts/
    command: str                         # the make command that writes the report
    render: Callable[[Path], Rendered]
    measures: tuple[str, ...] = ()       # code it measures: a commit touching these after its date makes it stale
    plots: tuple[str, ...] = ()          # under artifacts/, copied to docs/img/results/
    cpu_dependent: str = ""              # which of its numbers depend on the CPU ("speeds", "accuracy to the 4th digit")


# Why a goal is short or a check failed, one line each, where the report cannot say it itself:
# (section key, the start of the short phrase) -> the line. Unused entries do nothing.
EXPLAINED: dict[tuple[str, str], str] = {
    ("faults", "overload"): "the load generator shares the 2 cores and hit its 2,048-connection cap, so the 3x "
                            "overload it offered fell short of 3x; goodput is measured under that (docs/service.md)",
}


def date_of(path: Path) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(path.stat().st_mtime))


# --- renderers: one per report ------------------------------------------------------------------

def render_model(path: Path) -> Rendered:
    """results.md (python -m export.report): accuracy, parity, speed; the run's CPU from its config."""
    text = path.read_text().strip()
    text = re.sub(r"^!\[.*$", "", text, flags=re.M).strip()
    text = re.sub(r"^(Folded|Unfolded) graph nodes: .*(\n|$)", "", text, flags=re.M).strip()  # in export_report.json
    text = re.sub(r"\n\| trained model \|.*", "", text, flags=re.S).strip()  # every run side by side: results.md
    cpu = ""
    report = path.parent / "export_report.json"
    if report.exists():
        run = json.loads(report.read_text()).get("run")
        config = Path(run) / "config.json" if run else None
        if config and config.exists():
            cpu = cpu_text(json.loads(config.read_text()).get("machine"))
    return Rendered(text, date=date_of(path), cpu=cpu)


def render_pipeline_times(path: Path) -> Rendered:
    """pipeline_times.json (scripts/pipeline.py): the wall seconds of each stage of one make pipeline that
    succeeded; a stage that reused what was there says so, and the total says it is not a full run's."""
    t = json.loads(path.read_text())
    stages = t["stages"]
    reused = [s["stage"] for s in stages if not s["ran"]]
    total = sum(s["seconds"] for s in stages)
    cells = " · ".join(f"{s['stage']} {s['seconds']:.0f}" + ("" if s["ran"] else " (reused)") for s in stages)
    body = f"wall seconds: {cells} → **total {total:.0f} s** ({total / 60:.1f} min)"
    if t.get("load_average_before"):
        body += f"; load average {t['load_average_before'][0]:.1f} before, {t['load_average_after'][0]:.1f} after"
    note = ""
    if reused:
        note = (f"Not a full run: {', '.join(reused)} reused what was there, so the total is not the time "
                f"of `make pipeline` from a fresh clone.")
    short = [f"total {total:.0f} s (goal ≤ {t['goal_s']:.0f} s)"] if t.get("goal_s") and total > t["goal_s"] else []
    return Rendered(body + ".", date=t["date"], command=t["command"], cpu=cpu_text(t.get("cpu")), short=short, note=note)


def render_faults(path: Path) -> Rendered:
    """faults.json (python -m loadtest.faults): every figure of the battery against its goal."""
    f = json.loads(path.read_text())
    rows, short = [], []
    for name, scenario in f["scenarios"].items():
        ok = all(c["pass"] for c in scenario["checks"])
        rows.append(f"| {name} | " + "; ".join(f"{c['figure']}: {c['value']}" + ("" if c["pass"] else f" **(goal {c['goal']})**")
                                              for c in scenario["checks"]) + f" | {'PASS' if ok else '**FAIL**'} |")
        if not ok:
            short.append(f"{name}: " + "; ".join(f"{c['figure']} {c['value']} (goal {c['goal']})"
                                                for c in scenario["checks"] if not c["pass"]))
    body = "\n".join([f"{f['workers']} workers, load average before {f['load_average_before'][0]:.1f} (the load "
                      "generator shares the 2 cores); every goal in docs/service.md:", "",
                      "| scenario | figures | |", "|---|---|---|", *rows])
    return Rendered(body, date=f["date"], command=f["command"], cpu=cpu_text(f.get("cpu")), short=short)


PEERS = ("dynamo optimize", "onnxsim", "onnxslim", "onnxoptimizer", "fx fuse")  # bench/zoo.py's names


def render_zoo(path: Path) -> Rendered:
    """bench_zoo/results.json: one paragraph (published, BNs left per tool, what we keep and why)."""
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
    text = (f"Each model holding the benchmark lock, load average {meta['load']}, {meta['versions']}: "
            f"**{sum(o.get('published', False) for o in ours)} of {len(models)} published**. BatchNorms left of the "
            f"{total:,} the models run: **ours {left['ours']}**, " + ", ".join(f"{t} {left[t]}" for t in PEERS)
            + ". Outputs that no longer match the float64 model (within 1e-5, or ≤ 2x float32's own error): ours "
            f"{wrong['ours']}, " + ", ".join(f"{t} {wrong[t]}" for t in PEERS) + " (the peers publish without checking).")
    if kept:
        text += f" Kept by us, each with its reason in the report: {kept}."
    if r50:
        text += f" ResNet-50 at 224x224 exported and verified in {r50['seconds']:.0f} s ({r50['rows']} rows)."
    text += " Every model, tool and reason: [docs/zoo.md](docs/zoo.md)."
    return Rendered(text, date=meta["dates"], command=meta.get("command", "make bench-zoo"),
                    cpu=cpu_text(meta.get("cpu")))


def render_onnx_fold(path: Path) -> Rendered:
    """bench_onnx_fold/results.json: one paragraph (per model, the BN-derived nodes left and ours against the
    best tool); the table with every variant and tool is docs/onnx-fold.md's."""
    b = json.loads(path.read_text())
    ran = [r for r in b["results"] if "failed" not in r["variants"].get("ours", {"failed": 1})]
    models = "; ".join(f"{r['model']} {r['variants']['original']['bn_derived_left']} → "
                       f"{r['variants']['ours']['bn_derived_left']}" for r in ran)
    worst = max((r["variants"]["ours"]["parity"]["max_abs_diff"] for r in ran), default=float("nan"))
    body = (f"onnxruntime {b['onnxruntime']}, 1 thread, median of {b['rounds']} interleaved rounds. BN-derived nodes, "
            f"original → ours: {models}; parity within {worst:.1e} (max abs diff).")
    for batch in ("1", "64"):
        ratios = [r["acceptance"].get(f"batch{batch}_ours_over_best_tool") for r in ran]
        ratios = [x for x in ratios if x is not None]
        if ratios:
            body += f" Ours ÷ the best tool's speed at batch {batch}: {min(ratios):.2f}–{max(ratios):.2f}x."
    body += " Every model, variant and tool: [docs/onnx-fold.md](docs/onnx-fold.md)."
    names = {"ours_ran": "our pass did not run", "no_bn_derived_left": "BN-derived nodes left",
             "parity": "parity with the original lost"}  # export/bench_onnx_fold.py's goals (it exits 1 on any)
    short = [f"{r['model']}: {names[k]}" for r in b["results"] for k in names if r["acceptance"].get(k) is False]
    return Rendered(body, date=b["date"], command=b["command"], cpu=cpu_text(b.get("cpu")), short=short)


def render_serving(path: Path) -> Rendered:
    """bench_serve/results.json (python -m loadtest bench) or bench_real/summary.json (make bench-real): a row per
    model, ours at the most clients against the in-process ceiling and the best other setup; each goal short."""
    real = json.loads(path.read_text())
    if "meta" in real:  # one benchmark
        real = {"date": real["meta"]["date"], "command": real["meta"]["command"], "models": {real["meta"]["model_name"]: real}}
    rows, short, cpu = [], [], ""
    for name, res in real["models"].items():
        machine = res.get("meta", {}).get("cpu")
        cpu = cpu or (cpu_text(machine) if isinstance(machine, dict) else "")
        got = [r for r in res.get("rows", []) if r["round"] == 1 and r["kind"] in ("closed", "ceiling")]
        ceil = next((r for r in got if r["kind"] == "ceiling"), None)
        top = max((r["clients"] for r in got if r["setup"] == "ours"), default=None)
        at = {r["setup"]: r for r in got if r["clients"] == top and r["kind"] == "closed"}
        short += [f"{name}: {f}" for f in res.get("failed", [])]
        if not ceil or "ours" not in at:
            continue
        ours, others = at.pop("ours"), sorted(at.values(), key=lambda r: -r["img_s"])
        met = [g["met"] for g in res["goals"]]
        rows.append(f"| {name} | {ceil['img_s']:,.1f} | {ours['img_s']:,.1f} ({ours['img_s'] / ceil['img_s']:.2f}x) | "
                    f"{ours['p99_ms']:,.0f} | {ours['server_cpu_ms_per_img'] / ceil['server_cpu_ms_per_img']:.2f}x | "
                    + (f"{others[0]['setup']} {others[0]['img_s']:,.1f}, p99 {others[0]['p99_ms']:,.0f}" if others else "–")
                    + f" | {sum(met)} of {len(met)} |")
        short += [f"{name}: {g['goal'].split(': ', 1)[-1].split('; short at')[0]}" for g in res["goals"] if not g["met"]]
    body = "\n".join(["One image per request, keep-alive clients; ours at the most clients (every step, layout and load: "
                      "docs/service.md, \"Serving real models\", or the results.md beside the report):", "",
                      "| model | in-process ceiling img/s | ours img/s (× ceiling) | ours p99 ms | ours server CPU/img × "
                      "in-process | best other setup: img/s, p99 ms | goals met |", "|---|---|---|---|---|---|---|", *rows])
    return Rendered(body, date=real["date"], command=real.get("command", ""), cpu=cpu, short=short)


def render_soak(path: Path) -> Rendered:
    s = json.loads(path.read_text())
    body = (f"**{'PASS' if s['ok'] else 'FAIL'}** — {s['time']} at {s['offered_rps']:.0f} req/s offered "
            f"({s['achieved_rps']:.0f} achieved), {s['requests']:,} requests, {s['failures']} failures, p50 "
            f"{s['p50_ms']:.0f} ms, p99 {s['p99_ms']:.0f} ms, server RSS {s['rss_baseline_mib']:.0f} → "
            f"{s['rss_final_mib']:.0f} MiB ({s['rss_growth']:+.1%}) after {s['warmup_s']:.0f} s of warm-up.")
    return Rendered(body, date=s.get("date", date_of(path)), command=s.get("command", ""), cpu=cpu_text(s.get("cpu")),
                    short=list(s.get("reasons", [])) if not s["ok"] else [])


def render_deploy(path: Path) -> Rendered:
    """deploy/deploy_check.json, with the image make container built (artifacts/container.json)."""
    d, image = json.loads(path.read_text()), path.parent.parent / "container.json"
    lines, short = [], []
    if image.exists():
        c = json.loads(image.read_text())
        lines.append(f"`make container` (`{c['command']}`), {c['date']}, load average {c['load_average'][0]:.1f}: "
                     f"image {c['image']}, **{c['size_mb']:.0f} MB** (goal ≤ 500), user `{c['user']}`, ready in "
                     f"{c['ready_s']:.1f} s, `docker stop` drained and exited {c['exit_code']} after {c['stop_s']:.1f} s.")
        if c["size_mb"] > 500:
            short.append(f"image size {c['size_mb']:.0f} MB (goal ≤ 500)")
    r, k = d["rolling"], d["kill"]
    out_after = " and ".join(f"{step['sigterm_to_balancer_down_s']:.2f}" for step in r["steps"])
    lines.append(f"Load average before {d['load_average_before'][0]:.1f}: {d['pod']['replicas']} replicas behind "
                 f"HAProxy at {d['rate_rps']:.0f} req/s. Rolling replace: **{r['failed']} failed of {r['requests']:,}**, "
                 f"{d['wrong_labels']} wrong labels, p99 {r['p99_ms']:.0f} ms; the balancer took each old replica out "
                 f"{out_after} s after its SIGTERM. One replica SIGKILLed: {k['failed']} failed of {k['requests']:,} "
                 f"(requests in flight on it: {k['victim_sessions_in_flight']}), marked down after "
                 f"{k['balancer_down_after_s']:.2f} s, p99 {k['p99_ms']:.0f} ms. {'PASS' if d['passed'] else '**FAIL**'}.")
    if not d["passed"]:
        short += [f"{name}: {g.get('value')} (goal {g.get('goal')})" for name, g in d.get("goals", {}).items()
                  if not g.get("pass")] or ["deploy-check failed"]
    return Rendered("\n\n".join(lines), date=d["date"], command=d["command"], cpu=cpu_text(d.get("cpu")), short=short)


# (`make recipes` and `make keras-seeds` are kept in docs/training.md and docs/onnx-fold.md, not here)
SECTIONS = [
    Section("model", "Model: accuracy, fold parity, onnxruntime speed", "results.md", "make pipeline", render_model,
            measures=("training/", "export/"), cpu_dependent="the accuracy's 4th digit and the speeds"),
    Section("pipeline-times", "`make pipeline`: wall seconds per stage", "pipeline_times.json", "make pipeline",
            render_pipeline_times, measures=("Makefile", "scripts/pipeline.py", "training/", "export/"),
            cpu_dependent="the times"),
    Section("bench-zoo", "Real models: torchvision and timm through `python -m export`, beside the tools people use "
            "instead", "bench_zoo/results.json", "make bench-zoo", render_zoo, measures=("export/", "bench/zoo.py"),
            plots=("bench_zoo/bn_left.png",), cpu_dependent="the seconds"),
    Section("bench-onnx-fold", "ONNX fold pass vs onnxoptimizer / onnxsim / onnxslim", "bench_onnx_fold/results.json",
            "make bench-onnx-fold", render_onnx_fold,
            measures=("export/onnx_fold.py", "export/onnx_graph.py", "export/bench_onnx_fold.py"),
            plots=("bench_onnx_fold/throughput.png",), cpu_dependent="the speed ratios"),
    Section("bench-serve", "Serving benchmark: ours vs the in-process ceiling, naive FastAPI and the peers",
            "bench_serve/results.json", "make bench-serve", render_serving, measures=("service/", "loadtest/"),
            plots=("bench_serve/bench_serve.png",), cpu_dependent="the rates, latencies and CPU times"),
    Section("bench-real", "Serving real models: seed-cnn, MobileNetV2, ResNet-50, YOLOv8n made by the CLI",
            "bench_real/summary.json", "make bench-real", render_serving,
            measures=("service/", "loadtest/", "bench/real.py"), plots=("bench_real/resnet50/bench/bench_serve.png",),
            cpu_dependent="the rates, latencies and CPU times"),
    Section("soak", "Soak", "soak/soak.json", "make soak", render_soak, measures=("service/",), plots=("soak/soak.png",),
            cpu_dependent="the rates"),
    Section("faults", "Fault battery", "faults/faults.json", "make faults", render_faults,
            measures=("service/", "loadtest/faults.py"), cpu_dependent="the timings"),
    Section("deploy", "Container image and rolling replace", "deploy/deploy_check.json", "make deploy-check",
            render_deploy, measures=("deploy/", "service/"), cpu_dependent="the timings"),
]


# --- the framework: date, command, CPU, staleness, short goals ------------------------------------

def changed_since(repo: Path, date: str, paths: tuple[str, ...]) -> str | None:
    """The commits (not merges) after `date` (local time; a bare day counts from its start) that touch
    `paths`: "3 commits, the latest abc1234 2026-12-05 'subject'"; None when there are none, or when
    this is not a git checkout (then nothing can be said)."""
    when = re.search(r"\d{4}-\d{2}-\d{2}(?:[ T]\d\d:\d\d(?::\d\d)?)?", date or "")
    if not paths or not when:
        return None
    since = when.group(0) if len(when.group(0)) > 10 else f"{when.group(0)} 00:00:00"  # git fills a bare day with now
    try:
        out = subprocess.run(["git", "-C", str(repo), "log", "--no-merges", "--format=%h %cd %s",
                              "--date=format:%Y-%m-%d", f"--since={since}", "--", *paths],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    commits = out.stdout.strip().splitlines() if out.returncode == 0 else []
    if not commits:
        return None
    sha, day, subject = commits[0].split(" ", 2)
    count = f"{len(commits)} commits, the latest" if len(commits) > 1 else "1 commit,"
    return f"{count} {sha} {day} '{subject[:70]}{'…' if len(subject) > 70 else ''}'"


def head_line(section: Section, r: Rendered) -> str:
    command = f"`{section.command}`" + (f" (`{r.command}`)" if r.command and r.command != section.command else "")
    cpu = (f"; CPU: {r.cpu}" if r.cpu else "; CPU not recorded") if section.cpu_dependent else ""
    depends = f" ({section.cpu_dependent} depend on the CPU)" if section.cpu_dependent else ""
    return f"{command}, {r.date}{cpu}{depends}:"


def explained(section: Section, short: list[str], report_why: dict | None = None) -> tuple[list[str], list[str]]:
    """One line per short goal or failed check: its explanation, or a marker that it has none yet."""
    lines, missing = [], []
    for item in short:
        why = next((text for (key, start), text in EXPLAINED.items() if key == section.key and item.startswith(start)),
                   None)
        if why is None:
            missing.append(f"{section.key}: {item}")
        lines.append(f"- **Short:** {item} — {why or '**not explained yet**'}")
    return lines, missing


def stale_line(section: Section, date: str, repo: Path) -> str:
    change = changed_since(repo, date, section.measures)
    if change is None:
        return ""
    return (f"**Stale:** measured {date}; the code it measures ({', '.join(section.measures)}) changed since in "
            f"{change}. Re-run `{section.command}`, then `make readme-results`.")


def sections_of(old_block: str) -> dict[str, str]:
    """The README's current results block, section title -> its text."""
    found = re.split(r"^### (.+)\n", old_block, flags=re.M)
    return {title: text.strip() for title, text in zip(found[1::2], found[2::2])}


def kept_section(section: Section, old: str, repo: Path) -> str:
    """A section whose report is not here: the README's text as it was, its stale line redone from the date
    it records (its marker, else the first date in it)."""
    lines = [line for line in old.splitlines() if not line.startswith("**Stale:**")]
    mark = MARK.search(lines[0]) if lines else None
    date = mark.group("date") if mark else next(
        (m.group(0) for m in map(re.compile(r"\d{4}-\d{2}-\d{2}( \d\d:\d\d)?").search, lines) if m), "")
    head = lines[:2] if mark else []  # the marker and the command/date line stay on top
    rest = "\n".join(lines[len(head):]).strip()
    stale = stale_line(section, date, repo)
    return "\n".join([*head, *([f"\n{stale}\n"] if stale else []), f"\n{rest}" if head else rest]).strip()


def block(artifacts: Path, img_dir: Path, repo: Path, old_block: str = "") -> tuple[str, list[str]]:
    parts = [BEGIN, "<!-- generated by `make readme-results` from the latest reports; edit scripts/readme_results.py -->"]
    kept, unexplained = sections_of(old_block), []
    for section in SECTIONS:
        path = artifacts / section.report
        parts.append(f"\n### {section.title}\n")
        if not path.exists():
            old = kept.get(section.title, "")
            parts.append(kept_section(section, old, repo) if old and not old.startswith("Not measured yet") else
                         f"Not measured yet: `{section.command}` writes {artifacts / section.report}.")
            continue
        r = section.render(path)
        parts.append(f"<!-- section: {section.key} · measured: {r.date} · command: {r.command or section.command} -->")
        parts.append(head_line(section, r))
        for line in (stale_line(section, r.date, repo), r.note):
            if line:
                parts.append(f"\n{line}")
        parts.append(f"\n{r.body}")
        lines, missing = explained(section, r.short)
        unexplained += missing
        if lines:
            parts.append("\n" + "\n".join(lines))
        links = []
        for plot in section.plots:
            if (artifacts / plot).exists():
                img_dir.mkdir(parents=True, exist_ok=True)
                target = img_dir / plot.replace("/", "-")
                shutil.copyfile(artifacts / plot, target)
                links.append(f"![{Path(plot).stem}]({target.relative_to(repo)})")
        if links:
            parts.append("\n" + " ".join(links))
    parts.append(END)
    return "\n".join(parts), unexplained


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
    new, unexplained = block(args.artifacts, repo / "docs" / "img" / "results", repo, rest.split(END, 1)[0])
    write_text(args.readme, head + new + rest.split(END, 1)[1])
    print(f"readme_results: {args.readme} results block rewritten from {args.artifacts}/")
    for item in unexplained:
        print(f"readme_results: short and not explained yet (add a line to EXPLAINED): {item}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
