"""A Fig. 4-style plot: one metric against the number of subjects, one line per variant."""

from __future__ import annotations

import math
from typing import Sequence

from .stats import ALL


def plot_metric_vs_subjects(summary: Sequence[dict], metric: str, ax=None, variants: Sequence[str] | None = None,
                            scale: float = 1.0, aggregate: bool = True):
    """Plots ``metric`` (mean with its 95% CI) against the subject count, one line per variant.

    With ``aggregate``, each variant's mean over all subject counts is a rhombus to the right (as in
    the paper's Fig. 4). Draws on ``ax`` (a new figure if None) and returns the figure; never shows.
    """
    import matplotlib.pyplot as plt

    if ax is None:
        fig, ax = plt.subplots(figsize=(4.5, 3.2))
    fig = ax.figure
    rows = [row for row in summary if metric in row]
    if not rows:
        raise ValueError(f"the summary has no metric {metric!r}; it has "
                         f"{sorted(k for k in summary[0] if not k.endswith(('_low', '_high')))}" if summary else "the summary is empty")
    variants = list(variants) if variants is not None else list(dict.fromkeys(row["variant"] for row in rows))
    counts = sorted({row["n_subjects"] for row in rows if row["n_subjects"] != ALL})
    x_all = (max(counts) + 1) if counts else 0
    for index, variant in enumerate(variants):
        own = sorted((row for row in rows if row["variant"] == variant and row["n_subjects"] != ALL),
                     key=lambda row: row["n_subjects"])
        color = f"C{index}"
        offset = (index - (len(variants) - 1) / 2) * 0.06  # keep overlapping error bars apart
        xs = [row["n_subjects"] + offset for row in own]
        ys = [row[metric] * scale for row in own]
        errors = [[(row[metric] - row[f"{metric}_low"]) * scale for row in own],
                  [(row[f"{metric}_high"] - row[metric]) * scale for row in own]]
        ax.errorbar(xs, ys, yerr=errors, marker="o", capsize=3, color=color, label=variant)
        total = next((row for row in rows if row["variant"] == variant and row["n_subjects"] == ALL), None)
        if aggregate and total is not None and not math.isnan(total[metric]):
            ax.errorbar([x_all + offset], [total[metric] * scale],
                        yerr=[[(total[metric] - total[f"{metric}_low"]) * scale], [(total[f"{metric}_high"] - total[metric]) * scale]],
                        marker="D", capsize=3, color=color, linestyle="none")
    ticks = counts + ([x_all] if aggregate else [])
    ax.set_xticks(ticks)
    ax.set_xticklabels([str(c) for c in counts] + (["all"] if aggregate else []))
    ax.set_xlabel("number of subjects")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return fig


SUBJECT_MARKERS = ("o", "s", "^", "v", "p", "h", "*", "X")


def plot_metric_pair(summary: Sequence[dict], x: str, y: str, ax=None, variants: Sequence[str] | None = None,
                     scale: float = 1.0):
    """The paper's Fig. 4 layout: ``y`` against ``x``, colour = variant, marker = subject count, rhombus = all.

    Each point is a (variant, subject count) mean with its 95% CI as error bars on both axes. Draws on
    ``ax`` (a new figure if None) and returns the figure; never shows.
    """
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    if ax is None:
        fig, ax = plt.subplots(figsize=(4.5, 3.6))
    fig = ax.figure
    rows = [row for row in summary if x in row and y in row]
    if not rows:
        raise ValueError(f"the summary has no rows with both {x!r} and {y!r}")
    variants = list(variants) if variants is not None else list(dict.fromkeys(row["variant"] for row in rows))
    counts = sorted({row["n_subjects"] for row in rows if row["n_subjects"] != ALL})
    markers = {count: SUBJECT_MARKERS[i % len(SUBJECT_MARKERS)] for i, count in enumerate(counts)} | {ALL: "D"}
    for index, variant in enumerate(variants):
        for row in (r for r in rows if r["variant"] == variant):
            ax.errorbar([row[x] * scale], [row[y] * scale],
                        xerr=[[(row[x] - row[f"{x}_low"]) * scale], [(row[f"{x}_high"] - row[x]) * scale]],
                        yerr=[[(row[y] - row[f"{y}_low"]) * scale], [(row[f"{y}_high"] - row[y]) * scale]],
                        marker=markers[row["n_subjects"]], markersize=9 if row["n_subjects"] == ALL else 6,
                        color=f"C{index}", capsize=2, elinewidth=0.7, linestyle="none")
    handles = [Line2D([], [], color=f"C{i}", marker="o", linestyle="none", label=v) for i, v in enumerate(variants)]
    handles += [Line2D([], [], color="grey", marker=markers[c], linestyle="none",
                       label=f"{c} subjects" if c != ALL else "all") for c in counts + [ALL]]
    ax.legend(handles=handles, fontsize="small")
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.grid(alpha=0.3)
    return fig
