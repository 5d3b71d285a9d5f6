"""The Pareto plot: mean prompt tokens per test query against mean macro-F1, one point
per (method, n), with the frontier of the points no other point beats on both axes."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")  # files only: no display on benchmark machines

import matplotlib.pyplot as plt  # noqa: E402

from dspy_promptmii.files import partial_path  # noqa: E402

if TYPE_CHECKING:
    from benchmarks.report import Row

__all__ = ["pareto_front", "pareto_plot"]

_MARKERS = "osD^vP*Xh"


def pareto_front(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points (tokens, F1) that no other point matches or beats on both axes with one
    strict improvement (fewer tokens, higher F1), sorted by tokens."""
    front = []
    for x, y in points:
        dominated = any((ox <= x and oy >= y) and (ox < x or oy > y) for ox, oy in points)
        if not dominated:
            front.append((x, y))
    return sorted(set(front))


def pareto_plot(rows: Sequence[Row], path: str | Path, title: str = "Prompt tokens per query vs macro-F1") -> Path:
    """Draw ``rows`` (see :func:`benchmarks.report.summary_rows`) into a PNG at ``path``.
    Rows without a token count are left out (their methods are listed in the legend as such)."""
    path = Path(path)
    fig, ax = plt.subplots(figsize=(7.5, 5.0), dpi=120)
    methods = list(dict.fromkeys(r.method for r in rows))
    cmap = plt.get_cmap("tab10")
    points = []
    for i, method in enumerate(methods):
        mine = [r for r in rows if r.method == method and r.tokens_per_query is not None and r.macro_f1 is not None]
        label = method if mine else f"{method} (no token counts)"
        xs = [r.tokens_per_query for r in mine]
        ys = [r.macro_f1 for r in mine]
        ax.scatter(xs, ys, s=60, color=cmap(i % 10), marker=_MARKERS[i % len(_MARKERS)], label=label, zorder=3)
        if len(mine) > 1:
            ax.plot(xs, ys, color=cmap(i % 10), alpha=0.35, linewidth=1, zorder=2)
        for r in mine:
            ax.annotate(
                f"n={r.n}", (r.tokens_per_query, r.macro_f1), textcoords="offset points", xytext=(5, 4), fontsize=7
            )
        points += list(zip(xs, ys))
    front = pareto_front(points)
    if len(front) > 1:
        fx, fy = zip(*front)
        ax.step(fx, fy, where="post", color="grey", linestyle="--", linewidth=1, label="Pareto front", zorder=1)
    if points:
        low, high = min(p[0] for p in points), max(p[0] for p in points)
        if low > 0 and high / low > 10:
            ax.set_xscale("log")
    ax.set_xlabel("mean prompt tokens per test query (follower)")
    ax.set_ylabel("mean macro-F1 over tasks")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    partial = partial_path(path)
    fig.savefig(partial, format="png")
    plt.close(fig)
    partial.replace(path)
    return path
