"""Scoring a sweep: the paper's metrics (or the toy world's), per image, summarized with 95% CIs.

    anyms score DIR --metrics toy                           # offline, toy-world sweeps
    anyms score DIR --metrics miou ap50 clip_i dino clip_t  # the paper's Table 1 (``paper`` = all five)

    from anyms_core.scoring import score_sweep, plot_metric_vs_subjects
    scores = score_sweep("sweeps/toy", metrics=["toy"])
    summary = scores.summary()                   # rows: variant x subject count (+ "all"), mean/low/high
    fig = plot_metric_vs_subjects(summary, "toy_iou")

Writes under DIR/scores/: ``per_image.csv``, ``per_subject.csv``, ``records.jsonl`` (what set metrics
such as AP50 are computed from), ``summary.csv``, ``summary.md`` and ``fig4_<metric>.png``.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from .detection import Detection, GroundingDinoDetector, average_precision, box_iou
from .identity import ClipEmbedder, DinoEmbedder, SamSegmenter, cut_out
from .plot import plot_metric_pair, plot_metric_vs_subjects
from .stats import bootstrap_ci, markdown_table, summarize

PAPER_METRICS = ("miou", "ap50", "clip_i", "dino", "clip_t")  # "paper": these five; DreamSim is opt-in
METRIC_CHOICES = ("toy", "paper") + PAPER_METRICS + ("dreamsim",)
ROW_KEYS = ("run_id", "case", "variant", "seed", "n_subjects")
# which backend's records a set metric is computed from
SET_METRIC_BACKENDS = {"toy_ap50": "toy", "ap50": "paper"}


def _set_statistic(metric: str):
    backend = SET_METRIC_BACKENDS[metric]
    if backend == "toy":
        from . import toy

        return lambda records: toy.ToyBackend().set_values([r[backend] for r in records])[metric]
    from . import paper

    return lambda records: paper.set_values([r[backend] for r in records])[metric]


@dataclass
class Scores:
    """Scores of a sweep: per image and per subject, plus each image's records for set metrics (AP50)."""

    per_image: list[dict]
    per_subject: list[dict]
    records: list[dict]
    metrics: list[str] = field(default_factory=list)

    def summary(self, min_subjects: int | None = None, bootstrap: int = 1000, set_bootstrap: int = 200,
                seed: int = 0, ci_unit: str = "image") -> list[dict]:
        """Mean and 95% bootstrap CI of every metric per variant x subject count (and over all counts).

        ``ci_unit="case"`` resamples whole cases instead of images (see :func:`~.stats.summarize`).
        """
        statistics = {m: _set_statistic(m) for m in self.metrics if m in SET_METRIC_BACKENDS}
        return summarize(self.per_image, self.metrics, self.records, statistics, min_subjects=min_subjects,
                         bootstrap=bootstrap, set_bootstrap=set_bootstrap, seed=seed, ci_unit=ci_unit)

    def save(self, directory: str | Path, figures: bool = True, bootstrap: int = 1000, ci_unit: str = "image") -> list[Path]:
        """Writes the tables, the summary and one Fig. 4-style plot per metric; returns the paths."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        written = [_write_csv(directory / "per_image.csv", self.per_image),
                   _write_csv(directory / "per_subject.csv", self.per_subject)]
        (directory / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in self.records))
        (directory / "metrics.json").write_text(json.dumps(self.metrics) + "\n")
        written.append(directory / "records.jsonl")
        summary = self.summary(bootstrap=bootstrap, ci_unit=ci_unit)
        written.append(_write_csv(directory / "summary.csv", summary))
        (directory / "summary.md").write_text(
            f"Mean [95% bootstrap CI, resampling {ci_unit}s] per variant and subject count.\n\n"
            + markdown_table(summary, self.metrics) + "\n")
        written.append(directory / "summary.md")
        if figures and summary:
            import matplotlib.pyplot as plt

            for metric in self.metrics:
                fig = plot_metric_vs_subjects(summary, metric)
                fig.tight_layout()
                fig.savefig(directory / f"fig4_{metric}.png", dpi=120)
                plt.close(fig)
                written.append(directory / f"fig4_{metric}.png")
        return written

    @classmethod
    def load(cls, directory: str | Path) -> "Scores":
        directory = Path(directory)
        records = [json.loads(line) for line in (directory / "records.jsonl").read_text().splitlines() if line.strip()]
        return cls(_read_csv(directory / "per_image.csv"), _read_csv(directory / "per_subject.csv"), records,
                   json.loads((directory / "metrics.json").read_text()))


def _write_csv(path: Path, rows: list[dict]) -> Path:
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in row.items()})
    return path


TEXT_COLUMNS = {"run_id", "case", "variant", "name", "class"}


def _read_csv(path: Path) -> list[dict]:
    def parse(key: str, value: str):
        if key in TEXT_COLUMNS:
            return value
        if value == "":
            return None
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value  # a plain string (run ids, variants, names)

    with open(path, newline="") as handle:
        return [{k: parse(k, v) for k, v in row.items()} for row in csv.DictReader(handle)]


def expand_metrics(metrics: Sequence[str]) -> tuple[bool, tuple[str, ...]]:
    """-> (toy backend wanted, the paper's metrics wanted); ``paper`` means all five but DreamSim."""
    unknown = sorted(set(metrics) - set(METRIC_CHOICES))
    if unknown or not metrics:
        raise ValueError(f"unknown metric(s) {unknown}; choose from {list(METRIC_CHOICES)}")
    paper = tuple(m for m in PAPER_METRICS + ("dreamsim",) if m in metrics or ("paper" in metrics and m in PAPER_METRICS))
    return "toy" in metrics, paper


def score_sweep(directory: str | Path, metrics: Sequence[str] = ("toy",), backends: Sequence | None = None,
                models: dict | None = None, device: str = "cpu", progress: bool = True) -> Scores:
    """Scores every run in the sweep folder ``directory`` (its ``index.jsonl``).

    ``backends``: scoring backends to use instead of building them from ``metrics`` (e.g. a
    :class:`~anyms_core.scoring.paper.PaperBackend` with stand-in or tiny models).
    ``models``: hub ids or local folders per kind (``detector``, ``segmenter``, ``clip``, ``dino``).
    """
    from tqdm.auto import tqdm

    from ..run import Run
    from ..sweep import read_index

    if backends is None:
        backends = []
        want_toy, paper_metrics = expand_metrics(metrics)
        if want_toy:
            from .toy import ToyBackend

            backends.append(ToyBackend())
        if paper_metrics:
            from .paper import PaperBackend

            backends.append(PaperBackend.from_pretrained(paper_metrics, models, device))
    directory = Path(directory)
    rows = read_index(directory)
    per_image, per_subject, records = [], [], []
    for row in tqdm(rows, desc="score", unit="image", disable=not progress, dynamic_ncols=True):
        run = Run.load(directory / row["path"])
        base = {key: row[key] for key in ROW_KEYS}
        image_row, subject_rows, record = dict(base), [
            {**base, "subject": j, "name": row["names"][j], "class": row["classes"][j], "box": row["boxes"][j]}
            for j in range(row["n_subjects"])], {}
        for backend in backends:
            values, subjects, backend_record = backend.score_image(row, run.image, run.subject_images)
            image_row.update(values)
            for subject_row, subject_values in zip(subject_rows, subjects):
                subject_row.update(subject_values)
            record[backend.name] = backend_record
        per_image.append(image_row)
        per_subject.extend(subject_rows)
        records.append(record)
    names = [m for backend in backends for m in (*backend.image_metrics, *backend.set_metrics)]
    return Scores(per_image, per_subject, records, names)


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="anyms score", description="Score a sweep folder (see anyms sweep).")
    parser.add_argument("directory", help="a sweep output folder (with index.jsonl)")
    parser.add_argument("--metrics", nargs="+", default=["toy"], choices=METRIC_CHOICES,
                        help="toy (the toy world's pixel metrics) and/or the paper's: miou ap50 clip_i dino clip_t "
                             "(paper = these five) and dreamsim (needs pip install dreamsim)")
    parser.add_argument("--out", default=None, help="where to write the tables and plots (default: DIR/scores)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the 95%% CIs")
    parser.add_argument("--ci-unit", choices=("image", "case"), default="image",
                        help="what the bootstrap resamples: images, or whole cases (all seeds of a layout together)")
    from .paper import DEFAULT_MODELS, DREAMSIM_CACHE

    for kind, default in DEFAULT_MODELS.items():
        parser.add_argument(f"--{kind}", default=default, help=f"hub id (in the local cache) or folder (default: {default})")
    parser.add_argument("--dreamsim-cache", default=DREAMSIM_CACHE, help="folder with the dreamsim package's weights")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    return command(parse_args(argv))


def command(args: argparse.Namespace) -> int:
    """Runs the parsed ``score`` command; returns the exit status (2 with a one-line error)."""
    from .paper import DEFAULT_MODELS, ModelNotAvailable

    models = {kind: getattr(args, kind) for kind in DEFAULT_MODELS} | {"dreamsim": args.dreamsim_cache}
    try:
        scores = score_sweep(args.directory, args.metrics, models=models, device=args.device, progress=not args.no_progress)
    except (ModelNotAvailable, FileNotFoundError, ValueError) as error:
        print(f"anyms score: error: {error}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else Path(args.directory) / "scores"
    written = scores.save(out, bootstrap=args.bootstrap, ci_unit=args.ci_unit)
    print((out / "summary.md").read_text())
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


__all__ = [
    "Detection", "GroundingDinoDetector", "SamSegmenter", "ClipEmbedder", "DinoEmbedder", "Scores", "average_precision",
    "box_iou", "bootstrap_ci", "cut_out", "markdown_table", "plot_metric_pair", "plot_metric_vs_subjects", "score_sweep", "summarize", "main",
]
