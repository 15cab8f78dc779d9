"""The fold math against an unfused float64 reference, for every case the fold pass claims."""
import random

import numpy as np
import pytest
import torch
from torch import nn

from export.fold import FoldError, bn_scale_shift, fold_batchnorm, fold_forward

ATOL = RTOL = 1e-5


def randomize_bn(bn: nn.modules.batchnorm._BatchNorm, gen: torch.Generator, negative_scale: bool = False):
    """Non-trivial running statistics (and affine parameters), as a trained model would have."""
    c = bn.num_features
    bn.running_mean.copy_(torch.randn(c, generator=gen))
    bn.running_var.copy_(torch.rand(c, generator=gen) * 2 + 0.1)
    if bn.affine:
        gamma = torch.rand(c, generator=gen) + 0.5
        if negative_scale:
            gamma[0] = -gamma[0]
        bn.weight.data.copy_(gamma)
        bn.bias.data.copy_(torch.randn(c, generator=gen))
    return bn


def randomize_layer(layer: nn.Module, gen: torch.Generator):
    layer.weight.data.copy_(torch.randn(layer.weight.shape, generator=gen) * 0.3)
    if layer.bias is not None:
        layer.bias.data.copy_(torch.randn(layer.bias.shape, generator=gen))
    return layer


def reference64(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The unfused model in float64: BN really applied with its running statistics."""
    import copy

    return copy.deepcopy(model).double().eval()(x.double())


def assert_folded_matches(model: nn.Module, x: torch.Tensor):
    model.eval()
    folded, report = fold_batchnorm(model)
    assert not any(isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.Dropout)) for m in folded.modules()), report
    with torch.no_grad():
        got = folded(x).double()
        want = reference64(model, x)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)
    return report


def conv_cases():
    rng = random.Random(0)
    cases = []
    for i in range(24):
        groups = rng.choice([1, 1, 2, 4, "depthwise"])
        c_in = rng.choice([4, 8, 12])
        c_out = c_in if groups == "depthwise" else rng.choice([4, 8, 16])
        g = c_in if groups == "depthwise" else groups
        cases.append(dict(c_in=c_in, c_out=c_out, groups=g, kernel=rng.choice([1, 3, 5]),
                          stride=rng.choice([1, 2]), dilation=rng.choice([1, 2]), padding=rng.choice([0, 1, 2]),
                          bias=rng.random() < 0.5, affine=rng.random() < 0.7, seed=i))
    return cases


@pytest.mark.parametrize("case", conv_cases(), ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_conv_bn_backward(case):
    gen = torch.Generator().manual_seed(case["seed"])
    conv = nn.Conv2d(case["c_in"], case["c_out"], case["kernel"], stride=case["stride"], padding=case["padding"],
                     dilation=case["dilation"], groups=case["groups"], bias=case["bias"])
    model = nn.Sequential(randomize_layer(conv, gen), randomize_bn(nn.BatchNorm2d(case["c_out"], affine=case["affine"]), gen))
    report = assert_folded_matches(model, torch.randn(3, case["c_in"], 17, 15, generator=gen))
    assert [f.direction for f in report.folded] == ["backward"]


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("affine", [True, False])
def test_linear_bn1d_backward(bias, affine):
    gen = torch.Generator().manual_seed(int(bias) * 2 + int(affine))
    model = nn.Sequential(randomize_layer(nn.Linear(37, 23, bias=bias), gen),
                          randomize_bn(nn.BatchNorm1d(23, affine=affine), gen), nn.ReLU(), nn.Dropout(0.3), nn.Linear(23, 5))
    report = assert_folded_matches(model, torch.randn(11, 37, generator=gen))
    assert report.removed_dropout == ["3"]


def test_bn_after_activation_folds_forward_into_linear():
    """The Keras Dense example: Linear -> ReLU -> BN1d -> Dropout -> Linear."""
    gen = torch.Generator().manual_seed(1)
    model = nn.Sequential(nn.Flatten(), randomize_layer(nn.Linear(49, 32), gen), nn.ReLU(),
                          randomize_bn(nn.BatchNorm1d(32), gen), nn.Dropout(0.2), randomize_layer(nn.Linear(32, 10), gen))
    report = assert_folded_matches(model, torch.rand(9, 1, 7, 7, generator=gen))
    assert [r.as_dict() for r in report.folded] == [{"bn": "3 (BatchNorm1d)", "into": "5 (Linear)", "layers": ["5"],
                                                    "direction": "forward", "kind": "batchnorm", "pass": "fx", "module": "3"}]


def keras_conv_model(gen, negative_scale=False, bias=True):
    return nn.Sequential(randomize_layer(nn.Conv2d(1, 6, 3), gen), nn.ReLU(),
                         randomize_bn(nn.BatchNorm2d(6), gen, negative_scale=negative_scale), nn.MaxPool2d(2),
                         nn.Flatten(), randomize_layer(nn.Linear(6 * 5 * 5, 10, bias=bias), gen))


@pytest.mark.parametrize("bias", [True, False])
def test_bn_after_activation_folds_through_maxpool_and_flatten(bias):
    gen = torch.Generator().manual_seed(2)
    report = assert_folded_matches(keras_conv_model(gen, bias=bias), torch.rand(5, 1, 12, 12, generator=gen))
    assert report.folded[0].into == "5 (Linear)" and report.kept == []


def test_negative_scale_is_kept_before_maxpool():
    """max(s·x) = s·min(x) for s < 0: folding through MaxPool would be wrong, so the BN stays."""
    gen = torch.Generator().manual_seed(3)
    model = keras_conv_model(gen, negative_scale=True).eval()
    folded, report = fold_batchnorm(model)
    assert report.folded == []
    assert len(report.kept) == 1 and "max would become min" in report.kept[0].reason
    assert sum(isinstance(m, nn.BatchNorm2d) for m in folded.modules()) == 1
    x = torch.rand(4, 1, 12, 12, generator=gen)
    with torch.no_grad():
        torch.testing.assert_close(folded(x).double(), reference64(model, x), atol=ATOL, rtol=RTOL)
        # The refused fold really would be wrong: apply it anyway and see the outputs move.
        scale, shift = bn_scale_shift(model[2])
        per_position = model[5].in_features // scale.size
        forced = nn.Sequential(model[0], model[1], model[3], model[4],
                               fold_forward(model[5], np.repeat(scale, per_position), np.repeat(shift, per_position)))
        assert not torch.allclose(forced(x), model(x), atol=1e-3)


@pytest.mark.parametrize("groups", [1, 2, 8])
def test_bn_folds_forward_into_unpadded_conv(groups):
    gen = torch.Generator().manual_seed(4 + groups)
    model = nn.Sequential(randomize_layer(nn.Conv2d(3, 8, 3, padding=1), gen), nn.ReLU(), randomize_bn(nn.BatchNorm2d(8), gen),
                          randomize_layer(nn.Conv2d(8, 16, 3, stride=2, groups=groups), gen))
    report = assert_folded_matches(model, torch.randn(2, 3, 13, 13, generator=gen))
    assert report.folded[0].direction == "forward" and report.folded[0].into == "3 (Conv2d)"


def test_bn_not_folded_into_padded_conv():
    gen = torch.Generator().manual_seed(5)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), randomize_bn(nn.BatchNorm2d(8), gen), nn.Conv2d(8, 4, 3, padding=1)).eval()
    folded, report = fold_batchnorm(model)
    assert report.folded == [] and "padded" in report.kept[0].reason
    x = torch.randn(2, 3, 9, 9, generator=gen)
    with torch.no_grad():
        torch.testing.assert_close(folded(x).double(), reference64(model, x), atol=ATOL, rtol=RTOL)


def test_bn_with_two_consumers_is_kept():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.act, self.bn = nn.Linear(6, 6), nn.ReLU(), nn.BatchNorm1d(6)
            self.head_a, self.head_b = nn.Linear(6, 2), nn.Linear(6, 2)

        def forward(self, x):
            y = self.bn(self.act(self.fc(x)))
            return self.head_a(y) + self.head_b(y)

    model = Branchy()
    randomize_bn(model.bn, torch.Generator().manual_seed(6))
    folded, report = fold_batchnorm(model.eval())
    assert report.folded == [] and "consumers" in report.kept[0].reason
    x = torch.randn(4, 6)
    with torch.no_grad():
        torch.testing.assert_close(folded(x).double(), reference64(model, x), atol=ATOL, rtol=RTOL)


def test_bn_without_running_stats_is_refused_by_name():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4, track_running_stats=False), nn.ReLU())
    with pytest.raises(FoldError, match=r"'1'.*track_running_stats=False"):
        fold_batchnorm(model)


def test_fold_leaves_the_original_model_alone():
    gen = torch.Generator().manual_seed(7)
    model = nn.Sequential(randomize_layer(nn.Conv2d(1, 4, 3), gen), randomize_bn(nn.BatchNorm2d(4), gen)).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fold_batchnorm(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert isinstance(model[1], nn.BatchNorm2d)


@pytest.mark.parametrize("arch", ["seed-cnn", "mlp-bn", "keras-cnn", "deep-cnn"])
def test_every_family_folds_completely(arch):
    from training.models import build

    gen = torch.Generator().manual_seed(8)
    model = build(arch)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            randomize_bn(m, gen)
    report = assert_folded_matches(model, torch.rand(6, 1, 28, 28, generator=gen))
    assert report.kept == []


@pytest.mark.parametrize("layout", ["out_in", "in_out"])
def test_array_math_for_both_weight_layouts(layout):
    """The shared fold math on plain arrays, as the ONNX pass calls it: Gemm/Linear keep W as
    [out, in], MatMul as [in, out]. Folded layer == layer applied to the affine map (float64)."""
    from export.fold import fold_backward_arrays, fold_forward_arrays

    rng = np.random.default_rng(7)
    w = rng.standard_normal((6, 5))  # [out, in]
    b = rng.standard_normal(6)
    x = rng.standard_normal((4, 5))
    out_axis, in_axis = (0, 1) if layout == "out_in" else (1, 0)
    stored = w if layout == "out_in" else w.T

    def apply(weight, bias, inputs):
        return inputs @ (weight.T if layout == "out_in" else weight) + bias

    s_in, t_in = rng.uniform(0.5, 2, 5) * rng.choice([-1, 1], 5), rng.standard_normal(5)
    fw, fb = fold_forward_arrays(stored, b, s_in, t_in, out_axis=out_axis, in_axis=in_axis)
    np.testing.assert_allclose(apply(fw, fb, x), apply(stored, b, x * s_in + t_in), rtol=1e-12, atol=1e-12)

    s_out, t_out = rng.uniform(0.5, 2, 6), rng.standard_normal(6)
    bw, bb = fold_backward_arrays(stored, b, s_out, t_out, out_axis=out_axis)
    np.testing.assert_allclose(apply(bw, bb, x), apply(stored, b, x) * s_out + t_out, rtol=1e-12, atol=1e-12)
    bw0, bb0 = fold_backward_arrays(stored, None, s_out, t_out, out_axis=out_axis)
    np.testing.assert_allclose(apply(bw0, bb0, x), apply(stored, 0.0, x) * s_out + t_out, rtol=1e-12, atol=1e-12)
