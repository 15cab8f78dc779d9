"""The exported ONNX files: node types, dynamic batch, metadata, checksums, atomic writes, CLI errors."""
import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from export.onnx_export import read_metadata, save_model
from export.verify import ort_session
from training.artifacts import atomic_write

CONTRACT_KEYS = {"labels", "input_name", "output_name", "input_layout", "input_shape", "input_range",
                 "normalization", "arch", "test_accuracy", "weights_sha256", "torch_version",
                 "onnx_version", "fold_report", "folded"}


def ops(path) -> set[str]:
    return {n.op_type for n in onnx.load(path).graph.node}


def test_both_models_pass_the_full_checker(model_dir):
    for name in ("model.onnx", "model_unfolded.onnx"):
        onnx.checker.check_model(onnx.load(model_dir / name), full_check=True)
    assert not list(model_dir.glob("*.onnx.data")), "weights must live inside the .onnx file"


def test_folded_graph_has_no_batchnorm_or_dropout_and_reference_keeps_them(model_dir):
    folded, unfolded = ops(model_dir / "model.onnx"), ops(model_dir / "model_unfolded.onnx")
    assert "BatchNormalization" not in folded and "Dropout" not in folded
    assert "BatchNormalization" in unfolded
    assert "Conv" in folded and "Gemm" in folded


@pytest.mark.parametrize("batch", [1, 37])
def test_dynamic_batch(model_dir, test_images, batch):
    session = ort_session(str(model_dir / "model.onnx"))
    assert session.get_inputs()[0].shape[0] == "batch" and session.get_inputs()[0].name == "image"
    logits = session.run(["logits"], {"image": test_images[0][:batch]})[0]
    assert logits.shape == (batch, 10) and logits.dtype == np.float32
    reference = ort_session(str(model_dir / "model_unfolded.onnx"), optimize=False).run(None, {"image": test_images[0][:batch]})[0]
    np.testing.assert_allclose(logits, reference, atol=1e-5, rtol=1e-5)


def test_metadata_round_trip(model_dir, trained_run):
    meta = read_metadata(model_dir / "model.onnx")
    assert CONTRACT_KEYS <= set(meta)
    config = json.loads((trained_run / "config.json").read_text())
    assert json.loads(meta["labels"]) == config["labels"] and len(config["labels"]) == 10
    assert meta["weights_sha256"] == hashlib.sha256((trained_run / "weights.safetensors").read_bytes()).hexdigest()
    assert meta["arch"] == "seed-cnn" and meta["folded"] == "true" and meta["input_layout"] == "NCHW"
    assert abs(float(meta["test_accuracy"]) - config["metrics"]["test_accuracy"]) < 1e-4
    assert json.loads(meta["input_shape"]) == [None, 1, 28, 28] and json.loads(meta["input_range"]) == [0.0, 1.0]
    fold = json.loads(meta["fold_report"])
    assert fold["folded"][0]["into"].endswith("(Conv2d)") and fold["kept"] == []
    assert read_metadata(model_dir / "model_unfolded.onnx")["folded"] == "false"


def test_checksum_sidecars_match(model_dir):
    for name in ("model.onnx", "model_unfolded.onnx"):
        digest, filename = (model_dir / f"{name}.sha256").read_text().split()
        assert filename == name and digest == hashlib.sha256((model_dir / name).read_bytes()).hexdigest()


def test_export_report_records_parity(model_dir):
    report = json.loads((model_dir / "export_report.json").read_text())
    parity = report["parity"]
    assert parity["passed"] is True and parity["images"] == 10000 and parity["float64"]["available"]
    assert parity["exactness"]["fx pass"]["status"] == "passed" and parity["exactness"]["fx pass"]["relative"] < 1e-12
    # Our own runs keep passing the plain rule on all 10k test images: within 1e-5 + 1e-5|ref| of the
    # float64 model, no argmax other than float32's own (the float32 clause is not needed here).
    judged = {name: row for name, row in parity["variants"].items() if name != parity["own"]}
    assert sorted(judged) == ["ORT folded", "ORT folded (DISABLE_ALL)", "ORT unfolded (DISABLE_ALL)", "torch folded"]
    for name, row in judged.items():
        assert row["clause"] == "within 1e-5" and row["within_tolerance"], (name, row)
        assert row["argmax_disagreements"] <= parity["variants"][parity["own"]]["argmax_disagreements"] * 2, name
    assert report["nodes_unfolded"]["BatchNormalization"] == 1 and "BatchNormalization" not in report["nodes_folded"]


def test_atomic_write_keeps_the_old_model_when_a_write_fails(model_dir, tmp_path, monkeypatch):
    target = tmp_path / "model.onnx"
    good = onnx.load(model_dir / "model.onnx")
    save_model(good, target)
    before = target.read_bytes()

    class HalfWritten:
        """Serializes, then dies halfway through the write (a full disk, a kill)."""
        def SerializeToString(self):
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_model(HalfWritten(), target)

    def write_half_then_fail(tmp):
        Path(tmp).write_bytes(before[: len(before) // 2])
        raise OSError("killed")

    with pytest.raises(OSError, match="killed"):
        atomic_write(target, write_half_then_fail)
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model.onnx.sha256"]


def test_parity_failure_publishes_nothing(trained_run, data_dir, tmp_path, monkeypatch, capsys):
    """Break the fold on purpose (drop the BN shift): verification must catch it and write no model."""
    import export.fold as fold
    from export.__main__ import main

    real = fold.bn_scale_shift
    monkeypatch.setattr(fold, "bn_scale_shift", lambda bn: (real(bn)[0], real(bn)[1] * 0))
    assert main(["--run", str(trained_run), "--out", str(tmp_path), "--data-dir", str(data_dir)]) == 1
    assert not (tmp_path / "model.onnx").exists()
    report = json.loads((tmp_path / "export_report.json").read_text())
    assert report["parity"]["passed"] is False and report["parity"]["failed_step"] == "fx pass"
    assert "VERIFICATION FAILED at fx pass: the folded float64 model is" in capsys.readouterr().out


def snapshot(directory: Path) -> dict:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(directory.iterdir())}


def test_verify_only_rechecks_published_files_and_writes_nothing(model_dir, trained_run, data_dir, capsys, monkeypatch):
    """Issue 26, 1: the re-check the README shows reports and changes nothing on disk, passing or failing:
    export_report.json keeps the ONNX pass's exactness and the export's timings."""
    import export.fold as fold
    from export.__main__ import main

    before = snapshot(model_dir)
    args = ["--run", str(trained_run), "--out", str(model_dir), "--data-dir", str(data_dir), "--verify-only"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "VERIFICATION PASSED" in out and "--verify-only wrote nothing" in out
    assert snapshot(model_dir) == before  # same files, same bytes, not even rewritten
    report = json.loads((model_dir / "export_report.json").read_text())
    assert "not re-run by --verify-only" not in json.dumps(report) and report["timings"]["total"] > 0

    real = fold.bn_scale_shift  # a re-check that fails writes nothing either
    monkeypatch.setattr(fold, "bn_scale_shift", lambda bn: (real(bn)[0], real(bn)[1] * 0))
    assert main(args) == 1
    captured = capsys.readouterr()
    assert "VERIFICATION FAILED at fx pass" in captured.out and "nothing written" in captured.err
    assert snapshot(model_dir) == before


@pytest.mark.parametrize("args, message", [
    (["--run", "/nonexistent/run"], "is missing"),
])
def test_export_cli_bad_input_is_one_line(args, message, tmp_path, capsys):
    from export.__main__ import main

    assert main(args + ["--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("export:") and message in err and "\n" not in err
    assert not any(Path(tmp_path).iterdir())


def test_if_stale_reuses_a_current_export_and_redoes_a_damaged_one(model_dir, trained_run, data_dir, tmp_path, capsys):
    import shutil

    from export.__main__ import main

    out = tmp_path / "copy"
    shutil.copytree(model_dir, out)
    args = ["--run", str(trained_run), "--out", str(out), "--data-dir", str(data_dir), "--if-stale"]
    assert main(args) == 0 and "already a verified export" in capsys.readouterr().out
    (out / "model.onnx").write_bytes((out / "model.onnx").read_bytes()[:-100])  # damaged
    assert main(args) == 0 and "already" not in capsys.readouterr().out
    onnx.checker.check_model(onnx.load(out / "model.onnx"), full_check=True)
