"""bench/real.py (`make bench-real`): what is done is kept (resumable), and the summary says what is short.
The run itself (exports, ~1 h of benchmarks) is a benchmark, not a test."""
import json
import os
import time

from bench import real


def test_done_work_is_kept_and_short_goals_fail_the_run(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(real.subprocess, "run", lambda *a, **k: calls.append(a) or (_ for _ in ()).throw(AssertionError(a)))
    out = tmp_path / "seed-cnn"
    (out / "bench").mkdir(parents=True)
    (out / "model.onnx").write_bytes(b"onnx")
    (out / "export_report.json").write_text("{}")
    old = time.time() - 60
    os.utime(out / "model.onnx", (old, old))  # the results are newer than the model: kept
    row = {"round": 1, "setup": "ours", "kind": "closed", "clients": 4, "requests": 10, "ok": 10, "shed": 0, "errors": 0,
           "img_s": 800.0, "p50_ms": 2.0, "p99_ms": 9.0, "server_cpu_ms_per_img": 0.5}
    (out / "bench" / "results.json").write_text(json.dumps({
        "meta": {"command": "python -m loadtest bench …", "date": "2026-12-07 15:00", "layout_text": "2 workers x 1",
                 "uptime_before": "load average: 0.10, 0.2, 0.3", "uptime_after": "load average: 1.9, 1.0, 0.5"},
        "rows": [row, {**row, "setup": "ceiling", "kind": "ceiling", "clients": 2, "img_s": 1000.0, "p99_ms": 2.0,
                       "server_cpu_ms_per_img": 0.25}], "failed": [], "goals": [{"goal": "round 1: open loop: 9 of 10 answers 200", "met": False}]}))
    (out / "bench" / "bench_serve.png").write_bytes(b"\x89PNG")
    doc = tmp_path / "docs" / "service.md"
    doc.parent.mkdir()
    doc.write_text("# s\n<!-- bench-real:begin -->\nold\n<!-- bench-real:end -->\nafter\n")
    assert real.main(["--only", "seed-cnn", "--out", str(tmp_path), "--docs", str(doc)]) == 1 and not calls  # nothing re-run
    md = (tmp_path / "summary.md").read_text()
    assert "#### seed-cnn" in md and "| ours | 800.0 | 9 | 0.50 (2.00x) | 0 |" in md and "load before: 0.10, 0.2, 0.3" in md
    text = doc.read_text()  # the tables replace the docs' block, the plot beside them
    assert "old" not in text and text.endswith("<!-- bench-real:end -->\nafter\n") and "| in-process ceiling (2 proc) | 1,000.0 |" in text
    assert "![seed-cnn](img/bench_real/seed-cnn.png)" in text and (doc.parent / "img/bench_real/seed-cnn.png").exists()
    assert "- seed-cnn: round 1: open loop: 9 of 10 answers 200" in md
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["problems"] == ["seed-cnn: round 1: open loop: 9 of 10 answers 200"]
    assert set(real.MODELS) == {"seed-cnn", "mobilenet_v2", "resnet50", "resnet50_448", "yolov8n"}
