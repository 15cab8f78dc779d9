"""Matplotlib PNGs for the serving benchmark and the soak (written atomically)."""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _save(fig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, path)


def _sweeps(rows: list[dict]) -> dict[str, list[dict]]:
    by_setup: dict[str, list[dict]] = {}
    for row in rows:
        if row["kind"] == "sweep" and row["setup"] != "in-process":
            by_setup.setdefault(row["setup"], []).append(row)
    return {k: sorted(v, key=lambda r: r["users"]) for k, v in by_setup.items()}


def _users_axis(ax, rows: list[dict]) -> None:
    users = sorted({r["users"] for r in rows if r["kind"] == "sweep" and r["setup"] != "in-process"})
    ax.set_xscale("log", base=2)
    ax.set_xticks(users)
    ax.set_xticklabels([str(u) for u in users])
    ax.minorticks_off()


def plot_throughput(rows: list[dict], path: Path, title: str) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for setup, points in _sweeps(rows).items():
        ax.plot([p["users"] for p in points], [p["rps"] for p in points], marker="o", label=setup)
    _users_axis(ax, rows)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("concurrent users (closed loop, single-image /predict)")
    ax.set_ylabel("throughput (req/s)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    _save(fig, path)


def plot_latency(rows: list[dict], path: Path, title: str) -> None:
    sweeps = _sweeps(rows)
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2), sharey=True)
    for ax, pct in zip(axes, ("p50", "p95", "p99")):
        for setup, points in sweeps.items():
            ax.plot([p["users"] for p in points], [p[pct] for p in points], marker="o", label=setup)
        # locust reports sub-millisecond times as 0 ms: symlog keeps those on the plot (linear
        # below 1 ms) where a log axis would drop them.
        ax.set_yscale("symlog", linthresh=1.0)
        _users_axis(ax, rows)
        ax.set_xlabel("concurrent users")
        ax.set_title(f"{pct} latency")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("ms (single-image /predict)")
    axes[-1].legend()
    fig.suptitle(title)
    _save(fig, path)


def plot_soak(seconds: list[float], rss_mib: list[float], lat_t: list[float], p50: list[float],
              p99: list[float], rps: list[float], warmup_s: float, path: Path, title: str) -> None:
    fig, (ax_rss, ax_lat) = plt.subplots(2, 1, figsize=(9, 6.5), sharex=True)
    ax_rss.plot(seconds, rss_mib, color="tab:purple")
    ax_rss.axvline(warmup_s, color="grey", linestyle="--", label="end of warm-up")
    ax_rss.set_ylabel("server RSS (MiB, all processes)")
    ax_rss.grid(True, alpha=0.3)
    ax_rss.legend(loc="lower right")
    ax_lat.plot(lat_t, p50, label="p50")
    ax_lat.plot(lat_t, p99, label="p99")
    ax_lat.set_ylabel("latency (ms)")
    ax_lat.set_xlabel("seconds since start of load")
    ax_lat.grid(True, alpha=0.3)
    ax_rps = ax_lat.twinx()
    ax_rps.plot(lat_t, rps, color="tab:green", alpha=0.5, label="req/s")
    ax_rps.set_ylabel("req/s")
    lines = ax_lat.get_legend_handles_labels()
    more = ax_rps.get_legend_handles_labels()
    ax_lat.legend(lines[0] + more[0], lines[1] + more[1], loc="upper right")
    fig.suptitle(title)
    _save(fig, path)
