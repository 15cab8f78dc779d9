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
from datetime import datetime, timedelta
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
    optional: bool = False               # left out while its report is missing (another section covers it)


# Why a goal is short or a check failed, one line each, where the report cannot say it itself:
# (section key, the start of the short phrase) -> the line. Unused entries do nothing.
EXPLAINED: dict[tuple[str, str], str] = {
    ("faults", "overload"): "3x a 0.06 ms model is ~17,700 req/s asked of a load generator on the same 2 cores "
                            "(0.6 of a core): it stops at its own 2,048-connection cap; the service answered every "
                            "request it got, 200 or a 503 with Retry-After (0 timeouts, 0 resets), but ~400,000 "
                            "rejections at ~46 µs each and the generator leave ~0.4x for the model (ResNet-50, where "
                            "the generator costs little: 0.93x, 28 of 28; docs/service.md)",
    ("bench-real", "throughput ÷ ceiling"): "YOLOv8n: the model costs in the service what it costs in-process, "
                                             "the service adds ~3 ms a request for its 3.8 MB of tensors and the "
                                             "load generator ~2 ms on the same 2 cores, where 0.9x leaves 2.7 ms for "
                                             "both; ResNet-50 (FP32 and INT8): one step in four at 0.92–0.94x, the "
                                             "others 0.96–0.99x, against a ceiling timed around each step that "
                                             "itself moves ±3% (docs/service.md)",
    ("bench-real", "server CPU per image"): "~1.3 ms a request of the service's own work (body, ASGI stack, "
                                             "answer) beside 7.5 ms (FP32) or 4 ms (INT8) of MobileNetV2",
    ("bench-real", "open loop at 0.9x capacity"): "for a 0.06 ms model the open loop's extra connections cost more "
                                                   "than the model: its open-loop capacity is below the closed-loop "
                                                   "peak the rate is set from",
    ("bench-real", "probes while busy"): "one slow probe per step, at 32 clients only: that step opens 32 "
                                          "connections at once and the probe waits behind them (4–16 clients: "
                                          "p99 ≤ 14 ms; ResNet-50 at 448 px saturated: 48 ms)",
    ("bench-real", "peers"): "seed-cnn's p99 at 1–4 clients is 0.3–1 ms above naive FastAPI's, KServe's and "
                             "ours@946ad9a's at 1.02–1.9x their throughput; ResNet-50 at 8 clients: 412 against "
                             "naive FastAPI's 408 ms at 1.04x its throughput",
    ("bench-zoo", "mobileone_s0"): "ours runs as fast as timm's own merged model (170 vs 166 img/s; 3.69–3.80x in "
                                   "the runs before): the as-exported branch model runs faster here than where the "
                                   "issue measured 4.45x for timm's merge",
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
    kept = re.search(r"\n\nBatchNorms kept: (.*)", text)
    if kept and re.search(r"^Fold exactness .*$", text, flags=re.M):  # said with the exactness, not a paragraph of its own
        text = text.replace(kept.group(0), "")
        text = re.sub(r"^(Fold exactness .*)$", lambda m: f"{m.group(1)} BatchNorms kept: {kept.group(1)}.", text,
                      count=1, flags=re.M)
    speed = re.search(r"^\| images/s, 1 thread \| batch 1 \| batch 64 \|\n\|[-|]+\|\n((?:\|.*\|\n?)+)", text, flags=re.M)
    if speed:  # the speed table in one line (the README's length; the table stays in results.md)
        cells = [[c.strip() for c in row.strip("|").split("|")] for row in speed.group(1).strip().splitlines()]
        text = text.replace(speed.group(0), "Images/s on 1 thread, batch 1 · batch 64: " + "; ".join(
            f"{name} {b1} · {b64}" for name, b1, b64 in cells) + "\n")
    cpu = ""
    report = path.parent / "export_report.json"
    if report.exists():
        run = json.loads(report.read_text()).get("run")
        config = Path(run) / "config.json" if run else None
        if config and config.exists():
            cpu = cpu_text(json.loads(config.read_text()).get("machine"))
    return Rendered(text.strip(), date=date_of(path), cpu=cpu)


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
    merges, short = render_merges(models)
    return Rendered(text + merges, date=meta["dates"], command=meta.get("command", "make bench-zoo"),
                    cpu=cpu_text(meta.get("cpu")), short=short)


def render_merges(models: list[dict]) -> tuple[str, list[str]]:
    """The re-parameterizable models' rows (bench/zoo_merge.py) against issue 23's goals: 0 BNs left,
    Conv nodes ≤ timm's reparameterize_model, every merge ≤ 1e-9 of the output in float64, and
    mobileone_s0 ≥ 4x the as-exported model's onnxruntime img/s."""
    rows, short = [], []
    for m in models:
        g = m.get("merge")
        if not g or "error" in g:
            short += [f"{m['name']}: merge part: {g['error']}"] if g else []
            continue
        c, ours = g["conv"], g["diff"]["ours"]
        rows.append(f"| {m['name']} | {g['bn_left']} | {c['ours']} · {c['timm']} · {c['as exported']} | "
                    f"{ours['relative']:.0e} · {g['diff']['timm (float32 merge)']['relative']:.0e} | "
                    f"{g['img_s']['ours']:.0f} · {g['img_s']['as exported']:.0f} · {g['img_s']['timm']:.0f} | "
                    f"**{g['speedup']:.2f}x** |")
        short += [f"{m['name']}: {g['bn_left']} BNs left"] if g["bn_left"] else []
        short += [f"{m['name']}: {c['ours']} Conv nodes, timm's {c['timm']}"] if c["ours"] > c["timm"] else []
        short += [f"{m['name']}: merge {ours['relative']:.1e} of the output (goal 1e-9)"] if not ours["relative"] <= 1e-9 else []
        short += [f"mobileone_s0: {g['speedup']:.2f}x the as-exported img/s (goal 4x)"] \
            if m["name"] == "mobileone_s0" and g["speedup"] < 4 else []
    if not rows:
        return "", short
    return " " + "\n".join([  # the intro goes on in the paragraph before
        "Train-time branches merged into one conv (ours vs timm's `reparameterize_model`; onnxruntime 1 thread, batch 1, "
        "one run):", "", "| model | BNs left | Conv: ours · timm · as exported | float64 |diff| rel.: ours · timm | "
        "img/s: ours · as exported · timm | ours / as exported |", "|---|---|---|---|---|---|", *rows]), short


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


SERVING_KINDS = (("throughput ÷ ceiling", "throughput ÷ in-process"), ("server CPU per image", "server CPU per image"),
                 ("open loop at 0.9x capacity", "open loop"), ("probes while busy", "/livez"), ("peers", "ours vs"))


def render_serving(path: Path) -> Rendered:
    """bench_serve/results.json (python -m loadtest bench) or bench_real/summary.json (make bench-real): a row per
    model, ours at the most clients against the in-process ceiling and the best other setup; each goal short."""
    real = json.loads(path.read_text())
    if "meta" in real:  # one benchmark
        real = {"date": real["meta"]["date"], "command": real["meta"]["command"], "models": {real["meta"]["model_name"]: real}}
    rows, short, cpu, grouped = [], [], "", {}
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
        c = {k: ours.get(f"ceiling_{k}", ceil[k]) for k in ("img_s", "server_cpu_ms_per_img")}  # timed around that step
        rows.append(f"| {name} | {c['img_s']:,.1f} | {ours['img_s']:,.1f} ({ours['img_s'] / c['img_s']:.2f}x) | "
                    f"{ours['p99_ms']:,.0f} | {ours['server_cpu_ms_per_img'] / c['server_cpu_ms_per_img']:.2f}x | "
                    + (f"{others[0]['setup']} {others[0]['img_s']:,.1f}, p99 {others[0]['p99_ms']:,.0f}" if others else "–")
                    + f" | {sum(met)} of {len(met)} |")
        for g in res["goals"]:
            if not g["met"]:
                text = g["goal"].split(": ", 1)[-1].split("; short at")[0].split(" (goal")[0]
                kind = next((k for k, marker in SERVING_KINDS if marker in text), "other")
                grouped.setdefault(kind, []).append(f"{name} {text.split(': ', 1)[-1] if kind != 'peers' else text}")
    # one line per kind of goal, the models it is short for side by side (each kind explained once: EXPLAINED)
    short += [f"{kind}: " + "; ".join(items) for kind, items in grouped.items()]
    body = "\n".join(["| model | in-process ceiling img/s | ours img/s, most clients, 1 image a request (× ceiling) | ours p99 ms | ours server CPU/img × "
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


INT8_DEFAULT = "per-channel + CLE + absorb + BC"  # what `python -m export --int8` does
INT8_GOALS = {"seed-cnn": (INT8_DEFAULT, 0.2), "deep-cnn": (INT8_DEFAULT, 0.2), "mobile-cnn": (INT8_DEFAULT, 0.5)}


def render_int8(path: Path) -> Rendered:
    """bench_int8/results.json (python -m export.bench_int8 all): accuracy drop per variant on our runs,
    INT8 against FP32 img/s on one thread; the issue's goals as short phrases."""
    r = json.loads(path.read_text())
    ablation, speed, short = r.get("ablation", {}), r.get("speed", {}), []
    columns = (INT8_DEFAULT, "per-channel naive", "per-tensor naive", "per-tensor + CLE + absorb + BC")
    rows = []
    for model, variants in ablation.items():
        drops = [f"{variants[c]['drop_pp']:+.2f}" if c in variants else "—" for c in columns]
        s1 = speed.get(model, {}).get("batches", {})
        ratio = " / ".join(f"{t['INT8 (published)']['vs_fp32']:.2f}x" if "INT8 (published)" in t else "—" for t in s1.values())
        rows.append(f"| {model} | {100 * next(iter(variants.values()))['accuracy_float64']:.2f}% | "
                    + " | ".join(drops) + f" | {ratio or '—'} |")
        want = INT8_GOALS.get(model)
        if want and want[0] in variants and variants[want[0]]["drop_pp"] > want[1]:
            short.append(f"{model} INT8 drop {variants[want[0]]['drop_pp']:.2f} points (goal ≤ {want[1]:g})")
        if model == "mobile-cnn" and columns[3] in variants and variants[columns[3]]["drop_pp"] > 1.0:
            short.append(f"mobile-cnn per-tensor with equalization + bias correction: drop "
                         f"{variants[columns[3]]['drop_pp']:.2f} points (goal ≤ 1)")
    zoo = []
    for model, row in speed.items():
        if model in ablation:
            continue
        b1 = row["batches"].get("1", {}).get("INT8 (published)")
        if b1 is None:
            continue
        verified = row.get("int8", {}).get("outputs", {})
        sqnr = ", ".join(f"SQNR {o['sqnr_db']:.1f} dB" for o in verified.values())
        zoo.append(f"{model} {b1['vs_fp32']:.2f}x ({sqnr})" if sqnr else f"{model} {b1['vs_fp32']:.2f}x")
        if model == "resnet50" and b1["vs_fp32"] < 1.5:
            short.append(f"ResNet-50 INT8 at batch 1 {b1['vs_fp32']:.2f}x FP32 in-process (goal ≥ 1.5x)")
    batches = " / ".join(f"batch {b}" for b in next(iter(speed.values()), {}).get("batches", {})) or "—"
    body = "\n".join([
        f"Accuracy drop against the float64 model on the 10,000 test images (points; INT8 as served: onnxruntime, "
        f"the service's session settings), and INT8 ÷ FP32 img/s on one thread ({batches}); load average "
        f"{r['load_average_before'][0]:.1f} before, {r.get('load_average_after', ['?'])[0]} after:", "",
        "| model | float64 | `--int8` (per-channel + CLE + absorption + BC) | per-channel, naive | per-tensor, naive | "
        "per-tensor + CLE + absorption + BC | INT8 ÷ FP32 |", "|---|---|---|---|---|---|---|", *rows] +
        ([f"", f"At batch 1 in-process, INT8 ÷ FP32: {'; '.join(zoo)} (calibrated random weights, random calibration: "
          f"a speed benchmark). Every variant, the per-layer SQNR and QDQ against QOperator: [docs/int8.md](docs/int8.md)."]
         if zoo else ["", "Every variant and the per-layer SQNR: [docs/int8.md](docs/int8.md)."]))
    return Rendered(body, date=r["date"], command=r["command"], cpu=cpu_text(r.get("cpu")), short=short)


# (`make recipes` and `make keras-seeds` are kept in docs/training.md and docs/onnx-fold.md, not here)
SECTIONS = [
    Section("model", "Model: accuracy, fold parity, onnxruntime speed", "results.md", "make pipeline", render_model,
            measures=("training/", "export/"), cpu_dependent="the accuracy's 4th digit and the speeds"),
    Section("pipeline-times", "`make pipeline`: wall seconds per stage", "pipeline_times.json", "make pipeline",
            render_pipeline_times, measures=("Makefile", "scripts/pipeline.py", "training/", "export/"),
            cpu_dependent="the times"),
    Section("bench-zoo", "Real models: torchvision and timm through `python -m export`, beside the tools people use "
            "instead", "bench_zoo/results.json", "make bench-zoo", render_zoo, measures=("export/", "bench/zoo.py", "bench/zoo_merge.py"),
            plots=("bench_zoo/bn_left.png",), cpu_dependent="the seconds and img/s"),
    Section("int8", "INT8 on this host: accuracy and speed", "bench_int8/results.json", "make bench-int8", render_int8,
            measures=("export/int8.py", "export/int8_graph.py", "export/int8_quant.py", "export/int8_check.py",
                      "export/bench_int8.py", "training/models.py"),
            plots=("bench_int8/ablation.png",), cpu_dependent="the speeds, and which INT8 kernels ran"),
    Section("bench-onnx-fold", "ONNX fold pass vs onnxoptimizer / onnxsim / onnxslim", "bench_onnx_fold/results.json",
            "make bench-onnx-fold", render_onnx_fold,
            measures=("export/onnx_fold.py", "export/onnx_graph.py", "export/bench_onnx_fold.py"),
            plots=("bench_onnx_fold/throughput.png",), cpu_dependent="the speed ratios"),
    Section("bench-serve", "Serving benchmark: ours vs the in-process ceiling, naive FastAPI and the peers",
            "bench_serve/results.json", "make bench-serve", render_serving, measures=("service/", "loadtest/"),
            plots=("bench_serve/bench_serve.png",), cpu_dependent="the rates, latencies and CPU times",
            optional=True),  # make bench-real runs the same benchmark on seed-cnn and the real models
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
    if len(since) == 19:  # to the second: git's --since counts that second too, and a commit in it is what was measured
        since = (datetime.strptime(since.replace("T", " "), "%Y-%m-%d %H:%M:%S") + timedelta(seconds=1)).strftime("%Y-%m-%d %H:%M:%S")
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
    if stale:  # figures older than the code they measure: the command and date, why stale; the figures in history
        head = head or [line for line in lines if line.strip()][:1]  # its command and date
        return "\n".join([*head, f"{stale} Its figures of then: `git log -p -- README.md`."]).strip()
    return "\n".join([*head, f"\n{rest}" if head else rest]).strip()


def block(artifacts: Path, img_dir: Path, repo: Path, old_block: str = "") -> tuple[str, list[str]]:
    parts = [BEGIN, "<!-- generated by `make readme-results` from the latest reports; edit scripts/readme_results.py -->"]
    kept, unexplained = sections_of(old_block), []
    for section in SECTIONS:
        path = artifacts / section.report
        if section.optional and not path.exists():
            continue
        parts.append(f"\n### {section.title}\n")
        if not path.exists():
            old = kept.get(section.title, "")
            parts.append(kept_section(section, old, repo) if old and not old.startswith("Not measured yet") else
                         f"Not measured yet: `{section.command}` writes {artifacts / section.report}.")
            continue
        r = section.render(path)
        parts.append(f"<!-- section: {section.key} · measured: {r.date} · command: {r.command or section.command} -->")
        parts.append(head_line(section, r))
        stale = stale_line(section, r.date, repo)
        extra = ([stale] if stale else []) + ([f"\n{r.note}"] if r.note else [])  # the stale line under the head line
        parts += extra
        # a sentence goes on in the head line's paragraph; a table, a plot or anything after a stale line or note apart
        parts.append(r.body if r.body[:1] not in "|!<" and not extra else f"\n{r.body}")
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
