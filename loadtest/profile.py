"""Where the server's time goes: py-spy on a server's process tree while a load step runs.

``bench_serve --profile`` samples our service during its saturation step; this module runs py-spy
and turns its collapsed stacks into a top-N table of self and inclusive time.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path


def start_py_spy(pid: int, seconds: float, raw_out: Path) -> subprocess.Popen | None:
    """Start sampling ``pid`` and its children for ``seconds``; None when py-spy is unavailable."""
    exe = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(exe).exists():
        return None
    raw_out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [exe, "record", "--pid", str(pid), "--subprocesses", "--duration", str(max(1, int(seconds))),
           "--format", "raw", "--function", "--nonblocking", "--rate", "50", "-o", str(raw_out)]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def summarize_collapsed(raw: Path, top: int = 30) -> tuple[int, list[tuple[str, int]], list[tuple[str, int]]]:
    """(samples, top self-time frames, top inclusive frames) from py-spy's raw output."""
    self_time: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        # The first frame is the process ("process 123:\"python ...\""), not code.
        code = [f for f in frames if not f.startswith("process ") and not f.startswith("thread ")]
        if not code:
            continue
        total += n
        self_time[code[-1]] += n
        for frame in set(code):
            inclusive[frame] += n
    return total, self_time.most_common(top), inclusive.most_common(top)


def profile_markdown(raw: Path, title: str) -> str:
    total, self_top, incl_top = summarize_collapsed(raw)
    if not total:
        return f"### {title}\n\n(no samples)\n"
    lines = [f"### {title}", "", f"{total} samples (py-spy, 50 Hz, all server processes, idle threads excluded)",
             "", "| self % | frame |", "|---:|---|"]
    lines += [f"| {100 * n / total:.1f} | `{frame}` |" for frame, n in self_top[:15]]
    # Frames on (nearly) every stack are the event loop's trunk (runpy, click, uvicorn): no news.
    branches = [(frame, n) for frame, n in incl_top if n < 0.8 * total]
    lines += ["", "| inclusive % | frame (below the event-loop trunk) |", "|---:|---|"]
    lines += [f"| {100 * n / total:.1f} | `{frame}` |" for frame, n in branches[:15]]
    return "\n".join(lines) + "\n"
