"""Measure AnyMS in the toy world: placement, identity, overlaps, fidelity over held-out cases.

    python -m anyms_core.toy.evaluate --groups 2 3 4 5 6 7 overlap-2 overlap-3 --cases 100 \
        --variants anyms mask none joint text --jobs 2 --out results/toy_eval

A group is a subject count (`world.make_cases(n)`: non-overlapping boxes, shortest side >= 1/8 of the
image) or `overlap-N` (`world.make_cases(n, overlap=True)`: 2-3 subjects in a chain of boxes that
overlap by 20-50% of the smaller one, explicit priorities, the priority subject listed first in half
of the cases). Cases use seeds never used in training (which only ever sees single-sprite scenes).
Every image is generated through the public API `AnyMS(pipe).generate(...)` and scored with
`metrics.score_case`. Next to every variant the table shows the rendered scene (the ceiling: what a
perfect generator would score) and the `text` variant (no subject images: the floor). Writes OUT.json
(summaries with 95% bootstrap CIs, the exact command and settings) and OUT.md (the tables).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from . import metrics, world

METRICS = ("placed", "iou", "identity", "shape", "ap50", "background", "all_placed", "fidelity", "artefact", "grid")
SIZE_BUCKETS = ((0.125, 0.2), (0.2, 0.3), (0.3, 1.01))  # a box's shortest side, fraction of the image side


def group_cases(group: str, n_cases: int, seed: int) -> list[world.Case]:
    """The cases of a group name: "3" (three subjects) or "overlap-2" (the overlap family, two subjects)."""
    if group.startswith("overlap-"):
        return world.make_cases(int(group.removeprefix("overlap-")), n_cases, seed=seed, overlap=True)
    return world.make_cases(int(group), n_cases, seed=seed)


def generate_case(anyms, case: world.Case, variant: str, steps: int | None = None, guidance: float | None = None,
                  size: int = 64, ip_adapter_scale: float | None = None):
    """One image for one case and variant, through the public AnyMS API (seeded by the case)."""
    from anyms_core import Subject

    priorities = case.priorities or [None] * len(case.sprites)
    subjects = [
        Subject(image=ref, box=box, name=sprite.name, priority=priority)
        for sprite, box, ref, priority in zip(case.sprites, case.boxes, case.references, priorities)
    ]
    run = anyms.generate(
        case.prompt,
        subjects,
        variant=variant,
        seed=case.seed,
        num_inference_steps=steps,
        guidance_scale=guidance,
        ip_adapter_scale=ip_adapter_scale,
        height=size,
        width=size,
        record=None,
        previews=False,
    )
    return run.image


_WORKER: dict = {}


def _init_worker(weights: str | None, threads: int) -> None:
    torch.set_num_threads(threads)
    from anyms_core import AnyMS

    from .pipeline import load_toy_pipeline

    _WORKER["anyms"] = AnyMS(load_toy_pipeline(weights))


def _run_task(task: tuple) -> tuple:
    """Generate and score one (group, variant) over its cases; returns scores, seconds, first images."""
    group, variant, n_cases, seed, steps, guidance, scale, size, keep = task
    scores, seconds, images = [], 0.0, []
    for i, case in enumerate(group_cases(group, n_cases, seed)):
        t0 = time.perf_counter()
        image = generate_case(_WORKER["anyms"], case, variant, steps, guidance, size, scale)
        seconds += time.perf_counter() - t0
        scores.append(metrics.score_case(image, case))
        if i < keep:
            images.append(np.asarray(image))
    return group, variant, scores, seconds, images


def by_box_size(scores: list[dict]) -> dict:
    """Placement rate per bucket of a box's shortest side."""
    out = {}
    for lo, hi in SIZE_BUCKETS:
        hits = [s["placed"] for sc in scores for s in sc["subjects"] if lo <= s["short_side"] < hi]
        if hits:
            low, high = wilson(sum(hits), len(hits))
            out[f"{lo:g}-{min(hi, 1):g}"] = {"placed": round(sum(hits) / len(hits), 4), "ci95": [low, high], "subjects": len(hits)}
    return out


# The share of a box that must lie inside a framed silhouette for the box to count as inside it.
SILHOUETTE_INSIDE = 0.7
SILHOUETTE_BUCKETS = ("other shapes, box inside", "other shapes, box outside",
                      "squares, box inside the cross", "squares, box outside the cross")


@functools.lru_cache(maxsize=None)
def _framed_silhouette(shape: str, size: int) -> torch.Tensor:
    shapes = torch.tensor([[world.SHAPES.index(shape)]])
    return world.sprite_alpha(shapes, torch.tensor([[world.FRAMED_BOX]]), size, size, 2)[0, 0]


def framed_silhouette_share(shape: str, box: list[float], size: int = 64) -> float:
    """The share of `box` covered by `shape` drawn framed (inscribed in world.FRAMED_BOX), as the model saw most
    sprites in training: where a subject lands if the model draws the piece of its full-frame sprite that
    falls in the box (diagnostics.frame_relative_shape)."""
    x0, y0, x1, y1 = (int(round(v * size)) for v in box)
    return float(_framed_silhouette(shape, size)[y0:max(y1, y0 + 1), x0:max(x1, x0 + 1)].mean())


def by_framed_silhouette(scores: list[dict]) -> dict:
    """Placement of non-square subjects whose box lies inside (>= SILHOUETTE_INSIDE of it) or outside their
    own shape's framed silhouette. The control, position alone: squares (whose framed silhouette covers nearly
    every box), split by the framed cross's silhouette, the shape with the most cut away."""
    buckets: dict[str, list[bool]] = {k: [] for k in SILHOUETTE_BUCKETS}
    for sc in scores:
        for s in sc["subjects"]:
            shape = s["sprite"].split()[1]
            where = "inside" if framed_silhouette_share("cross" if shape == "square" else shape, s["target"]) \
                >= SILHOUETTE_INSIDE else "outside"
            buckets[f"squares, box {where} the cross" if shape == "square" else f"other shapes, box {where}"].append(s["placed"])
    return {k: {"placed": round(sum(v) / len(v), 4), "ci95": wilson(sum(v), len(v)), "subjects": len(v)}
            for k, v in buckets.items() if v}


def wilson(k: int, n: int, z: float = 1.96) -> list[float]:
    """95% Wilson interval of a proportion k/n."""
    if n == 0:
        return [float("nan"), float("nan")]
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [round(centre - half, 4), round(centre + half, 4)]


def ownership_by_listing(scores: list[dict]) -> dict:
    """Overlap ownership split by whether the priority subject was listed first or last."""
    out = {}
    for first in (True, False):
        owned = [o["owned"] for sc in scores for o in sc["overlaps"] if o["top_listed_first"] == first]
        if owned:
            out["priority listed first" if first else "priority listed last"] = {
                "owned": round(sum(owned) / len(owned), 4), "ci95": wilson(sum(owned), len(owned)), "pairs": len(owned)}
    return out


def evaluate(
    weights: str | None,
    groups: list[str],
    n_cases: int,
    variants: list[str],
    seed: int = 0,
    steps: int | None = None,
    guidance: float | None = None,
    ip_adapter_scale: float | None = None,
    size: int = 64,
    bootstrap: int = 1000,
    progress: bool = True,
    keep_images: int = 0,
    jobs: int = 1,
    threads: int = 1,
) -> dict:
    """Scores per group and variant (plus the rendered 'ceiling'); see the module docstring. Work is
    split into (group, variant) tasks over `jobs` processes, each with its own pipeline."""
    tasks = [(g, v, n_cases, seed, steps, guidance, ip_adapter_scale, size, keep_images) for g in groups for v in variants]
    results: dict = {"groups": {}, "images": {}, "scores": {}}
    seconds = {v: 0.0 for v in variants}
    raw: dict = {}
    bar = tqdm(total=len(tasks) * n_cases, desc="toy eval", disable=not progress, dynamic_ncols=True)
    if jobs <= 1:
        _init_worker(weights, threads)
        outputs = map(_run_task, tasks)
    else:
        import multiprocessing

        pool = ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker,
                                   initargs=(weights, threads))
        outputs = pool.map(_run_task, tasks)
    for group, variant, scores, secs, images in outputs:
        raw[(group, variant)] = scores
        seconds[variant] += secs
        if images:
            results["images"][f"{group}/{variant}"] = images
        bar.update(n_cases)
        bar.set_postfix(group=group, variant=variant)
    bar.close()
    if jobs > 1:
        pool.shutdown()
    for group in groups:
        cases = group_cases(group, n_cases, seed)
        ceiling = [metrics.score_case(c.render(size), c) for c in cases]
        entry = {"ceiling": metrics.summarize(ceiling, bootstrap)}
        sizes = {"ceiling": by_box_size(ceiling)}
        silhouettes = {"ceiling": by_framed_silhouette(ceiling)}
        listing = {}
        for variant in variants:
            entry[variant] = metrics.summarize(raw[(group, variant)], bootstrap)
            sizes[variant] = by_box_size(raw[(group, variant)])
            silhouettes[variant] = by_framed_silhouette(raw[(group, variant)])
            if group.startswith("overlap-"):
                listing[variant] = ownership_by_listing(raw[(group, variant)])
        entry["placed_by_box_size"] = sizes
        entry["placed_by_framed_silhouette"] = silhouettes
        if listing:
            entry["overlap_by_listing"] = listing
        results["groups"][group] = entry
    count = len(groups) * n_cases
    results["seconds_per_image"] = {v: round(s / max(count, 1), 4) for v, s in seconds.items()}
    results["scores"] = {f"{g}/{v}": s for (g, v), s in raw.items()}
    return results


def map_study(weights: str | None, groups: list[str], n_cases: int = 30, variant: str = "anyms", seed: int = 0,
              size: int = 64) -> dict:
    """Do the recorded maps read right? Per step, over the cases of each group, under `variant`, on the
    finest attention grid (16x16 for 64 px images):

    - `affinity` (normalised over space per subject token): the share of a subject's map inside its
      own box, next to chance (the box's share of the image);
    - `joint_share` (one softmax over all subjects' tokens): its mean inside the subject's own box,
      next to chance (1 / subjects);
    - `contribution`: the share of what the subject injects that lands inside its own box.
    """
    from anyms_core import AnyMS

    from .pipeline import load_toy_pipeline

    anyms = AnyMS(load_toy_pipeline(weights))
    record = {"kinds": ["affinity", "joint_share", "contribution"], "policy": "resolution"}
    out: dict = {}
    for group in groups:
        rows = {"affinity": [], "affinity_chance": [], "joint_share": [], "joint_share_chance": [], "contribution": []}
        for case in group_cases(group, n_cases, seed):
            from anyms_core import Subject

            priorities = case.priorities or [None] * len(case.sprites)
            subjects = [Subject(image=r, box=b, name=s.name, priority=p)
                        for s, b, r, p in zip(case.sprites, case.boxes, case.references, priorities)]
            run = anyms.generate(case.prompt, subjects, variant=variant, seed=case.seed, height=size, width=size,
                                 record=record, previews=False)
            # the finest attention grid (size / 4 here), upsampled to the image
            finest = max(run.attention.resolutions, key=lambda g: g[0] * g[1])
            maps = {k: run.attention.maps(k, per_step=True, resolution=finest, size=(size, size)) for k in record["kinds"]}
            masks = np.zeros((len(case.boxes), size, size), dtype=np.float32)
            for j, (x0, y0, x1, y1) in enumerate(case.boxes):
                masks[j, round(y0 * size):round(y1 * size), round(x0 * size):round(x1 * size)] = 1
            area = masks.reshape(len(masks), -1).mean(-1)  # [S]
            share = (maps["affinity"] * masks).sum((2, 3)) / maps["affinity"].sum((2, 3))  # [T, S]
            rows["affinity"].append(share.mean(1))
            rows["affinity_chance"].append(np.full(share.shape[0], area.mean()))
            inside = (maps["joint_share"] * masks).sum((2, 3)) / masks.sum((1, 2))
            rows["joint_share"].append(inside.mean(1))
            rows["joint_share_chance"].append(np.full(share.shape[0], 1 / len(case.boxes)))
            total = maps["contribution"].sum((2, 3))
            rows["contribution"].append(((maps["contribution"] * masks).sum((2, 3)) / np.maximum(total, 1e-12)).mean(1))
        out[group] = {k: [round(float(v), 4) for v in np.mean(rows[k], 0)] for k in rows}
        out[group]["cases"] = n_cases
    return out


def map_study_markdown(study: dict, variant: str = "anyms") -> str:
    lines = []
    for group, rows in study.items():
        steps = len(rows["affinity"])
        lines += [f"**{group} subjects, `{variant}`, {rows['cases']} cases** (mean over subjects and cases, per step)", "",
                  "| step | " + " | ".join(str(i) for i in range(steps)) + " |", "|---|" + "---|" * steps]
        for key, label in (("affinity", "`affinity` own-box share"), ("affinity_chance", "chance (box area)"),
                           ("joint_share", "`joint_share` mean in own box"), ("joint_share_chance", "chance (1 / subjects)"),
                           ("contribution", "`contribution` own-box share")):
            lines.append(f"| {label} | " + " | ".join(f"{v:.3f}" for v in rows[key]) + " |")
        lines.append("")
    return "\n".join(lines)


def _cell(m: dict, digits: int = 2) -> str:
    if m is None or m["mean"] is None or (isinstance(m["mean"], float) and math.isnan(m["mean"])):
        return "-"
    return f"{m['mean']:.{digits}f} [{m['ci95'][0]:.{digits}f}, {m['ci95'][1]:.{digits}f}]"


def markdown_table(groups: dict, variants: list[str]) -> str:
    """The main table: every metric per group and variant, with the rendered ceiling."""
    extra = any("overlap_owned" in g.get(v, {}) for g in groups.values() for v in variants)
    names = list(METRICS) + (["overlap_owned"] if extra else [])
    lines = ["| group | variant | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for group, entry in groups.items():
        for variant in ["ceiling"] + variants:
            label = "rendered (ceiling)" if variant == "ceiling" else f"`{variant}`"
            s = entry[variant]
            cells = [_cell(s.get(m), 4 if m == "artefact" else 2) for m in names]
            lines.append(f"| {group} | {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _placement_table(groups: dict, key: str, buckets: list[str], labels: list[str], variant: str) -> str:
    """One row per group: placement with its Wilson CI in each bucket of `entry[key][variant]`."""
    lines = ["| group | " + " | ".join(labels) + " |", "|---|" + "---|" * len(buckets)]
    for group, entry in groups.items():
        rows = entry.get(key, {}).get(variant, {})
        cells = [f"{rows[b]['placed']:.2f} [{rows[b]['ci95'][0]:.2f}, {rows[b]['ci95'][1]:.2f}] (n={rows[b]['subjects']})"
                 if b in rows else "-" for b in buckets]
        lines.append(f"| {group} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def size_table(groups: dict, variant: str = "anyms") -> str:
    """Placement by the box's shortest side (fraction of the image side) for one variant."""
    buckets = [f"{lo:g}-{min(hi, 1):g}" for lo, hi in SIZE_BUCKETS]
    return _placement_table(groups, "placed_by_box_size", buckets, [f"short side {b}" for b in buckets], variant)


def silhouette_table(groups: dict, variant: str = "anyms") -> str:
    """Placement by whether a box lies inside its subject's framed silhouette, for one variant."""
    buckets = list(SILHOUETTE_BUCKETS)
    return _placement_table(groups, "placed_by_framed_silhouette", buckets, buckets, variant)


def ordering_table(groups: dict, pairs=(("anyms", "mask"), ("mask", "none"), ("anyms", "none")),
                   metrics_=("iou", "identity", "placed", "overlap_owned")) -> tuple[str, list[dict]]:
    """The paper's Table 2 ordering (anyms > mask > none) per group and metric: does it hold, and are
    the 95% CIs apart?"""
    rows = []
    lines = ["| group | metric | comparison | means | holds | CIs apart |", "|---|---|---|---|---|---|"]
    for group, entry in groups.items():
        for metric in metrics_:
            for a, b in pairs:
                if a not in entry or b not in entry or metric not in entry[a] or metric not in entry[b]:
                    continue
                ma, mb = entry[a][metric], entry[b][metric]
                if any(isinstance(x["mean"], float) and math.isnan(x["mean"]) for x in (ma, mb)):
                    continue
                holds = ma["mean"] > mb["mean"]
                apart = ma["ci95"][0] > mb["ci95"][1]
                rows.append({"group": group, "metric": metric, "a": a, "b": b, "holds": holds, "ci_apart": apart,
                             "mean_a": ma["mean"], "mean_b": mb["mean"]})
                lines.append(f"| {group} | {metric} | `{a}` > `{b}` | {ma['mean']:.2f} vs {mb['mean']:.2f} | "
                             f"{'yes' if holds else '**no**'} | {'yes' if apart else 'no'} |")
    return "\n".join(lines), rows


def fidelity_table(groups: dict, variants: list[str]) -> str:
    """Image fidelity and the 2x2 artefact energy of each variant relative to the rendered scenes, and the
    4-px block grid ratio of `anyms` next to the rendered scenes' (~1: no grid)."""
    lines = ["| group | " + " | ".join(f"`{v}` fidelity / rendered" for v in variants)
             + " | `anyms` artefact / rendered | `anyms` grid (rendered) |",
             "|---|" + "---|" * (len(variants) + 2)]
    for group, entry in groups.items():
        ref = entry["ceiling"]["fidelity"]["mean"]
        cells = [f"{entry[v]['fidelity']['mean'] / ref:.2f}" for v in variants]
        art = entry.get("anyms", {}).get("artefact")
        art_ratio = f"{art['mean'] / entry['ceiling']['artefact']['mean']:.2f}" if art else "-"
        grid = entry.get("anyms", {}).get("grid")
        grid_cell = f"{grid['mean']:.2f} ({entry['ceiling']['grid']['mean']:.2f})" if grid and "grid" in entry["ceiling"] else "-"
        lines.append(f"| {group} | " + " | ".join(cells) + f" | {art_ratio} | {grid_cell} |")
    return "\n".join(lines)


def draw_boxes(image, boxes: list[list[float]], colors: list[tuple[float, float, float]], scale: int = 4):
    """Upscale (nearest) and outline each box in its subject's colour."""
    from PIL import Image, ImageDraw

    big = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    draw = ImageDraw.Draw(big)
    for (x0, y0, x1, y1), rgb in zip(boxes, colors):
        draw.rectangle(
            [x0 * big.width, y0 * big.height, x1 * big.width - 1, y1 * big.height - 1],
            outline=tuple(int(255 * c) for c in rgb), width=1,
        )
    return big


def card_figures(pipe, out_dir: str | Path, train_dir: str | Path | None = None, guidance: float | None = None,
                 steps: int | None = None) -> list[Path]:
    """The model card's figures: loss curve, text-only and one-subject samples, and AnyMS variants."""
    from PIL import Image, ImageDraw

    from anyms_core import AnyMS

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    if train_dir is not None and (Path(train_dir) / "loss_log.csv").exists():
        import csv

        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = list(csv.DictReader(open(Path(train_dir) / "loss_log.csv")))
        fig, ax = plt.subplots(figsize=(6, 3))
        for stage in ("1", "2"):
            r = [x for x in rows if x["stage"] == stage]
            if r:
                ax.plot([int(x["step"]) for x in r], [float(x["loss"]) for x in r],
                        label=f"stage {stage}: " + ("base (UNet + text encoder)" if stage == "1" else "IP-Adapter (base frozen)"))
        ax.set_xlabel("optimizer step (within the stage)")
        ax.set_ylabel("weighted clean-image MSE")
        ax.set_yscale("log")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out_dir / "toy-loss.png", dpi=100)
        plt.close(fig)
        written.append(out_dir / "toy-loss.png")

    anyms = AnyMS(pipe)
    variants = ["anyms", "mask", "none", "joint", "text"]
    scale = 2
    side = 64 * scale
    header_h, cell = 14, side + 4
    cases = [world.make_cases(n, 1, seed=7)[0] for n in (2, 3, 5, 7)]
    cases += [world.make_cases(n, 1, seed=7, overlap=True)[0] for n in (2, 3)]
    columns = ["refs", "target"] + variants
    sheet = Image.new("RGB", (cell * len(columns), header_h + cell * len(cases)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for j, label in enumerate(columns):
        draw.text((j * cell + 4, 2), label, fill=(0, 0, 0))
    for i, case in enumerate(cases):
        colors = [s.rgb for s in case.sprites]
        y = header_h + i * cell
        refs = Image.new("RGB", (side, side), (255, 255, 255))
        k = math.ceil(math.sqrt(len(case.references)))
        for r, ref in enumerate(case.references):
            refs.paste(ref.resize((side // k, side // k), Image.NEAREST), ((r % k) * (side // k), (r // k) * (side // k)))
        sheet.paste(refs, (0, y))
        sheet.paste(draw_boxes(case.render(), case.boxes, colors, scale), (cell, y))
        for j, variant in enumerate(variants):
            image = generate_case(anyms, case, variant, steps, guidance)
            sheet.paste(draw_boxes(image, case.boxes, colors, scale), ((j + 2) * cell, y))
    sheet.save(out_dir / "toy-anyms.png")
    written.append(out_dir / "toy-anyms.png")
    return written


def choose_trial(trials: list[dict], min_background: float = 0.9, min_none_fidelity: float = 0.8) -> dict:
    """`tune_sampling`'s rule: the best mean of placed and identity (to 3 decimals) among the trials that keep
    backgrounds right and `none`'s 2-subject fidelity; a constraint no trial meets is dropped. Ties go to the
    smaller scale, then fewer steps."""
    ok = [t for t in trials if t["background"] >= min_background] or trials
    ok = [t for t in ok if t.get("none_fidelity_2", 1.0) >= min_none_fidelity] or ok
    return max(ok, key=lambda t: (round((t["placed"] + t["identity"]) / 2, 3), -t["ip_adapter_scale"], -t["num_inference_steps"]))


def tune_sampling(weights_dir: str | Path, scales: list[float], guidances: list[float], steps: list[int],
                  n_cases: int = 24, seed: int = 1, min_background: float = 0.9, min_none_fidelity: float = 0.8,
                  jobs: int = 1) -> dict:
    """Choose the weights' default IP-Adapter scale, guidance and steps on VALIDATION cases (seed 1,
    never the reported seed-0 set): the best mean of placement and identity (anyms, 2 and 5 subjects)
    among the trials with background accuracy >= `min_background` and, with 2 subjects, `none`'s image
    fidelity >= `min_none_fidelity` of the rendered scenes' (issue 8: the ablation must show a picture, not
    noise); a constraint no trial meets is dropped. Ties go to the smaller scale and fewer steps.
    Writes WEIGHTS/sampling.json."""
    trials = []
    for scale in scales:
        for g in guidances:
            for k in steps:
                r = evaluate(str(weights_dir), ["2", "5"], n_cases, ["anyms", "none"], seed=seed, steps=k, guidance=g,
                             ip_adapter_scale=scale, bootstrap=0, progress=False, jobs=jobs)
                groups = r["groups"]
                placed = sum(groups[n]["anyms"]["placed"]["mean"] for n in ("2", "5")) / 2
                identity = sum(groups[n]["anyms"]["identity"]["mean"] for n in ("2", "5")) / 2
                background = min(groups[n]["anyms"]["background"]["mean"] for n in ("2", "5"))
                none_fidelity = groups["2"]["none"]["fidelity"]["mean"] / groups["2"]["ceiling"]["fidelity"]["mean"]
                trials.append({"ip_adapter_scale": scale, "guidance_scale": g, "num_inference_steps": k,
                               "placed": round(placed, 4), "identity": round(identity, 4), "background": background,
                               "none_fidelity_2": round(none_fidelity, 4)})
                print(trials[-1], file=sys.stderr)
    best = choose_trial(trials, min_background, min_none_fidelity)
    path = Path(weights_dir) / "sampling.json"
    previous = json.loads(path.read_text()) if path.exists() else {}
    sampling = {"num_inference_steps": best["num_inference_steps"], "guidance_scale": best["guidance_scale"],
                "ip_adapter_scale": best["ip_adapter_scale"],
                **{k: previous[k] for k in ("fold_shifts", "fold_shifts_chosen_on", "weights_chosen_on") if k in previous},
                "chosen_on": f"validation cases (make_cases seed={seed}), {n_cases} per subject count (2 and 5), "
                             f"variant anyms, best mean of placed and identity with background >= {min_background} and "
                             f"none's fidelity with 2 subjects >= {min_none_fidelity} of rendered; never the held-out seed=0 set",
                "trials": trials}
    path.write_text(json.dumps(sampling, indent=1) + "\n")
    return sampling


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="anyms evaluate-toy", description=__doc__.split("\n\n")[0])
    p.add_argument("--groups", nargs="+", default=["2", "3", "4", "5", "6", "7", "overlap-2", "overlap-3"],
                   help="subject counts (2-7) and/or overlap-2, overlap-3")
    p.add_argument("--subjects", type=int, nargs="+", default=None, help="shorthand for --groups with subject counts")
    p.add_argument("--cases", type=int, default=100)
    p.add_argument("--variants", nargs="+", default=["anyms", "mask", "none", "joint", "text"])
    p.add_argument("--out", default="results/toy_eval", help="writes OUT.json and OUT.md")
    p.add_argument("--weights", default=None, help="toy weights folder (default: the shipped ones)")
    p.add_argument("--seed", type=int, default=0, help="case set (0 = the reported held-out set, 1 = validation)")
    p.add_argument("--steps", type=int, default=None, help="default: the pipeline's")
    p.add_argument("--guidance", type=float, default=None, help="default: the pipeline's")
    p.add_argument("--ip-adapter-scale", type=float, default=None, help="default: the pipeline's")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--bootstrap", type=int, default=1000)
    p.add_argument("--jobs", type=int, default=1, help="worker processes (one pipeline each)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--grid", default=None, help="also save a PNG grid of the first cases' images here")
    p.add_argument("--card-figures", default=None, help="only write the model card's figures to this folder")
    p.add_argument("--train-dir", default=None, help="training output folder (its loss_log.csv) for --card-figures")
    p.add_argument("--tune", action="store_true",
                   help="only choose the default IP-Adapter scale and guidance on validation cases; writes WEIGHTS/sampling.json")
    p.add_argument("--tune-scales", type=float, nargs="+", default=[0.75, 1.0, 1.25, 1.5])
    p.add_argument("--tune-guidance", type=float, nargs="+", default=[2.0, 3.0, 4.0])
    p.add_argument("--tune-steps", type=int, nargs="+", default=[8, 10, 12])
    p.add_argument("--tune-cases", type=int, default=24, help="validation cases per subject count (2 and 5) for --tune")
    p.add_argument("--maps", action="store_true",
                   help="only run the map study (own-box share of each recorded map per step) on --groups; writes OUT.md/.json")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from .pipeline import DEFAULT_WEIGHTS_DIR, load_toy_pipeline

    if args.tune:
        return tune_sampling(args.weights or DEFAULT_WEIGHTS_DIR, args.tune_scales, args.tune_guidance, args.tune_steps,
                             n_cases=args.tune_cases, jobs=args.jobs)
    if args.card_figures:
        pipe = load_toy_pipeline(args.weights)
        paths = card_figures(pipe, args.card_figures, args.train_dir, guidance=args.guidance, steps=args.steps)
        print("\n".join(str(p) for p in paths))
        return {"figures": [str(p) for p in paths]}
    groups = [str(n) for n in args.subjects] if args.subjects else args.groups
    if args.maps:
        study = map_study(args.weights, groups, n_cases=args.cases, seed=args.seed, size=args.size)
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        command = "python -m anyms_core.toy.evaluate " + " ".join(sys.argv[1:] if argv is None else argv)
        out.with_suffix(".json").write_text(json.dumps({"command": command, "study": study}, indent=1))
        out.with_suffix(".md").write_text(f"# Do the maps read right?\n\nCommand: `{command}`\n\n" + map_study_markdown(study) + "\n")
        print(map_study_markdown(study))
        return study
    start = time.perf_counter()
    results = evaluate(
        args.weights, groups, args.cases, args.variants, seed=args.seed, steps=args.steps, guidance=args.guidance,
        ip_adapter_scale=args.ip_adapter_scale, size=args.size, bootstrap=args.bootstrap,
        keep_images=3 if args.grid else 0, jobs=args.jobs, threads=args.threads,
    )
    images = results.pop("images")
    scores = results.pop("scores")
    pipe_defaults = json.loads((Path(args.weights or DEFAULT_WEIGHTS_DIR) / "sampling.json").read_text())
    order_md, order_rows = ordering_table(results["groups"])
    report = {
        "command": "python -m anyms_core.toy.evaluate " + " ".join(sys.argv[1:] if argv is None else argv),
        "settings": {
            "groups": groups, "cases": args.cases, "variants": args.variants, "seed": args.seed,
            "steps": args.steps or pipe_defaults["num_inference_steps"],
            "guidance": pipe_defaults["guidance_scale"] if args.guidance is None else args.guidance,
            "ip_adapter_scale": pipe_defaults.get("ip_adapter_scale", 1.0) if args.ip_adapter_scale is None else args.ip_adapter_scale,
            "size": args.size, "weights": str(args.weights or "shipped"), "threads": args.threads, "jobs": args.jobs,
        },
        "machine": {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__},
        "wall_seconds": round(time.perf_counter() - start, 1),
        "ordering": order_rows,
        **results,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    variants = args.variants
    md = [
        "# Toy-world evaluation",
        "",
        f"Command: `{report['command']}`  ",
        f"Settings: {json.dumps(report['settings'])}  ",
        f"Mean with 95% bootstrap CI over cases; {args.cases} held-out cases per group. `identity` and `shape` are "
        "among placed subjects. `text` (no subject images) is the floor, the rendered scene the ceiling.",
        "",
        markdown_table(report["groups"], variants),
        "",
        "## Placement by box size (`anyms`; Wilson 95% CI)",
        "",
        size_table(report["groups"], "anyms"),
        "",
        "## Placement by the subject's framed silhouette (`anyms`; Wilson 95% CI)",
        "",
        "A box is *inside* when at least 70% of it lies in the silhouette of its subject's own shape drawn framed "
        "(inscribed in the whole image, as most training sprites were): where the piece of the full-frame sprite "
        "that falls in the box is the sprite's colour (`diagnostics.frame_relative_shape`). Squares, split by the "
        "framed cross's silhouette, are the control: what the box's position alone does.",
        "",
        silhouette_table(report["groups"], "anyms"),
        "",
        "## The paper's Table 2 ordering (`anyms` > `mask` > `none`)",
        "",
        order_md,
        "",
        "## Image fidelity and artefacts relative to the rendered scenes",
        "",
        fidelity_table(report["groups"], variants),
        "",
        f"Seconds per image (generation only, {args.threads} thread per process): {json.dumps(report['seconds_per_image'])}",
    ]
    listing = {g: e["overlap_by_listing"] for g, e in report["groups"].items() if "overlap_by_listing" in e}
    if listing:
        md += ["", "## Overlap ownership by where the priority subject is listed", "", "```json", json.dumps(listing, indent=1), "```"]
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    if args.grid and images:
        from PIL import Image

        from .train import image_grid

        rows = [Image.fromarray(im) for key in sorted(images) for im in images[key]]
        image_grid(rows, columns=6, scale=2).save(args.grid)  # per row: two (group, variant) pairs, 3 cases each
    print(markdown_table(report["groups"], variants))
    return report


if __name__ == "__main__":
    main()
