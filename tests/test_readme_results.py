"""scripts/readme_results.py: the README's results block is rebuilt from the reports that exist,
each with its command, date, CPU and freshness, and says which command makes each missing one."""
import importlib.util
import json
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n" + b"\0" * 16


def load_script():
    spec = importlib.util.spec_from_file_location("readme_results", ROOT / "scripts" / "readme_results.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def git(repo: Path, *args: str, date: str | None = None) -> None:
    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t",
           "HOME": str(repo), "PATH": os.environ["PATH"], **({"GIT_AUTHOR_DATE": date, "GIT_COMMITTER_DATE": date}
                                                             if date else {})}
    subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, env=env)


def commit(repo: Path, path: str, date: str, message: str) -> None:
    (repo / path).parent.mkdir(parents=True, exist_ok=True)
    (repo / path).write_text(message)
    git(repo, "add", path)
    git(repo, "commit", "-q", "-m", message, date=date)


def test_block_is_rebuilt_from_the_reports_that_exist(tmp_path, capsys):
    """Every section opens with its command, date and (where its numbers depend on it) the CPU; a section older
    than the code it measures is marked stale with the commit that changed it; a short goal or a FAIL gets one
    line of why (or is marked unexplained, and the script says so); a missing report keeps the README's text."""
    script = load_script()
    repo, artifacts = tmp_path / "repo", tmp_path / "artifacts"
    (artifacts / "faults").mkdir(parents=True)
    repo.mkdir()
    git(repo, "init", "-q")
    commit(repo, "loadtest/core.py", "2026-12-05T10:00:00", "loadtest: a faster sampler")
    (artifacts / "pipeline_times.json").write_text(json.dumps({
        "command": "make pipeline", "date": "2026-12-07 13:21", "complete": True, "goal_s": 300,
        "load_average_before": [0.4, 0.5, 0.6], "load_average_after": [1.9, 1, 1],
        "cpu": {"model": "AMD EPYC", "isa": "AVX-512 VNNI", "cores": 2},
        "stages": [{"stage": "set-up", "seconds": 22.4, "ran": True}, {"stage": "data", "seconds": 0.1, "ran": True},
                   {"stage": "train", "seconds": 169.1, "ran": True}, {"stage": "export+verify", "seconds": 17.7, "ran": True}]}))
    (artifacts / "runs" / "seed-cnn").mkdir(parents=True)
    (artifacts / "runs" / "seed-cnn" / "config.json").write_text(json.dumps(
        {"machine": {"model": "AMD EPYC", "isa": "AVX-512 VNNI", "cores": 2}}))
    (artifacts / "export_report.json").write_text(json.dumps({"run": str(artifacts / "runs" / "seed-cnn")}))
    (artifacts / "results.md").write_text(
        "Model `seed-cnn` (artifacts/runs/seed-cnn):\n\n| form | test accuracy |\n|---|---|\n| torch folded | 0.92 |\n"
        "\nFolded graph nodes: {'Conv': 1}\n")
    (artifacts / "soak").mkdir()
    (artifacts / "soak" / "soak.json").write_text(json.dumps({"ok": False, "reasons": ["p99 80 ms > 50"], "time": "1m",
        "offered_rps": 100, "achieved_rps": 99, "requests": 6000, "failures": 0, "p50_ms": 4, "p99_ms": 80,
        "rss_baseline_mib": 400, "rss_final_mib": 401, "rss_growth": 0.0025, "warmup_s": 90,
        "command": "python -m loadtest soak", "date": "2026-11-24"}))
    (artifacts / "bench_serve").mkdir()
    (artifacts / "bench_serve" / "bench_serve.png").write_bytes(PNG)
    row = {"round": 1, "kind": "closed", "p99_ms": 300.0}
    (artifacts / "bench_serve" / "results.json").write_text(json.dumps({
        "meta": {"command": "python -m loadtest bench --model m.onnx", "date": "2026-11-23 15:00", "model_name": "resnet50"},
        "rows": [{**row, "setup": "ceiling", "kind": "ceiling", "clients": 2, "img_s": 26.0, "server_cpu_ms_per_img": 76.0},
                 {**row, "setup": "ours", "clients": 8, "img_s": 20.0, "server_cpu_ms_per_img": 80.0},
                 {**row, "setup": "ours", "clients": 32, "img_s": 25.0, "server_cpu_ms_per_img": 79.8},
                 {**row, "setup": "triton", "clients": 32, "img_s": 24.6, "p99_ms": 330.0},
                 {**row, "setup": "kserve", "clients": 32, "img_s": 15.5, "p99_ms": 900.0}],
        "failed": ["round 1: torchserve: pip could not install it"],
        "goals": [{"goal": "round 1: ours' throughput ÷ in-process at 4–32 clients: 0.77–0.96x (goal ≥ 0.95x at each); "
                           "short at 8: 0.77x", "met": False}, {"goal": "round 1: open loop: all 200", "met": True}]}))
    (artifacts / "faults" / "faults.json").write_text(json.dumps({
        "command": "python -m loadtest.faults", "date": "2026-12-06 10:00", "workers": 2, "load_average_before": [0.5],
        "scenarios": {"kill": {"checks": [{"figure": "lost requests", "value": 0, "goal": 0, "pass": True}]},
                      "overload": {"checks": [{"figure": "goodput", "value": "0.72x", "goal": ">= 0.8x", "pass": False}]},
                      "stalled": {"checks": [{"figure": "closed", "value": "190/200", "goal": "200/200", "pass": False}]}}}))
    readme = repo / "README.md"
    readme.write_text(f"# x\n\nbefore\n{script.BEGIN}\nold text\n\n### Container image and rolling replace\n\n"
                      f"`make deploy-check`, 2026-12-01 23:39: the old figures\n\n### Soak\n\nthe old soak\n{script.END}\nafter\n")
    commit(repo, "deploy/check.py", "2026-12-03T10:00:00", "deploy: a new check")

    assert script.main(["--artifacts", str(artifacts), "--readme", str(readme)]) == 0
    text, err = readme.read_text(), capsys.readouterr().err
    assert text.startswith("# x\n\nbefore\n") and text.endswith("after\n") and "old text" not in text
    sections = script.sections_of(text.split(script.BEGIN)[1].split(script.END)[0])
    times = sections["`make pipeline`: wall seconds per stage"]
    assert "`make pipeline`, 2026-12-07 13:21; CPU: AMD EPYC, AVX-512 VNNI, 2 cores (the times depend on the CPU):" in times
    assert "set-up 22 · data 0 · train 169 · export+verify 18 → **total 209 s** (3.5 min); load average 0.4 before, " \
        "1.9 after." in times and "Stale" not in times and "Short" not in times
    model = sections["Model: accuracy, fold parity, onnxruntime speed"]
    assert "; CPU: AMD EPYC, AVX-512 VNNI, 2 cores (the accuracy's 4th digit and the speeds depend on the CPU)" in model
    assert "| torch folded | 0.92 |" in model and "Folded graph nodes" not in model
    # stale: loadtest/ changed after the benchmark ran; the soak measures service/ only, which did not
    serve = sections["Serving benchmark: ours vs the in-process ceiling, naive FastAPI and the peers"]
    assert "`make bench-serve` (`python -m loadtest bench --model m.onnx`), 2026-11-23 15:00; CPU not recorded" in serve
    assert "**Stale:** measured 2026-11-23 15:00; the code it measures (service/, loadtest/) changed since in 1" in serve
    assert "'loadtest: a faster sampler'" in serve and "Re-run `make bench-serve`" in serve
    # one row at the most clients: ours against the ceiling and the best other setup; what is short, what did not run
    assert "| resnet50 | 26.0 | 25.0 (0.96x) | 300 | 1.05x | triton 24.6, p99 330 | 1 of 2 |" in serve
    assert "- **Short:** throughput ÷ ceiling: resnet50 0.77–0.96x — **not explained yet**" in serve  # (test repo: none)
    assert "- **Short:** resnet50: round 1: torchserve: pip could not install it" in serve
    assert (repo / "docs" / "img" / "results" / "bench_serve-bench_serve.png").read_bytes() == PNG
    assert "![bench_serve](docs/img/results/bench_serve-bench_serve.png)" in serve
    soak = sections["Soak"]
    assert "**FAIL**" in soak and "Stale" not in soak and "the old soak" not in soak
    faults = sections["Fault battery"]
    assert "- **Short:** overload: goodput 0.72x (goal >= 0.8x) — 3x a 0.06 ms model is ~17,700 req/s asked of a load generator on the same 2 cores" in faults
    assert "- **Short:** stalled: closed 190/200 (goal 200/200) — **not explained yet**" in faults
    assert "short and not explained yet (add a line to EXPLAINED): faults: stalled" in err and "overload" not in err
    assert "Not measured yet: `make bench-onnx-fold`" in text  # never measured
    # a report missing from artifacts/ keeps the section the README had, its freshness checked from its own date
    deploy = sections["Container image and rolling replace"]
    # (stale: its command and date, the stale line; figures older than the code stay in the README's history)
    assert deploy.startswith("`make deploy-check`, 2026-12-01 23:39: the old figures\n**Stale:** measured 2026-12-01 "
                             "23:39; the code it measures (deploy/, service/)")
    assert "'deploy: a new check'" in deploy and deploy.endswith("Its figures of then: `git log -p -- README.md`.")

    # run again on its own output: the same text (the stale lines are redone, not stacked)
    assert script.main(["--artifacts", str(artifacts), "--readme", str(readme)]) == 0
    assert readme.read_text() == text


def test_readme_without_the_markers_is_refused(tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text("# no block\n")
    assert load_script().main(["--artifacts", str(tmp_path), "--readme", str(readme)]) == 2
    assert readme.read_text() == "# no block\n" and "no <!-- results:begin -->" in capsys.readouterr().err


def test_zoo_and_deployment_reports_are_summed_up_not_copied(tmp_path):
    """bench-zoo's records become one paragraph (published, BNs left per tool, what we keep); the
    rolling replace and the image one each; their numbers come from the reports."""
    script = load_script()
    artifacts = tmp_path / "artifacts"
    (artifacts / "bench_zoo").mkdir(parents=True)
    (artifacts / "deploy").mkdir()
    peer = {"left": 3, "check": {"matches": True}}
    models = [
        {"name": "resnet50", "bns": 53, "peers": {"unfolded": {"bn_nodes": 53}, **{t: dict(peer, left=0) for t in script.PEERS}},
         "ours": {"exit": 0, "published": True, "bn_left": 0, "kept": 0, "seconds": 31.1, "rows": 16, "check": {"matches": True}}},
        {"name": "mixnet_s", "bns": 49, "peers": {"unfolded": {"bn_nodes": 49}, **{t: dict(peer, left=34) for t in script.PEERS},
                                                 "onnxsim": {"left": 34, "check": {"matches": False}}},
         "ours": {"exit": 0, "published": True, "bn_left": 0, "kept": 0, "seconds": 32, "rows": 16, "check": {"matches": True}}},
        {"name": "densenet121", "bns": 121, "peers": {t: dict(peer, left=62) for t in script.PEERS},
         "ours": {"exit": 1, "published": False, "bn_left": 62, "kept": 62, "seconds": 80, "rows": 16}},
        {"name": "never_run", "bns": 7, "ours": {}},
    ]
    (artifacts / "bench_zoo" / "results.json").write_text(json.dumps(
        {"meta": {"dates": "2026-12-02 00:36 to 01:00", "load": "0.4 to 1.2", "versions": "torch 2.14.1"}, "models": models}))
    (artifacts / "deploy" / "deploy_check.json").write_text(json.dumps({
        "command": "python -m deploy.check", "date": "2026-12-01 23:39", "load_average_before": [3.7, 4, 5],
        "pod": {"replicas": 2}, "rate_rps": 100, "wrong_labels": 0, "passed": True,
        "rolling": {"failed": 0, "requests": 4953, "p99_ms": 30.2, "steps": [{"sigterm_to_balancer_down_s": 0.25},
                                                                          {"sigterm_to_balancer_down_s": 0.5}]},
        "kill": {"failed": 1, "requests": 579, "victim_sessions_in_flight": 1, "balancer_down_after_s": 0.82,
                 "p99_ms": 1015.6}}))
    (artifacts / "container.json").write_text(json.dumps({
        "command": "python -m deploy.container", "date": "2026-12-01 23:49", "load_average": [5.3, 5, 5],
        "image": "bnfold-classifier:abc", "size_mb": 382.4, "user": "bentoml", "ready_s": 4.9, "exit_code": 0,
        "stop_s": 6.87}))
    readme = tmp_path / "README.md"
    readme.write_text(f"{script.BEGIN}\n{script.END}\n")
    assert script.main(["--artifacts", str(artifacts), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert "**2 of 3 published**" in text and "of the 223 the models run: **ours 62**" in text  # 53 + 49 + 121
    assert "dynamo optimize 96" in text and "onnxsim 96" in text  # 0 + 34 + 62
    assert "ours 0, dynamo optimize 0, onnxsim 1" in text  # onnxsim's mixnet_s no longer matches
    assert "Kept by us, each with its reason in the report: densenet121 62." in text
    assert "ResNet-50 at 224x224 exported and verified in 31 s (16 rows)" in text
    assert "**382 MB** (goal ≤ 500)" in text and "user `bentoml`" in text
    assert "Rolling replace: **0 failed of 4,953**" in text and "0.25 and 0.50 s after its SIGTERM" in text
    assert "One replica SIGKILLed: 1 failed of 579 (requests in flight on it: 1)" in text and "PASS." in text


def test_the_onnx_fold_benchmark_is_one_paragraph_and_a_missed_goal_is_said(tmp_path):
    script = load_script()
    row = lambda model, left, parity, b1, b64: {  # noqa: E731
        "model": model, "variants": {"original": {"bn_derived_left": 2, "nodes": 28},
                                     "ours": {"bn_derived_left": left, "nodes": 7, "parity": {"max_abs_diff": 9.2e-7}}},
        "acceptance": {"ours_ran": True, "no_bn_derived_left": left == 0, "parity": parity,
                       "batch1_ours_over_best_tool": b1, "batch64_ours_over_best_tool": b64}}
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"command": "python -m export.bench_onnx_fold", "date": "2026-12-07 15:00",
                                "onnxruntime": "1.32.0", "rounds": 7, "cpu": {"model": "X", "isa": "AVX2", "cores": 2},
                                "results": [row("keras3-mlp", 0, True, 1.01, 1.04), row("torch x", 1, False, 0.92, 0.97)]}))
    r = script.render_onnx_fold(path)
    assert "keras3-mlp 2 → 0; torch x 2 → 1" in r.body and "batch 1: 0.92–1.01x" in r.body and "batch 64: 0.97–1.04x" in r.body
    assert r.short == ["torch x: BN-derived nodes left", "torch x: parity with the original lost"]
    assert r.cpu == "X, AVX2, 2 cores" and r.date == "2026-12-07 15:00"
