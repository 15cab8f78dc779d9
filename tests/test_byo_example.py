"""The README's bring-your-own-model example (examples/byo/), run as the README writes it."""
import json
import subprocess
import sys

import onnx

from common.procs import REPO


def test_readme_byo_example_folds_every_bn_and_writes_a_contract_model(tmp_path):
    weights, out = tmp_path / "my_model.safetensors", tmp_path / "shapes"
    subprocess.run([sys.executable, "examples/byo/make_weights.py", str(weights)], cwd=REPO, check=True)
    done = subprocess.run([sys.executable, "-m", "export", "--model", "examples/byo/my_model.py:build", "--weights",
                           str(weights), "--input-shape", "3,32,32", "--labels", "examples/byo/labels.txt",
                           "--name", "shapes", "--out", str(out)], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    report = json.loads((out / "export_report.json").read_text())
    assert len(report["fold"]["folded"]) == 3 and report["fold"]["kept"] == []
    meta = {p.key: p.value for p in onnx.load(out / "model.onnx").metadata_props}
    assert json.loads(meta["labels"]) == ["circle", "square", "triangle", "star"]
    assert json.loads(meta["input_shape"]) == [None, 3, 32, 32] and meta["name"] == "shapes"
    assert "BatchNormalization" not in {n.op_type for n in onnx.load(out / "model.onnx").graph.node}
