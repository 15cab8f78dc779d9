"""Issue 26, 3: `make pipeline`'s stage times (scripts/pipeline.py) are written only by a run that succeeded
and did some work; a failed run leaves the last good record; the README says when a run reused stages."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def touch(path: Path) -> list[str]:
    """A stage command that rewrites `path` (it did work)."""
    return [sys.executable, "-c", f"import pathlib, time; p = pathlib.Path({str(path)!r}); p.write_text(str(time.time_ns()))"]


NOTHING = [sys.executable, "-c", "pass"]  # a stage that finds its output current


def test_a_failed_run_of_make_pipeline_keeps_the_last_good_record(tmp_path):
    """The README's own line on a machine without that folder: it fails in the data stage and the record
    of the last good run is left as it was, byte for byte."""
    record = tmp_path / "artifacts" / "pipeline_times.json"
    record.parent.mkdir()
    record.write_text('{"date": "2026-12-01 10:00", "stages": [{"stage": "train", "seconds": 201, "ran": true}]}\n')
    before = record.read_bytes()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAKE")}
    done = subprocess.run(["make", "--no-print-directory", "pipeline", f"DATA_DIR={tmp_path / 'no-such-dir'}",
                           f"ARTIFACTS={tmp_path / 'artifacts'}"], cwd=ROOT, capture_output=True, text=True, env=env,
                          timeout=600)
    assert done.returncode != 0
    assert "stage data failed" in done.stderr and "keeps the run of 2026-12-01 10:00" in done.stderr, done.stderr
    assert record.read_bytes() == before
    assert sorted(p.name for p in record.parent.iterdir()) == ["pipeline_times.json"]  # no half-written record


def test_only_a_run_that_did_work_is_recorded_and_says_what_it_reused(tmp_path, capsys):
    pipeline, readme = load("pipeline"), load("readme_results")
    weights, model = tmp_path / "weights", tmp_path / "model.onnx"
    record = tmp_path / "pipeline_times.json"
    full = [pipeline.Stage("train", touch(weights), [weights]), pipeline.Stage("export+verify", touch(model), [model]),
            pipeline.Stage("report", NOTHING, [])]
    assert pipeline.run(full, record, "make pipeline") == 0
    first = json.loads(record.read_text())
    assert first["complete"] and [s["ran"] for s in first["stages"]] == [True, True, True] and first["cpu"]["isa"]

    # everything current: the times would be the reuse's (a few seconds), so the record stays
    before = record.read_bytes()
    reuse = [pipeline.Stage("train", NOTHING, [weights]), pipeline.Stage("export+verify", NOTHING, [model]),
             pipeline.Stage("report", NOTHING, [])]
    assert pipeline.run(reuse, record, "make pipeline") == 0
    assert record.read_bytes() == before and "every stage reused what was there" in capsys.readouterr().out

    # a failing stage: nothing recorded, its exit status returned
    failing = [pipeline.Stage("train", touch(weights), [weights]),
               pipeline.Stage("export+verify", [sys.executable, "-c", "raise SystemExit(3)"], [model])]
    assert pipeline.run(failing, record, "make pipeline") == 3 and record.read_bytes() == before

    # a partial run is recorded, and the README says which stages it reused and that its total is not a full run's
    partial = [pipeline.Stage("train", NOTHING, [weights]), pipeline.Stage("export+verify", touch(model), [model])]
    assert pipeline.run(partial, record, "make pipeline ARCH=seed-cnn") == 0
    second = json.loads(record.read_text())
    assert not second["complete"] and [s["ran"] for s in second["stages"]] == [False, True]
    r = readme.render_pipeline_times(record)
    assert "train 0 (reused)" in r.body and "Not a full run: train reused what was there" in r.note
    assert r.command == "make pipeline ARCH=seed-cnn" and r.cpu.endswith(" cores")
