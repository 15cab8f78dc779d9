"""python -m export --model FILE.py:FACTORY --weights W: the models users bring (tests/byo_models.py),
each with random non-trivial BN statistics, end to end through the CLI; and every bad input."""
import copy
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from safetensors.torch import save_file

import byo_models
from export.__main__ import main
from export.fold import affine_of_bn, fold_backward_arrays
from export.onnx_export import norms_of_activations, read_metadata
from export.verify import ATOL, RTOL, ort_session

ROOT = Path(__file__).resolve().parents[1]
MODELS = Path(byo_models.__file__).resolve()


def save_weights(path: Path, factory: str, randomize: bool = True) -> torch.nn.Module:
    model = getattr(byo_models, factory)()
    if randomize:
        byo_models.randomize(model)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if path.suffix == ".safetensors":
        save_file(state, path)
    else:
        torch.save({"epoch": 3, "state_dict": state}, path)  # a training checkpoint, unwrapped by the loader
    return model.eval()


def bn_nodes(path: Path) -> list[str]:
    return [n.name for n in onnx.load(path).graph.node if n.op_type == "BatchNormalization"]


def n_batchnorms(model: torch.nn.Module) -> int:
    return sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())


# factory, --input-shape, expected layout, BNs the fx pass must keep, modules fx must call whole, more flags
ARCHS = [
    ("resnet", "3,16,16", "NCHW", [], [], {}),
    ("mobilenet", "16,16,3", "NHWC", [], [], {}),
    ("vgg", "1,16,16", "NCHW", [], [], {"weights": "pt", "sample": True, "labels": "txt"}),
    ("preact", "3,8,8", "NCHW", ["block.bn1", "bn"], [], {}),
    ("mlp", "20", "NC", [], [], {"labels": "json", "name": "tiny-mlp"}),
    # the BN after the StdConv2d stays in the fx pass; once exported the standardized weight is a constant
    ("std_conv", "3,10,10", "NCHW", ["4"], [], {}),
    # folded layer by layer inside a forward that iterates its Sequential (ultralytics' DetectionModel)
    ("routed", "3,8,8", "NCHW", [], ["<top level> (Routed)"], {}),
    # with a stand-in for the ONNX graph pass (below), which folds a BN right after a Conv
    ("leafy", "1,7,7", "NCHW", ["3.bn"], ["3 (PadToEven)"], {"stand_in": True}),
    ("shape_branch", "3,8,8", "NCHW", ["bn"], ["<top level> (ShapeBranchNet)"], {"stand_in": True}),
]
CONV1D = ("conv1d", "2,32", "NCW", [], [], {"range": "-1,1", "name": "signals"})  # run as a real command line


def export_and_check(tmp_path, run, factory, shape, layout, fx_kept, untraceable, options):
    """Export tests/byo_models.py:factory with `run(args)` (in-process or a subprocess), then check
    the fold report against the graph, the contract metadata, parity and the dynamic batch."""
    dims = [int(d) for d in shape.split(",")]
    weights = tmp_path / f"{factory}.{options.get('weights', 'safetensors')}"
    model = save_weights(weights, factory)
    out = tmp_path / "out"
    args = ["--model", f"{MODELS}:{factory}", "--weights", str(weights), "--input-shape", shape, "--out", str(out)]
    lo, hi = (float(v) for v in options.get("range", "0,1").split(","))
    if "range" in options:
        args += ["--input-range", options["range"]]
    if options.get("sample"):
        np.save(tmp_path / "sample.npy", np.random.default_rng(1).uniform(lo, hi, (40, *dims)).astype(np.float32))
        args += ["--sample", str(tmp_path / "sample.npy")]
    with torch.no_grad():
        classes = model(torch.zeros(2, *dims)).shape[1]
    labels = [f"kind {i}" for i in range(classes)]
    if options.get("labels") == "txt":
        (tmp_path / "labels.txt").write_text("\n".join(labels) + "\n")
        args += ["--labels", str(tmp_path / "labels.txt")]
    elif options.get("labels") == "json":
        (tmp_path / "labels.json").write_text(json.dumps(labels))
        args += ["--labels", str(tmp_path / "labels.json")]
    if "name" in options:
        args += ["--name", options["name"]]

    run(args)
    report = json.loads((out / "export_report.json").read_text())
    fold = report["fold"]

    # The fx pass folds every BN except the ones it must keep, which say why; fx calls whole
    # exactly the modules it cannot trace.
    assert sum(e["pass"] == "fx" for e in fold["folded"]) == n_batchnorms(model) - len(fx_kept)
    assert [u["module"] for u in fold["untraceable"]] == untraceable
    # Every BatchNormalization left in model.onnx is reported as kept, with its reason; a BN the
    # fx pass kept is gone only if the ONNX graph pass folded it.
    left = bn_nodes(out / "model.onnx")
    assert sorted(left) == sorted(e["node"] for e in fold["kept"] if "node" in e)
    assert all(e["reason"] for e in fold["kept"])
    still_kept = [e["bn"].split(" (")[0] for e in fold["kept"] if e["pass"] == "fx"]
    assert set(still_kept) <= set(fx_kept)
    assert len(fx_kept) - len(still_kept) == sum(e["pass"] == "onnx" for e in fold["folded"])
    for entry in fold["kept"]:
        if untraceable and entry["pass"] == "fx":
            assert "cannot trace" in entry["reason"] and "byo_models.py:" in entry["reason"]
    # (a weight standardization exports as a BatchNormalization of a constant: not a BN of activations)
    assert norms_of_activations(onnx.load(out / "model_unfolded.onnx")) == n_batchnorms(model)
    assert "Dropout" not in {n.op_type for n in onnx.load(out / "model.onnx").graph.node}

    # Contract v3 metadata.
    meta = read_metadata(out / "model.onnx")
    assert meta["contract_version"] == "3" and meta["folded"] == "true"
    assert read_metadata(out / "model_unfolded.onnx")["folded"] == "false"
    assert json.loads(meta["input_shape"]) == [None, *dims] and meta["input_layout"] == layout
    assert json.loads(meta["input_range"]) == [lo, hi]
    assert json.loads(meta["labels"]) == (labels if "labels" in options else [f"class_{i}" for i in range(classes)])
    assert meta["name"] == options.get("name", "byo_models")
    kind = "probabilities" if factory == "mlp" else "logits"
    assert meta["output_kind"] == kind and meta["output_name"] == kind and meta["input_name"] == "input"
    assert json.loads(meta["outputs"]) == [{"name": kind, "shape": [None, classes], "dtype": "float32", "path": ""}]
    source = json.loads(meta["source"])
    assert source["kind"] == "pytorch" and source["path"] == str(weights)
    assert source["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert json.loads(meta["fold_report"]) == fold

    # Verified on what the report says, in batches of 1, 7 and the rest: every fold exact in float64,
    # every float32 form within 1e-5 of the float64 model (these small nets need no float32 clause).
    parity = report["parity"]
    assert parity["passed"] and {1, 7} <= set(parity["batch_sizes"])
    fx_exact = parity["exactness"]["fx pass"]
    assert parity["float64"]["available"]
    if n_batchnorms(model) > len(fx_kept):  # the fx pass folded something: proven exact
        assert fx_exact["status"] == "passed" and fx_exact["passed"] and fx_exact["relative"] < 1e-12, fx_exact
    else:  # nothing to prove: skipped, which is not passed
        assert fx_exact == {"kind": "exactness", "status": "skipped", "why": "it folded nothing"}
    judged = {n: r for n, r in parity["variants"].items() if n != parity["own"]}
    assert len(judged) == 4 and all(r["clause"] == "within 1e-5" for r in judged.values()), judged
    assert parity["images"] == (40 if options.get("sample") else 256)
    assert parity["inputs"].startswith("rows of --sample" if options.get("sample") else "random inputs (uniform in")

    # Dynamic batch: the published graph takes 1 and an odd N, and matches the torch model.
    session = ort_session(str(out / "model.onnx"))
    assert session.get_inputs()[0].shape[0] == "batch"
    for n in (1, 5):
        x = np.random.default_rng(n).uniform(lo, hi, (n, *dims)).astype(np.float32)
        got = session.run([kind], {"input": x})[0]
        with torch.no_grad():
            want = model(torch.from_numpy(x)).numpy()
        assert got.shape == (n, classes)
        np.testing.assert_allclose(got, want, atol=ATOL, rtol=RTOL)
    return report


@pytest.mark.parametrize("factory, shape, layout, fx_kept, untraceable, options", ARCHS, ids=[a[0] for a in ARCHS])
def test_model_folds_exports_and_verifies(factory, shape, layout, fx_kept, untraceable, options, tmp_path, capsys,
                                          monkeypatch):
    if options.get("stand_in"):
        import export.pipeline

        monkeypatch.setattr(export.pipeline, "fold_onnx", stand_in_fold_onnx)

    def run(args):
        assert main(args) == 0, capsys.readouterr().err

    report = export_and_check(tmp_path, run, factory, shape, layout, fx_kept, untraceable, options)
    if factory == "leafy":  # the stand-in folded the BN fx had to keep (inside PadToEven, scope "3")
        assert [(e["pass"], e.get("module")) for e in report["fold"]["folded"]].count(("onnx", "3")) == 1
        assert report["fold"]["kept"] == []
    if factory == "shape_branch":  # the stand-in could not fold it either: both reasons
        assert [e.get("onnx_reason") for e in report["fold"]["kept"]] == ["not after a Conv"]


def test_float32_noise_beyond_1e5_is_published_by_the_float32_clause(tmp_path, capsys):
    """Outputs that are small differences of large terms: float32 itself is ~1e-3 off float64 here,
    so no float32 form can be within 1e-5 of the model. The fold is exact (float64 proves it) and
    every folded form adds no more than 2x over float32's own error: published, and the report says
    which clause passed for each form."""
    weights = tmp_path / "w.safetensors"
    save_weights(weights, "cancelling", randomize=False)
    out = tmp_path / "out"
    assert main(["--model", f"{MODELS}:cancelling", "--weights", str(weights), "--input-shape", "16", "--out", str(out)]) == 0
    report = json.loads((out / "export_report.json").read_text())
    parity = report["parity"]
    assert parity["passed"] and parity["exactness"]["fx pass"]["relative"] < 1e-9
    own = parity["variants"][parity["own"]]
    assert own["tol_error"] > 10, own  # float32 itself: more than 10x the 1e-5 tolerance from float64
    for name, row in parity["variants"].items():
        if name != parity["own"]:
            assert row["clause"] == "<= 2x float32's own" and row["ratio"] <= 2 and not row["within_tolerance"], (name, row)
    assert "VERIFICATION PASSED" in capsys.readouterr().out and (out / "model.onnx").exists()


def stand_in_fold_onnx(model: onnx.ModelProto):
    """A stand-in for the ONNX graph pass being written on branch onnx-fold, with its interface:
    folds a BatchNormalization into the Conv before it (the only consumer), with the shared math."""
    model = copy.deepcopy(model)
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    uses = {}
    for n in graph.node:
        for i in n.input:
            uses[i] = uses.get(i, 0) + 1
    report = {"folded": [], "kept": [], "removed": [], "notes": ["test stand-in"]}
    for bn in [n for n in graph.node if n.op_type == "BatchNormalization"]:
        conv = producer.get(bn.input[0])
        if conv is None or conv.op_type != "Conv" or uses[conv.output[0]] != 1 or conv.input[1] not in inits:
            report["kept"].append({"bn": bn.name, "reason": "not after a Conv", "nodes": [bn.name]})
            continue
        eps = next((a.f for a in bn.attribute if a.name == "epsilon"), 1e-5)
        scale, shift = affine_of_bn(*(numpy_helper.to_array(inits[name]) for name in bn.input[1:]), eps)
        bias = numpy_helper.to_array(inits[conv.input[2]]) if len(conv.input) > 2 else None
        w, b = fold_backward_arrays(numpy_helper.to_array(inits[conv.input[1]]), bias, scale, shift)
        dtype = numpy_helper.to_array(inits[conv.input[1]]).dtype  # float32, or float64 in the exactness check
        graph.initializer.extend([numpy_helper.from_array(w.astype(dtype), conv.name + "_w"),
                                  numpy_helper.from_array(b.astype(dtype), conv.name + "_b")])
        conv.input[1:] = [conv.name + "_w", conv.name + "_b"]
        conv.output[0] = bn.output[0]
        graph.node.remove(bn)
        report["folded"].append({"bn": bn.name, "into": conv.name, "direction": "backward", "nodes": [bn.name]})
    return model, report


# --- bad input: one line on stderr, exit 2, --out untouched ------------------------------------------

@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Weights, labels and samples, good and bad, for the bad-input cases."""
    tmp_path = tmp_path_factory.mktemp("bad-input")
    f = {"vgg": tmp_path / "vgg.safetensors", "resnet": tmp_path / "resnet.safetensors"}
    save_weights(f["vgg"], "vgg")
    save_weights(f["resnet"], "resnet")
    state = {k: v.clone() for k, v in byo_models.vgg().state_dict().items()}
    state["12.weight"] = torch.zeros(32, 100)
    save_file(state, f.setdefault("vgg_shape", tmp_path / "vgg_shape.safetensors"))
    torch.save(byo_models.vgg(), f.setdefault("pickled", tmp_path / "pickled.pt"))  # a whole pickled module
    (f.setdefault("blank", tmp_path / "blank.txt")).write_text("a\n\nb\n")
    (f.setdefault("notjson", tmp_path / "bad.json")).write_text("{not json")
    (f.setdefault("three", tmp_path / "three.txt")).write_text("a\nb\nc\n")
    (f.setdefault("csv", tmp_path / "labels.csv")).write_text("a,b\n")
    np.save(f.setdefault("wrong_shape", tmp_path / "wrong_shape.npy"), np.zeros((4, 1, 8, 8), np.float32))
    np.save(f.setdefault("objects", tmp_path / "objects.npy"), np.array([{"a": 1}], dtype=object), allow_pickle=True)
    np.save(f.setdefault("too_big", tmp_path / "too_big.npy"), np.full((4, 1, 16, 16), 255, np.float32))
    (f.setdefault("garbage", tmp_path / "garbage.safetensors")).write_bytes(b"\x00" * 20)
    save_weights(f.setdefault("value", tmp_path / "value.safetensors"), "value_branch")
    (f.setdefault("broken_py", tmp_path / "broken.py")).write_text("import torch\nraise ImportError('no module named timm')\n")
    return f


def vgg_args(files, **change):
    args = {"--model": f"{MODELS}:vgg", "--weights": files["vgg"], "--input-shape": "1,16,16", **change}
    return [str(x) for kv in args.items() for x in kv if kv[1] is not None]


BAD = {
    "model file missing": (lambda f: vgg_args(f, **{"--model": "/nonexistent/my_model.py:build"}), "does not exist"),
    "factory missing": (lambda f: vgg_args(f, **{"--model": f"{MODELS}:resnet50"}), "has no 'resnet50'"),
    "module import fails": (lambda f: vgg_args(f, **{"--model": f"{f['broken_py']}:build"}), "raised ImportError: no module named timm"),
    "package missing": (lambda f: vgg_args(f, **{"--model": "no_such_pkg.models:build"}), "cannot import no_such_pkg.models"),
    "factory raises": (lambda f: vgg_args(f, **{"--model": f"{MODELS}:broken"}), "broken() raised RuntimeError: cannot build"),
    "factory returns no module": (lambda f: vgg_args(f, **{"--model": f"{MODELS}:not_a_module"}), "returned a dict, not a torch.nn.Module"),
    "weights missing": (lambda f: vgg_args(f, **{"--weights": "/nonexistent/w.safetensors"}), "no such file"),
    "weights not safetensors": (lambda f: vgg_args(f, **{"--weights": f["garbage"]}), "not a readable safetensors file"),
    "keys do not match": (lambda f: vgg_args(f, **{"--weights": f["resnet"]}), "missing: 0.weight, 0.bias, 1.weight"),
    "unexpected keys": (lambda f: vgg_args(f, **{"--weights": f["resnet"]}), "unexpected: bn1.bias, bn1.running_mean, bn1.running_var"),
    "shape mismatch": (lambda f: vgg_args(f, **{"--weights": f["vgg_shape"]}), "1 shape mismatch: 12.weight [32, 100] in the file, [32, 256] in the model"),
    "pickle refused": (lambda f: vgg_args(f, **{"--weights": f["pickled"]}), "torch.load(weights_only=True) refuses it (it pickles torch.nn.modules.container.Sequential"),
    "input shape the model cannot run": (lambda f: vgg_args(f, **{"--input-shape": "3,16,16"}), "expected input[2, 3, 16, 16] to have 1 channels"),
    "input shape not ints": (lambda f: vgg_args(f, **{"--input-shape": "1,sixteen"}), "want comma-separated positive ints"),
    "top level neither fx nor torch.export can capture": (
        lambda f: vgg_args(f, **{"--model": f"{MODELS}:value_branch", "--weights": f["value"], "--input-shape": "3,8,8"}),
        ("cannot export ValueBranchNet: GuardOnDataDependentSymNode", "if x.mean() > 0:",
         "nor can fx trace <top level> (ValueBranchNet)")),
    "labels for a model that is not a classifier": (
        lambda f: vgg_args(f, **{"--model": f"{MODELS}:sequence_output", "--weights": None, "--input-shape": "2,10",
                                 "--labels": f["three"]}),
        "--labels: the model is not a classifier (its outputs: output [N, 4, 8]); pass --class-output NAME"),
    "an output without the batch axis": (
        lambda f: vgg_args(f, **{"--model": f"{MODELS}:not_batch_first", "--weights": None, "--input-shape": "6"}),
        "output 'output_1' ([1]) has shape [5, 2] for a batch of 2; every output must have the batch as its first axis"),
    "an integer output": (lambda f: vgg_args(f, **{"--model": f"{MODELS}:int_output", "--weights": None, "--input-shape": "6"}),
                          "output 'output_1' ([1]) is int64; the contract carries float32 outputs"),
    "class output that is not there": (
        lambda f: vgg_args(f, **{"--class-output": "scores"}), "--class-output 'scores': the model from"),
    "samples out of range": (lambda f: vgg_args(f, **{"--samples": "0"}), "--samples 0: want 1 to 100000 rows"),
    "samples not a number": (lambda f: vgg_args(f, **{"--samples": "many"}), "--samples 'many': want a whole number"),
    "labels with a blank line": (lambda f: vgg_args(f, **{"--labels": f["blank"]}), "line 2 is empty"),
    "labels not json": (lambda f: vgg_args(f, **{"--labels": f["notjson"]}), "not valid JSON"),
    "labels of an unknown format": (lambda f: vgg_args(f, **{"--labels": f["csv"]}), "want a .txt file"),
    "labels count differs": (lambda f: vgg_args(f, **{"--labels": f["three"]}), "3 labels but the model outputs 10 classes"),
    "sample of the wrong shape": (lambda f: vgg_args(f, **{"--sample": f["wrong_shape"]}), "shape [4, 1, 8, 8], want [N, 1, 16, 16]"),
    "sample that needs pickle": (lambda f: vgg_args(f, **{"--sample": f["objects"]}), "not a readable .npy array"),
    "sample outside the range": (lambda f: vgg_args(f, **{"--sample": f["too_big"]}), "outside the input range [0, 1]"),
    "layout of another rank": (lambda f: vgg_args(f, **{"--layout": "NC"}), "--layout NC wants a rank-2 input"),
    "background of a non-image": (lambda f: vgg_args(f, **{"--layout": "other", "--background": "dark"}), "--background applies to image inputs"),
    "bad range": (lambda f: vgg_args(f, **{"--input-range": "1,0"}), "want finite LO < HI"),
    "bad name": (lambda f: vgg_args(f, **{"--name": "my model/v2"}), "use letters, digits"),
    "weights without --model": (lambda f: ["--onnx", str(f["vgg"]), "--weights", str(f["vgg"])], "--weights applies to --model only"),
    "--model without --input-shape": (lambda f: vgg_args(f, **{"--input-shape": None}), "--model needs --input-shape"),
    "unknown flag": (lambda f: vgg_args(f, **{"--colour": "red"}), "unrecognized arguments: --colour"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, files, tmp_path, capsys):
    make_args, message = BAD[case]
    factory = {"labels for a model that is not a classifier": "sequence_output",
               "an output without the batch axis": "not_batch_first", "an integer output": "int_output"}.get(case)
    if factory:
        save_weights(tmp_path / f"{factory}.safetensors", factory)
        args = make_args(files) + ["--weights", str(tmp_path / f"{factory}.safetensors")]
    else:
        args = make_args(files)
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.onnx").write_bytes(b"the previous export")
    code = main(args + ["--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("export: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for part in message if isinstance(message, tuple) else (message,):
        assert part in err, err
    assert [p.name for p in out.iterdir()] == ["model.onnx"] and (out / "model.onnx").read_bytes() == b"the previous export"


def test_real_command_line(tmp_path):
    """`python -m export` as a user runs it: the Conv1d model end to end (checked like the others),
    and a bad input whose stderr is exactly one line; --help names the command and every default."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))

    def run(args):
        done = subprocess.run([sys.executable, "-m", "export", *args], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0 and "VERIFICATION PASSED" in done.stdout and done.stderr == "", done.stderr

    export_and_check(tmp_path, run, *CONV1D)

    bad = subprocess.run([sys.executable, "-m", "export", "--model", f"{MODELS}:conv1d", "--weights",
                          str(tmp_path / "conv1d.safetensors"), "--out", str(tmp_path / "bad")],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and bad.stderr == "export: --model needs --input-shape\n", bad.stderr
    assert bad.stdout == "" and not (tmp_path / "bad").exists()

    from export.__main__ import build_parser

    parser = build_parser()
    assert parser.format_help().startswith("usage: python -m export")
    for action in parser._actions:
        assert action.help and ("(default" in action.help or "(required with" in action.help
                                or action.dest == "help"), action.dest


def test_factories_and_checkpoints_users_have(tmp_path, monkeypatch):
    """package.module:FACTORY from PYTHONPATH; .pth as a plain state_dict, as {"model": ...} and as
    saved from DataParallel ("module." prefixes); a checkpoint missing num_batches_tracked."""
    from export.sources import load_factory, load_state, load_weights

    monkeypatch.syspath_prepend(str(MODELS.parent))
    model = load_factory("byo_models:mlp")
    assert isinstance(model, torch.nn.Sequential)
    state = byo_models.randomize(byo_models.mlp()).state_dict()
    for name, saved in {"plain.pth": state, "wrapped.pt": {"model": state, "optimizer": {"lr": 0.1}},
                        "parallel.pth": {f"module.{k}": v for k, v in state.items()},
                        "no_counts.pth": {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}}.items():
        torch.save(saved, tmp_path / name)
        fresh = byo_models.mlp()
        load_state(fresh, load_weights(tmp_path / name), name)
        assert all(torch.equal(fresh.state_dict()[k], v) for k, v in state.items() if "num_batches" not in k), name


def test_a_form_that_cannot_run_fails_with_its_error():
    from export.verify import fidelity, format_table

    reference = [np.eye(3)]

    def crashes():
        raise RuntimeError("folded module lost its child\nsecond line")

    result = fidelity({"own": [np.eye(3, dtype=np.float32)], "ok": [np.eye(3, dtype=np.float32)], "broken": crashes,
                       "short": [np.eye(3, dtype=np.float32)[:, :2]]}, reference, "own", scores=0)
    assert result["passed"] is False and result["variants"]["ok"].passed
    assert result["variants"]["broken"].why == "RuntimeError: folded module lost its child"
    assert result["variants"]["broken"].status == "failed" and "[3, 2]" in result["variants"]["short"].why
    table = format_table({"images": 3, "passed": False, **result})
    assert "FAILED: RuntimeError: folded module lost its child" in table
