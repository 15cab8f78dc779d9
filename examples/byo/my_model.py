"""A small image classifier of one's own: 3x32x32 RGB in [0, 1], 4 classes.
`build` is the zero-argument factory `python -m export --model examples/byo/my_model.py:build` calls."""
from torch import nn


class SmallNet(nn.Module):
    def __init__(self, classes: int = 4):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(inplace=True),
            nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(inplace=True),
            nn.MaxPool2d(2))
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(32 * 8 * 8, 64), nn.ReLU(), nn.BatchNorm1d(64), nn.Dropout(0.3),
            nn.Linear(64, classes))

    def forward(self, x):
        return self.head(self.features(x))


def build() -> nn.Module:
    return SmallNet()
