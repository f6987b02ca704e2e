"""PNG plots of a sweep (matplotlib, headless)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

LATENCIES = (("ttft", "TTFT"), ("tpot", "TPOT"), ("itl", "ITL"), ("e2el", "end-to-end"))


def require_matplotlib() -> None:
    """Fail before a benchmark runs, not after, when the plots cannot be drawn."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ValueError("plots need matplotlib: pip install 'trtdist[bench]' (or "
                         "matplotlib)") from None


def _pyplot():  # type: ignore[no-untyped-def]
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")  # NOTE: no display on servers; must precede importing pyplot
    import matplotlib.pyplot as plt

    return plt


def plot_throughput_latency(points: Sequence[dict[str, Any]], labels: Sequence[str],
                            path: str | Path, *, unit: str = "ms", title: str = "") -> Path:
    """2 x 2 panels (TTFT, TPOT, ITL, E2E): p50 / p90 / p99 latency against output tok/s,
    each point labelled with its sweep value. `points` are result dicts holding
    `output_throughput` and `<metric>_<unit>` percentile dicts."""
    plt = _pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    x = [p["output_throughput"] for p in points]
    for ax, (key, name) in zip(axes.flat, LATENCIES):
        for q, style in (("p50", "o-"), ("p90", "s--"), ("p99", "^:")):
            ax.plot(x, [p[f"{key}_{unit}"][q] for p in points], style, label=q)
        for xi, yi, lab in zip(x, [p[f"{key}_{unit}"]["p50"] for p in points], labels):
            ax.annotate(lab, (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xlabel("output tokens / s")
        ax.set_ylabel(f"{name} ({unit})")
        ax.set_title(f"{name} latency vs throughput")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def plot_distributions(samples: Sequence[dict[str, Sequence[float]]], labels: Sequence[str],
                       path: str | Path, *, title: str = "") -> Path:
    """Per sweep point, the CDF of TTFT and of ITL (milliseconds), one line each.
    `samples[i]` is `{"ttft": [...], "itl": [...]}` in ms for point i."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, key, name in ((axes[0], "ttft", "TTFT"), (axes[1], "itl", "ITL")):
        for s, lab in zip(samples, labels):
            v = np.sort(np.asarray(s.get(key, []), dtype=np.float64))
            if v.size:
                ax.plot(v, np.arange(1, v.size + 1) / v.size, drawstyle="steps-post", label=lab)
        ax.set_xlabel(f"{name} (ms)")
        ax.set_ylabel("fraction of samples")
        ax.set_title(f"{name} distribution per point")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def plot_sweep(points: Sequence[dict[str, Any]], labels: Sequence[str], xlabel: str,
               path: str | Path, *, unit: str = "s", title: str = "") -> Path:
    """Offline sweep: output tok/s (left) and p50 / p99 latencies (right) per sweep value."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    xs = range(len(points))
    left.bar(xs, [p["output_tokens_per_s"] for p in points])
    left.set_ylabel("output tokens / s")
    for ax in (left, right):
        ax.set_xticks(list(xs), list(labels))
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    for i, (key, name) in enumerate(LATENCIES):
        for q, style in (("p50", "o-"), ("p99", "^:")):
            right.plot(xs, [p[f"{key}_{unit}"][q] for p in points], style, color=f"C{i}",
                       label=f"{name} {q}")
    right.set_yscale("log")
    right.set_ylabel(f"latency ({unit})")
    right.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
