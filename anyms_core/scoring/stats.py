"""Summaries with 95% bootstrap confidence intervals, grouped by variant x subject count."""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np

ALL = "all"


def bootstrap_ci(values: Sequence[float], bootstrap: int = 1000, seed: int = 0) -> tuple[float, float, float]:
    """Mean and 95% percentile-bootstrap interval (over the values) of ``values``; NaNs are dropped."""
    array = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=np.float64)
    if len(array) == 0:
        return float("nan"), float("nan"), float("nan")
    mean = float(array.mean())
    if len(array) == 1 or bootstrap <= 0:
        return mean, mean, mean
    rng = np.random.default_rng(seed)
    means = array[rng.integers(0, len(array), (bootstrap, len(array)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return mean, float(low), float(high)


def set_ci(records: Sequence, statistic: Callable[[list], float], bootstrap: int = 200,
           seed: int = 0) -> tuple[float, float, float]:
    """A set-level statistic (e.g. AP50) and its 95% percentile-bootstrap interval, resampling images."""
    records = list(records)
    value = statistic(records)
    if len(records) < 2 or bootstrap <= 0:
        return value, value, value
    rng = np.random.default_rng(seed)
    samples = [statistic([records[i] for i in rng.integers(0, len(records), len(records))]) for _ in range(bootstrap)]
    samples = [s for s in samples if not math.isnan(s)]
    if not samples:
        return value, value, value
    low, high = np.percentile(samples, [2.5, 97.5])
    return value, float(low), float(high)


def summarize(per_image: Sequence[dict], metrics: Sequence[str], records: Sequence[dict] | None = None,
              set_statistics: dict[str, Callable[[list], float]] | None = None, min_subjects: int | None = None,
              bootstrap: int = 1000, set_bootstrap: int = 200, seed: int = 0) -> list[dict]:
    """One row per variant x subject count, plus one per variant over all counts (``n_subjects == "all"``).

    Each row: ``variant``, ``n_subjects``, ``images``, and for each metric ``<m>``, ``<m>_low``,
    ``<m>_high`` (mean and 95% CI). ``records[i]`` goes with ``per_image[i]``; ``set_statistics``
    maps a set metric's name to a function of a list of records. ``min_subjects``: keep only images
    with at least that many subjects (the paper's Table 2 uses three or more).
    """
    records = list(records) if records is not None else [None] * len(per_image)
    pairs = [(row, record) for row, record in zip(per_image, records)
             if min_subjects is None or row["n_subjects"] >= min_subjects]
    variants = list(dict.fromkeys(row["variant"] for row, _ in pairs))
    counts = sorted({int(row["n_subjects"]) for row, _ in pairs})
    out = []
    for variant in variants:
        for count in counts + [ALL]:
            group = [(row, record) for row, record in pairs
                     if row["variant"] == variant and (count == ALL or int(row["n_subjects"]) == count)]
            if not group:
                continue
            summary = {"variant": variant, "n_subjects": count, "images": len(group)}
            for metric in metrics:
                if set_statistics and metric in set_statistics:
                    mean, low, high = set_ci([record for _, record in group], set_statistics[metric], set_bootstrap, seed)
                else:
                    mean, low, high = bootstrap_ci([row.get(metric, float("nan")) for row, _ in group], bootstrap, seed)
                summary.update({metric: mean, f"{metric}_low": low, f"{metric}_high": high})
            out.append(summary)
    return out


def markdown_table(summary: Sequence[dict], metrics: Sequence[str], n_subjects: int | str | None = None,
                   scale: float = 1.0, digits: int = 2) -> str:
    """A Table 1/2-like markdown table: a row per (variant, subject count), metrics as 'mean [low, high]'.

    ``n_subjects``: only rows with this subject count (e.g. ``"all"`` for one row per variant).
    ``scale``: multiply values (the paper prints cosines and IoUs x 100).
    """
    rows = [row for row in summary if n_subjects is None or row["n_subjects"] == n_subjects]
    header = "| variant | subjects | images | " + " | ".join(metrics) + " |"
    lines = [header, "|" + "---|" * (3 + len(metrics))]
    for row in rows:
        cells = []
        for metric in metrics:
            mean, low, high = (row[metric] * scale, row[f"{metric}_low"] * scale, row[f"{metric}_high"] * scale)
            cells.append("n/a" if math.isnan(mean) else f"{mean:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]")
        lines.append(f"| {row['variant']} | {row['n_subjects']} | {row['images']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
