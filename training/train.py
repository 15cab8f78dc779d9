"""Training loop: AdamW + one-cycle schedule, early stopping on a held-out validation split
(best checkpoint restored), seeded and reproducible, tqdm progress."""
import copy
import ctypes
import math
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from common.machine import cpu_summary
from training import data
from training.config import ARCH_DEFAULTS, DEFAULTS, resolve_config  # noqa: F401 (their old home)
from training.models import PIXEL_MEAN, PIXEL_STD, LeanSeedCNN, build
from training.provenance import trained_on

def keep_freed_memory() -> bool:
    """glibc's malloc gives a freed block larger than its mmap threshold back to the OS, so a
    training step page-faults its ~13 MB activations in again: ~10% of a lean step, ~35% of a step
    of the seed's own layers (docs/training.md). Raising the mmap threshold to glibc's maximum
    (32 MB) and the trim threshold keeps freed blocks for reuse. False where the C library is not
    glibc (nothing changes)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    return bool(libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 1 << 30))


def set_threads(threads: int) -> int:
    threads = threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    return threads


def seed_everything(seed: int) -> torch.Generator:
    torch.manual_seed(seed)
    np.random.seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    return torch.Generator().manual_seed(seed)


@torch.no_grad()
def random_shift(x: torch.Tensor, pixels: int, generator: torch.Generator) -> torch.Tensor:
    """Each image moved by its own random (dy, dx) in [-pixels, pixels], the gap filled with 0
    (the background): pad, then gather one 28x28 window per image."""
    n, _, h, w = x.shape
    padded = F.pad(x, (pixels, pixels, pixels, pixels))
    dy, dx = torch.randint(0, 2 * pixels + 1, (2, n), generator=generator)
    rows = (dy[:, None] + torch.arange(h))[:, :, None]
    cols = (dx[:, None] + torch.arange(w))[:, None, :]
    return padded[torch.arange(n)[:, None, None], :, rows, cols].permute(0, 3, 1, 2)  # [n,h,w,c] -> [n,c,h,w]


class WeightAverage:
    """Exponential moving average of a module's weights (--ema): `model` is a twin of `net` whose
    float tensors, parameters and BN running statistics, move towards net's by (1 - decay) at every
    update(). The twin's state_dict tensors share its storage, so one in-place _foreach_lerp_ does
    it. decay 0: no twin, `model` is `net` itself."""

    def __init__(self, net: torch.nn.Module, decay: float):
        self.decay, self.model = decay, copy.deepcopy(net) if decay else net
        live, avg = net.state_dict(), self.model.state_dict()
        keys = [k for k, v in live.items() if v.is_floating_point()]
        self._avg, self._live = [avg[k] for k in keys], [live[k] for k in keys]

    @torch.no_grad()
    def update(self):
        if self.decay:
            torch._foreach_lerp_(self._avg, self._live, 1.0 - self.decay)


def evaluate(model, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 500) -> dict:
    """Loss and accuracy in eval mode; images uint8 [N,28,28], converted one batch at a time."""
    model.eval()
    loss, correct = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            logits = model(data.to_float(images[i:i + batch_size]))
            loss += F.cross_entropy(logits, labels[i:i + batch_size], reduction="sum").item()
            correct += (logits.argmax(1) == labels[i:i + batch_size]).sum().item()
    return {"loss": loss / len(images), "accuracy": correct / len(images)}


def train(cfg: dict, data_dir: str, progress: bool = True) -> tuple[torch.nn.Module, dict]:
    """Returns the best model (eval mode) and the config, extended with metrics and history."""
    cfg = resolve_config(cfg)
    provenance = trained_on(cfg, data_dir)  # what it is trained on: the data files' sha256, the recipe, the seed
    cfg["threads"] = set_threads(cfg["threads"])
    if cfg["keep_freed"]:
        keep_freed_memory()
    generator = seed_everything(cfg["seed"])

    images, labels = data.load_split_uint8(data_dir, "train")  # uint8 in memory, converted per batch
    train_idx, val_idx = data.train_val_split(len(images), cfg["val_size"], cfg["seed"])
    if cfg["subset"]:
        train_idx = train_idx[:cfg["subset"]]
    x_train, y_train = torch.from_numpy(images[train_idx]), torch.from_numpy(labels[train_idx])
    x_val, y_val = torch.from_numpy(images[val_idx]), torch.from_numpy(labels[val_idx])

    model = build(cfg["arch"], dropout=cfg["dropout"])
    lean = cfg["arch"] == "seed-cnn" and cfg["lean"]
    # LeanSeedCNN is trained in the seed's place and written back into `model` at the end.
    net = LeanSeedCNN(model) if lean else model.to(memory_format=torch.channels_last)  # oneDNN convs: 2-3x faster NHWC
    average = WeightAverage(net, cfg["ema"])  # average.model is what is evaluated and kept
    kept = average.model
    # No weight decay on BN/bias parameters: decaying γ/β only fights the normalization.
    decay = [p for p in net.parameters() if p.ndim > 1]
    no_decay = [p for p in net.parameters() if p.ndim <= 1]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg["weight_decay"]},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg["lr"], fused=True)
    steps_per_epoch = math.ceil(len(x_train) / cfg["batch_size"])
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg["lr"], epochs=cfg["epochs"],
                                                   steps_per_epoch=steps_per_epoch)

    history, best, best_state, since_best = [], None, None, 0
    started = time.perf_counter()
    for epoch in range(1, cfg["epochs"] + 1):
        net.train()
        order = torch.randperm(len(x_train), generator=generator)
        seen, loss_sum, correct = 0, 0.0, 0
        bar = tqdm(range(0, len(order), cfg["batch_size"]), desc=f"epoch {epoch}/{cfg['epochs']}",
                   unit="batch", disable=not progress, leave=False)
        for start in bar:
            batch = order[start:start + cfg["batch_size"]]
            x, y = data.to_float(x_train[batch]), y_train[batch]
            if cfg["hflip"]:
                flip = torch.rand(len(x), generator=generator) < 0.5
                x = torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)
            if cfg["shift"]:
                x = random_shift(x, cfg["shift"], generator)
            logits = net(x)
            loss = F.cross_entropy(logits, y, label_smoothing=cfg["label_smoothing"])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            average.update()
            seen += len(batch)
            loss_sum += loss.item() * len(batch)
            correct += (logits.argmax(1) == y).sum().item()
            bar.set_postfix(loss=f"{loss_sum / seen:.4f}", refresh=False)
        val = evaluate(kept, x_val, y_val)
        # train_loss is the running loss in train mode (dropout on, label smoothing on); the overfitting
        # gap is read from train_eval_loss: plain cross-entropy in eval mode, like val_loss.
        train_eval = evaluate(kept, x_train[:len(x_val)], y_train[:len(x_val)])
        row = {"epoch": epoch, "train_loss": loss_sum / seen, "train_accuracy": correct / seen,
               "train_eval_loss": train_eval["loss"], "train_eval_accuracy": train_eval["accuracy"],
               "val_loss": val["loss"], "val_accuracy": val["accuracy"], "lr": schedule.get_last_lr()[0],
               "seconds": round(time.perf_counter() - started, 1)}
        history.append(row)
        if progress:
            tqdm.write(f"epoch {epoch:2d}  train loss {row['train_loss']:.4f}  val loss {val['loss']:.4f}  "
                       f"val acc {val['accuracy']:.4f}  ({row['seconds']:.0f}s)")
        if best is None or val["accuracy"] > best["val_accuracy"]:
            state = kept.seed_state_dict() if lean else kept.state_dict()
            best, best_state, since_best = row, {k: v.detach().clone() for k, v in state.items()}, 0
        else:
            since_best += 1
            if since_best >= cfg["patience"]:
                if progress:
                    tqdm.write(f"early stop: no better validation accuracy for {cfg['patience']} epochs")
                break

    model.load_state_dict(best_state)
    model = model.to(memory_format=torch.contiguous_format).eval()
    x_test, y_test = (torch.from_numpy(a.copy()) for a in data.load_split_uint8(data_dir, "test"))
    test = evaluate(model, x_test, y_test)
    cfg.update(
        labels=data.LABELS,
        normalization={"mean": PIXEL_MEAN, "std": PIXEL_STD},
        input={"name": "image", "shape": [None, 1, 28, 28], "range": [0.0, 1.0], "layout": "NCHW"},
        best_epoch=best["epoch"],
        metrics={"val_loss": best["val_loss"], "val_accuracy": best["val_accuracy"],
                 "test_loss": test["loss"], "test_accuracy": test["accuracy"]},
        history=history,
        train_seconds=round(time.perf_counter() - started, 1),
        torch_version=torch.__version__,
        trained_on=provenance,
        machine=cpu_summary(),  # the 4th digit of the accuracy depends on it (docs/training.md, "Determinism")
    )
    return model, cfg
