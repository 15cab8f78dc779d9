"""Stand-in weights for a torchvision or timm model, to try `python -m export --model` with when you have
none of your own (no internet for pretrained ones): the model's own initialisation, its BatchNorms
calibrated on a few batches of random images so their statistics are not the trivial 0/1. Runs in the
torchvision/timm venv (`make setup-zoo`):

    .venv-zoo/bin/python examples/zoo/make_weights.py torchvision.models:resnet50 /tmp/resnet50.safetensors
"""
import argparse
import importlib
import sys

import torch
from safetensors.torch import save_file


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("factory", help="package.module:FACTORY, e.g. torchvision.models:resnet50 or timm:create_model")
    p.add_argument("out", help="the .safetensors file to write")
    p.add_argument("--size", type=int, default=224, help="input height and width (default: 224)")
    p.add_argument("--arg", default=None, help="one positional argument for the factory, e.g. resnet18 for timm:create_model")
    args = p.parse_args()
    module, _, name = args.factory.partition(":")
    factory = getattr(importlib.import_module(module), name)
    torch.manual_seed(0)
    model = (factory(args.arg) if args.arg else factory()).train()
    with torch.no_grad():
        for _ in range(4):
            model(torch.rand(8, 3, args.size, args.size))
    save_file({k: v.detach().contiguous() for k, v in model.eval().state_dict().items()}, args.out)
    print(f"wrote {args.out}: {args.factory} with BatchNorm statistics from 32 random {args.size}x{args.size} images")
    return 0


if __name__ == "__main__":
    sys.exit(main())
