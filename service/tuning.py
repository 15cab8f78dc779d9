"""Settings the served model's own cost decides (issue 25; docs/service.md, "Settings from the model").

The defaults used to be constants fitted to a 0.06 ms model. Now, when `bentoml serve` starts and
before any worker does, one short-lived process (`measure_in_subprocess`, so the supervisor never
holds an onnxruntime session) loads the model at the workers' own session settings and times one
call at batch sizes 1, 2, 4, ... (each the best of two, while a call stays within the latency budget
and the whole measurement within MEASURE_S). Every worker, and every respawned one, gets the figures
through its environment (TUNING_ENV) and derives from them, unless a variable overrides it:

- the batch cap: the largest measured batch whose call fits LATENCY_BUDGET_MS (default 500 ms);
- the inline cap: calls of up to this many inputs run on the event loop, when one takes no more
  than INLINE_BUDGET_MS; anything bigger runs in the worker's inference thread;
- the shedding threshold: a standing queue of QUEUE_CALLS full calls is not overload, so
  QUEUE_DELAY_MS defaults to max(1 s, QUEUE_CALLS x the longest measured call within the latency
  budget); the window the
  standing queue is judged over is two such calls (at least 100 ms);
- the shedding pace: an overload 503 is sent no sooner than SHED_PACE_MS after its request's headers,
  by default one call of one input, so a client that re-sends at once on a 503 (many ignore
  Retry-After) re-sends no faster than it would be served.

A setting that cannot work (a latency budget below one call of the model) is refused before any
worker starts, in one line naming the variable and the measured cost.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

TUNING_ENV = "BNFOLD_TUNING"  # the measured cost, JSON, handed from `bentoml serve` to its workers
DEFAULT_LATENCY_BUDGET_MS = 500.0
QUEUE_CALLS = 8
# A closed loop of N clients keeps N requests queued, which is no overload; 1 s lets 32 clients over 2
# workers queue on YOLOv8n (16 x 26 ms) and MobileNetV2 without a 503; for tiny models QUEUE_MAX binds
# long before it.
QUEUE_DELAY_FLOOR_MS = 1000.0
MIN_WINDOW_S = 0.1
MAX_MEASURED_BATCH = 64
MEASURE_S = 2.0  # at most this long timing batches
REPEATS = 2  # each batch size at least this many times ...
MIN_TIMING_S = 0.15  # ... and for at least this long (up to MAX_REPEATS calls)
MAX_REPEATS = 200
BATCH_TOLERANCE = 0.05  # a batch may cost this much more per input than the cheapest and still be the cap


class TuningError(ValueError):
    """A setting that cannot work with this model on this host (one line)."""


def cgroup_cpu_limit() -> float | None:
    """The CPU quota of this process's cgroup in cores (v2 cpu.max, or v1 cfs quota/period), if any."""
    for quota_file, period_file in (("/sys/fs/cgroup/cpu.max", None),
                                    ("/sys/fs/cgroup/cpu/cpu.cfs_quota_us", "/sys/fs/cgroup/cpu/cpu.cfs_period_us")):
        try:
            fields = Path(quota_file).read_text().split()
            quota, period = fields[0], (fields[1] if period_file is None else Path(period_file).read_text().strip())
            if quota not in ("max", "-1"):
                return int(quota) / int(period)
        except (OSError, ValueError, IndexError):
            continue
    return None


def usable_cores() -> int:
    """CPUs this process may use: its affinity mask, and its cgroup's CPU quota when there is one."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    limit = cgroup_cpu_limit()
    if limit is not None:
        cores = min(cores, max(1, math.ceil(limit)))
    return max(1, cores)


def time_batches(model, budget_s: float, limit_s: float = MEASURE_S) -> tuple[dict[int, float], dict[int, float]]:
    """({batch size: wall seconds per call, the best}, {batch size: CPU seconds per call, the median})
    for 1, 2, 4, ...: each size timed at least REPEATS times and for at least MIN_TIMING_S, while its
    call is predicted to fit `budget_s` and the whole measurement `limit_s`. Wall time is what a
    request waits; CPU time (all of this process's threads) is what an input costs the cores, the
    figure batches are compared by (it is not inflated when another process takes turns on a core)."""
    wall: dict[int, float] = {}
    cpu: dict[int, float] = {}
    low = model.contract.input_range[0] if model.contract.input_range else 0.0
    spent, b = 0.0, 1
    while b <= MAX_MEASURED_BATCH:
        if b > 1 and (2 * wall[b // 2] > budget_s or spent + REPEATS * 2 * wall[b // 2] > limit_s):
            break
        batch = np.full((b, *model.contract.sample_shape), low, np.float32)
        walls, cpus, started = [], [], time.perf_counter()
        while len(walls) < REPEATS or (time.perf_counter() - started < MIN_TIMING_S and len(walls) < MAX_REPEATS):
            w, c = time.perf_counter(), time.process_time()
            model.run(batch)
            walls.append(time.perf_counter() - w)
            cpus.append(time.process_time() - c)
        wall[b], cpu[b] = min(walls), float(np.median(cpus))
        spent += time.perf_counter() - started
        b *= 2
    return wall, cpu


@dataclass(frozen=True)
class Tuning:
    seconds: dict[int, float]  # measured: batch size -> wall seconds per call
    cpu: dict[int, float]  # measured: batch size -> CPU seconds per call
    latency_budget_s: float
    batch_max: int
    inline_max: int  # 0: no call runs on the event loop
    queue_delay_s: float
    window_s: float
    why: dict[str, str]
    max_images: int = 1024  # per request: what the model computes within half of REQUEST_TIMEOUT_S
    shed_pace_s: float = 0.0  # an overload 503 goes no sooner than this after its request's headers

    def call_s(self, n: int) -> float:
        """Predicted seconds of one call of n inputs (linear beyond the largest measured batch)."""
        sizes = sorted(self.seconds)
        at_or_below = [b for b in sizes if b <= n]
        b = at_or_below[-1] if at_or_below else sizes[0]
        return self.seconds[b] * n / b

    def describe(self) -> dict:
        return {"ms_per_call": {str(b): round(1000 * t, 3) for b, t in sorted(self.seconds.items())},
                "cpu_ms_per_input": {str(b): round(1000 * t / b, 3) for b, t in sorted(self.cpu.items())},
                "best_batch": min(self.cpu, key=lambda b: self.cpu[b] / b),
                "latency_budget_ms": round(1000 * self.latency_budget_s, 1), "batch_max_inputs": self.batch_max,
                "inline_max_inputs": self.inline_max, "queue_delay_ms": round(1000 * self.queue_delay_s, 1),
                "queue_window_ms": round(1000 * self.window_s, 1), "max_images_per_request": self.max_images,
                "shed_pace_ms": round(1000 * self.shed_pace_s, 2), "why": self.why}


def derive(seconds: dict[int, float], settings, cpu: dict[int, float] | None = None) -> Tuning:
    """The settings of module docstring from measured `seconds` (wall) and `cpu` (CPU seconds per
    call; the wall figures when not given); TuningError for one that cannot work."""
    cpu = cpu or seconds
    t1 = seconds[1]
    why = {}
    if settings.latency_budget_ms is None:
        budget = max(DEFAULT_LATENCY_BUDGET_MS / 1000, t1)
        why["latency_budget"] = (f"default {DEFAULT_LATENCY_BUDGET_MS:g} ms" if budget > t1 else
                                 f"one call of one input ({1000 * t1:.0f} ms): the default {DEFAULT_LATENCY_BUDGET_MS:g} ms "
                                 "is shorter, so calls are not batched")
    else:
        budget = settings.latency_budget_ms / 1000
        if t1 > budget:
            raise TuningError(f"LATENCY_BUDGET_MS={settings.latency_budget_ms:g} is below one call of the model: "
                              f"{1000 * t1:.1f} ms for one input, measured at start")
        why["latency_budget"] = "LATENCY_BUDGET_MS"
    fitting = [b for b, t in seconds.items() if t <= budget and b in cpu]
    if settings.batch_max_images is None:
        # Bigger is not always cheaper: past a size the activations leave the cache (YOLOv8n here: 7%
        # more per input at batch 2 than at 1), and a bigger call then only adds latency.
        per_input = {b: cpu[b] / b for b in fitting}
        cheapest = min(per_input.values())
        batch_max = max(b for b in fitting if per_input[b] <= (1 + BATCH_TOLERANCE) * cheapest)
        why["batch_max"] = (f"the largest measured batch whose call fits the latency budget and costs at most "
                            f"{100 * BATCH_TOLERANCE:g}% more per input than the cheapest ({batch_max}: "
                            f"{1000 * seconds[batch_max]:.1f} ms a call, {1000 * per_input[batch_max]:.2f} ms of CPU "
                            f"per input against {1000 * cheapest:.2f})")
    else:
        batch_max = settings.batch_max_images
        why["batch_max"] = "BATCH_MAX_IMAGES"
    inline_budget = settings.inline_budget_ms / 1000
    inline_max = min(batch_max, max((b for b, t in seconds.items() if t <= inline_budget), default=0))
    why["inline_max"] = (f"calls up to {inline_max} inputs take <= INLINE_BUDGET_MS ({settings.inline_budget_ms:g} ms)"
                         if inline_max else f"one call takes {1000 * t1:.2f} ms > INLINE_BUDGET_MS "
                                            f"({settings.inline_budget_ms:g} ms): every call runs in the inference thread")
    tuning = Tuning(dict(seconds), dict(cpu), budget, batch_max, inline_max, 0.0, 0.0, why)
    call = tuning.call_s(batch_max)
    # The queue is judged in calls as long as the latency budget lets one be, not at the batch cap: the cap
    # is the cheapest batch per input within 10%, a pick that measurement noise moves (ResNet-50: 1, 2 or 4
    # from one start to the next), and with it a threshold of 1.0-2.5 s; 32 keep-alive clients queue 16
    # inputs (1.3 s) a worker, so on some starts they were shed, and re-sending at once they collapsed
    # throughput (9.9 img/s against 25 in-process, docs/service.md).
    longest = max([seconds[b] for b in fitting] + [call])
    if settings.queue_delay_ms is None:
        queue_delay = max(QUEUE_DELAY_FLOOR_MS / 1000, QUEUE_CALLS * longest)
        why["queue_delay"] = (f"{QUEUE_CALLS} calls as long as the latency budget allows ({QUEUE_CALLS} x "
                              f"{1000 * longest:.1f} ms)" if queue_delay > QUEUE_DELAY_FLOOR_MS / 1000 else
                              f"the floor of {QUEUE_DELAY_FLOOR_MS:g} ms ({QUEUE_CALLS} calls as long as the latency "
                              f"budget allows take {1000 * QUEUE_CALLS * longest:.1f} ms)")
    else:
        queue_delay = settings.queue_delay_ms / 1000
        why["queue_delay"] = "QUEUE_DELAY_MS"
    window = max(MIN_WINDOW_S, 2 * call)
    # A request the model cannot answer within the request timeout would run for nothing and end in a
    # 504; it is refused at once (413) instead, at what fits in half of the timeout.
    per_input = min(t / b for b, t in seconds.items())  # wall: what a request of n inputs waits
    affordable = max(1, int(settings.request_timeout_s / 2 / per_input))
    max_images = min(settings.max_images, affordable)
    why["max_images"] = (f"MAX_IMAGES_PER_REQUEST ({settings.max_images})" if max_images == settings.max_images else
                         f"what the model computes in half of REQUEST_TIMEOUT_S ({settings.request_timeout_s} s / 2 / "
                         f"{1000 * per_input:.1f} ms per input)")
    # Shed answers come at once, and a closed-loop client that ignores Retry-After re-sends at once: with
    # 2.4 MB bodies (448 px) 16 such clients made ~1,000 rejections a second, and their uploads and
    # reconnects took half of the served throughput (2.6 against 4.7 img/s, docs/service.md). Paced at one
    # call, a looping client costs no more requests than one being served; on a tiny model it is nothing.
    if settings.shed_pace_ms is None:
        shed_pace = t1
        why["shed_pace"] = f"one call of one input ({1000 * t1:.2f} ms)"
    else:
        shed_pace = settings.shed_pace_ms / 1000
        why["shed_pace"] = "SHED_PACE_MS"
    return Tuning(dict(seconds), dict(cpu), budget, batch_max, inline_max, queue_delay, window, why, max_images,
                  shed_pace)


# --- measured once per `bentoml serve`, handed to the workers ----------------------------------------

def encode(sha256: str, seconds: dict[int, float], cpu: dict[int, float]) -> str:
    return json.dumps({"sha256": sha256, "seconds": {str(b): t for b, t in seconds.items()},
                       "cpu": {str(b): t for b, t in cpu.items()}})


def decode(text: str | None, sha256: str) -> tuple[dict[int, float], dict[int, float]] | None:
    """The figures handed down (wall, CPU), if they are of this very model."""
    try:
        data = json.loads(text or "")
        if data["sha256"] != sha256:
            return None
        return ({int(b): float(t) for b, t in data["seconds"].items()}, {int(b): float(t) for b, t in data["cpu"].items()})
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


def measure_in_subprocess(model_path: str, timeout: float = 300.0) -> str:
    """Run `python -m service.tuning` on `model_path` (the file the workers will load: inside a bento
    the model comes from the store through a bento argument the child would not see) in the same
    environment otherwise, and return its JSON; raises TuningError."""
    root = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, "MODEL_PATH": str(model_path), "MODEL_TAG": "",
           "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-m", "service.tuning"], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=root)
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines()
        raise TuningError(lines[-1] if lines else f"measuring the model failed (exit {done.returncode})")
    return done.stdout.strip().splitlines()[-1]


def main() -> int:
    """Load the model as a worker does, time it, check the settings, print the figures as JSON."""
    from .config import Settings
    from .contract import ModelLoadError, load_contract
    from .model import Model

    settings = Settings.from_env()
    try:
        contract, data = load_contract(settings.resolve_model_path())
        model = Model(contract, data, settings.provider, settings.intra_op_threads, settings.chunk_images, timed_runs=1)
        budget = (settings.latency_budget_ms or DEFAULT_LATENCY_BUDGET_MS) / 1000
        seconds, cpu = time_batches(model, max(budget, model.seconds_per_sample))
        derive(seconds, settings, cpu)  # refuse what cannot work, here, before any worker starts
    except (ModelLoadError, TuningError) as exc:
        print(str(exc), file=sys.stderr)
        return 2
    print(encode(contract.sha256, seconds, cpu))
    return 0


if __name__ == "__main__":
    sys.exit(main())
