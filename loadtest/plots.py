"""Matplotlib PNGs of the serving benchmark and the soak (Agg, written atomically)."""
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from common.files import atomic_write  # noqa: E402


def _save(fig, path: Path) -> None:
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight"))
    plt.close(fig)


def bench(rows: list[dict], path: Path, title: str) -> None:
    """img/s, p99 and server CPU per image against closed-loop clients, a line per setup and round; the
    in-process ceiling dashed."""
    keys = (("img_s", "images/s"), ("p99_ms", "p99 latency (ms)"), ("server_cpu_ms_per_img", "server CPU ms per image"))
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    rounds = len({r["round"] for r in rows}) > 1
    lines: dict[str, list[dict]] = {}
    for r in rows:
        if r["kind"] == "closed" and r["ok"]:
            lines.setdefault(r["setup"] + (f" (round {r['round']})" if rounds else ""), []).append(r)
    for ax, (key, label) in zip(axes, keys):
        for i, (name, points) in enumerate(lines.items()):
            ax.plot([p["clients"] for p in points], [p[key] for p in points], marker="o", label=name,
                    color=f"C{i % 10}")
        for r in rows:
            if r["kind"] == "ceiling" and key != "p99_ms":
                label = f"in-process ceiling ({r['clients']} proc)" if r["round"] == 1 else None
                timed = [p for p in rows if p["round"] == r["round"] and f"ceiling_{key}" in p]  # around each step
                if timed:
                    ax.plot([p["clients"] for p in timed], [p[f"ceiling_{key}"] for p in timed], color="black",
                            linestyle="--", linewidth=1, marker="x", label=label)
                else:
                    ax.axhline(r[key], color="black", linestyle="--", linewidth=1, label=label)
        ax.set_xscale("log", base=2)
        clients = sorted({p["clients"] for points in lines.values() for p in points})
        ax.set_xticks(clients, [str(c) for c in clients])
        ax.set(xlabel="keep-alive clients (closed loop)", ylabel=label)
        ax.set_yscale("log" if key == "p99_ms" else "linear")
        if key != "p99_ms":
            ax.set_ylim(0, None)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(loc="best", fontsize="small")
    fig.suptitle(title)
    _save(fig, path)


def soak(seconds: list[float], rss_mib: list[float], series: dict, warmup_s: float, path: Path, title: str) -> None:
    """Server RSS, and locust's p50/p99 and req/s, over the soak."""
    fig, (ax_rss, ax_lat) = plt.subplots(2, 1, figsize=(9, 6.5), sharex=True)
    ax_rss.plot(seconds, rss_mib, color="tab:purple")
    ax_rss.axvline(warmup_s, color="grey", linestyle="--", label="end of warm-up")
    ax_rss.set(ylabel="server RSS (MiB, all processes)")
    ax_rss.legend(loc="lower right")
    for name in ("p50", "p99"):
        ax_lat.plot(series["seconds"], series[name], label=name)
    ax_lat.set(ylabel="latency (ms)", xlabel="seconds since start of load")
    ax_lat.legend(loc="upper left")
    for ax in (ax_rss, ax_lat):
        ax.grid(True, alpha=0.3)
    ax_rps = ax_lat.twinx()
    ax_rps.plot(series["seconds"], series["rps"], color="tab:green", alpha=0.5)
    ax_rps.set(ylabel="req/s (green)")
    fig.suptitle(title)
    _save(fig, path)
