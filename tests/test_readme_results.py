"""scripts/readme_results.py: the README's results block is rebuilt from the reports that exist,
each with its command and date, and says which command makes each missing one."""
import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n" + b"\0" * 16


def load_script():
    spec = importlib.util.spec_from_file_location("readme_results", ROOT / "scripts" / "readme_results.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_block_is_rebuilt_from_the_reports_that_exist(tmp_path):
    script = load_script()
    repo, artifacts = tmp_path / "repo", tmp_path / "artifacts"
    (artifacts / "recipes").mkdir(parents=True)
    repo.mkdir()
    (artifacts / "pipeline_times.tsv").write_text("set-up\t22.4\ndata\t0.1\ntrain\t169.1\nexport+verify\t17.7\n")
    (artifacts / "recipes" / "results.md").write_text(
        "`python -m training.recipes --recipes before@0`, 2026-11-24 01:43, 2 threads:\n\n| recipe | seed |\n|---|---|\n| before | 0 |\n")
    (artifacts / "recipes" / "recipes.png").write_bytes(PNG)
    (artifacts / "soak").mkdir()
    (artifacts / "soak" / "soak.json").write_text(json.dumps({"ok": False, "reasons": ["p99 80 ms > 50"], "time": "1m",
        "offered_rps": 100, "achieved_rps": 99, "requests": 6000, "failures": 0, "p50_ms": 4, "p99_ms": 80,
        "rss_baseline_mib": 400, "rss_final_mib": 401, "rss_growth": 0.0025, "warmup_s": 90}))
    (artifacts / "bench_serve").mkdir()
    (artifacts / "bench_serve" / "results.md").write_text(
        "Command: `python -m loadtest bench`\n\n| a |\n|---|\n\nGoals:\n- speed: 3x (goal ≥2x) — met\n"
        "- p99: 80 ms (goal ≤50 ms) — SHORT\n- errors: 0 (goal 0) — met\n")
    readme = repo / "README.md"
    readme.write_text(f"# x\n\nbefore\n{script.BEGIN}\nold text\n\n### Fault battery\n\n`make faults`, 2026-11-23: "
                      f"the old figures\n\n### Soak\n\nthe old soak\n{script.END}\nafter\n")

    assert script.main(["--artifacts", str(artifacts), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert text.startswith("# x\n\nbefore\n") and text.endswith("after\n") and "old text" not in text
    assert "set-up 22 · data 0 · train 169 · export+verify 18 → **total 209 s**" in text
    assert "| before | 0 |" in text and "python -m training.recipes --recipes before@0" in text
    assert (repo / "docs" / "img" / "results" / "recipes-recipes.png").read_bytes() == PNG
    assert "![recipes](docs/img/results/recipes-recipes.png)" in text
    assert "**FAIL: p99 80 ms > 50**" in text
    assert "Goals: p99: 80 ms (goal ≤50 ms) — **short**; 2 of 3 met." in text and "— met" not in text
    assert "Not measured yet: `make keras-seeds`" in text  # never measured
    # a report missing from artifacts/ keeps the section the README had (its own command and date) ...
    assert "`make faults`, 2026-11-23: the old figures" in text and "Not measured yet: `make faults`" not in text
    assert "the old soak" not in text  # ... and a report that exists replaces it


def test_readme_without_the_markers_is_refused(tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text("# no block\n")
    assert load_script().main(["--artifacts", str(tmp_path), "--readme", str(readme)]) == 2
    assert readme.read_text() == "# no block\n" and "no <!-- results:begin -->" in capsys.readouterr().err
