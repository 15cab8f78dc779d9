"""Matplotlib PNGs of the serving benchmark and the soak (Agg, written atomically)."""
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from common.files import atomic_write  # noqa: E402


def _save(fig, path: Path) -> None:
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight"))
    plt.close(fig)


def sweep(rows: list[dict], out: Path, title: str) -> None:
    """throughput_vs_users.png and latency_vs_users.png (p50/p95/p99) of the closed-loop sweeps."""
    by_setup: dict[str, list[dict]] = {}
    for r in sorted(rows, key=lambda r: r["users"]):
        if r["kind"] == "sweep" and r["setup"] != "in-process":
            by_setup.setdefault(r["setup"], []).append(r)
    users = sorted({r["users"] for points in by_setup.values() for r in points})

    def axes(ax, xlabel):
        ax.set_xscale("log", base=2)
        ax.set_xticks(users, [str(u) for u in users])
        ax.minorticks_off()
        ax.set_xlabel(xlabel)
        ax.grid(True, which="both", alpha=0.3)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for setup, points in by_setup.items():
        ax.plot([p["users"] for p in points], [p["rps"] for p in points], marker="o", label=setup)
    axes(ax, "concurrent users (closed loop, single-input /predict)")
    ax.set_ylim(bottom=0)
    ax.set_ylabel("throughput (req/s)")
    ax.set_title(title)
    ax.legend(loc="best", fontsize="small")
    _save(fig, out / "throughput_vs_users.png")

    fig, panels = plt.subplots(1, 3, figsize=(14, 4.2), sharey=True)
    for ax, pct in zip(panels, ("p50", "p95", "p99")):
        for setup, points in by_setup.items():
            ax.plot([p["users"] for p in points], [p[pct] for p in points], marker="o", label=setup)
        ax.set_yscale("symlog", linthresh=1.0)  # locust reports sub-millisecond times as 0 ms: keep them
        axes(ax, "concurrent users")
        ax.set_title(f"{pct} latency")
    panels[0].set_ylabel("ms (single-input /predict)")
    panels[-1].legend()
    fig.suptitle(title)
    _save(fig, out / "latency_vs_users.png")


def soak(seconds: list[float], rss_mib: list[float], series: dict, warmup_s: float, path: Path, title: str) -> None:
    """Server RSS, and locust's p50/p99 and req/s, over the soak."""
    fig, (ax_rss, ax_lat) = plt.subplots(2, 1, figsize=(9, 6.5), sharex=True)
    ax_rss.plot(seconds, rss_mib, color="tab:purple")
    ax_rss.axvline(warmup_s, color="grey", linestyle="--", label="end of warm-up")
    ax_rss.set_ylabel("server RSS (MiB, all processes)")
    ax_rss.legend(loc="lower right")
    for name in ("p50", "p99"):
        ax_lat.plot(series["seconds"], series[name], label=name)
    ax_lat.set_ylabel("latency (ms)")
    ax_lat.set_xlabel("seconds since start of load")
    ax_rps = ax_lat.twinx()
    ax_rps.plot(series["seconds"], series["rps"], color="tab:green", alpha=0.5, label="req/s")
    ax_rps.set_ylabel("req/s")
    (h1, l1), (h2, l2) = ax_lat.get_legend_handles_labels(), ax_rps.get_legend_handles_labels()
    ax_lat.legend(h1 + h2, l1 + l2, loc="upper right")
    for ax in (ax_rss, ax_lat):
        ax.grid(True, alpha=0.3)
    fig.suptitle(title)
    _save(fig, path)
