"""The model families, read top to bottom. Every model takes raw pixels in [0, 1], shape [N,1,28,28],
and normalizes inside the graph, so an exported ONNX needs no preprocessing knowledge."""
import torch
from torch import nn

# Fashion-MNIST training-set pixel statistics (training/data.py computes the same numbers).
PIXEL_MEAN = 0.2860
PIXEL_STD = 0.3530


class Normalize(nn.Module):
    def __init__(self, mean: float = PIXEL_MEAN, std: float = PIXEL_STD):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean))
        self.register_buffer("std", torch.tensor(std))

    def forward(self, x):
        return (x - self.mean) / self.std


def seed_cnn() -> nn.Sequential:
    """The seed exercise: Conv2d(1,32,3,p=1) -> BN -> ReLU -> MaxPool -> Linear(6272,128) -> ReLU
    -> Dropout(0.5) -> Linear(128,10). BN right after the conv folds backward into it."""
    return nn.Sequential(
        Normalize(),
        nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 14 * 14, 128), nn.ReLU(), nn.Dropout(0.5),
        nn.Linear(128, 10),
    )


def mlp_bn() -> nn.Sequential:
    """Keras' Dense example: BN after the activation, so it can only fold forward into the last Linear."""
    return nn.Sequential(
        Normalize(), nn.Flatten(),
        nn.Linear(784, 128), nn.ReLU(), nn.BatchNorm1d(128), nn.Dropout(0.2),
        nn.Linear(128, 10),
    )


def keras_cnn() -> nn.Sequential:
    """Keras' Conv2D example: BN after the activation; it folds forward through MaxPool and Flatten
    into the Linear only when every per-channel scale is positive (max commutes with x*s+t, s>0)."""
    return nn.Sequential(
        Normalize(),
        nn.Conv2d(1, 32, 3), nn.ReLU(), nn.BatchNorm2d(32), nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 13 * 13, 128), nn.ReLU(), nn.Dropout(0.5),
        nn.Linear(128, 10),
    )


def _conv_block(c_in: int, c_out: int, dropout: float) -> list[nn.Module]:
    """Two 3x3 Conv -> BN -> ReLU, then MaxPool and Dropout. Bias-free convs: the BN right after
    each supplies the shift (and folds back into it)."""
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(),
            nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(),
            nn.MaxPool2d(2), nn.Dropout(dropout)]


def deep_cnn() -> nn.Sequential:
    """The stronger variant, VGG-style: two blocks of two Conv->BN->ReLU (32 then 64 channels),
    each closed by MaxPool and Dropout (28->14->7), a BN'd hidden layer, dropout, classifier.
    ~19M multiply-adds an image (2.5x the earlier 3-block, one-conv-per-block design, which
    stopped at 92.3-92.8% test); about 70 s an epoch on 2 cores."""
    return nn.Sequential(
        Normalize(),
        *_conv_block(1, 32, 0.25), *_conv_block(32, 64, 0.25),
        nn.Flatten(),
        nn.Linear(64 * 7 * 7, 256, bias=False), nn.BatchNorm1d(256), nn.ReLU(), nn.Dropout(0.5),
        nn.Linear(256, 10),
    )


class InvertedResidual(nn.Module):
    """MobileNetV2's block: 1x1 expand -> BN -> ReLU -> 3x3 depthwise (stride) -> BN -> ReLU -> 1x1
    project -> BN, plus its input when the shapes match. ReLU where MobileNetV2 has ReLU6: a clip is not
    positively homogeneous, so cross-layer equalization could not pass through it (Nagel et al. 2019
    train their MobileNetV2 with ReLU for the same reason; docs/int8.md)."""

    def __init__(self, c_in: int, c_out: int, stride: int, expand: int):
        super().__init__()
        hidden = c_in * expand
        self.block = nn.Sequential(
            nn.Conv2d(c_in, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU(),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden), nn.ReLU(),
            nn.Conv2d(hidden, c_out, 1, bias=False), nn.BatchNorm2d(c_out),
        )
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x):
        y = self.block(x)
        return x + y if self.residual else y


def mobile_cnn() -> nn.Sequential:
    """A depthwise MobileNetV2-style net for the INT8 ablation (docs/int8.md): a 3x3 stem, five inverted
    residual blocks (28->14->7), a 1x1 head, global average pooling, a classifier. Its depthwise
    convs, folded with their BNs, have per-channel weight ranges far apart: what per-tensor INT8
    quantizes badly and equalization fixes. ~4.5M multiply-adds an image."""
    return nn.Sequential(
        Normalize(),
        nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        InvertedResidual(16, 24, 2, 4), InvertedResidual(24, 24, 1, 4),
        InvertedResidual(24, 32, 2, 4), InvertedResidual(32, 32, 1, 4), InvertedResidual(32, 64, 1, 4),
        nn.Conv2d(64, 128, 1, bias=False), nn.BatchNorm2d(128), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.2),
        nn.Linear(128, 10),
    )


ARCHS = {"seed-cnn": seed_cnn, "mlp-bn": mlp_bn, "keras-cnn": keras_cnn, "deep-cnn": deep_cnn, "mobile-cnn": mobile_cnn}


def build(arch: str, dropout: bool = True) -> nn.Sequential:
    """`dropout=False` swaps every Dropout for Identity (the ablation)."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
    model = ARCHS[arch]()
    if not dropout:
        for i, layer in enumerate(model):
            if isinstance(layer, nn.Dropout):
                model[i] = nn.Identity()
    return model


# --- seed-cnn, trained with less memory traffic ---------------------------------------------------
# The seed's Conv(1->32) -> BN -> ReLU -> MaxPool spends a training step streaming 32x28x28
# activations through BN, ReLU, MaxPool and their backward passes (docs/training.md). LeanSeedCNN is
# the same function with the same parameters and the same gradients, arranged so that only the
# conv output and its pooling gradient are full size:
#   1. ReLU(MaxPool(.)) = MaxPool(ReLU(.)) and BN's per-channel affine map a*x+b commutes with the
#      max for a >= 0 (for a < 0 the max of a*x+b sits at the min of x: that channel's filter is
#      negated before the pool), so the affine map and the ReLU run on the pooled 32x14x14;
#   2. BN's batch mean and variance over the conv output are functions of the filters and the input
#      patches' mean and 9x9 second moment (mean_c = w_c.E[z], var_c = w_c'Cov(z)w_c), so
#      BN's backward runs through 32x9 filters instead of 32x28x28 activations;
#   3. the conv bias shifts the conv output and its batch mean alike, so it cancels in BN (its exact
#      gradient is 0) and enters only the running mean;
#   4. weights are held in the layouts the kernels want: filters as [9, 32], fc1's columns in
#      (h, w, c) order so the pooled NHWC activations flatten without a copy.
# `seed_state_dict` gives everything back under the seed's own names and layouts (export/ never sees
# this class).


class _ConvMaxPool(torch.autograd.Function):
    """patches [4, M, 9] (one block per position of the 2x2 pooling window, in MaxPool's scan order)
    @ filters [9, C], then the max over the 4 positions: [M, C]. The backward routes each pooled
    gradient to the position that won (the first on ties, like MaxPool) without a 4x scatter."""

    @staticmethod
    def forward(ctx, patches, filters):
        c0, c1, c2, c3 = (patches.view(-1, 9) @ filters).view(4, -1, filters.shape[1])
        # 1.0 where the 2nd beats the 1st, the 4th the 3rd, the bottom pair the top; strictly, so ties
        # go to the first, as in MaxPool. Float masks: multiplying by a bool tensor is 3x slower here.
        wins = torch.empty(3, *c0.shape, dtype=c0.dtype)
        torch.gt(c1, c0, out=wins[0])
        torch.gt(c3, c2, out=wins[1])
        top, bottom = torch.maximum(c0, c1, out=c0), torch.maximum(c2, c3, out=c2)
        torch.gt(bottom, top, out=wins[2])
        ctx.save_for_backward(patches, wins)
        return torch.maximum(top, bottom)

    @staticmethod
    def backward(ctx, grad):
        # The filters' gradient is sum_s P_s' r_s over the 4 positions, r_s = the part of grad that
        # position s won: r1 = g_top*w0, r0 = g_top - r1, r3 = g_bot*w1, r2 = g_bot - r3, with
        # g_bot = grad*w2, g_top = grad - g_bot. Regrouped, it needs three routed blocks, not four:
        #   P0' grad + (P2 - P0)' g_bot + (P1 - P0)' r1 + (P3 - P2)' r3.
        p, wins = ctx.saved_tensors
        routed = torch.empty(3, *grad.shape, dtype=grad.dtype)
        torch.mul(grad, wins[2], out=routed[0])              # g_bot
        torch.mul(grad - routed[0], wins[0], out=routed[1])  # r1
        torch.mul(routed[0], wins[1], out=routed[2])         # r3
        diffs = torch.empty(3, *p.shape[1:], dtype=p.dtype)
        torch.sub(p[2], p[0], out=diffs[0])
        torch.sub(p[1], p[0], out=diffs[1])
        torch.sub(p[3], p[2], out=diffs[2])
        return None, p[0].T @ grad + diffs.view(-1, 9).T @ routed.view(-1, grad.shape[1])


def pooled_patches(x: torch.Tensor, mean, std) -> torch.Tensor:
    """Normalized, zero-padded 3x3 patches of x [N,1,28,28], as [4, N*14*14, 9]: block (a, b) holds
    the patches of output pixels (2i+a, 2j+b), rows in (n, i, j) order, columns in the kernel's."""
    padded = nn.functional.pad((x[:, 0] - mean) / std, (1, 1, 1, 1))
    out = torch.empty(4, x.shape[0], 14, 14, 9, dtype=x.dtype)
    for s, (a, b) in enumerate(((0, 0), (0, 1), (1, 0), (1, 1))):
        torch.stack([padded[:, a + dy:a + dy + 28:2, b + dx:b + dx + 28:2] for dy in range(3) for dx in range(3)],
                    -1, out=out[s])
    return out.view(4, -1, 9)


class LeanSeedCNN(nn.Module):
    """seed_cnn() for training: same function, parameters and gradients, less memory traffic (above)."""

    def __init__(self, seed: nn.Sequential):
        super().__init__()
        norm, conv, bn, _, _, _, fc1, _, dropout, fc2 = seed
        p = lambda t: nn.Parameter(t.detach().clone())  # noqa: E731
        self.register_buffer("pixel_mean", norm.mean.clone())
        self.register_buffer("pixel_std", norm.std.clone())
        self.filters = p(conv.weight.view(32, 9).T)                    # [9, 32]
        self.conv_bias = p(conv.bias)
        self.bn_weight, self.bn_bias = p(bn.weight), p(bn.bias)
        self.register_buffer("running_mean", bn.running_mean.clone())
        self.register_buffer("running_var", bn.running_var.clone())
        self.register_buffer("num_batches_tracked", bn.num_batches_tracked.clone())
        self.momentum, self.eps = bn.momentum, bn.eps
        self.fc1_weight = p(fc1.weight.view(-1, 32, 14, 14).permute(0, 2, 3, 1).reshape(-1, 32 * 14 * 14))
        self.fc1_bias = p(fc1.bias)
        self.dropout = dropout.p if isinstance(dropout, nn.Dropout) else 0.0
        self.fc2_weight, self.fc2_bias = p(fc2.weight), p(fc2.bias)

    def forward(self, x):
        patches = pooled_patches(x, self.pixel_mean, self.pixel_std)
        if self.training:
            z = patches.view(-1, 9)
            count = len(z)
            z_mean = z.mean(0)
            cov = z.T @ z / count - torch.outer(z_mean, z_mean)
            mean, var = z_mean @ self.filters, ((cov @ self.filters) * self.filters).sum(0)  # over all N*28*28 conv outputs
            with torch.no_grad():
                self.num_batches_tracked += 1
                self.running_mean.lerp_(mean + self.conv_bias, self.momentum)
                self.running_var.lerp_(var * count / (count - 1), self.momentum)
        else:
            mean, var = self.running_mean - self.conv_bias, self.running_var
        scale = self.bn_weight * torch.rsqrt(var + self.eps)
        sign = torch.where(scale < 0, -1.0, 1.0).detach()
        pooled = _ConvMaxPool.apply(patches, self.filters * sign)    # max of sign * conv, [N*14*14, 32]
        h = torch.relu(pooled * (scale * sign) + (self.bn_bias - mean * scale))
        h = nn.functional.linear(h.view(x.shape[0], -1), self.fc1_weight, self.fc1_bias)
        h = nn.functional.dropout(torch.relu(h), self.dropout, self.training)
        return nn.functional.linear(h, self.fc2_weight, self.fc2_bias)

    def seed_state_dict(self) -> dict:
        """The same values under seed_cnn()'s names, shapes and layouts."""
        return {
            "0.mean": self.pixel_mean, "0.std": self.pixel_std,
            "1.weight": self.filters.T.reshape(32, 1, 3, 3), "1.bias": self.conv_bias,
            "2.weight": self.bn_weight, "2.bias": self.bn_bias, "2.running_mean": self.running_mean,
            "2.running_var": self.running_var, "2.num_batches_tracked": self.num_batches_tracked,
            "6.weight": self.fc1_weight.view(-1, 14, 14, 32).permute(0, 3, 1, 2).reshape(-1, 32 * 14 * 14),
            "6.bias": self.fc1_bias, "9.weight": self.fc2_weight, "9.bias": self.fc2_bias,
        }
