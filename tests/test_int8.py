"""INT8 (issue 24, docs/int8.md): the graph transforms' math on small seeded graphs, the quantizer's
consistency check against tampered models, and `python -m export --int8` end to end: a real run
published with its fingerprint, a wrong INT8 model refused at export (FP32 still published), bad input
refused in one line with exit 2 and nothing written."""
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from export.float64 import Float64Graph
from export.int8_graph import Net, Stats, absorb_high_bias, bias_shift, equalize, expected_input, find_pairs, relu_mean

pytestmark = pytest.mark.timeout(600)


# --- small seeded graphs -----------------------------------------------------------------------------

def _conv(name, x, w, b, out, **attrs):
    return helper.make_node("Conv", [x, w, b], [out], name=name, **attrs)


def triplet_net(seed: int = 0, clip: bool = False) -> onnx.ModelProto:
    """conv3x3 → ReLU → expand 1x1 → ReLU → depthwise 3x3 → ReLU (or Clip 0..6) → project 1x1 →
    GlobalAveragePool → Flatten → Gemm: channels scaled 10^U(-2, 1) apart, as folding BNs leaves them."""
    rng = np.random.default_rng(seed)

    def w(*shape):
        a = rng.standard_normal(shape) * 0.3
        return (a * 10.0 ** rng.uniform(-2, 1, size=(shape[0],) + (1,) * (len(shape) - 1))).astype(np.float32)

    inits = {"w1": w(8, 1, 3, 3), "b1": rng.standard_normal(8).astype(np.float32),
             "w2": w(16, 8, 1, 1), "b2": rng.standard_normal(16).astype(np.float32),
             "w3": w(16, 1, 3, 3), "b3": rng.standard_normal(16).astype(np.float32),
             "w4": w(8, 16, 1, 1), "b4": rng.standard_normal(8).astype(np.float32),
             "w5": (rng.standard_normal((4, 8)) * 0.3).astype(np.float32), "b5": np.zeros(4, np.float32)}
    nodes = [_conv("c1", "x", "w1", "b1", "y1", pads=[1, 1, 1, 1]), helper.make_node("Relu", ["y1"], ["a1"], name="r1"),
             _conv("c2", "a1", "w2", "b2", "y2"), helper.make_node("Relu", ["y2"], ["a2"], name="r2"),
             _conv("c3", "a2", "w3", "b3", "y3", pads=[1, 1, 1, 1], group=16)]
    if clip:
        inits.update(lo=np.array(0, np.float32), hi=np.array(6, np.float32))
        nodes.append(helper.make_node("Clip", ["y3", "lo", "hi"], ["a3"], name="r3"))
    else:
        nodes.append(helper.make_node("Relu", ["y3"], ["a3"], name="r3"))
    nodes += [_conv("c4", "a3", "w4", "b4", "y4"), helper.make_node("GlobalAveragePool", ["y4"], ["p"], name="gap"),
              helper.make_node("Flatten", ["p"], ["f"], name="flat"),
              helper.make_node("Gemm", ["f", "w5", "b5"], ["out"], name="fc", transB=1)]
    graph = helper.make_graph(nodes, "triplet", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 1, 8, 8])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["n", 4])],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.checker.check_model(model, full_check=True)
    return model


def test_equalization_is_exact_and_equalizes_every_pair_of_a_depthwise_triplet():
    from export.float64 import to_float64

    model = to_float64(triplet_net())
    x = np.random.default_rng(1).uniform(0, 1, (4, 1, 8, 8))
    before = Float64Graph(model)(x)[0]
    net = Net(model)
    report = equalize(net, {})
    after = Float64Graph(net.flush())(x)[0]
    assert [(p["first"], p["second"]) for p in report["pairs"]] == [("c1", "c2"), ("c2", "c3"), ("c3", "c4"), ("c4", "fc")]
    assert np.abs(after - before).max() <= 1e-12 * np.abs(before).max()
    pairs, _ = find_pairs(Net(model))
    for pair in pairs:  # both sides of every pair now have the same range per channel (the triplet converged)
        from export.int8_graph import _ranges
        r1, r2 = _ranges(Net(model), pair)
        assert np.allclose(r1, r2, rtol=2e-3), pair.names  # settled to 0.1% (CLE_SETTLED)
    # a scale off by 1e-4 on one side breaks the function far beyond 1e-9: the pipeline's float64 proof catches it
    w2 = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "w2")) * 1.0001
    next(t for t in model.graph.initializer if t.name == "w2").CopyFrom(numpy_helper.from_array(w2, "w2"))
    assert np.abs(Float64Graph(model)(x)[0] - before).max() > 1e-9 * np.abs(before).max()


def test_a_clip_stops_equalization_and_absorption_skips_padded_layers():
    net = Net(triplet_net(clip=True))
    pairs, refused = find_pairs(net)
    assert [p.names for p in pairs] == ["c1 -> c2", "c2 -> c3", "c4 -> fc"]
    assert any(r["layer"] == "c3" and "Clip" in r["why"] for r in refused)
    stats = {n: Stats(np.full(16 if n in ("c2", "c3") else 8, 5.0), np.full(16 if n in ("c2", "c3") else 8, 0.5))
             for n in ("c1", "c2", "c3", "c4")}
    report = absorb_high_bias(net, stats)
    assert [(a["first"], a["second"]) for a in report["absorbed"]] == [("c1", "c2")]  # c2 -> c3: c3 is padded
    assert any(s["first"] == "c2" and "padded" in s["why"] for s in report["skipped"])
    assert np.allclose(stats["c1"].mean, 3 * 0.5)  # what is left: 3 sigma above zero


def test_relu_mean_matches_sampling():
    rng = np.random.default_rng(0)
    mean, std = np.array([-2.0, -0.3, 0.0, 0.7, 3.0]), np.array([1.0, 0.5, 2.0, 0.1, 1.5])
    n = 400_000
    samples = np.maximum(rng.normal(mean, std, size=(n, 5)), 0).mean(0)
    assert np.all(np.abs(relu_mean(mean, std) - samples) <= 4 * std / np.sqrt(n))  # 4 standard errors
    assert np.isclose(relu_mean(np.array([3.0]), np.array([1.5]))[0], 3.0127360, atol=1e-7)  # 3·Φ(2) + 1.5·φ(2)
    assert np.allclose(relu_mean(np.array([-1.0, 2.0]), np.zeros(2)), [0.0, 2.0])


@pytest.mark.parametrize("kind", ["grouped", "gemm", "gemm-transposed"])
def test_bias_shift_is_what_a_weight_error_adds_on_a_constant_input(kind):
    """E[(W + ε)·x] − E[W·x] = ε·E[x]: on an input equal to its mean everywhere, exactly the output shift."""
    rng = np.random.default_rng(2)
    if kind == "grouped":
        w, node = rng.standard_normal((6, 2, 3, 3)), helper.make_node("Conv", ["x", "w"], ["y"], group=3)
        e = rng.uniform(0, 2, 6)
        x = np.broadcast_to(e[None, :, None, None], (1, 6, 5, 5))
    else:
        w = rng.standard_normal((4, 6) if kind == "gemm" else (6, 4))
        node = helper.make_node("Gemm", ["x", "w"], ["y"], transB=1 if kind == "gemm" else 0)
        e = rng.uniform(0, 2, 6)
        x = e[None, :]
    error = rng.standard_normal(w.shape) * 0.01

    def run(weight):
        graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.DOUBLE, None)],
                                  [helper.make_tensor_value_info("y", TensorProto.DOUBLE, None)],
                                  [numpy_helper.from_array(weight, "w")])
        return onnx.reference.ReferenceEvaluator(helper.make_model(graph)).run(None, {"x": np.ascontiguousarray(x)})[0]

    shift = run(w + error) - run(w)
    axis = (0, 2, 3) if kind == "grouped" else 0
    want = shift.mean(axis=axis)
    assert np.allclose(shift.max(axis=axis), shift.min(axis=axis))  # one shift per output channel
    assert np.allclose(bias_shift(node, error, e), want, rtol=1e-10, atol=1e-12)


def test_expected_input_walks_relu_and_pooling_but_not_maxpool():
    net = Net(triplet_net())
    stats = {n: Stats(np.linspace(-1, 1, 16 if n in ("c2", "c3") else 8), np.full(16 if n in ("c2", "c3") else 8, 0.5))
             for n in ("c1", "c2", "c3", "c4")}
    e, _ = expected_input(net, net.nodes["c3"], stats)
    assert np.allclose(e, relu_mean(stats["c2"].mean, stats["c2"].std))
    e, _ = expected_input(net, net.nodes["fc"], stats)  # c4 -> GlobalAveragePool -> Flatten, no activation
    assert np.allclose(e, stats["c4"].mean)
    e, why = expected_input(net, net.nodes["c1"], stats)
    assert e is None and "graph input" in why


# --- the quantizer and its consistency check --------------------------------------------------------------

def tamper(model: onnx.ModelProto, how: str) -> onnx.ModelProto:
    """A wrong INT8 model: `scale` doubles the weight scale of the first Conv's channel with the largest
    weights; `zero-point` moves the zero point with which that Conv reads its input by one step (its own
    initializer: the QuantizeLinear before keeps the right one)."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    producer = {o: n for n in model.graph.node for o in n.output}
    inits = {t.name: t for t in model.graph.initializer}
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    if how == "scale":
        dq = producer[conv.input[1]]
        q = numpy_helper.to_array(inits[dq.input[0]])
        scale = numpy_helper.to_array(inits[dq.input[1]]).copy()
        channel = int(np.abs(q.reshape(len(q), -1)).max(1).argmax()) if scale.ndim else 0
        if scale.ndim:
            scale[channel] *= 2
        else:
            scale = scale * 2
        inits[dq.input[1]].CopyFrom(numpy_helper.from_array(scale, dq.input[1]))
    else:
        dq = producer[conv.input[0]]
        zp = numpy_helper.to_array(inits[dq.input[2]])
        moved = np.array(zp + 1 if zp < np.iinfo(zp.dtype).max else zp - 1, dtype=zp.dtype)
        model.graph.initializer.append(numpy_helper.from_array(moved, dq.input[2] + "_moved"))
        dq.input[2] = dq.input[2] + "_moved"
    return model


@pytest.mark.parametrize("types", ["U8S8", "S8S8"])
@pytest.mark.parametrize("how", ["scale", "zero-point"])
def test_consistency_refuses_a_tampered_quantization(how, types):
    from export.int8_check import consistency
    from export.int8_quant import quantize

    model = triplet_net()
    calib = np.random.default_rng(3).uniform(0, 1, (64, 1, 8, 8)).astype(np.float32)
    quantized, ranges = quantize(model, calib, types)
    assert consistency(model, quantized, ranges, {}, (-127, 127)).status == "passed"
    result = consistency(model, tamper(quantized, how), ranges, {}, (-127, 127))
    assert result.status == "failed" and result.as_dict()["passed"] is False
    assert ("steps from its float weights" if how == "scale" else "reads it back with") in result.why


def test_host_isa_and_types(tmp_path):
    from export.int8_quant import choose_types, host_isa

    (tmp_path / "vnni").write_text("flags\t\t: fpu avx2 avx512f avx512_vnni\nmodel name\t: Some CPU\n")
    (tmp_path / "avx2").write_text("flags\t\t: fpu sse4_2 avx2 fma\n")
    vnni, avx2 = host_isa(tmp_path / "vnni"), host_isa(tmp_path / "avx2")
    if vnni["machine"] in ("x86_64", "amd64"):
        assert (vnni["isa"], vnni["vnni"], choose_types(vnni)[0]) == ("AVX-512 VNNI", True, "U8S8")
        assert (avx2["isa"], avx2["vnni"], choose_types(avx2)[0]) == ("AVX2", False, "U8S8R")


# --- python -m export --int8 ---------------------------------------------------------------------------------

def test_run_with_int8_publishes_a_verified_int8_model_with_its_fingerprint(int8_dir):
    from service.contract import load_contract

    report = json.loads((int8_dir / "export_report.json").read_text())
    int8 = report["int8"]
    assert int8["status"] == "passed" and int8["format"] == "QDQ"
    fidelity = int8["checks"]["int8 fidelity"]
    assert fidelity["rows"] == 10_000 and fidelity["rule"] == "accuracy drop"
    assert fidelity["drop_pp"] <= 0.5 and 0.95 <= fidelity["top1_agreement"] <= 1.0
    assert int8["checks"]["int8 consistency"]["status"] == "passed" and int8["host"]["isa"]
    assert int8["layers"]["worst"] and all("sqnr_db" in r for r in int8["layers"]["layers"])
    for name in ("model_int8.onnx", "model_int8.fingerprint.npz"):
        assert report["files"][name]["sha256"] == (int8_dir / f"{name}.sha256").read_text().split()[0]
    contract, _ = load_contract(int8_dir / "model_int8.onnx")  # the same contract, served by the same code
    meta = json.loads(contract.metadata["int8"])
    assert meta["fp32_sha256"] == report["files"]["model.onnx"]["sha256"]
    with np.load(int8_dir / "model_int8.fingerprint.npz", allow_pickle=False) as npz:
        assert 8 <= len(npz["inputs"]) <= 256 and npz["int8_0"].shape == npz["float64_0"].shape == (len(npz["inputs"]), 10)


@pytest.fixture(scope="session")
def onnx_source(tmp_path_factory, model_dir, test_images) -> dict:
    """The unfolded seed-cnn as an --onnx source (its BN folded by the ONNX pass), calibration and sample rows."""
    root = tmp_path_factory.mktemp("int8-onnx")
    np.save(root / "calib.npy", test_images[0][128:])
    np.save(root / "sample.npy", test_images[0][:128])
    return {"root": root, "args": ["--onnx", str(model_dir / "model_unfolded.onnx"), "--sample", str(root / "sample.npy"),
                                   "--int8", "--calib", str(root / "calib.npy")]}


@pytest.mark.parametrize("how, step", [("scale", "int8 consistency"), ("zero-point", "int8 consistency"),
                                       ("refused", "int8 quantization")])
def test_a_wrong_int8_model_fails_at_export_and_only_fp32_is_published(how, step, onnx_source, monkeypatch, capsys):
    import export.int8
    from export.__main__ import main as export_main

    quantize = export.int8.quantize

    def wrong(*args, **kwargs):
        if how == "refused":  # onnxruntime's quantizer cannot take the graph: FP32 stays good
            raise RuntimeError("Unable to find data type for weight_name=...")
        quantized, ranges = quantize(*args, **kwargs)
        return tamper(quantized, how), ranges

    monkeypatch.setattr(export.int8, "quantize", wrong)
    out = onnx_source["root"] / f"tampered-{how}"
    (out).mkdir()
    (out / "model_int8.onnx").write_bytes(b"an earlier INT8 model")  # stale: must not survive
    assert export_main([*onnx_source["args"], "--out", str(out)]) == 1
    report = json.loads((out / "export_report.json").read_text())
    assert report["parity"]["passed"] and report["int8"]["failed_step"] == step
    assert (out / "model.onnx").exists() and not (out / "model_int8.onnx").exists()
    assert not (out / "model_int8.fingerprint.npz").exists()
    err = capsys.readouterr().err
    assert f"INT8 not published: {step}" in err and "model.onnx" in err


def test_onnx_source_with_int8_corrects_biases_from_the_folded_bn(onnx_source):
    from export.__main__ import main as export_main

    out = onnx_source["root"] / "good"
    assert export_main([*onnx_source["args"], "--out", str(out)]) == 0
    int8 = json.loads((out / "export_report.json").read_text())["int8"]
    assert int8["statistics"]["layers"], "the ONNX pass's BatchNormalization statistics were found"
    assert int8["checks"]["int8 fidelity"]["rule"] == "top-1 disagreement (no labels)"
    assert (out / "model_int8.onnx").exists()


def _bad(args: list[str], out: Path, capsys) -> str:
    from export.__main__ import main as export_main

    assert export_main([*args, "--out", str(out)]) == 2
    assert not out.exists() or not any(out.iterdir())
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    return err


def test_bad_int8_input_is_one_line_exit_2_nothing_written(onnx_source, model_dir, tmp_path, capsys):
    root, args = onnx_source["root"], onnx_source["args"]
    base = args[:4]
    for value in ("-1", "100.5", "nan", "lots"):
        assert "--max-drop" in _bad([*args, "--max-drop", value], tmp_path / f"drop{value}", capsys)
    assert "applies to --int8 only" in _bad([*base, "--calib", str(root / "calib.npy")], tmp_path / "noint8", capsys)
    assert "--int8 needs calibration data" in _bad([*base, "--int8"], tmp_path / "nocalib", capsys)
    np.save(tmp_path / "shape.npy", np.zeros((4, 28, 28), np.float32))
    np.save(tmp_path / "range.npy", np.full((4, 1, 28, 28), 255.0, np.float32))
    np.save(tmp_path / "dtype.npy", np.array([["a"] * 784] * 2).reshape(2, 1, 28, 28))
    np.save(tmp_path / "pickled.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    for name, words in (("shape", "shape"), ("range", "outside the input range"), ("dtype", "dtype"),
                        ("pickled", "not a readable")):
        err = _bad([*base, "--int8", "--calib", str(tmp_path / f"{name}.npy")], tmp_path / f"calib-{name}", capsys)
        assert err.startswith("export: --calib") and words in err, err
    # nothing to quantize: a graph of elementwise ops only
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "plain",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), tmp_path / "plain.onnx")
    err = _bad(["--onnx", str(tmp_path / "plain.onnx"), "--int8", "--calib", "random"], tmp_path / "plain", capsys)
    assert "nothing to quantize" in err


def test_readme_renders_the_int8_benchmark_and_names_each_short_goal(tmp_path):
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    from readme_results import render_int8

    def row(drop):
        return {"accuracy_float64": 0.92, "drop_pp": drop}

    speed = {"batches": {"1": {"FP32": {"vs_fp32": 1.0}, "INT8 (published)": {"vs_fp32": 1.1}},
                         "8": {"FP32": {"vs_fp32": 1.0}, "INT8 (published)": {"vs_fp32": 0.9}}}}
    report = {"date": "2026-12-07 18:00", "command": "make bench-int8", "load_average_before": [0.4],
              "cpu": {"model": "AMD EPYC", "isa": "AVX-512 VNNI", "cores": 2},
              "ablation": {"seed-cnn": {"per-channel + CLE + absorb + BC": row(0.1), "per-channel naive": row(0.12)},
                           "mobile-cnn": {"per-channel + CLE + absorb + BC": row(0.6),
                                          "per-tensor + CLE + absorb + BC": row(1.5), "per-tensor naive": row(20.0)}},
              "speed": {"seed-cnn": speed, "resnet50": {"batches": {"1": {"INT8 (published)": {"vs_fp32": 1.4}}},
                                                         "int8": {"outputs": {"logits": {"sqnr_db": 14.5}}}}}}
    (tmp_path / "results.json").write_text(json.dumps(report))
    r = render_int8(tmp_path / "results.json")
    assert "| seed-cnn | 92.00% | +0.10 |" in r.body and "1.10x / 0.90x" in r.body and "resnet50 1.40x (SQNR 14.5 dB)" in r.body
    assert r.short == ["mobile-cnn INT8 drop 0.60 points (goal ≤ 0.5)",
                       "mobile-cnn per-tensor with equalization + bias correction: drop 1.50 points (goal ≤ 1)",
                       "ResNet-50 INT8 at batch 1 1.40x FP32 in-process (goal ≥ 1.5x)"]
    assert r.cpu == "AMD EPYC, AVX-512 VNNI, 2 cores" and r.date == "2026-12-07 18:00"
