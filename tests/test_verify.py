"""The verification rule (export/verify.py, docs/export.md "What verified means"): float64 is the
ground truth; a wrong fold fails the exactness check of the pass that made it (exit 1, nothing
written, the step named); float32 noise that no float32 program can avoid does not fail an exact fold.
"""
import copy
import dataclasses
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import byo_models
from export.__main__ import main
from export.float64 import Float64Graph, to_float64
from export.onnx_export import export_to_proto
from export.verify import EXACT_RTOL, FACTOR, SPREAD_RUNS, exactness, fidelity, run_torch, ulp_perturbed

RNG = np.random.default_rng(0)


# --- the rule, on plain arrays ----------------------------------------------------------------------

def test_exactness_tells_float64_rounding_from_a_wrong_fold():
    ref = [RNG.normal(size=(32, 10)) * 5]
    scale = np.abs(ref[0]).max()
    assert exactness([ref[0] + 1e-13 * scale], ref, ["y"]).status == "passed"
    assert exactness([ref[0] + 0.5 * EXACT_RTOL * scale], ref, ["y"]).passed
    assert exactness([ref[0] + 2 * EXACT_RTOL * scale], ref, ["y"]).status == "failed"
    wrong = ref[0].copy()
    wrong[:, 3] *= 1 + 1e-4  # one channel's scale off by 1e-4 relative
    result = exactness([wrong], ref, ["y"])
    assert not result.passed and result.relative > 1e-6 and "a wrong fold" in result.why


def test_fidelity_clauses():
    """Within 1e-5 passes; beyond it, at most 2x float32's own error (and at most 2x its argmax
    disagreements) passes; 3x fails; a form that raises fails with its error."""
    ref = RNG.normal(size=(200, 6))
    tol = 1e-5 + 1e-5 * np.abs(ref)
    noise = RNG.choice([-1.0, 1.0], size=ref.shape)
    own = ref + 20 * tol * noise  # float32 itself: 20x the tolerance away (a deep net)
    forms = {"own": [own], "close": [ref + 0.5 * tol * noise], "as noisy": [ref + 30 * tol * noise],
             "too noisy": [ref + 60 * tol * noise]}
    result = fidelity(forms, [ref], "own", scores=0)
    rows = result["variants"]
    assert rows["own"].status == "skipped" and rows["own"].why.startswith("float32's own")  # not judged, not passed
    assert rows["own"].tol_error == pytest.approx(20, rel=1e-6)
    assert rows["close"].clause == "within 1e-5" and rows["close"].status == "passed"
    assert rows["as noisy"].clause == f"<= {FACTOR:g}x float32's own" and rows["as noisy"].ratio == pytest.approx(1.5)
    assert rows["too noisy"].clause is None and rows["too noisy"].status == "failed" and not result["passed"]
    assert "3.0x float32's own error" in rows["too noisy"].why


def test_fidelity_counts_argmax_disagreements_against_float32s_own():
    ref = np.tile(np.arange(4.0), (10, 1))  # argmax 3 everywhere, far from a tie
    own = ref.copy()
    flip_one, flip_three = ref.copy(), ref.copy()
    flip_one[0, 0] = own[0, 0] = 10  # float32's own flips row 0 too
    flip_three[:3, 0] = 10
    result = fidelity({"own": [own], "one": [flip_one], "three": [flip_three]}, [ref], "own", scores=0)
    assert result["variants"]["own"].argmax_disagreements == 1
    assert result["variants"]["one"].passed and result["variants"]["one"].clause == f"<= {FACTOR:g}x float32's own"
    assert not result["variants"]["three"].passed  # 3 disagreements > 2x float32's 1
    no_flip = fidelity({"own": [ref.copy()], "one": [flip_one]}, [ref], "own", scores=0)
    assert not no_flip["variants"]["one"].passed  # float32 itself disagrees nowhere: neither may a fold


def test_fidelity_draws_more_float32_runs_only_when_a_form_needs_them():
    """One float32 run is one sample of float32's error. A form beyond 2x that run is judged against
    the worst of up to SPREAD_RUNS ulp-perturbed runs, drawn one at a time until it passes; past 2x
    the worst of them all it still fails."""
    ref = RNG.normal(size=(100, 5))
    tol = 1e-5 + 1e-5 * np.abs(ref)
    noise = RNG.choice([-1.0, 1.0], size=ref.shape)
    drawn = []

    def runs(sizes):
        return lambda k: drawn.append(k) or [ref + sizes[k - 1] * tol * noise]

    quiet = fidelity({"own": [ref + 20 * tol * noise], "form": [ref + 30 * tol * noise]}, [ref], "own", 0,
                     runs=runs([50] * SPREAD_RUNS))
    assert quiet["passed"] and drawn == [] and "float32_runs" not in quiet  # 1.5x the first run: nothing drawn

    chaotic = [30, 90, 40, 200, 60]  # float32's error, run to run, on an ill-conditioned net
    result = fidelity({"own": [ref + 20 * tol * noise], "form": [ref + 150 * tol * noise]}, [ref], "own", 0,
                      runs=runs(chaotic))
    assert result["passed"] and drawn == [1, 2] and result["own_error"] == pytest.approx(90)
    assert result["float32_runs"]["tol_errors"] == pytest.approx([20, 30, 90])
    assert result["variants"]["form"].clause == f"<= {FACTOR:g}x float32's own"

    drawn.clear()
    wrong = fidelity({"own": [ref + 20 * tol * noise], "form": [ref + 450 * tol * noise]}, [ref], "own", 0,
                     runs=runs(chaotic))
    assert not wrong["passed"] and drawn == list(range(1, SPREAD_RUNS + 1)) and wrong["own_error"] == pytest.approx(200)


def test_ulp_perturbed_moves_every_float_parameter_by_one_ulp():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(64, 2))
    moved = ulp_perturbed(model, 1)
    for (name, a), b in zip(model.state_dict().items(), moved.state_dict().values()):
        if a.is_floating_point():
            a, b = a.numpy(), b.numpy()
            assert np.all((b == np.nextafter(a, np.inf)) | (b == np.nextafter(a, -np.inf))), name
        else:
            assert torch.equal(a, b), name  # num_batches_tracked
    graph = export_to_proto(model.eval(), (2, 3, 6, 6), "x", ["y"])
    moved = ulp_perturbed(graph, 1)
    for a, b in zip(graph.graph.initializer, moved.graph.initializer):
        a, b = onnx.numpy_helper.to_array(a), onnx.numpy_helper.to_array(b)
        if a.dtype == np.float32:
            assert np.all((b == np.nextafter(a, np.float32(np.inf))) | (b == np.nextafter(a, np.float32(-np.inf))))


def test_on_an_ill_conditioned_net_the_float32_runs_stay_far_below_a_wrong_result():
    """The runs measure float32 noise, not slack for a wrong result: on a model whose float32 output is
    far from float64 (Cancelling: small differences of large terms), the worst of the runs is of the
    size of float32's own error, and one channel 1e-4 off is beyond 2x of it."""
    model = byo_models.cancelling()
    x = RNG.uniform(0, 1, (64, 16)).astype(np.float32)
    ref = run_torch(copy.deepcopy(model).double(), x.astype(np.float64), dtype=torch.float64)
    wrong = copy.deepcopy(model)
    with torch.no_grad():
        wrong.bn.weight[3] *= 1 + 1e-4
    result = fidelity({"own": run_torch(model, x), "wrong": run_torch(wrong, x)}, ref, "own", 0,
                      runs=lambda k: run_torch(ulp_perturbed(model, k), x))
    own, runs = result["variants"]["own"].tol_error, result["float32_runs"]["tol_errors"]
    assert own > 10 and max(runs) < 10 * own, runs  # float32 noise, run to run: the same order
    assert not result["passed"] and len(runs) == 1 + SPREAD_RUNS


# --- the float64 ONNX evaluator -----------------------------------------------------------------------

class Mixed(nn.Module):
    """Conv (grouped, strided, padded), BN, pools, ConvTranspose, Gemm: the ops float64.py computes with torch (GELU is left out: its
    exported constants, 1/sqrt(2) in float32, are not the float64 ones torch uses)."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=4), nn.MaxPool2d(2, ceil_mode=True),
                                      nn.ConvTranspose2d(8, 4, 2, stride=2), nn.AvgPool2d(3, 1, 1), nn.SiLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))

    def forward(self, x):
        return self.head(self.features(x))


def test_float64_graph_computes_what_torch_computes_in_float64():
    model = byo_models.randomize(Mixed())
    graph = export_to_proto(model, (2, 3, 10, 10), "x", ["y"])
    double = to_float64(graph)
    assert not any(t.data_type == onnx.TensorProto.FLOAT for t in double.graph.initializer)
    x = RNG.uniform(0, 1, (5, 3, 10, 10))
    got = Float64Graph(graph)(x)[0]
    with torch.no_grad():
        want = model.double()(torch.from_numpy(x)).numpy()
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12 * np.abs(want).max())


# --- wrong folds, injected into each pass: exit 1, the step named, nothing written ----------------------

class Injected(nn.Module):
    """A conv with a bias before a BN (backward fold), a BN before a padded conv (kept: a forward fold
    there would be wrong), and a BN before an unpadded conv (forward fold)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.bn2, self.conv2 = nn.BatchNorm2d(8), nn.Conv2d(8, 8, 3, padding=1)
        self.bn3, self.conv3 = nn.BatchNorm2d(8), nn.Conv2d(8, 6, 1)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4))

    def forward(self, x):
        x = self.bn2(torch.relu(self.bn1(self.conv1(x))))
        x = self.bn3(torch.relu(self.conv2(x)))
        return self.head(self.conv3(x))


def injected() -> nn.Module:
    return Injected()


def scale_off(real):
    def wrong(*args, **kwargs):
        scale, shift = real(*args, **kwargs)
        scale = scale.copy()
        scale[1] *= 1 + 1e-4
        return scale, shift
    return wrong


def bias_dropped(real):
    return lambda weight, bias, scale, shift, *a, **k: real(weight, None, scale, shift, *a, **k)


def channels_swapped(real):
    def wrong(*args, **kwargs):
        w, b = real(*args, **kwargs)
        w = w.copy()
        w[[0, 1]] = w[[1, 0]]
        return w, b
    return wrong


FX = {  # what to patch in export.fold, and how
    "one channel's scale off by 1e-4": ("affine_of_bn", scale_off),
    "a dropped bias": ("fold_backward_arrays", bias_dropped),
    "two channels swapped": ("fold_backward_arrays", channels_swapped),
    "a forward fold through a padded conv": ("_padded", lambda real: lambda conv: False),
}


@pytest.fixture(scope="module")
def injected_files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("injected")
    torch.manual_seed(0)  # the conv weights: torch's default init, from the global generator
    model = byo_models.randomize(Injected())
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp / "w.safetensors")
    onnx.save(export_to_proto(model, (2, 3, 12, 12), "x", ["y"]), tmp / "injected.onnx")  # the BNs still in
    return tmp


def run_export(args, out, capsys):
    code = main([*args, "--out", str(out)])
    captured = capsys.readouterr()
    return code, captured, json.loads((out / "export_report.json").read_text()) if (out / "export_report.json").exists() else None


def test_the_unbroken_passes_publish(injected_files, tmp_path, capsys):
    """The control: without injected errors both sources publish, every fold exact."""
    code, captured, report = run_export(["--model", f"{__file__}:injected", "--weights",
                                         str(injected_files / "w.safetensors"), "--input-shape", "3,12,12"],
                                        tmp_path / "torch", capsys)
    assert code == 0, captured.err
    assert report["parity"]["exactness"]["fx pass"]["status"] == "passed"
    assert [e["bn"].split(" ")[0] for e in report["fold"]["kept"] if e["pass"] == "fx"] == ["bn2"]
    code, captured, report = run_export(["--onnx", str(injected_files / "injected.onnx")], tmp_path / "onnx", capsys)
    assert code == 0, captured.err
    assert report["parity"]["exactness"]["ONNX pass"]["status"] == "passed" and report["fold"]["folded"]


@pytest.mark.parametrize("error", list(FX))
def test_a_wrong_fold_in_the_fx_pass_fails_before_any_export(error, injected_files, tmp_path, capsys, monkeypatch):
    import export.fold
    import export.pipeline

    name, make_wrong = FX[error]
    monkeypatch.setattr(export.fold, name, make_wrong(getattr(export.fold, name)))
    exported = []
    monkeypatch.setattr(export.pipeline, "export_to_proto", lambda *a, **k: exported.append(a) or export_to_proto(*a, **k))
    out = tmp_path / "out"
    code, captured, report = run_export(["--model", f"{__file__}:injected", "--weights",
                                         str(injected_files / "w.safetensors"), "--input-shape", "3,12,12"], out, capsys)
    assert code == 1, captured.err
    assert report["parity"]["failed_step"] == "fx pass" and "a wrong fold" in report["parity"]["why"]
    assert report["parity"]["exactness"]["fx pass"]["relative"] > 1e2 * EXACT_RTOL  # far above float64's rounding
    assert "VERIFICATION FAILED at fx pass" in captured.out and "no model written" in captured.err
    assert exported == [] and not (out / "model.onnx").exists()


ONNX = {  # what to patch in export.onnx_fold
    "one channel's scale off by 1e-4": ("affine_of_bn", scale_off),
    "a dropped bias": ("fold_backward_arrays", bias_dropped),
    "two channels swapped": ("fold_backward_arrays", channels_swapped),
    "a forward fold through a padded conv": (
        "attr", lambda real: lambda node, name, default=None: [] if name == "pads" else real(node, name, default)),
}


@pytest.mark.parametrize("error", list(ONNX))
def test_a_wrong_fold_in_the_onnx_pass_fails(error, injected_files, tmp_path, capsys, monkeypatch):
    import export.onnx_fold

    name, make_wrong = ONNX[error]
    monkeypatch.setattr(export.onnx_fold, name, make_wrong(getattr(export.onnx_fold, name)))
    out = tmp_path / "out"
    code, captured, report = run_export(["--onnx", str(injected_files / "injected.onnx")], out, capsys)
    assert code == 1, captured.err
    assert report["parity"]["failed_step"] == "ONNX pass" and "a wrong fold" in report["parity"]["why"]
    assert "VERIFICATION FAILED at ONNX pass" in captured.out and not (out / "model.onnx").exists()


# --- when no float64 copy runs -----------------------------------------------------------------------

def test_a_model_without_a_float64_copy_is_judged_by_the_float32_clause_and_says_so(tmp_path, capsys):
    model = byo_models.randomize(byo_models.float32_inside())
    save_file(model.state_dict(), tmp_path / "w.safetensors")
    code, captured, report = run_export(["--model", f"{byo_models.__file__}:float32_inside", "--weights",
                                         str(tmp_path / "w.safetensors"), "--input-shape", "6"], tmp_path / "out", capsys)
    assert code == 0, captured.err
    parity = report["parity"]
    assert not parity["float64"]["available"] and "cannot run in float64" in parity["float64"]["why"]
    # nothing proves the ONNX pass here: skipped, which is never passed
    assert parity["reference"] == "the unfolded float32 model" and parity["exactness"] == {
        "ONNX pass": {"kind": "exactness", "status": "skipped", "why": parity["exactness"]["ONNX pass"]["why"]}}
    assert all(r["clause"] == "within 1e-5" and r["kind"] == "float32 vs float32"
               for n, r in parity["variants"].items() if n != parity["own"])
    assert "fold exactness not proven, the float32 clause decided" in captured.out


# --- typed results and exit codes (contract 1 and 2 of the team plan) -------------------------------------

def test_a_check_has_a_status_and_a_skipped_one_is_never_passed():
    from export.errors import InternalError
    from export.verify import Exactness, Float32VsFloat64, tally

    done = Exactness(status="passed", relative=1e-15, max_abs_diff=2e-15)
    skipped = Exactness(status="skipped", why="it folded nothing")
    wrong = Float32VsFloat64(status="failed", why="3.1e-03 from the reference", max_abs_diff=3.1e-3, tol_error=310.0)
    assert done.as_dict() == {"kind": "exactness", "status": "passed", "passed": True, "relative": 1e-15,
                              "max_abs_diff": 2e-15}
    assert skipped.as_dict() == {"kind": "exactness", "status": "skipped", "why": "it folded nothing"}
    assert not skipped.passed and wrong.as_dict()["passed"] is False and wrong.as_dict()["why"]
    assert tally({"fx pass": done, "ONNX pass": skipped, "ORT folded": wrong}) == {
        "passed": ["fx pass"], "failed": ["ORT folded"], "skipped": ["ONNX pass"]}
    with pytest.raises(InternalError):
        Exactness(status="skipped")  # a check that did not pass says why
    with pytest.raises(InternalError):
        Exactness(status="ok")
    with pytest.raises(dataclasses.FrozenInstanceError):
        done.status = "failed"


def test_verify_only_reports_the_onnx_pass_as_not_checked(injected_files, tmp_path, capsys):
    """--verify-only does not re-run the ONNX pass: the check is skipped, never passed, and the verdict
    line says which checks were not made."""
    code, captured, _ = run_export(["--onnx", str(injected_files / "injected.onnx")], tmp_path / "out", capsys)
    assert code == 0, captured.err
    code, captured, _ = run_export(["--onnx", str(injected_files / "injected.onnx"), "--verify-only"],
                                   tmp_path / "out", capsys)
    assert code == 0, captured.err
    assert "ONNX pass                          skipped: not re-run by --verify-only" in captured.out
    assert "checks passed; not checked: ONNX pass (not re-run by --verify-only" in captured.out


@pytest.mark.parametrize("where, error", [("simplify", ValueError("clean-up broke an invariant")),
                                          ("fold_onnx", KeyError("missing initializer"))])
def test_an_internal_error_exits_3_not_2(where, error, injected_files, tmp_path, capsys, monkeypatch):
    """A bug of ours (here: an exception inside the clean-up or the ONNX pass) is exit 3 with one line that
    says so and names the traceback's file; a ValueError no longer passes for bad input (exit 2)."""
    import export.pipeline

    def broken(*args, **kwargs):
        raise error

    monkeypatch.setattr(export.pipeline, where, broken)
    out = tmp_path / "out"
    args = (["--model", f"{__file__}:injected", "--weights", str(injected_files / "w.safetensors"), "--input-shape",
             "3,12,12"] if where == "simplify" else ["--onnx", str(injected_files / "injected.onnx")])
    code, captured, report = run_export(args, out, capsys)
    assert code == 3, captured.err
    line = captured.err.strip()
    assert "\n" not in line and "internal error, a bug in bnfold and not your input" in line, line
    assert type(error).__name__ in line and "nothing published" in line
    trace = Path(line.split("the traceback is in ")[1].split(" ")[0])
    assert "Traceback" in trace.read_text() and where in trace.read_text()
    trace.unlink()
    assert not (out / "model.onnx").exists() and report is None


def test_bad_input_stays_exit_2(injected_files, tmp_path, capsys):
    code, captured, report = run_export(["--model", f"{__file__}:injected", "--weights",
                                         str(injected_files / "w.safetensors"), "--input-shape", "3,12"],
                                        tmp_path / "out", capsys)
    assert code == 2 and captured.err.startswith("export: ") and captured.err.count("\n") == 1, captured.err
    assert "internal error" not in captured.err and report is None and not (tmp_path / "out").exists()


def test_the_results_table_says_skipped_and_refuses_an_old_report(tmp_path):
    """export/report.py (results.md, the README's model section): a skipped check is said to be skipped,
    with its reason, never shown as a figure that passed; a report of the old format (checks without a
    status) is refused with the command that makes a new one."""
    from export.report import REPORT_FORMAT, exactness_cell, results_table
    from export.verify import Exactness

    assert exactness_cell("fx pass", Exactness(status="passed", relative=6e-16).as_dict()) == "fx pass 6.0e-16"
    assert exactness_cell("ONNX pass", Exactness(status="skipped", why="not re-run").as_dict()) == \
        "ONNX pass skipped: not re-run"
    old = {"name": "m", "parity": {"exactness": {"ONNX pass": {"skipped": "x", "passed": True}}, "variants": {}}}
    (tmp_path / "export_report.json").write_text(json.dumps(old))
    with pytest.raises(ValueError, match="older bnfold.*export again"):
        results_table(tmp_path)
    assert REPORT_FORMAT == 2
