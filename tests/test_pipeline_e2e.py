"""End to end on real data for every model family: a short training run -> fold -> export -> parity."""
import json

import onnx
import pytest

from export.__main__ import main as export_main
from training.__main__ import main as train_main


def test_seed_cnn_end_to_end(model_dir):
    """The session fixture already ran `python -m training` + `python -m export` for seed-cnn."""
    report = json.loads((model_dir / "export_report.json").read_text())
    assert report["arch"] == "seed-cnn" and report["parity"]["passed"]


@pytest.mark.parametrize("arch", ["mlp-bn", "keras-cnn", "deep-cnn"])
def test_family_end_to_end(arch, tmp_path, data_dir):
    run = tmp_path / "run"
    assert train_main(["--arch", arch, "--epochs", "1", "--subset", "3000", "--val-size", "500",
                       "--data-dir", str(data_dir), "--out", str(run), "--quiet"]) == 0
    config = json.loads((run / "config.json").read_text())
    assert config["metrics"]["test_accuracy"] > 0.6, "one epoch on 3k images should already learn something"
    assert export_main(["--run", str(run), "--out", str(tmp_path), "--data-dir", str(data_dir)]) == 0
    report = json.loads((tmp_path / "export_report.json").read_text())
    assert report["parity"]["passed"] and report["parity"]["images"] == 10000
    ops = {n.op_type for n in onnx.load(tmp_path / "model.onnx").graph.node}
    assert "Dropout" not in ops
    # Every BN is folded, or the report names it and says why it stayed.
    kept = report["fold"]["kept"]
    assert ("BatchNormalization" in ops) == bool(kept)
    for entry in kept:
        assert entry["reason"]
