"""The fx pass's coverage table (export/fold.py LAYERS and NORMS), one case per entry, each folded
in float64 with random non-trivial statistics (γ, β, μ, σ² all random, some γ < 0) and compared
with the unfolded model in float64: an exact fold agrees to ~1e-12 relative, a wrong one (a wrong
weight axis, a dropped bias, one channel's scale off by 1e-4) is far above the 1e-9 used here —
the mutation tests at the end show each check catching one."""
import random

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import export.fold
import export.fold_math
from export.fold import CONV_TRANSPOSE_FORWARD, fold_batchnorm, fold_forward_arrays

EXACT = 1e-9  # relative to the output's largest value, float64


# --- look-alikes of modules we cannot import here (torchvision and timm need torch 2.14) -----------

class FrozenBatchNorm2d(nn.Module):
    """torchvision.ops.FrozenBatchNorm2d, copied: statistics as buffers, x·scale + bias in forward."""

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x):
        w = self.weight.reshape(1, -1, 1, 1)
        b = self.bias.reshape(1, -1, 1, 1)
        rv = self.running_var.reshape(1, -1, 1, 1)
        rm = self.running_mean.reshape(1, -1, 1, 1)
        scale = w * (rv + self.eps).rsqrt()
        bias = b - rm * scale
        return x * scale + bias


class BatchNormAct2d(nn.BatchNorm2d):
    """timm.layers.BatchNormAct2d's forward: BatchNorm2d's own code via F.batch_norm, then drop and act."""

    def __init__(self, num_features: int, act: type = nn.ReLU, **kwargs):
        super().__init__(num_features, **kwargs)
        self.drop = nn.Identity()
        self.act = act()

    def forward(self, x):
        torch._assert(x.ndim == 4, f"expected 4D input (got {x.ndim}D input)")
        exponential_average_factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
        bn_training = True if self.training else (self.running_mean is None) and (self.running_var is None)
        x = F.batch_norm(x, self.running_mean if not self.training or self.track_running_stats else None,
                         self.running_var if not self.training or self.track_running_stats else None,
                         self.weight, self.bias, bn_training, exponential_average_factor, self.eps)
        return self.act(self.drop(x))


class FunctionalBN(nn.Module):
    """F.batch_norm on the module's own constant buffers (no BatchNorm module at all)."""

    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(3, c, 3, padding=1, bias=False)
        for name in ("mean", "var", "gamma", "beta"):
            self.register_buffer(name, torch.ones(c))

    def forward(self, x):
        return F.relu(F.batch_norm(self.conv(x), self.mean, self.var, self.gamma, self.beta, False, 0.0, 1e-3))


class PlainSubclass(nn.BatchNorm2d):
    """A BatchNorm2d subclass that keeps BatchNorm2d's forward (a name, a default)."""


# --- helpers ------------------------------------------------------------------------------------------

def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random statistics on every BatchNorm-like module and buffer set, some γ < 0; random weights."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, FunctionalBN):
                c = m.mean.numel()
                m.mean.copy_(torch.randn(c, generator=gen))
                m.var.copy_(torch.rand(c, generator=gen) * 2 + 0.1)
                m.gamma.copy_((torch.rand(c, generator=gen) + 0.5) * torch.where(torch.rand(c, generator=gen) < 0.3, -1, 1))
                m.beta.copy_(torch.randn(c, generator=gen))
            elif hasattr(m, "running_var") and m.running_var is not None:
                c = m.running_var.numel()
                m.running_mean.copy_(torch.randn(c, generator=gen))
                m.running_var.copy_(torch.rand(c, generator=gen) * 2 + 0.1)
                if m.weight is not None:
                    m.weight.copy_((torch.rand(c, generator=gen) + 0.5) * torch.where(torch.rand(c, generator=gen) < 0.3, -1, 1))
                    m.bias.copy_(torch.randn(c, generator=gen))
            elif isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)):
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * 0.5)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=gen))
    return model.eval()


def norms_left(module: nn.Module) -> int:
    return sum(isinstance(m, (nn.modules.batchnorm._BatchNorm, FrozenBatchNorm2d)) for m in module.modules()) + sum(
        n.target is F.batch_norm for m in module.modules() if hasattr(m, "graph") for n in m.graph.nodes)


def flat(out) -> torch.Tensor:
    return torch.cat([flat(o) for o in out]) if isinstance(out, (list, tuple)) else out.reshape(-1)


def fold_error(model: nn.Module, x: torch.Tensor, example: bool = True):
    """Fold the float64 model; (max |folded − unfolded| / max |unfolded|, report, folded module)."""
    model = model.double().eval()
    x = x.double()
    folded, report = fold_batchnorm(model, (x,) if example else None)
    with torch.no_grad():
        want, got = flat(model(x)), flat(folded(x))
    assert want.abs().max() > 1e-3
    return float((got - want).abs().max() / want.abs().max()), report, folded


def assert_exact(model, x, example=True):
    error, report, folded = fold_error(model, x, example)
    assert error < EXACT, (error, report)
    return report, folded


# --- backward folds: every layer type of LAYERS, groups and depthwise -----------------------------------

def conv_cases():
    rng = random.Random(1)
    cases = []
    for dims in (1, 2, 3):
        for transposed in (False, True):
            for groups in ("1", "2", "depthwise"):
                c_in = rng.choice([4, 8]) if groups != "depthwise" else 6
                c_out = {"1": rng.choice([3, 5]), "2": 6 if c_in == 4 else 4, "depthwise": 6}[groups]
                stride = rng.choice([1, 2])
                cases.append(dict(dims=dims, transposed=transposed, c_in=c_in, c_out=c_out,
                                  groups={"1": 1, "2": 2, "depthwise": 6}[groups], kernel=rng.choice([1, 2, 3]),
                                  stride=stride, padding=rng.choice([0, 1]), dilation=rng.choice([1, 2]),
                                  output_padding=stride - 1 if transposed and rng.random() < 0.5 else 0,
                                  bias=rng.random() < 0.5, affine=rng.random() < 0.8))
    return cases


def conv_bn(case) -> tuple[nn.Module, torch.Tensor]:
    d = case["dims"]
    kind = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d) if case["transposed"] else (nn.Conv1d, nn.Conv2d, nn.Conv3d)
    extra = {"output_padding": case["output_padding"]} if case["transposed"] else {}
    conv = kind[d - 1](case["c_in"], case["c_out"], case["kernel"], stride=case["stride"], padding=case["padding"],
                       dilation=case["dilation"], groups=case["groups"], bias=case["bias"], **extra)
    bn = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)[d - 1](case["c_out"], affine=case["affine"])
    size = (7, 6, 5)[d - 1]
    return randomize(nn.Sequential(conv, bn, nn.ReLU())), torch.randn(2, case["c_in"], *(size,) * d)


@pytest.mark.parametrize("case", conv_cases(), ids=lambda c: "-".join(f"{k}{int(v)}" for k, v in c.items()))
def test_conv_and_conv_transpose_fold_backward(case):
    model, x = conv_bn(case)
    report, folded = assert_exact(model, x)
    assert [(f.layers, f.direction, f.kind, f.module) for f in report.folded] == [(("0",), "backward", "batchnorm", "1")]
    assert norms_left(folded) == 0 and report.kept == []


@pytest.mark.parametrize("bias", [True, False])
def test_linear_bn1d_folds_backward(bias):
    model = randomize(nn.Sequential(nn.Linear(9, 7, bias=bias), nn.BatchNorm1d(7), nn.ReLU(), nn.Linear(7, 3)))
    report, _ = assert_exact(model, torch.randn(5, 9))
    assert report.folded[0].into == "0 (Linear)"


# --- the norm side of the table: every kind of BatchNorm ------------------------------------------------

NORM_CASES = {
    "SyncBatchNorm": lambda: nn.Sequential(nn.Conv2d(3, 6, 3), nn.SyncBatchNorm(6), nn.ReLU()),
    "FrozenBatchNorm2d": lambda: nn.Sequential(nn.Conv2d(3, 6, 3, bias=False), FrozenBatchNorm2d(6), nn.ReLU()),
    "FrozenBatchNorm2d-after-ConvTranspose": lambda: nn.Sequential(nn.ConvTranspose2d(4, 6, 3, 2, groups=2),
                                                                   FrozenBatchNorm2d(6, eps=1e-3), nn.ReLU()),
    "BatchNormAct2d": lambda: nn.Sequential(nn.Conv2d(3, 6, 3, bias=False), BatchNormAct2d(6, eps=1e-3)),
    "BatchNormAct2d-SiLU-no-affine": lambda: nn.Sequential(nn.Conv2d(3, 6, 3), BatchNormAct2d(6, act=nn.SiLU, affine=False)),
    "F.batch_norm-on-buffers": lambda: FunctionalBN(6),
    "BatchNorm2d-subclass": lambda: nn.Sequential(nn.Conv2d(3, 6, 3), PlainSubclass(6), nn.ReLU()),
}


NORM_NAMES = {"F.batch_norm-on-buffers": "<top level> (FunctionalBN)", "SyncBatchNorm": "1 (SyncBatchNorm)",
              "BatchNorm2d-subclass": "1 (PlainSubclass)"}


@pytest.mark.parametrize("name", NORM_CASES)
def test_every_kind_of_batchnorm_folds(name):
    model = randomize(NORM_CASES[name]())
    report, folded = assert_exact(model, torch.randn(2, 3 if "ConvTranspose" not in name else 4, 8, 8))
    assert len(report.folded) == 1 and report.kept == [] and report.untraceable == [], report
    assert norms_left(folded) == 0
    assert report.folded[0].bn == NORM_NAMES.get(name, f"1 ({name.split('-')[0]})")
    if name.startswith("BatchNormAct2d"):  # the normalization is folded, its activation still applied
        act = nn.ReLU if "SiLU" not in name else nn.SiLU
        assert any(isinstance(m, act) for m in folded.modules())


def test_frozen_look_alike_that_is_not_a_batchnorm_is_left_alone():
    """The four buffers and an eps, but the forward does something else: the probe says no, fx traces
    into it, nothing is folded, and the result is the unfolded model's."""
    class NotFrozen(FrozenBatchNorm2d):
        def forward(self, x):
            return torch.tanh(super().forward(x))

    model = randomize(nn.Sequential(nn.Conv2d(3, 6, 3), NotFrozen(6)))
    error, report, _ = fold_error(model, torch.randn(2, 3, 8, 8))
    assert report.folded == [] and error == 0.0


class StdConv2d(nn.Conv2d):
    """timm's StdConv2d: the weight standardized with F.batch_norm in training mode at every call."""

    def forward(self, x):
        w = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None, training=True,
                         momentum=0.0, eps=1e-6).reshape_as(self.weight)
        return F.conv2d(x, w, self.bias, self.stride, self.padding)


def test_weight_standardization_is_no_batchnorm_and_the_bn_after_it_still_folds():
    """F.batch_norm on a weight (batch statistics of the weight, the same for every input) is left as
    it is and not reported; a BN of activations with batch statistics is still refused."""
    model = randomize(nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), StdConv2d(6, 4, 1),
                                    nn.BatchNorm2d(4), nn.ReLU()))
    error, report, folded = fold_error(model, torch.randn(2, 3, 8, 8))
    assert error < EXACT and [f.bn for f in report.folded] == ["1 (BatchNorm2d)"]
    # a BN after a StdConv2d does not fold into it (the standardization would undo its scale): kept, both reasons
    assert [k.bn for k in report.kept] == ["4 (BatchNorm2d)"], report.kept
    assert report.kept[0].reason.startswith("backward: its input comes from conv2d"), report.kept

    class BatchStats(nn.Module):
        def forward(self, x):
            return F.batch_norm(x, None, None, training=True)

    with pytest.raises(export.fold.FoldError, match="batch statistics even in eval mode"):
        fold_batchnorm(nn.Sequential(nn.Conv2d(3, 6, 3), BatchStats()).double(), (torch.randn(2, 3, 8, 8).double(),))


class LinearNorm(nn.Module):
    """timm's LeViT block: a Linear on [B, N, C], its BatchNorm1d over the tokens flattened to [B·N, C]."""

    def __init__(self, cin, cout, reuse=False):
        super().__init__()
        self.linear, self.bn, self.reuse = nn.Linear(cin, cout, bias=False), nn.BatchNorm1d(cout), reuse

    def forward(self, x):
        x = self.linear(x)
        y = self.bn(x.flatten(0, 1)).reshape_as(x)
        return y + x if self.reuse else y


def test_bn_of_flattened_tokens_folds_into_the_linear_before():
    model = randomize(nn.Sequential(LinearNorm(8, 16), nn.GELU(), LinearNorm(16, 4)))
    error, report, folded = fold_error(model, torch.randn(3, 5, 8))
    assert error < EXACT and len(report.folded) == 2 and report.kept == [], report.as_dict()
    assert norms_left(folded) == 0
    # the Linear's output is also read by the residual add: folding would change it, so the BN stays
    error, report, _ = fold_error(randomize(LinearNorm(8, 8, reuse=True)), torch.randn(3, 5, 8))
    assert error == 0.0 and report.folded == [] and "read by 2 nodes" in report.kept[0].reason, report.kept


# --- forward folds, and the ones that are refused ----------------------------------------------------------

@pytest.mark.parametrize("dims, groups", [(1, 1), (2, 2), (3, 1), (2, 4)])
def test_bn_folds_forward_into_unpadded_conv(dims, groups):
    conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[dims - 1]
    bn = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)[dims - 1]
    model = randomize(nn.Sequential(conv(2, 4, 3, padding=1), nn.ReLU(), bn(4), conv(4, 8, 3, stride=2, groups=groups)))
    report, _ = assert_exact(model, torch.randn(2, 2, *(7,) * dims))
    assert [(f.into, f.direction) for f in report.folded] == [(f"3 ({conv.__name__})", "forward")]


@pytest.mark.parametrize("groups", [1, 2])
def test_bn_before_conv_transpose_is_kept_and_that_fold_would_be_wrong(groups):
    model = randomize(nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.BatchNorm2d(4),
                                    nn.ConvTranspose2d(4, 6, 3, stride=2, groups=groups)))
    x = torch.randn(2, 2, 6, 6)
    report, _ = assert_exact(model, x)
    assert report.folded == [] and report.kept[0].reason.endswith(f"forward: {CONV_TRANSPOSE_FORWARD} (3)")
    if groups == 1:  # the refused fold, done as for a conv (input axis 0, shift summed over the kernel): wrong
        model = model.double()
        scale, shift = export.fold.bn_scale_shift(model[2])
        w, b = fold_forward_arrays(model[3].weight.detach().numpy(), model[3].bias.detach().numpy(), scale, shift,
                                   out_axis=1, in_axis=0)
        forced = nn.ConvTranspose2d(4, 6, 3, stride=2).double()
        forced.weight.data, forced.bias.data = torch.from_numpy(w), torch.from_numpy(b)
        with torch.no_grad():
            h = model[1](model[0](x.double()))
            assert (forced(h) - model[3](model[2](h))).abs().max() > 1e-2


def test_flatten_from_dim_0_does_not_fold():
    class FlatAll(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.bn, self.fc2 = nn.Linear(6, 6), nn.BatchNorm1d(6), nn.Linear(12, 2)

        def forward(self, x):
            return self.fc2(torch.flatten(self.bn(torch.relu(self.fc1(x)))))

    report, _ = assert_exact(randomize(FlatAll()), torch.randn(2, 6))
    assert report.folded == [] and "flatten" in report.kept[0].reason


def test_linear_on_a_3d_tensor_is_not_folded_with_the_bn_of_its_middle_axis():
    """BatchNorm1d on [N, L, F] normalizes axis 1 (L); a Linear works on the last axis (F). With
    L == F the channel counts line up, but the fold would be wrong: the example's shapes tell."""
    model = randomize(nn.Sequential(nn.Linear(5, 5), nn.BatchNorm1d(5), nn.ReLU()))
    report, _ = assert_exact(model, torch.randn(3, 5, 5))
    assert report.folded == [] and "rank-3" in report.kept[0].reason


# --- BN after a concatenation ----------------------------------------------------------------------------

class Inception(nn.Module):
    """Branches of different kernels joined by torch.cat, then one BN over all channels."""

    def __init__(self, c=3):
        super().__init__()
        self.b1 = nn.Conv2d(c, 4, 1)
        self.b3 = nn.Conv2d(c, 5, 3, padding=1, bias=False)
        self.b5 = nn.Conv2d(c, 3, 5, padding=2, groups=3)
        self.bn = nn.BatchNorm2d(12)

    def forward(self, x):
        return F.relu(self.bn(torch.cat([self.b1(x), self.b3(x), self.b5(x)], dim=1)))


class MixedConv2d(nn.ModuleDict):
    """timm's MixedConv2d: input channels split across kernels of 3, 5, 7, outputs concatenated; a
    BatchNormAct2d after it (MixNet's blocks)."""

    def __init__(self, c_in=6, c_out=9):
        super().__init__({str(k): nn.Conv2d(2, 3, k, padding=k // 2, bias=False) for k in (3, 5, 7)})
        self.splits = [2, 2, 2]

    def forward(self, x):
        x_split = torch.split(x, self.splits, 1)
        return torch.cat([c(x_split[i]) for i, c in enumerate(self.values())], 1)


class MixBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = MixedConv2d()
        self.bn = BatchNormAct2d(9)

    def forward(self, x):
        return self.bn(self.conv(x))


def test_bn_after_concat_of_convs_folds_into_each():
    report, folded = assert_exact(randomize(Inception()), torch.randn(2, 3, 8, 8))
    assert [r.as_dict() for r in report.folded] == [{
        "bn": "bn (BatchNorm2d)", "into": "b1 (Conv2d), b3 (Conv2d), b5 (Conv2d)", "layers": ["b1", "b3", "b5"],
        "direction": "backward", "kind": "batchnorm", "pass": "fx", "module": "bn"}]
    assert norms_left(folded) == 0


def test_mixnet_block_folds_its_batchnormact_into_the_mixed_convs():
    report, folded = assert_exact(randomize(MixBlock()), torch.randn(2, 6, 9, 9))
    assert [(f.bn, f.into) for f in report.folded] == [
        ("bn (BatchNormAct2d)", "conv.3 (Conv2d), conv.5 (Conv2d), conv.7 (Conv2d)")]
    assert norms_left(folded) == 0


def test_linear_concat_bn1d_folds():
    class Heads(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.bn = nn.Linear(6, 3), nn.Linear(6, 4, bias=False), nn.BatchNorm1d(7)

        def forward(self, x):
            return self.bn(torch.cat((self.a(x), self.b(x)), -1))

    report, _ = assert_exact(randomize(Heads()), torch.randn(4, 6))
    assert report.folded[0].into == "a (Linear), b (Linear)"


class DenseLike(nn.Module):
    """DenseNet's concat: the block input joins new features, so one slice has no layer (or, with
    `reuse`, a layer whose output is read elsewhere too)."""

    def __init__(self, reuse: bool = False):
        super().__init__()
        self.conv, self.conv2, self.bn, self.reuse = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(8), reuse

    def forward(self, x):
        y = self.conv(x)
        out = F.relu(self.bn(torch.cat([y if self.reuse else x, self.conv2(x)], 1)))
        return out + y.repeat(1, 2, 1, 1)


@pytest.mark.parametrize("reuse, why", [(False, "is not the output of a Conv"), (True, "read by 2 nodes")])
def test_concat_that_cannot_be_split_is_kept(reuse, why):
    report, folded = assert_exact(randomize(DenseLike(reuse)), torch.randn(2, 4, 6, 6))
    assert [f.bn for f in report.folded] == [] and why in report.kept[0].reason and norms_left(folded) == 1


# --- the dtype: float32 and float64 fold the same --------------------------------------------------------

def mixed_model():
    return randomize(nn.Sequential(nn.Conv2d(3, 6, 3, bias=False), BatchNormAct2d(6), Inception(6),
                                   nn.ConvTranspose2d(12, 8, 2, 2, groups=4), FrozenBatchNorm2d(8), nn.ReLU(),
                                   nn.BatchNorm2d(8), nn.Conv2d(8, 4, 1), nn.Flatten(), nn.Linear(4 * 20 * 20, 5)))


def test_float64_folds_the_same_as_float32_bit_for_bit():
    """fold(m.double()).float() == fold(m.float()): the math runs in float64 either way on the same
    values (float32 statistics widen exactly), and rounds once to the model's dtype at the end."""
    model = mixed_model().float()
    x = torch.randn(2, 3, 12, 12)
    f32, r32 = fold_batchnorm(model, (x,))
    f64, r64 = fold_batchnorm(model.double(), (x.double(),))
    assert r32.as_dict() == r64.as_dict() and len(r32.folded) == 4 and r32.kept == []
    assert all(v.dtype == torch.float64 for v in f64.state_dict().values())
    s32, s64 = f32.state_dict(), f64.float().state_dict()  # .float() is in place
    assert list(s32) == list(s64)
    assert all(torch.equal(s32[k], s64[k]) for k in s32), [k for k in s32 if not torch.equal(s32[k], s64[k])]
    error, _, _ = fold_error(mixed_model(), x)
    assert error < EXACT


# --- the trace is checked against the forward ------------------------------------------------------------

class TupleSub(nn.Module):
    """fx cannot trace it (a branch on the data), and it returns a tuple: it becomes a leaf."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.bn(self.conv(x))
        if y.sum() > 1e9:
            y = y / 2
        return y, y.mean()


class Unwrap(nn.Module):
    """The wrapper of issue 17: Python work on a leaf's output, which a Proxy cannot do."""

    def __init__(self):
        super().__init__()
        self.sub = TupleSub()
        self.head = nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4), nn.ReLU())

    def forward(self, x):
        out = self.sub(x)
        if isinstance(out, tuple):
            out = out[0]
        return self.head(out)


def test_a_mis_traced_wrapper_is_folded_inside_its_children_only():
    model = randomize(Unwrap())
    x = torch.randn(2, 3, 8, 8)
    report, folded = assert_exact(model, x)
    (wrapper, sub) = report.untraceable
    assert wrapper["module"] == "<top level> (Unwrap)"
    assert wrapper["reason"].startswith("fx's trace of <top level> (Unwrap) does not compute what its forward does: it raises")
    assert sub["module"] == "sub (TupleSub)" and "y.sum() > 1e9" in sub["reason"]
    assert [f.bn for f in report.folded] == ["head.1 (BatchNorm2d)"]
    assert [k.bn for k in report.kept] == ["sub.bn (BatchNorm2d)"]
    # Without the example nothing runs the trace: the fold uses it, and the folded model raises.
    _, unchecked = fold_batchnorm(model.double())
    with pytest.raises(Exception):
        unchecked[0](x.double())


def test_a_trace_that_returns_another_structure_is_not_used():
    class Listy(nn.Module):
        def __init__(self):
            super().__init__()
            self.sub, self.bn = TupleSub(), nn.BatchNorm2d(4)

        def forward(self, x):
            out = self.sub(x)
            return [self.bn(out[0])] if isinstance(out, tuple) else (self.bn(out[0]), out[1])

    report, _ = assert_exact(randomize(Listy()), torch.randn(2, 3, 8, 8))
    assert "its output is a tuple, not a list" in report.untraceable[0]["reason"]


def test_a_trace_that_computes_something_else_is_not_used():
    class Doubler(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.bn(self.conv(x))
            return y * 2 if isinstance(y, torch.Tensor) else y  # a Proxy is not a Tensor: the trace skips * 2

    report, _ = assert_exact(randomize(Doubler()), torch.randn(2, 3, 8, 8))
    assert "does not compute what its forward does: its output differs by up to" in report.untraceable[0]["reason"]
    assert report.folded == [] and [k.bn for k in report.kept] == ["bn (BatchNorm2d)"]


@pytest.mark.parametrize("factory", ["resnet", "mobilenet", "vgg", "preact", "conv1d", "mlp", "leafy"])
def test_a_correct_trace_passes_the_check(factory):
    """No false alarm on the models users bring: float32, as the pipeline folds them."""
    import byo_models

    model = byo_models.randomize(getattr(byo_models, factory)())
    shape = {"resnet": (3, 16, 16), "mobilenet": (16, 16, 3), "vgg": (1, 16, 16), "preact": (3, 8, 8),
             "conv1d": (2, 32), "mlp": (20,), "leafy": (1, 7, 7)}[factory]
    x = torch.rand(4, *shape)
    with_example, without = fold_batchnorm(model, (x,))[1], fold_batchnorm(model)[1]
    assert with_example.as_dict() == without.as_dict()


# --- each check above can fail: wrong folds it catches ------------------------------------------------

def grouped_conv_transpose():
    return randomize(nn.Sequential(nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2), nn.BatchNorm2d(6), nn.ReLU())), \
        torch.randn(2, 4, 5, 5)


def test_wrong_conv_transpose_axis_is_caught(monkeypatch):
    """The peers' deconv bugs: scaling axis 0 of a ConvTranspose weight (its input channels), or
    axis 1 without the groups."""
    rule = export.fold.LAYERS[nn.ConvTranspose2d]
    square = randomize(nn.Sequential(nn.ConvTranspose2d(6, 6, 3, stride=2, groups=3), nn.BatchNorm2d(6)))
    x = torch.randn(2, 6, 5, 5)
    assert fold_error(square, x)[0] < EXACT
    monkeypatch.setitem(export.fold.LAYERS, nn.ConvTranspose2d, export.fold.LayerRule(0, 1, 4, rule.no_forward))
    assert fold_error(square, x)[0] > 1e-3
    monkeypatch.setitem(export.fold.LAYERS, nn.ConvTranspose2d, rule)
    monkeypatch.setattr(export.fold_math, "grouped_channels", lambda major, minor, groups: np.tile(np.arange(minor), (major, 1)))
    assert fold_error(*grouped_conv_transpose())[0] > 1e-3


@pytest.mark.parametrize("case", ["conv-transpose", "frozen", "batchnormact", "concat", "forward", "functional"])
def test_one_channel_off_by_1e_4_is_caught(case, monkeypatch):
    """The fold math patched as issue 17's injected errors do: one channel's scale 1e-4 too large."""
    model, x = {"conv-transpose": grouped_conv_transpose(),
                "frozen": (randomize(NORM_CASES["FrozenBatchNorm2d"]()), torch.randn(2, 3, 8, 8)),
                "batchnormact": (randomize(NORM_CASES["BatchNormAct2d"]()), torch.randn(2, 3, 8, 8)),
                "concat": (randomize(MixBlock()), torch.randn(2, 6, 9, 9)),
                "forward": (randomize(nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.BatchNorm2d(4),
                                                    nn.Conv2d(4, 8, 3))), torch.randn(2, 2, 7, 7)),
                "functional": (randomize(FunctionalBN(6)), torch.randn(2, 3, 8, 8))}[case]
    right = export.fold.affine_of_bn

    def off(*args, **kwargs):
        scale, shift = right(*args, **kwargs)
        scale = scale.copy()
        scale[-1] *= 1 + 1e-4
        return scale, shift

    assert fold_error(model, x)[0] < EXACT
    monkeypatch.setattr(export.fold, "affine_of_bn", off)
    assert fold_error(model, x)[0] > EXACT


def test_dropped_bias_and_shift_are_caught(monkeypatch):
    model, x = randomize(Inception()), torch.randn(2, 3, 8, 8)
    right = export.fold.fold_backward_arrays

    def no_bias(*args, **kwargs):
        weight, bias = right(*args, **kwargs)
        return weight, np.zeros_like(bias)

    monkeypatch.setattr(export.fold, "fold_backward_arrays", no_bias)
    assert fold_error(model, x)[0] > 1e-3
