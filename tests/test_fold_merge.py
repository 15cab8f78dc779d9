"""The merge of train-time branches into one conv (export/merge.py), in the fx pass (merge_fx.py) and
the ONNX pass (merge_onnx.py): every block of byo_models.rep_net (RepVGG, MobileOne, FastViT's
RepMixer and RepCPE, RepViT, RepGhost, a large kernel, an AvgPool branch) merged and exact in float64,
each refusal with its reason, and wrong merges (a misaligned window, the identity in the wrong
channel of its group) caught: exit 1 at the merge step, naming the block."""
import dataclasses
import json

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper
from safetensors.torch import save_file
from torch import nn
from torch.nn import functional as F

import byo_models
import export.merge
from export.__main__ import main
from export.fold import FoldReport, fold_batchnorm
from export.merge import identity_kernel
from export.merge_fx import merge_branches
from export.merge_onnx import merge_onnx
from export.onnx_fold import fold_onnx
from export.onnx_graph import node_counts
from test_onnx_fold import bn_node, bn_stats, conv, exact_error, model

EXACT = 1e-9


def fold_and_merge(module: nn.Module, x: torch.Tensor):
    """Fold and merge the float64 model: (max |merged − unfolded| / max |unfolded|, report, merged module)."""
    module = byo_models.randomize(module).double()
    x = x.double()
    merged, report = fold_batchnorm(module, (x[:2],))
    merge_branches(merged, report, (x[:2],))
    with torch.no_grad():
        want, got = module(x), merged(x)
    assert want.abs().max() > 1e-3
    return float((got - want).abs().max() / want.abs().max()), report, merged


def batchnorms(module: nn.Module) -> int:
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules()) + sum(
        n.target is F.batch_norm for m in module.modules() if hasattr(m, "graph") for n in m.graph.nodes)


# --- the fx pass ------------------------------------------------------------------------------------------

def test_every_block_of_the_rep_net_merges_into_one_conv_exactly():
    error, report, merged = fold_and_merge(byo_models.rep_net(), torch.rand(3, 3, 16, 16))
    assert error < EXACT, error
    assert batchnorms(merged) == 0 and report.kept == [] and report.merge_refused == []
    # 12 blocks; left: their 12 convs, RepGhost's primary conv (another input) and the head's Linear
    assert len(report.merged) == 12 and sum(isinstance(m, nn.Conv2d) for m in merged.modules()) == 13
    blocks = {r.block: r for r in report.merged}
    mixer = blocks["features.5"]  # FastViT: x + layer_scale(mixer(x) − norm(x)), depthwise
    assert mixer.into == "features.5.merged (Conv2d 3x3, groups 16)" and mixer.after == ("mul (mul)",)
    assert mixer.bns == ("features.5.mixer.identity (BatchNorm2d)", "features.5.norm.identity (BatchNorm2d)")
    assert sorted(mixer.branches) == ["features.5.mixer.conv_kxk.0.0 (Conv2d 3x3)", "features.5.mixer.conv_scale.0 (Conv2d 1x1)",
                                      "identity", "identity → features.5.mixer.identity (BatchNorm2d)",
                                      "identity → features.5.norm.identity (BatchNorm2d)"]
    assert blocks["features.1"].into == "features.1.merged (Conv2d 3x3, groups 2)"  # RepVGG, grouped
    assert blocks["features.9"].into == "features.9.merged (Conv2d 7x7)"  # 7x7 and 3x3, stride 2
    assert blocks["features.10"].branches[1] == "features.10.pool (AvgPool2d) → features.10.bn (BatchNorm2d)"
    # and in float32, as published: the same merges, within float32 rounding
    f32, r32 = fold_batchnorm(byo_models.randomize(byo_models.rep_net()), (torch.rand(2, 3, 16, 16),))
    merge_branches(f32, r32)
    assert [r.as_dict() for r in r32.merged] == [r.as_dict() for r in report.merged]


def test_the_identity_kernel_respects_groups():
    kernel = identity_kernel(6, 3, (3, 3), (1, 1))  # 3 groups of 2 channels
    assert kernel.shape == (6, 2, 3, 3) and kernel.sum() == 6
    assert [tuple(np.argwhere(kernel[c])[0]) for c in range(6)] == [(c % 2, 1, 1) for c in range(6)]
    x = torch.randn(1, 6, 5, 5, dtype=torch.float64)
    assert torch.equal(F.conv2d(x, torch.from_numpy(kernel), padding=1, groups=3), x)


class Branches(nn.Module):
    """One sum of branches of x, with whatever sits on them."""

    def __init__(self, *branches, post=None):
        super().__init__()
        self.branches, self.post = nn.ModuleList(branches), post or nn.Identity()

    def forward(self, x):
        out = 0
        for b in self.branches:
            out = out + b(x)
        return self.post(out)


class Gated(nn.Module):
    """SE on a branch: conv(x) · sigmoid(mean of conv(x))."""

    def __init__(self, c):
        super().__init__()
        self.conv = byo_models.conv_bn(c, c, 3)

    def forward(self, x):
        y = self.conv(x)
        return y * torch.sigmoid(y.mean((2, 3), keepdim=True))


class OtherInput(nn.Module):
    """conv(a) + BN(b), a and b two values of x (neither below the other)."""

    def __init__(self, c):
        super().__init__()
        self.pre_a, self.pre_b = nn.Conv2d(c, c, 1), nn.Conv2d(c, c, 1)
        self.conv, self.bn = byo_models.conv_bn(c, c, 3), nn.BatchNorm2d(c)

    def forward(self, x):
        return self.conv(F.relu(self.pre_a(x))) + self.bn(F.relu(self.pre_b(x)))


REFUSED = {  # model, the words of the reason
    "an activation on a branch": (lambda: Branches(nn.Sequential(byo_models.conv_bn(4, 4, 3), nn.ReLU()),
                                                   byo_models.conv_bn(4, 4, 1), nn.BatchNorm2d(4)), "an activation"),
    "SE on a branch": (lambda: Branches(Gated(4), byo_models.conv_bn(4, 4, 1), nn.BatchNorm2d(4)),
                       "a product of two tensors, as in SE or attention"),
    "different inputs": (lambda: OtherInput(4), "its branches read different inputs"),
    "an AvgPool that excludes padding": (lambda: Branches(byo_models.conv_bn(4, 4, 3), nn.AvgPool2d(3, 1, 1, count_include_pad=False)),
                                         "excludes its padding from the average"),
    "mismatched stride": (lambda: Branches(nn.Conv2d(4, 4, 5, 1), nn.Conv2d(4, 4, 3, 2)), "mismatched stride"),
    "mismatched groups": (lambda: Branches(byo_models.conv_bn(4, 4, 3, groups=2), byo_models.conv_bn(4, 4, 1)),
                          "mismatched groups"),
    "mismatched dilation": (lambda: Branches(nn.Conv2d(4, 4, 3, padding=2, dilation=2), nn.Conv2d(4, 4, 3, padding=1)),
                            "mismatched dilation"),
    "misaligned windows": (lambda: Branches(nn.Conv2d(4, 4, 2, padding=1, dilation=2), nn.Conv2d(4, 4, 1)),
                           "misaligned windows"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_each_refusal_has_its_reason_and_leaves_the_model_as_it_was(case):
    build, words = REFUSED[case]
    x = torch.rand(2, 4, 6, 6)
    error, report, merged = fold_and_merge(build(), x)
    assert report.merged == [] and len(report.merge_refused) == 1, report.as_dict()
    assert words in report.merge_refused[0].reason, report.merge_refused[0].reason
    assert error < EXACT


def test_a_residual_add_of_another_input_is_neither_merged_nor_reported():
    """ResNet's blocks (conv(relu(conv(x))) + x) are no re-parameterizable blocks: nothing to report."""
    error, report, _ = fold_and_merge(byo_models.resnet(), torch.rand(2, 3, 16, 16))
    assert report.merged == report.merge_refused == [] and error < EXACT


# --- the ONNX pass, on graphs exported without re-parameterization -------------------------------------------

def rep_graph(relu_on_branch: bool = False) -> onnx.ModelProto:
    """A RepVGG block (conv 3x3 + BN, conv 1x1 + BN, BN of x, as a 3-input Sum) with 2 groups, then
    a FastViT-style difference under a layer scale: y + γ·(dwconv(y) − BN(y)), then Relu. With
    `relu_on_branch`, a Relu on the first block's 3x3 branch."""
    c3, i3 = conv("k3", "x", "a", 4, 4, k=3, pads=1, group=2, bias=False)
    c1, i1 = conv("k1", "x", "b", 4, 4, k=1, pads=0, group=2, bias=False)
    dw, idw = conv("dw", "y", "d", 4, 4, k=3, pads=1, group=4)
    branch = [bn_node("bn3", "a", "an0"), helper.make_node("Relu", ["an0"], ["an"], name="relu_on_branch")] \
        if relu_on_branch else [bn_node("bn3", "a", "an")]
    nodes = [c3, *branch, c1, bn_node("bn1", "b", "bn_"), bn_node("bnid", "x", "i"),
             helper.make_node("Sum", ["an", "bn_", "i"], ["y"], name="sum"),
             dw, bn_node("bnn", "y", "n"), helper.make_node("Sub", ["d", "n"], ["diff"], name="diff"),
             helper.make_node("Mul", ["diff", "gamma"], ["scaled"], name="layer_scale"),
             helper.make_node("Add", ["y", "scaled"], ["z"], name="residual"), helper.make_node("Relu", ["z"], ["out"])]
    gamma = onnx.numpy_helper.from_array(np.random.default_rng(1).uniform(0.5, 1.5, (4, 1, 1)).astype(np.float32), "gamma")
    inits = i3 + i1 + idw + bn_stats("bn3", 4) + bn_stats("bn1", 4) + bn_stats("bnid", 4) + bn_stats("bnn", 4) + [gamma]
    graph = helper.make_graph(nodes, "rep", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 6, 6])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 4, 6, 6])], inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    m.ir_version = 9
    onnx.checker.check_model(m, full_check=True)
    return m


def merged_graph(m: onnx.ModelProto, only=None):
    folded, report = fold_onnx(m)
    return merge_onnx(folded, report, only)


def test_the_onnx_pass_merges_a_sum_and_a_difference_under_a_layer_scale():
    m = rep_graph()
    merged, report = merged_graph(m)
    assert node_counts(merged) == {"Conv": 2, "Relu": 1}, node_counts(merged)
    assert [(r.block, len(r.branches), r.bns) for r in report["merged"]] == [
        ("residual", 3, ("bnn (BatchNormalization)",)), ("sum", 3, ("bnid (BatchNormalization)",))]
    assert report["merged"][0].after == ("layer_scale (Mul)",) and report["kept"] == []
    assert "group 2" in report["merged"][1].into
    assert exact_error(m, merged_graph(to64(m))[0]) < EXACT


def to64(m):
    from test_onnx_fold import to_float64
    return to_float64(m)


def test_the_onnx_pass_refuses_with_reasons():
    m = rep_graph(relu_on_branch=True)
    merged, report = merged_graph(m)
    assert [r.block for r in report["merged"]] == ["residual"]
    assert [(r.block, r.reason.split(" on a branch")[0]) for r in report["merge_refused"]] == [
        ("sum", "an activation (relu_on_branch (Relu))")]
    assert [r.bn for r in report["kept"]] == ["bnid (BatchNormalization)"]  # still kept, now with the refusal beside it
    assert exact_error(m, merged_graph(to64(m))[0]) < EXACT


def test_an_onnx_batchnorm_in_training_mode_is_refused():
    c3, i3 = conv("k3", "x", "a", 4, 4, k=3, pads=1)
    nodes = [c3, helper.make_node("BatchNormalization", ["x", "bn.gamma", "bn.beta", "bn.mean", "bn.var"],
                                  ["i", "rm", "rv"], name="bn", training_mode=1), helper.make_node("Add", ["a", "i"], ["y"], name="add")]
    m = model(nodes, i3 + bn_stats("bn", 4), ["N", 4, 6, 6], ["N", 4, 6, 6])
    merged, report = merged_graph(m)
    assert report["merged"] == [] and "training mode" in report["merge_refused"][0].reason


def test_an_asymmetric_window_merges_in_onnx():
    """A 2x2 conv padded (0, 1) and a 1x1 conv: aligned, the merged kernel 2x2 (ONNX pads each end)."""
    c2 = helper.make_node("Conv", ["x", "w2"], ["a"], name="k2", kernel_shape=[2, 2], pads=[0, 0, 1, 1])
    c1, i1 = conv("k1", "x", "b", 3, 3, k=1)
    rng = np.random.default_rng(2)
    w2 = onnx.numpy_helper.from_array(rng.normal(size=(3, 3, 2, 2)).astype(np.float32), "w2")
    m = model([c2, c1, helper.make_node("Add", ["a", "b"], ["y"], name="add")], [w2] + i1, ["N", 3, 5, 5], ["N", 3, 5, 5])
    merged, report = merged_graph(m)
    assert node_counts(merged) == {"Conv": 1} and len(report["merged"]) == 1
    assert exact_error(m, merged_graph(to64(m))[0]) < EXACT


# --- wrong merges are caught: exit 1 at the merge step, the block named ----------------------------------------

def wrong_group(channels, groups, size, centre):  # the 1 in another channel of the group, right for groups=1 only
    kernel = np.zeros((channels, channels // groups, *size))
    for c in range(channels):
        kernel[(c, (c // groups) % (channels // groups), *centre)] = 1.0
    return kernel


def misaligned(right):  # every branch kernel placed at the window's first tap, not where its own taps are
    def wrong(conv, pads, dilation, groups, size):
        return right(dataclasses.replace(conv, pads=pads), pads, dilation, groups, size)
    return wrong


WRONG = {"the identity in the wrong channel of its group": ("identity_kernel", lambda right: wrong_group),
         "a misaligned window": ("placed", misaligned)}


@pytest.fixture(scope="module")
def rep_files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rep")
    torch.manual_seed(0)
    for name in ("rep_net", "rep_small"):
        net = byo_models.randomize(getattr(byo_models, name)())
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, tmp / f"{name}.safetensors")
    onnx.save(rep_graph(), tmp / "rep.onnx")
    c, inits = conv("c", "x", "y", 3, 4, k=3, pads=1)
    onnx.save(model([c], inits, ["N", 3, 5, 5], ["N", 4, 5, 5]), tmp / "plain.onnx")
    return tmp


def run(args, out, capsys):
    code = main([*args, "--out", str(out)])
    captured = capsys.readouterr()
    report = json.loads((out / "export_report.json").read_text()) if (out / "export_report.json").exists() else None
    return code, captured, report


@pytest.mark.parametrize("error", list(WRONG))
def test_a_wrong_fx_merge_fails_at_the_merge_step_naming_the_block(error, rep_files, tmp_path, capsys, monkeypatch):
    name, make_wrong = WRONG[error]
    monkeypatch.setattr(export.merge, name, make_wrong(getattr(export.merge, name)))
    code, captured, report = run(["--model", f"{byo_models.__file__}:rep_small", "--weights",
                                  str(rep_files / "rep_small.safetensors"), "--input-shape", "3,8,8"], tmp_path / "out", capsys)
    assert code == 1, captured.err
    parity = report["parity"]
    assert parity["failed_step"] == "fx merge" and "a wrong merge" in parity["why"], parity
    assert parity["exactness"]["fx pass"]["passed"] and parity["exactness"]["fx merge"]["relative"] > 1e2 * EXACT
    assert "merged alone is" in parity["why"] and ("block 2 merged alone" in parity["why"]  # a grouped identity
                                                   or name != "identity_kernel"), parity["why"]
    assert "VERIFICATION FAILED at fx merge" in captured.out and not (tmp_path / "out" / "model.onnx").exists()


@pytest.mark.parametrize("error", list(WRONG))
def test_a_wrong_onnx_merge_fails_at_the_merge_step(error, rep_files, tmp_path, capsys, monkeypatch):
    name, make_wrong = WRONG[error]
    monkeypatch.setattr(export.merge, name, make_wrong(getattr(export.merge, name)))
    code, captured, report = run(["--onnx", str(rep_files / "rep.onnx")], tmp_path / "out", capsys)
    assert code == 1, captured.err
    parity = report["parity"]
    assert parity["failed_step"] == "ONNX merge" and "a wrong merge" in parity["why"] and "merged alone" in parity["why"]
    assert parity["exactness"]["ONNX pass"]["passed"] and not (tmp_path / "out" / "model.onnx").exists()


def test_the_rep_net_exports_merged_and_verified_and_no_merge_keeps_the_branches(rep_files, tmp_path, capsys):
    args = ["--model", f"{byo_models.__file__}:rep_net", "--weights", str(rep_files / "rep_net.safetensors"),
            "--input-shape", "3,16,16"]
    code, captured, report = run(args, tmp_path / "merged", capsys)
    assert code == 0, captured.err
    fold, parity = report["fold"], report["parity"]
    assert len(fold["merged"]) == 12 and fold["kept"] == [] and fold["merge_refused"] == []
    assert parity["exactness"]["fx merge"]["passed"] and parity["exactness"]["fx merge"]["relative"] < EXACT
    assert report["nodes_folded"].get("Conv") == 13 and "BatchNormalization" not in report["nodes_folded"]
    assert "merged 12 block(s) of branches into one conv each (7 BatchNorm(s) with them)" in report["summary"]
    assert "merged features.5: identity + " in captured.out
    code, captured, report = run(["--onnx", str(rep_files / "rep.onnx"), "--no-merge"], tmp_path / "kept", capsys)
    assert code == 0, captured.err
    fold = report["fold"]
    assert fold["merged"] == [] and any("--no-merge" in n for n in fold["notes"])
    assert [e["bn"] for e in fold["kept"] if e["kind"] == "batchnorm"] == ["bnid (BatchNormalization)", "bnn (BatchNormalization)"]
    assert "fx merge" not in report["parity"]["exactness"] and "ONNX merge" not in report["parity"]["exactness"]


def test_no_merge_on_a_graph_with_nothing_to_merge_is_no_error(rep_files, tmp_path, capsys):
    for flags in ([], ["--no-merge"]):
        code, captured, report = run(["--onnx", str(rep_files / "plain.onnx"), *flags], tmp_path / "-".join(flags or ["x"]), capsys)
        assert code == 0, captured.err
        assert report["fold"]["merged"] == report["fold"]["merge_refused"] == []
        assert report["summary"].startswith("nothing to fold")


def test_a_refused_branch_leaves_the_rest_of_its_sum_to_merge():
    """MobileOne's n-ary sum with an activation on its last conv branch: the sum of the others (and
    the identity BN) still merges; the refusal is reported once."""
    class Chain(nn.Module):
        def __init__(self):
            super().__init__()
            self.identity = nn.BatchNorm2d(4)
            self.convs = nn.ModuleList([byo_models.conv_bn(4, 4, 3), byo_models.conv_bn(4, 4, 3),
                                        nn.Sequential(byo_models.conv_bn(4, 4, 3), nn.ReLU())])

        def forward(self, x):
            out = 0 + self.identity(x)
            for conv in self.convs:
                out = out + conv(x)
            return out

    error, report, merged = fold_and_merge(Chain(), torch.rand(2, 4, 6, 6))
    assert error < EXACT and [len(r.branches) for r in report.merged] == [3] and batchnorms(merged) == 0
    assert [r.reason.split(" on a branch")[0] for r in report.merge_refused] == ["an activation (convs.2.1 (ReLU))"]
