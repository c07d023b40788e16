"""Summaries with 95% bootstrap confidence intervals, grouped by variant x subject count."""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np

ALL = "all"


def bootstrap_ci(values: Sequence[float], bootstrap: int = 1000, seed: int = 0,
                 units: Sequence | None = None) -> tuple[float, float, float]:
    """Mean of ``values`` and its 95% percentile-bootstrap interval; NaNs are dropped.

    ``units``: one label per value (e.g. its case); whole units are resampled instead of single
    values (a cluster bootstrap: images of one case are not independent draws).
    """
    kept = [(v, u) for v, u in zip(values, units if units is not None else range(len(values)))
            if v is not None and not math.isnan(v)]
    if not kept:
        return float("nan"), float("nan"), float("nan")
    array = np.asarray([v for v, _ in kept], dtype=np.float64)
    mean = float(array.mean())
    labels = list(dict.fromkeys(u for _, u in kept))
    if len(labels) == 1 or bootstrap <= 0:
        return mean, mean, mean
    index = {label: i for i, label in enumerate(labels)}
    of_unit = np.asarray([index[u] for _, u in kept])
    sums, counts = np.bincount(of_unit, weights=array), np.bincount(of_unit).astype(np.float64)
    rng = np.random.default_rng(seed)
    chosen = rng.integers(0, len(labels), (bootstrap, len(labels)))
    means = sums[chosen].sum(axis=1) / counts[chosen].sum(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return mean, float(low), float(high)


def set_ci(records: Sequence, statistic: Callable[[list], float], bootstrap: int = 200, seed: int = 0,
           units: Sequence | None = None) -> tuple[float, float, float]:
    """A set-level statistic (e.g. AP50) and its 95% percentile-bootstrap interval, resampling images
    (or whole ``units``, one label per record)."""
    records = list(records)
    value = statistic(records)
    units = list(units) if units is not None else list(range(len(records)))
    labels = list(dict.fromkeys(units))
    if len(labels) < 2 or bootstrap <= 0:
        return value, value, value
    members = {label: [r for r, u in zip(records, units) if u == label] for label in labels}
    rng = np.random.default_rng(seed)
    samples = [statistic([r for i in rng.integers(0, len(labels), len(labels)) for r in members[labels[i]]])
               for _ in range(bootstrap)]
    samples = [s for s in samples if not math.isnan(s)]
    if not samples:
        return value, value, value
    low, high = np.percentile(samples, [2.5, 97.5])
    return value, float(low), float(high)


def summarize(per_image: Sequence[dict], metrics: Sequence[str], records: Sequence[dict] | None = None,
              set_statistics: dict[str, Callable[[list], float]] | None = None, min_subjects: int | None = None,
              bootstrap: int = 1000, set_bootstrap: int = 200, seed: int = 0, ci_unit: str = "image") -> list[dict]:
    """One row per variant x subject count, plus one per variant over all counts (``n_subjects == "all"``).

    Each row: ``variant``, ``n_subjects``, ``images``, and for each metric ``<m>``, ``<m>_low``,
    ``<m>_high`` (mean and 95% CI). ``records[i]`` goes with ``per_image[i]``; ``set_statistics``
    maps a set metric's name to a function of a list of records. ``min_subjects``: keep only images
    with at least that many subjects (the paper's Table 2 uses three or more). ``ci_unit``: what the
    bootstrap resamples: ``"image"`` or ``"case"`` (whole cases: wider, honest intervals when a few
    layouts each have many seeds, as in the paper's 11 cases x 100 images).
    """
    if ci_unit not in ("image", "case"):
        raise ValueError(f"ci_unit must be 'image' or 'case', got {ci_unit!r}")
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
            units = [row["case"] for row, _ in group] if ci_unit == "case" else None
            for metric in metrics:
                if set_statistics and metric in set_statistics:
                    mean, low, high = set_ci([record for _, record in group], set_statistics[metric], set_bootstrap, seed, units)
                else:
                    values = [row.get(metric, float("nan")) for row, _ in group]
                    mean, low, high = bootstrap_ci(values, bootstrap, seed, units)
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
