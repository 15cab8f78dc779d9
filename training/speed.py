"""python -m training.speed: seconds per training step of seed-cnn formulations, side by side.

Variants run in interleaved rounds in one process on the same batches, so a busy machine slows all
of them alike; the result is each variant's median time per step and its ratio to the first one.
    old   the seed's layers, channels-last, float32 images in memory, for-loop AdamW (main's recipe)
    seed  the seed's layers, channels-last, uint8 images converted per batch, fused AdamW
    lean  LeanSeedCNN (training/models.py), uint8 images converted per batch, fused AdamW
--profile prints torch.profiler's table of one variant instead.
"""
import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from training import data
from training.models import LeanSeedCNN, build
from training.train import keep_freed_memory

VARIANTS = ("old", "seed", "lean")


def make_step(variant: str, images: torch.Tensor, labels: torch.Tensor, batch_size: int, generator):
    torch.manual_seed(0)
    model = build("seed-cnn")
    net = LeanSeedCNN(model) if variant == "lean" else model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3, **({} if variant == "old" else {"fused": True}))
    floats = data.to_float(images) if variant == "old" else None
    net.train()

    def step():
        batch = torch.randint(0, len(images), (batch_size,), generator=generator)
        x = floats[batch] if variant == "old" else data.to_float(images[batch])
        if variant != "lean":
            x = x.contiguous(memory_format=torch.channels_last)
        loss = F.cross_entropy(net(x), labels[batch], label_smoothing=0.1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss.item()
    return step


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.speed", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--variants", default="old,seed,lean", help=f"comma-separated, from {', '.join(VARIANTS)}")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--threads", type=int, default=0, help="0: one per core this process may use")
    p.add_argument("--rounds", type=int, default=10, help="interleaved rounds")
    p.add_argument("--steps", type=int, default=10, help="steps per variant per round")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="cpu: this thread's CPU time (use with --threads 1; robust to time-slicing)")
    p.add_argument("--profile", choices=VARIANTS, default=None, help="print torch.profiler's table for this variant")
    p.add_argument("--default-malloc", action="store_true",
                   help="leave glibc's malloc thresholds as they are (training raises them: keep_freed_memory)")
    p.add_argument("--data-dir", default=data.DEFAULT_DATA_DIR)
    args = p.parse_args(argv)
    variants = args.variants.split(",")
    if any(v not in VARIANTS for v in variants):
        print(f"speed: unknown variant in {args.variants!r}; choose from {', '.join(VARIANTS)}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads or len(__import__("os").sched_getaffinity(0)))
    if not args.default_malloc:
        keep_freed_memory()  # as training does
    images, labels = data.load_split_uint8(args.data_dir, "train")
    images, labels = torch.from_numpy(images[:20000].copy()), torch.from_numpy(labels[:20000])
    generator = torch.Generator().manual_seed(0)
    if args.profile:
        from torch.profiler import ProfilerActivity, profile
        step = make_step(args.profile, images, labels, args.batch_size, generator)
        for _ in range(5):
            step()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(args.steps):
                step()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
        return 0
    clock = time.thread_time if args.clock == "cpu" else time.perf_counter
    steps = {v: make_step(v, images, labels, args.batch_size, generator) for v in variants}
    for step in steps.values():
        for _ in range(3):
            step()
    times = {v: [] for v in variants}
    for _ in range(args.rounds):
        for v, step in steps.items():
            start = clock()
            for _ in range(args.steps):
                step()
            times[v].append((clock() - start) / args.steps * 1000)
    base = statistics.median(times[variants[0]])
    print(f"seed-cnn training step, batch {args.batch_size}, {torch.get_num_threads()} threads, {args.clock} clock, "
          f"median of {args.rounds} interleaved rounds of {args.steps} steps")
    print("| variant | ms/step | ms/128 images | ratio | min-max ms/step |\n|---|---|---|---|---|")
    for v, ts in times.items():
        m = statistics.median(ts)
        print(f"| {v} | {m:.1f} | {m * 128 / args.batch_size:.1f} | {m / base:.3f} | {min(ts):.1f}-{max(ts):.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
