"""Models users bring beyond one [N, K] tensor: tuple/list/dict outputs (detection-style heads),
state dicts that carry versions, and how many rows verification takes (--samples)."""
import json

import numpy as np
import onnx
import pytest
import torch
from safetensors.torch import save_file

import byo_models
from export.__main__ import main
from export.onnx_export import export_to_proto, read_metadata
from export.sources import MAX_ROWS, MIN_ROWS, rows_for
from export.verify import ort_session

MODELS = byo_models.__file__


def saved(tmp_path, factory: str):
    model = byo_models.randomize(getattr(byo_models, factory)())
    path = tmp_path / f"{factory}.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    return model, path


def export(tmp_path, factory, *flags, shape="3,16,16"):
    model, weights = saved(tmp_path, factory)
    out = tmp_path / "out"
    code = main(["--model", f"{MODELS}:{factory}", "--weights", str(weights), "--input-shape", shape,
                 "--out", str(out), *flags])
    return code, model, out


def test_a_tuple_of_heads_is_exported_verified_and_described(tmp_path, capsys):
    code, model, out = export(tmp_path, "two_heads")
    assert code == 0, capsys.readouterr().err
    meta = read_metadata(out / "model.onnx")
    assert json.loads(meta["outputs"]) == [
        {"name": "output_0", "shape": [None, 4, 64], "dtype": "float32", "path": "[0]"},
        {"name": "output_1_0", "shape": [None, 3, 64], "dtype": "float32", "path": "[1][0]"},
        {"name": "output_1_1", "shape": [None, 1, 64], "dtype": "float32", "path": "[1][1]"}]
    assert not {"output_name", "labels", "output_kind"} & set(meta)  # not a classifier
    report = json.loads((out / "export_report.json").read_text())
    assert report["output"] is None and report["labels"] is None
    assert set(report["parity"]["exactness"]["fx pass"]["outputs"]) == {"output_0", "output_1_0", "output_1_1"}
    variants = report["parity"]["variants"]
    assert variants.pop(report["parity"]["own"])["status"] == "skipped"  # the yardstick is not judged
    assert all(r["status"] == "passed" and r["passed"] for r in variants.values())
    assert "argmax_agreement" not in report["parity"]["variants"]["ORT folded"]  # no class scores to compare
    assert "BatchNormalization" not in {n.op_type for n in onnx.load(out / "model.onnx").graph.node}
    session = ort_session(str(out / "model.onnx"))
    assert [o.name for o in session.get_outputs()] == ["output_0", "output_1_0", "output_1_1"]
    x = np.random.default_rng(3).uniform(0, 1, (5, 3, 16, 16)).astype(np.float32)
    with torch.no_grad():
        boxes, (scores, objectness) = model(torch.from_numpy(x))
    for got, want in zip(session.run(None, {"input": x}), (boxes, scores, objectness)):
        np.testing.assert_allclose(got, want.numpy(), atol=1e-5, rtol=1e-5)


def test_dict_outputs_are_named_by_their_keys_and_one_can_be_the_class_scores(tmp_path, capsys):
    code, _, out = export(tmp_path, "named_heads")
    assert code == 0, capsys.readouterr().err
    meta = read_metadata(out / "model.onnx")
    assert [o["name"] for o in json.loads(meta["outputs"])] == ["boxes", "logits", "objectness"]
    assert "output_name" not in meta
    (tmp_path / "labels.txt").write_text("car\nbike\nperson\n")
    code, _, out = export(tmp_path, "named_heads", "--class-output", "logits", "--labels", str(tmp_path / "labels.txt"))
    assert code == 0, capsys.readouterr().err
    meta = read_metadata(out / "model.onnx")
    assert meta["output_name"] == "logits" and meta["output_kind"] == "logits"
    assert json.loads(meta["labels"]) == ["car", "bike", "person"]
    code, _, _ = export(tmp_path, "named_heads", "--class-output", "boxes")
    assert code == 2 and "--class-output 'boxes' has shape [N, 4, 64]; class scores are [N, K]" in capsys.readouterr().err


def test_an_onnx_graph_with_several_outputs(tmp_path, capsys):
    model = byo_models.randomize(byo_models.two_heads())
    onnx.save(export_to_proto(model, (2, 3, 16, 16), "pixels", ["boxes", "scores", "objectness"]), tmp_path / "det.onnx")
    assert main(["--onnx", str(tmp_path / "det.onnx"), "--out", str(tmp_path / "out")]) == 0, capsys.readouterr().err
    meta = read_metadata(tmp_path / "out" / "model.onnx")
    assert [(o["name"], o["shape"]) for o in json.loads(meta["outputs"])] == [
        ("boxes", [None, 4, 64]), ("scores", [None, 3, 64]), ("objectness", [None, 1, 64])]
    report = json.loads((tmp_path / "out" / "export_report.json").read_text())
    assert report["parity"]["exactness"]["ONNX pass"]["passed"] and len(report["fold"]["folded"]) == 4


def test_a_state_dict_version_check_loads_like_the_users_own(tmp_path, capsys):
    """torchvision's MNASNet refuses a state dict without `_metadata` versions, which safetensors
    files never carry: the fresh module's versions stand in."""
    code, _, out = export(tmp_path, "versioned", shape="6")
    assert code == 0, capsys.readouterr().err


def test_a_load_failure_names_the_module(tmp_path, capsys):
    code, _, _ = export(tmp_path, "picky_load", shape="6")
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert "--weights " in err and "loading it into head (Refuses) raised ValueError: this checkpoint predates" in err


def test_samples_sets_the_rows_and_the_default_is_sized_to_the_model(tmp_path, capsys):
    assert rows_for(None) == MAX_ROWS and rows_for((3.5e6, 2.5e4)) == MAX_ROWS  # the seed models: 256 rows
    assert rows_for((8.2e9, 1.1e7)) == MIN_ROWS  # ResNet-50 at 224x224
    assert rows_for((6.3e8, 5.5e6)) == MIN_ROWS  # MNASNet: few FLOPs, but float64 pays per element
    assert MIN_ROWS < rows_for((3e8, 2e6)) < MAX_ROWS  # ShuffleNetV2-sized
    code, _, out = export(tmp_path, "two_heads", "--samples", "9")
    assert code == 0, capsys.readouterr().err
    parity = json.loads((out / "export_report.json").read_text())["parity"]
    assert parity["images"] == 9 and parity["batch_sizes"] == [1, 7]


@pytest.mark.parametrize("flag", ["--samples", "--class-output"])
def test_the_new_flags_do_not_apply_to_runs(flag, capsys):
    assert main(["--run", "artifacts/runs/seed-cnn", flag, "3"]) == 2
    assert f"{flag} applies to --model and --onnx only" in capsys.readouterr().err
