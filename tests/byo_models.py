"""Small models of the shapes users bring, for `python -m export --model tests/byo_models.py:FACTORY`.
Each factory takes no argument and returns the architecture; the tests give every BatchNorm
non-trivial statistics (randomize) and save the weights, as a trained model would have them."""
import torch
from torch import nn
from torch.nn import functional as F


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random running statistics and affine parameters on every BN (some scales negative), and
    weights large enough that a missed or wrong fold shows far above 1e-5."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=gen) * 0.5)
            m.running_var.copy_(torch.rand(c, generator=gen) * 1.5 + 0.25)
            if m.affine:
                m.weight.data.copy_((torch.rand(c, generator=gen) + 0.5) * torch.where(torch.rand(c, generator=gen) < 0.2, -1, 1))
                m.bias.data.copy_(torch.randn(c, generator=gen) * 0.3)
    return model.eval()


# --- ResNet-18 style: residual adds, 1x1 strided downsample ----------------------------------------

class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNetish(nn.Module):
    def __init__(self, classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(2)
        self.layer1 = BasicBlock(8, 16, stride=2)  # the residual add, over a 1x1 strided downsample
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer1(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet() -> nn.Module:
    return ResNetish()


# --- MobileNetV2 style: depthwise convs, ReLU6, inverted residuals; NHWC input -------------------

class InvertedResidual(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, expand: int):
        super().__init__()
        hidden = c_in * expand
        self.use_residual = stride == 1 and c_in == c_out
        self.conv = nn.Sequential(
            nn.Conv2d(c_in, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, c_out, 1, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        return x + self.conv(x) if self.use_residual else self.conv(x)


class MobileNetish(nn.Module):
    """Takes NHWC images, as a TF-trained model would."""

    def __init__(self, classes: int = 5):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU6(inplace=True),
            InvertedResidual(8, 8, 1, 4), InvertedResidual(8, 12, 2, 4))
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(12, classes))

    def forward(self, x):
        x = self.features(x.permute(0, 3, 1, 2))
        return self.classifier(F.adaptive_avg_pool2d(x, 1).flatten(1))


def mobilenet() -> nn.Module:
    return MobileNetish()


# --- VGG with BN, in-place ReLU and Dropout --------------------------------------------------------

def vgg() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(16 * 4 * 4, 32), nn.BatchNorm1d(32), nn.ReLU(inplace=True), nn.Dropout(0.5),
        nn.Linear(32, 10))


# --- pre-activation block: BN -> ReLU -> Conv, nothing to fold it into --------------------------

class PreActBlock(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(c), nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(c), nn.Conv2d(c, c, 3, padding=1, bias=False)

    def forward(self, x):
        out = self.conv1(F.relu(self.bn1(x)))
        return x + self.conv2(F.relu(self.bn2(out)))


class PreActNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.block = PreActBlock(8)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = F.relu(self.bn(self.block(self.stem(x))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def preact() -> nn.Module:
    return PreActNet()


# --- 1-D signals -------------------------------------------------------------------------------

def conv1d() -> nn.Module:
    return nn.Sequential(
        nn.Conv1d(2, 8, 5, padding=2), nn.BatchNorm1d(8), nn.ReLU(), nn.MaxPool1d(2),
        nn.Conv1d(8, 8, 3, bias=False), nn.BatchNorm1d(8), nn.ReLU(),
        nn.Flatten(), nn.Linear(8 * 14, 3))


# --- MLP with BatchNorm1d, ending in Softmax (probabilities) -----------------------------------

def mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(20, 32), nn.BatchNorm1d(32), nn.ReLU(),
        nn.Linear(32, 32), nn.ReLU(), nn.BatchNorm1d(32), nn.Dropout(0.1),  # BN after the activation: folds forward
        nn.Linear(32, 6), nn.Softmax(dim=1))


# --- weight standardization (timm's StdConv2d, NF-Nets, BiT): F.batch_norm of a weight --------

class StdConv2d(nn.Conv2d):
    def forward(self, x):
        w = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None, training=True,
                         momentum=0.0, eps=1e-6).reshape_as(self.weight)
        return F.conv2d(x, w, self.bias, self.stride, self.padding)


def std_conv() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), StdConv2d(8, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))


# --- ultralytics-style: the forward iterates its layers and routes by each layer's `f` ---------------

class ConvBN(nn.Module):
    def __init__(self, cin, cout, k=3):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout)

    def forward(self, x):
        return F.silu(self.bn(self.conv(x)))


class Cat(nn.Module):
    def forward(self, xs):
        return torch.cat(xs, 1)


class Routed(nn.Module):
    """Like ultralytics' DetectionModel: `for m in self.model`, inputs picked by m.f (plain
    attributes on each layer), and a forward fx cannot trace."""

    def __init__(self):
        super().__init__()
        layers = [ConvBN(3, 8), ConvBN(8, 8), Cat(), ConvBN(16, 4, 1), nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())]
        for i, (m, f) in enumerate(zip(layers, [-1, -1, [-1, 0], -1, -1])):
            m.f, m.i = f, i
        self.model = nn.Sequential(*layers)

    def forward(self, x):
        y = []
        for m in self.model:
            x = m(x if m.f == -1 else [x if j == -1 else y[j] for j in m.f])
            y.append(x)
        boxes, scores = list(x.chunk(2, 1))  # as C2f does: fx cannot trace this forward (torch.onnx.export can)
        return torch.cat([boxes, scores.sigmoid()], 1)


def routed() -> nn.Module:
    return Routed()


# --- fx cannot trace one submodule ----------------------------------------------------------------

class PadToEven(nn.Module):
    """Shape-dependent Python control flow: fx cannot trace it, torch.export can."""

    def __init__(self, c: int):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(c, c, 3, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        if x.shape[-1] % 2:
            x = F.pad(x, (0, 1, 0, 1))
        return F.relu(self.bn(self.conv(x)))


def leafy() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
        PadToEven(6),
        nn.Conv2d(6, 6, 3, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Flatten(), nn.Linear(6 * 4 * 4, 4))


# --- the top-level forward cannot be traced ---------------------------------------------------------

class ShapeBranchNet(nn.Module):
    """The top level branches on the input's shape: fx cannot trace it, torch.export can."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = self.bn(self.features(x))
        return self.fc(x.mean((2, 3)))


def shape_branch() -> nn.Module:
    return ShapeBranchNet()


class ValueBranchNet(ShapeBranchNet):
    """The top level branches on the data: neither fx nor torch.export can capture that."""

    def forward(self, x):
        x = self.bn(self.features(x))
        if x.mean() > 0:
            x = x * 2
        return self.fc(x.mean((2, 3)))


def value_branch() -> nn.Module:
    return ValueBranchNet()


# --- for the bad-input tests -------------------------------------------------------------------------

def broken() -> nn.Module:
    raise RuntimeError("cannot build without a config file")


def not_a_module():
    return {"conv": 3}


def sequence_output() -> nn.Module:
    return nn.Sequential(nn.Conv1d(2, 4, 3), nn.BatchNorm1d(4))  # [N, 4, W-2]: not [N, K]


# --- float32 cannot meet 1e-5 on this one: outputs are small differences of large terms ----------

class Cancelling(nn.Module):
    """Ready-made statistics: do not randomize()."""

    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(1)
        self.fc1 = nn.Linear(16, 64)
        self.bn = nn.BatchNorm1d(64)
        self.fc2 = nn.Linear(64, 4)
        with torch.no_grad():
            self.fc1.weight.copy_(torch.randn(64, 16, generator=gen) * 300)
            w = torch.randn(4, 32, generator=gen)
            self.fc2.weight.copy_(torch.cat([w, -w * (1 + 1e-3)], 1))
            self.fc1.weight[32:] = self.fc1.weight[:32]
            self.fc1.bias[32:] = self.fc1.bias[:32]
            half = torch.rand(32, generator=gen) + 0.5  # the same statistics on both halves (no randomize())
            self.bn.running_var.copy_(torch.cat([half, half]))
            self.bn.running_mean.copy_(torch.cat([half, half]) * 100)
        self.eval()

    def forward(self, x):
        return self.fc2(F.relu(self.bn(self.fc1(x))))


def cancelling() -> nn.Module:
    return Cancelling()


# --- a detection-style model: two heads, a tuple (with a nested list) out --------------------------

class TwoHeads(nn.Module):
    """A backbone with BNs and two heads, returning (boxes [N, 4, A], [scores [N, 3, A], objectness [N, 1, A]])."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.SiLU(),
                                      nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16), nn.SiLU())
        self.box = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.SiLU(),
                                 nn.Conv2d(16, 4, 1))
        self.cls = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.SiLU(),
                                 nn.Conv2d(16, 4, 1))

    def forward(self, x):
        f = self.backbone(x)
        boxes, cls = self.box(f).flatten(2), self.cls(f).flatten(2)
        return boxes, [cls[:, :3].sigmoid(), cls[:, 3:]]


def two_heads() -> nn.Module:
    return TwoHeads()


class NamedHeads(TwoHeads):
    def forward(self, x):
        boxes, (scores, objectness) = super().forward(x)
        return {"boxes": boxes, "logits": scores.mean(2), "objectness": objectness}


def named_heads() -> nn.Module:
    return NamedHeads()


# --- state-dict versions, as torchvision's MNASNet checks them -------------------------------------

class Versioned(nn.Module):
    """Refuses a state dict without its `_metadata` version, like torchvision.models.MNASNet."""
    _version = 2

    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        version = local_metadata.get("version", None)
        if version not in [1, 2]:
            raise ValueError(f"version should be set to 1 or 2 instead of {version}")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    def forward(self, x):
        return self.layers(x)


def versioned() -> nn.Module:
    return Versioned()


class PickyLoad(nn.Module):
    """Its child refuses any state dict: the error must name the child."""

    class Refuses(nn.Linear):
        def _load_from_state_dict(self, *args, **kwargs):
            raise ValueError("this checkpoint predates the new head")

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU())
        self.head = PickyLoad.Refuses(8, 3)

    def forward(self, x):
        return self.head(self.body(x))


def picky_load() -> nn.Module:
    return PickyLoad()


# --- models whose float64 copy cannot run, or whose outputs the contract cannot carry -------------

class Float32Inside(nn.Module):
    """Makes a float32 tensor in forward: the double copy fails (float64 @ float32)."""

    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))

    def forward(self, x):
        return self.layers(x) @ torch.eye(3)


def float32_inside() -> nn.Module:
    return Float32Inside()


class NotBatchFirst(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.bn = nn.Linear(6, 4), nn.BatchNorm1d(4)

    def forward(self, x):
        return self.bn(self.fc(x)), torch.ones(5, 2)  # the second output ignores the batch


def not_batch_first() -> nn.Module:
    return NotBatchFirst()


class IntOutput(NotBatchFirst):
    def forward(self, x):
        y = self.bn(self.fc(x))
        return y, y.argmax(1)


def int_output() -> nn.Module:
    return IntOutput()


# --- train-time branches that merge into one conv (structural re-parameterization) -----------------
# Small look-alikes of timm's blocks (timm needs torch 2.14; these are written here from its code):
# RepVGG's RepVggBlock, MobileOne's MobileOneBlock (an n-ary sum built in a loop), FastViT's RepMixer
# (a difference under a layer scale) and RepConditionalPosEnc, RepViT's RepVggDw (a BN after the sum),
# RepGhost's module, a large kernel with a small one beside it, an AvgPool branch.

def conv_bn(c_in: int, c_out: int, k: int, stride: int = 1, groups: int = 1, padding: int | None = None) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, k, stride, k // 2 if padding is None else padding, groups=groups,
                                   bias=False), nn.BatchNorm2d(c_out))


class RepVggBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int = 1, groups: int = 1):
        super().__init__()
        self.identity = nn.BatchNorm2d(c_out) if c_in == c_out and stride == 1 else None
        self.conv_kxk, self.conv_1x1 = conv_bn(c_in, c_out, 3, stride, groups), conv_bn(c_in, c_out, 1, stride, groups)
        self.drop_path, self.act = nn.Identity(), nn.ReLU()

    def forward(self, x):
        if self.identity is None:
            return self.act(self.conv_1x1(x) + self.conv_kxk(x))
        identity = self.identity(x)
        x = self.drop_path(self.conv_1x1(x) + self.conv_kxk(x))
        x += identity
        return self.act(x)


class MobileOneBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, k: int, stride: int = 1, groups: int = 1, branches: int = 3,
                 scale_branch: bool = True, act: bool = True):
        super().__init__()
        self.identity = nn.BatchNorm2d(c_in) if c_in == c_out and stride == 1 else None
        self.conv_kxk = nn.ModuleList([conv_bn(c_in, c_out, k, stride, groups) for _ in range(branches)]) if branches else None
        self.conv_scale = conv_bn(c_in, c_out, 1, stride, groups) if k > 1 and scale_branch else None
        self.act = nn.ReLU() if act else nn.Identity()

    def forward(self, x):
        identity_out = 0
        if self.identity is not None:
            identity_out = self.identity(x)
        scale_out = 0
        if self.conv_scale is not None:
            scale_out = self.conv_scale(x)
        out = scale_out + identity_out
        if self.conv_kxk is not None:
            for rc in self.conv_kxk:
                out += rc(x)
        return self.act(out)


class LayerScale2d(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.rand(c) + 0.5)

    def forward(self, x):
        return x * self.gamma.view(1, -1, 1, 1)


class RepMixer(nn.Module):
    """FastViT: x + layer_scale(mixer(x) − norm(x)), both MobileOne blocks of depthwise 3x3 convs."""

    def __init__(self, c: int):
        super().__init__()
        self.norm = MobileOneBlock(c, c, 3, groups=c, branches=0, scale_branch=False, act=False)
        self.mixer = MobileOneBlock(c, c, 3, groups=c, branches=1, act=False)
        self.layer_scale = LayerScale2d(c)

    def forward(self, x):
        return x + self.layer_scale(self.mixer(x) - self.norm(x))


class RepCPE(nn.Module):
    """FastViT's RepConditionalPosEnc: a depthwise 7x7 conv (with a bias, no BN) plus the input."""

    def __init__(self, c: int):
        super().__init__()
        self.pos_enc = nn.Conv2d(c, c, 7, 1, 3, groups=c)

    def forward(self, x):
        return self.pos_enc(x) + x


class RepVggDw(nn.Module):
    """RepViT: BN(conv_bn 3x3 + conv 1x1 + x), all depthwise."""

    def __init__(self, c: int):
        super().__init__()
        self.conv, self.conv1, self.bn = conv_bn(c, c, 3, groups=c), nn.Conv2d(c, c, 1, groups=c), nn.BatchNorm2d(c)

    def forward(self, x):
        return self.bn(self.conv(x) + self.conv1(x) + x)


class RepGhost(nn.Module):
    """RepGhost's module: a depthwise 3x3 conv-BN of x1 plus a BN of x1 (the fusion branch)."""

    def __init__(self, c_in: int, c: int):
        super().__init__()
        self.primary_conv = nn.Sequential(*conv_bn(c_in, c, 1), nn.ReLU())
        self.cheap_operation, self.fusion_bn = conv_bn(c, c, 3, groups=c), nn.BatchNorm2d(c)

    def forward(self, x):
        x1 = self.primary_conv(x)
        return F.relu(self.cheap_operation(x1) + self.fusion_bn(x1))


class LargeKernel(nn.Module):
    """FastViT's ReparamLargeKernelConv: a 7x7 conv-BN and a 3x3 one beside it, stride 2."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.large_conv, self.small_conv = conv_bn(c_in, c_out, 7, 2), conv_bn(c_in, c_out, 3, 2)

    def forward(self, x):
        return F.gelu(self.large_conv(x) + self.small_conv(x))


class PoolBranch(nn.Module):
    """An AvgPool that counts its padding beside a conv and the identity (as DBB's branches)."""

    def __init__(self, c: int):
        super().__init__()
        self.conv, self.pool, self.bn = conv_bn(c, c, 3), nn.AvgPool2d(3, 1, 1, count_include_pad=True), nn.BatchNorm2d(c)

    def forward(self, x):
        return F.relu(self.conv(x) + self.bn(self.pool(x)) - 0.5 * x)


class RepNet(nn.Module):
    """Every block above in one small net: 3x16x16 in, 10 classes out."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.stem = RepVggBlock(3, 8, stride=2)                        # no identity: two convs
        self.features = nn.Sequential(
            RepVggBlock(8, 8), RepVggBlock(8, 8, groups=2),            # identity BN, grouped
            MobileOneBlock(8, 8, 3, groups=8, branches=3),             # depthwise, n-ary, identity
            MobileOneBlock(8, 16, 1, branches=2),                      # pointwise, no identity
            MobileOneBlock(16, 16, 3, stride=2, groups=16),            # stride 2: no identity
            RepMixer(16), RepCPE(16), RepVggDw(16), RepGhost(16, 16), LargeKernel(16, 24), PoolBranch(24))
        self.head = nn.Linear(24, classes)

    def forward(self, x):
        return self.head(self.features(self.stem(x)).mean((2, 3)))


def rep_net() -> nn.Module:
    return RepNet()


def rep_small() -> nn.Module:
    """Two RepVGG blocks, the second grouped, and a head: the injected-error tests' model."""
    return nn.Sequential(RepVggBlock(3, 4), RepVggBlock(4, 4, groups=2), RepVggBlock(4, 4, groups=2),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
