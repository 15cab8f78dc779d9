"""python examples/byo/make_weights.py OUT.safetensors: stands in for your own training. 20 forward
passes in train mode on random images give every BatchNorm real running statistics."""
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent))
from my_model import build  # noqa: E402

out = sys.argv[1] if len(sys.argv) > 1 else "my_model.safetensors"
torch.manual_seed(0)
model = build().train()
with torch.no_grad():
    for _ in range(20):
        model(torch.rand(64, 3, 32, 32))
save_file(model.state_dict(), out)
print(f"wrote {out}")
