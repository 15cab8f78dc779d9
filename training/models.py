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


ARCHS = {"seed-cnn": seed_cnn, "mlp-bn": mlp_bn, "keras-cnn": keras_cnn, "deep-cnn": deep_cnn}


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
