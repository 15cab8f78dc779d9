"""How examples/onnx/fashion_cnn.onnx was made: an ONNX graph with its BatchNormalization nodes still in,
as a PyTorch, Keras or tf2onnx export hands it to you, to try `python -m export --onnx` with.

A small CNN (two Conv -> BatchNorm -> ReLU -> MaxPool blocks, Linear) trained for one seeded epoch
on 20,000 Fashion-MNIST training images (85.87% test accuracy on this machine), exported by torch.onnx
with optimize=False (its optimizer would fold the BNs itself) and a dynamic batch axis.

    python examples/onnx/make_model.py examples/onnx/fashion_cnn.onnx [--data-dir DIR]
"""
import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from training.data import DEFAULT_DATA_DIR, load_split  # noqa: E402


class FashionCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten())
        self.head = nn.Linear(32 * 7 * 7, 10)

    def forward(self, x):
        return self.head(self.features(x))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path)
    p.add_argument("--data-dir", default=DEFAULT_DATA_DIR)
    args = p.parse_args()
    torch.manual_seed(0)
    x, y = load_split(args.data_dir, "train")
    x, y = torch.from_numpy(x[:20000]), torch.from_numpy(y[:20000])
    model = FashionCNN()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for i in torch.randperm(len(x)).split(64):
        loss = F.cross_entropy(model(x[i]), y[i])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    tx, ty = load_split(args.data_dir, "test")
    with torch.no_grad():
        accuracy = (model(torch.from_numpy(tx)).argmax(1).numpy() == ty).mean()
    batch = torch.export.Dim("batch", min=1, max=4096)
    torch.onnx.export(model, (torch.rand(2, 1, 28, 28),), args.out, input_names=["image"], output_names=["logits"],
                      dynamic_shapes=({0: batch},), dynamo=True, optimize=False, external_data=False)
    print(f"wrote {args.out}: test accuracy {accuracy:.4f} (torch, float32)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
