"""The merged fold report (export/fold_report.py) on real exports: both passes run as the pipeline
runs them (fx fold, torch.onnx export, clean-up, ONNX pass), then merge_fold_reports and summary."""
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from export.fold import fold_batchnorm
from export.fold_report import merge_fold_reports, summary
from export.onnx_export import export_to_proto, simplify
from export.onnx_fold import fold_onnx
from test_fold_coverage import FrozenBatchNorm2d, randomize


def both_passes(model: nn.Module, shape: tuple) -> dict:
    model = randomize(model)
    folded, fx_report = fold_batchnorm(model, (torch.randn(2, *shape),))
    cleaned = simplify(export_to_proto(folded, (2, *shape), "input", "logits"))
    graph, onnx_report = fold_onnx(cleaned)
    return merge_fold_reports(fx_report.as_dict(), onnx_report, cleaned, graph)


class KeptTwice(nn.Module):
    """A BN folded by fx; a BN and a FrozenBatchNorm2d neither pass can fold (after a ReLU, before a
    padded conv). The FrozenBatchNorm2d is exported as Mul/Add, which the ONNX pass alone cannot
    tell from a layer scale."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
        self.bn2, self.conv2 = nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3, padding=1)
        self.frozen, self.conv3 = FrozenBatchNorm2d(4), nn.Conv2d(4, 2, 3, padding=1)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.conv2(self.bn2(x)))
        return self.conv3(self.frozen(x)).mean((2, 3))


def test_one_kept_entry_per_batchnorm_with_both_reasons():
    report = both_passes(KeptTwice(), (3, 8, 8))
    assert [(e["bn"], e["pass"], e["kind"]) for e in report["folded"]] == [("bn1 (BatchNorm2d)", "fx", "batchnorm")]
    kept = {e["bn"]: e for e in report["kept"]}
    assert list(kept) == ["bn2 (BatchNorm2d)", "frozen (FrozenBatchNorm2d)"]
    for entry in kept.values():  # fx's reason and the ONNX pass's, joined by module name
        assert entry["pass"] == "fx" and entry["kind"] == "batchnorm"
        assert "zero-padded" in entry["reason"] and "zero-padded" in entry["onnx_reason"]
    assert kept["bn2 (BatchNorm2d)"]["node"].startswith("node__native_batch_norm")
    assert "node" not in kept["frozen (FrozenBatchNorm2d)"]  # Mul/Add, not a BatchNormalization node
    assert summary(report, True) == "folded 1 BatchNorm(s) (1 by the fx pass, 0 by the ONNX graph pass), kept 2"


class LayerScale(nn.Module):
    """ConvNeXt's block: depthwise 7x7, LayerNorm and the MLP in NHWC, x·γ per channel, residual.
    No BatchNorm at all."""

    def __init__(self, c=8):
        super().__init__()
        self.dw, self.norm = nn.Conv2d(c, c, 7, padding=3, groups=c), nn.LayerNorm(c)
        self.fc1, self.fc2 = nn.Linear(c, 2 * c), nn.Linear(2 * c, c)
        self.gamma = nn.Parameter(torch.rand(c) + 0.1)

    def forward(self, x):
        y = self.norm(self.dw(x).permute(0, 2, 3, 1))
        y = self.fc2(F.gelu(self.fc1(y))) * self.gamma
        return (x + y.permute(0, 3, 1, 2)).mean((2, 3))


def test_a_layer_scale_is_not_counted_as_a_batchnorm():
    report = both_passes(nn.Sequential(LayerScale(), nn.Linear(8, 3)), (8, 9, 9))
    assert [(e["pass"], e["kind"], e["module"]) for e in report["folded"]] == [("onnx", "affine", "0")]
    assert summary(report, True) == \
        "folded 1 per-channel affine op(s), 0 BatchNorm(s) (0 by the fx pass, 0 by the ONNX graph pass), kept 0"


def test_a_bn_fx_kept_and_the_onnx_pass_folded_is_not_kept():
    """byo_models.leafy: a BN inside a module fx calls whole, right after a conv: fx keeps it, the
    ONNX pass folds it, and the report says folded (by the ONNX pass, module "3"), not kept."""
    import byo_models

    report = both_passes(byo_models.leafy(), (1, 7, 7))
    assert report["kept"] == [] and [u["module"] for u in report["untraceable"]] == ["3 (PadToEven)"]
    assert [(e["pass"], e.get("module")) for e in report["folded"]].count(("onnx", "3")) == 1
    assert summary(report, True) == "folded 3 BatchNorm(s) (2 by the fx pass, 1 by the ONNX graph pass), kept 0"


@pytest.mark.parametrize("folded, kept, torch_source, text", [
    ([{"pass": "onnx", "kind": "affine"}] * 18, [], True,
     "folded 18 per-channel affine op(s), 0 BatchNorm(s) (0 by the fx pass, 0 by the ONNX graph pass), kept 0"),
    ([{"pass": "onnx"}, {"pass": "onnx", "kind": "affine"}], [{"kind": "affine"}, {"kind": "batchnorm"}], False,
     "folded 1 per-channel affine op(s), 1 BatchNorm(s) with the ONNX graph pass, kept 1 and 1 per-channel affine op(s)"),
    ([{"pass": "fx"}], [], True, "folded 1 BatchNorm(s) (1 by the fx pass, 0 by the ONNX graph pass), kept 0"),
])
def test_summary_counts_batchnorms_and_other_affine_ops_apart(folded, kept, torch_source, text):
    assert summary({"folded": folded, "kept": kept}, torch_source) == text
