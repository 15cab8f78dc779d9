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
    """throughput_vs_users.png and latency_vs_users.png (p50 / p95 / p99) of the closed-loop sweeps."""
    by_setup: dict[str, list[dict]] = {}
    for r in sorted(rows, key=lambda r: r["users"]):
        if r["kind"] == "sweep" and r["setup"] != "in-process":
            by_setup.setdefault(r["setup"], []).append(r)
    users = sorted({r["users"] for points in by_setup.values() for r in points})
    for name, keys in (("throughput_vs_users.png", ["rps"]), ("latency_vs_users.png", ["p50", "p95", "p99"])):
        fig, axes = plt.subplots(1, len(keys), figsize=(4.7 * len(keys) + 2.3, 4.5), sharey=True, squeeze=False)
        for ax, key in zip(axes[0], keys):
            for setup, points in by_setup.items():
                ax.plot([p["users"] for p in points], [p[key] for p in points], marker="o", label=setup)
            ax.set_xscale("log", base=2)
            ax.set_xticks(users, [str(u) for u in users])
            ax.minorticks_off()
            ax.grid(True, which="both", alpha=0.3)
            ax.set(xlabel="concurrent users (closed loop)")
            if key == "rps":
                ax.set(ylim=(0, None), ylabel="throughput (req/s, single-input /predict)")
            else:  # locust reports sub-millisecond times as 0 ms: symlog keeps them on the plot
                ax.set_yscale("symlog", linthresh=1.0)
                ax.set(title=f"{key} latency", ylabel="ms (single-input /predict)" if key == "p50" else "")
        axes[0][-1].legend(loc="best", fontsize="small")
        fig.suptitle(title)
        _save(fig, out / name)


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
