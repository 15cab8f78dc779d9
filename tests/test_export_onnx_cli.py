"""python -m export --onnx FILE.onnx: graphs built here with onnx.helper, end to end through the
CLI (load, validate, infer the layout, make a fixed batch of 1 dynamic, fold, verify, publish), and
every bad input of issue 9."""
import hashlib
import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from export.__main__ import main
from export.onnx_export import read_metadata
from export.verify import ATOL, RTOL, ort_session
from test_export_byo import stand_in_fold_onnx

RNG = np.random.default_rng(0)


def const(name, array, dtype=np.float32):
    return numpy_helper.from_array(np.asarray(array, dtype), name)


def make(nodes, inputs, outputs, initializers, opset=17) -> onnx.ModelProto:
    model = helper.make_model(helper.make_graph(nodes, "g", inputs, outputs, initializers),
                              opset_imports=[helper.make_opsetid("", opset)], producer_name="a test")
    model.ir_version = 8
    return model


def mlp_graph(batch="N") -> onnx.ModelProto:
    """Gemm -> Relu -> Gemm: nothing to fold."""
    return make([helper.make_node("Gemm", ["features", "w1", "b1"], ["h"], transB=1),
                 helper.make_node("Relu", ["h"], ["r"]),
                 helper.make_node("Gemm", ["r", "w2", "b2"], ["scores"], transB=1)],
                [helper.make_tensor_value_info("features", TensorProto.FLOAT, [batch, 8])],
                [helper.make_tensor_value_info("scores", TensorProto.FLOAT, [batch, 3])],
                [const("w1", RNG.standard_normal((16, 8))), const("b1", RNG.standard_normal(16)),
                 const("w2", RNG.standard_normal((3, 16))), const("b2", RNG.standard_normal(3))])


def conv_bn_graph(batch="N", height=8, width=8, nhwc=False, flatten="Flatten", classes=5) -> onnx.ModelProto:
    """[Transpose NHWC->NCHW] -> Conv -> BatchNormalization -> Relu -> Flatten -> Gemm -> Softmax."""
    nodes, first = [], "x"
    if nhwc:
        nodes.append(helper.make_node("Transpose", ["x"], ["x_nchw"], perm=[0, 3, 1, 2]))
        first = "x_nchw"
    nodes += [helper.make_node("Conv", [first, "cw", "cb"], ["c"], kernel_shape=[3, 3]),
              helper.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["bn"], epsilon=1e-3),
              helper.make_node("Relu", ["bn"], ["r"]),
              helper.make_node("Reshape", ["r", "batch1"], ["f"]) if flatten == "Reshape1"
              else helper.make_node("Flatten", ["r"], ["f"], axis=1),
              helper.make_node("Gemm", ["f", "w", "b"], ["logits"], transB=1),
              helper.make_node("Softmax", ["logits"], ["probs"], axis=1)]
    c, flat = 4, 4 * 6 * 6
    initializers = [const("cw", RNG.standard_normal((c, 3 if nhwc else 1, 3, 3))), const("cb", RNG.standard_normal(c)),
                    const("gamma", RNG.uniform(0.5, 1.5, c)), const("beta", RNG.standard_normal(c)),
                    const("mean", RNG.standard_normal(c)), const("var", RNG.uniform(0.5, 2, c)),
                    const("w", RNG.standard_normal((classes, flat)) * 0.1), const("b", RNG.standard_normal(classes)),
                    const("batch1", [1, -1], np.int64)]
    shape = [batch, height, width, 3] if nhwc else [batch, 1, height, width]
    return make(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                [helper.make_tensor_value_info("probs", TensorProto.FLOAT, [batch, classes])], initializers)


def reference(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort_session(model, optimize=False)
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def export_graph(tmp_path, model, *flags, name="graph.onnx"):
    path = tmp_path / name
    onnx.save(model, path)
    out = tmp_path / "out"
    code = main(["--onnx", str(path), "--out", str(out), *flags])
    return code, out, path


def test_graph_with_nothing_to_fold_is_exported_and_verified_as_is(tmp_path, capsys):
    model = mlp_graph()
    code, out, path = export_graph(tmp_path, model)
    printed = capsys.readouterr().out
    assert code == 0
    assert "nothing to fold" in printed and "input layout NC, inferred from [N, 8]" in printed
    report = json.loads((out / "export_report.json").read_text())
    assert report["summary"].startswith("nothing to fold") and report["fold"]["folded"] == report["fold"]["kept"] == []
    assert [n.op_type for n in onnx.load(out / "model.onnx").graph.node] == ["Gemm", "Relu", "Gemm"]
    meta = read_metadata(out / "model.onnx")
    assert meta["input_name"] == "features" and meta["output_name"] == "scores" and meta["output_kind"] == "logits"
    assert json.loads(meta["input_shape"]) == [None, 8] and meta["input_layout"] == "NC" and meta["name"] == "graph"
    assert json.loads(meta["labels"]) == ["class_0", "class_1", "class_2"]
    assert json.loads(meta["input_range"]) == [0.0, 1.0] and "image_background" not in meta
    assert json.loads(meta["source"]) == {"kind": "onnx", "path": str(path), "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
                                          "producer": "a test"}
    assert meta["folded"] == "true" and read_metadata(out / "model_unfolded.onnx")["folded"] == "false"
    assert report["parity"]["passed"] and report["parity"]["reference"] == "the unfolded model in float64"
    assert report["parity"]["own"] == "input graph (float32, DISABLE_ALL)"
    onnx_pass = report["parity"]["exactness"]["ONNX pass"]  # it changed nothing: skipped, never passed
    assert onnx_pass["status"] == "skipped" and "passed" not in onnx_pass and "changed nothing" in onnx_pass["why"]
    for n in (1, 5):  # dynamic batch, against the graph as given
        x = RNG.uniform(0, 1, (n, 8)).astype(np.float32)
        got = ort_session(str(out / "model.onnx")).run(None, {"features": x})[0]
        np.testing.assert_allclose(got, reference(model, x), atol=ATOL, rtol=RTOL)
    digest, filename = (out / "model.onnx.sha256").read_text().split()
    assert filename == "model.onnx" and digest == hashlib.sha256((out / "model.onnx").read_bytes()).hexdigest()


def test_every_option_lands_in_the_contract(tmp_path, capsys):
    (tmp_path / "labels.txt").write_text("cat\ndog\nbird\nfish\nfrog\n")
    code, out, _ = export_graph(tmp_path, conv_bn_graph(), "--labels", str(tmp_path / "labels.txt"), "--input-range", "-1,1",
                          "--name", "tiny-conv", "--background", "light", "--layout", "NCHW")
    assert code == 0, capsys.readouterr().err
    meta = read_metadata(out / "model.onnx")
    assert json.loads(meta["labels"]) == ["cat", "dog", "bird", "fish", "frog"] and meta["name"] == "tiny-conv"
    assert json.loads(meta["input_range"]) == [-1.0, 1.0] and meta["image_background"] == "light"
    assert meta["input_layout"] == "NCHW" and meta["output_kind"] == "probabilities" and meta["output_name"] == "probs"
    report = json.loads((out / "export_report.json").read_text())
    assert "[-1, 1]" in report["parity"]["inputs"] and report["parity"]["passed"]
    # Whatever the ONNX pass leaves is reported: every BatchNormalization left has a kept entry.
    left = [n.name for n in onnx.load(out / "model.onnx").graph.node if n.op_type == "BatchNormalization"]
    assert sorted(left) == sorted(e["node"] for e in report["fold"]["kept"] if "node" in e)


def test_the_onnx_pass_folds_and_parity_holds(tmp_path, monkeypatch):
    """With a stand-in for the graph pass (branch onnx-fold): the BN is folded into the Conv, the
    report says so, and the folded graph matches the input graph."""
    import export.pipeline

    monkeypatch.setattr(export.pipeline, "fold_onnx", stand_in_fold_onnx)
    model = conv_bn_graph()
    code, out, _ = export_graph(tmp_path, model)
    assert code == 0
    report = json.loads((out / "export_report.json").read_text())
    assert [e["pass"] for e in report["fold"]["folded"]] == ["onnx"] and report["fold"]["kept"] == []
    assert "BatchNormalization" not in {n.op_type for n in onnx.load(out / "model.onnx").graph.node}
    assert "BatchNormalization" in {n.op_type for n in onnx.load(out / "model_unfolded.onnx").graph.node}
    x = RNG.uniform(0, 1, (3, 1, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(ort_session(str(out / "model.onnx")).run(None, {"x": x})[0], reference(model, x),
                               atol=ATOL, rtol=RTOL)


def test_nhwc_is_inferred_and_said(tmp_path, capsys):
    code, out, _ = export_graph(tmp_path, conv_bn_graph(nhwc=True))
    assert code == 0
    assert "input layout NHWC, inferred from [N, 8, 8, 3] (pass --layout to override)" in capsys.readouterr().out
    assert read_metadata(out / "model.onnx")["input_layout"] == "NHWC"


def test_fixed_batch_of_one_is_made_dynamic_when_it_verifies(tmp_path, capsys):
    model = conv_bn_graph(batch=1)
    code, out, _ = export_graph(tmp_path, model)
    assert code == 0
    assert "had a fixed batch of 1; made dynamic" in capsys.readouterr().out
    for name in ("model.onnx", "model_unfolded.onnx"):
        session = ort_session(str(out / name), optimize=name == "model.onnx")
        assert isinstance(session.get_inputs()[0].shape[0], str)
        x = RNG.uniform(0, 1, (7, 1, 8, 8)).astype(np.float32)
        rows = np.concatenate([reference(model, x[i:i + 1]) for i in range(7)])
        np.testing.assert_allclose(session.run(None, {"x": x})[0], rows, atol=ATOL, rtol=RTOL)
    assert json.loads((out / "export_report.json").read_text())["parity"]["passed"]


def test_dynamic_height_and_width_are_fixed_from_the_sample(tmp_path):
    np.save(tmp_path / "sample.npy", RNG.uniform(0, 1, (6, 1, 8, 8)).astype(np.float32))
    code, out, _ = export_graph(tmp_path, conv_bn_graph(height="h", width="w"), "--sample", str(tmp_path / "sample.npy"))
    assert code == 0
    assert json.loads(read_metadata(out / "model.onnx")["input_shape"]) == [None, 1, 8, 8]
    report = json.loads((out / "export_report.json").read_text())
    assert report["parity"]["images"] == 6 and report["parity"]["inputs"].startswith("rows of --sample")


def test_external_data_is_read_in_and_the_export_is_one_file(tmp_path):
    model = conv_bn_graph()
    onnx.save(model, tmp_path / "big.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
              location="big.weights", size_threshold=0)
    assert (tmp_path / "big.weights").exists()
    assert main(["--onnx", str(tmp_path / "big.onnx"), "--out", str(tmp_path / "out")]) == 0
    exported = onnx.load(tmp_path / "out" / "model.onnx", load_external_data=False)
    assert not any(t.data_location == TensorProto.EXTERNAL for t in exported.graph.initializer)
    assert not list((tmp_path / "out").glob("*.weights")) and not list((tmp_path / "out").glob("*.data"))


# --- bad input: one line on stderr, exit 2, --out untouched ------------------------------------------

def two_inputs():
    return make([helper.make_node("Add", ["a", "b"], ["y"])],
                [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["N", 3]),
                 helper.make_tensor_value_info("b", TensorProto.FLOAT, ["N", 3])],
                [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])], [])


def int_input():
    return make([helper.make_node("Cast", ["ids"], ["f"], to=TensorProto.FLOAT),
                 helper.make_node("Gemm", ["f", "w"], ["y"], transB=1)],
                [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", 4])],
                [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])], [const("w", np.ones((2, 4)))])


def dangling_input():
    model = mlp_graph()
    model.graph.node[1].input[0] = "ghost"
    return model


def rank3_output():
    return make([helper.make_node("Relu", ["x"], ["y"])],
                [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 5])],
                [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3, 5])], [])


def write(model):
    return lambda path: onnx.save(model, path)


def external_data_missing(path):
    onnx.save(conv_bn_graph(), path, save_as_external_data=True, location="gone.weights", size_threshold=0)
    (path.parent / "gone.weights").unlink()


BAD = {
    "no such file": (None, [], "no such file"),
    "not an ONNX file": (lambda p: p.write_text("this is a CSV, not a graph\n1,2,3\n"), [], "not an ONNX"),
    "the checker rejects it": (write(dangling_input()), [], "the ONNX checker rejects it: "),
    "external data missing": (external_data_missing, [], "'gone.weights', which is missing"),
    "no float input": (write(int_input()), [], "its input 'ids' is INT64; the contract needs a float32 input"),
    "two inputs": (write(two_inputs()), [], "takes 2 inputs (a, b); the contract feeds exactly one"),
    "dynamic non-batch axes without --sample": (write(conv_bn_graph(height="h", width="w")), [],
                                                "dynamic axis 2 (h), axis 3 (w) besides the batch; pass --sample"),
    "fixed batch of 1 that only runs at 1": (write(conv_bn_graph(batch=1, flatten="Reshape1")), [],
                                             "its batch is fixed at 1 and the graph does not run at other batch sizes"),
    "fixed batch of 4": (write(conv_bn_graph(batch=4)), [], "a fixed batch of 4; the contract needs a dynamic batch"),
    "labels for a graph that is not a classifier": (write(rank3_output()), ["--labels", "LABELS"],
                                                     "--labels: the graph is not a classifier (its outputs: y [N, 3, 5])"),
    "opset too old": (write(make([helper.make_node("Relu", ["x"], ["y"])],
                                 [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
                                 [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])], [], opset=11)),
                      [], "opset 11; the contract needs >= 13"),
    "labels count differs": (write(mlp_graph()), ["--labels", "LABELS"], "2 labels but the graph outputs 3 classes"),
    "sample of the wrong shape": (write(mlp_graph()), ["--sample", "SAMPLE"], "shape [4, 1, 8, 8], want [N, 8]"),
    "layout of another rank": (write(conv_bn_graph()), ["--layout", "NCW"], "--layout NCW wants a rank-3 input"),
    "--input-shape with --onnx": (write(mlp_graph()), ["--input-shape", "8"], "--input-shape applies to --model only"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, tmp_path, capsys):
    make_file, flags, message = BAD[case]
    path = tmp_path / "in.onnx"
    if make_file:
        make_file(path)
    (tmp_path / "two.txt").write_text("a\nb\n")
    np.save(tmp_path / "sample.npy", np.zeros((4, 1, 8, 8), np.float32))
    flags = [{"LABELS": str(tmp_path / "two.txt"), "SAMPLE": str(tmp_path / "sample.npy")}.get(f, f) for f in flags]
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.onnx").write_bytes(b"the previous export")
    assert main(["--onnx", str(path), "--out", str(out), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("export: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert message in err, err
    assert [p.name for p in out.iterdir()] == ["model.onnx"] and (out / "model.onnx").read_bytes() == b"the previous export"


def test_if_stale_and_verify_only_work_for_any_source(tmp_path, capsys):
    code, out, path = export_graph(tmp_path, mlp_graph())
    assert code == 0
    stale = ["--onnx", str(path), "--out", str(out), "--if-stale"]
    assert main(stale) == 0 and "already a verified export" in capsys.readouterr().out
    (tmp_path / "labels.txt").write_text("a\nb\nc\n")
    assert main(stale + ["--labels", str(tmp_path / "labels.txt")]) == 0  # other options: exported again
    assert "already" not in capsys.readouterr().out
    assert json.loads(read_metadata(out / "model.onnx")["labels"]) == ["a", "b", "c"]
    assert main(["--onnx", str(path), "--out", str(out), "--verify-only"]) == 0
    assert "verified" in capsys.readouterr().out
    onnx.save(mlp_graph(), tmp_path / "other.onnx")  # other weights (the generator moved on)
    assert main(["--onnx", str(tmp_path / "other.onnx"), "--out", str(out), "--verify-only"]) == 2
    assert "was not exported from" in capsys.readouterr().err
