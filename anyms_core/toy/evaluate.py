"""Measure AnyMS in the toy world: placement, AP50, identity and background over held-out cases.

    python -m anyms_core.toy.evaluate --subjects 2 3 4 5 --cases 100 \
        --variants anyms mask none joint text --out results/toy_eval

For each subject count, `--cases` seeded cases (`world.make_cases`: layouts and seeds never used in
training, which only ever sees single-sprite scenes) are generated through the public API
`AnyMS(pipe).generate(...)` for every variant, and scored with `metrics.score_case`. Next to every
variant the table shows the rendered scene (the ceiling: what a perfect generator would score) and the
`text` variant (no subject images: the floor). Writes OUT.json (summaries with 95% bootstrap CIs, the
exact command and settings) and OUT.md (the table).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import metrics, world

METRICS = ("iou", "placed", "ap50", "identity", "background", "all_placed")


def generate_case(anyms, case: world.Case, variant: str, steps: int | None, guidance: float | None, size: int):
    """One image for one case and variant, through the public AnyMS API (seeded by the case)."""
    from anyms_core import Subject

    subjects = [
        Subject(image=ref, box=box, name=sprite.name)
        for sprite, box, ref in zip(case.sprites, case.boxes, case.references)
    ]
    run = anyms.generate(
        case.prompt,
        subjects,
        variant=variant,
        seed=case.seed,
        num_inference_steps=steps,
        guidance_scale=guidance,
        height=size,
        width=size,
        record=None,
        previews=False,
    )
    return run.image


def evaluate(
    pipe,
    subject_counts: list[int],
    n_cases: int,
    variants: list[str],
    seed: int = 0,
    steps: int | None = None,
    guidance: float | None = None,
    size: int = 32,
    bootstrap: int = 1000,
    progress: bool = True,
    keep_images: int = 0,
) -> dict:
    """Scores per subject count and variant (plus the rendered 'ceiling'); see module docstring."""
    from anyms_core import AnyMS

    anyms = AnyMS(pipe)
    results: dict = {"groups": {}, "images": {}}
    total = len(subject_counts) * n_cases * len(variants)
    bar = tqdm(total=total, desc="toy eval", disable=not progress, dynamic_ncols=True)
    seconds = {v: 0.0 for v in variants}
    for n in subject_counts:
        cases = world.make_cases(n, n_cases, seed=seed)
        group = {"ceiling": metrics.summarize([metrics.score_case(c.render(size), c) for c in cases], bootstrap)}
        for variant in variants:
            scores = []
            for i, case in enumerate(cases):
                t0 = time.perf_counter()
                image = generate_case(anyms, case, variant, steps, guidance, size)
                seconds[variant] += time.perf_counter() - t0
                scores.append(metrics.score_case(image, case))
                if i < keep_images:
                    results["images"].setdefault(f"{n}/{variant}", []).append(image)
                bar.update(1)
            group[variant] = metrics.summarize(scores, bootstrap)
            bar.set_postfix(n=n, variant=variant, placed=group[variant]["placed"]["mean"])
        results["groups"][str(n)] = group
    bar.close()
    count = len(subject_counts) * n_cases
    results["seconds_per_image"] = {v: round(s / max(count, 1), 4) for v, s in seconds.items()}
    return results


def markdown_table(groups: dict, variants: list[str]) -> str:
    def cell(m: dict) -> str:
        return f"{m['mean']:.2f} [{m['ci95'][0]:.2f}, {m['ci95'][1]:.2f}]"

    lines = [
        "| subjects | variant | box IoU | placed (IoU>=0.5) | AP50 | identity | background | all placed |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for n, group in groups.items():
        for variant in ["ceiling"] + variants:
            label = "rendered scene (ceiling)" if variant == "ceiling" else f"`{variant}`"
            s = group[variant]
            lines.append(f"| {n} | {label} | " + " | ".join(cell(s[m]) for m in METRICS) + " |")
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
        ax.set_ylabel("v-prediction MSE")
        ax.set_yscale("log")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out_dir / "toy-loss.png", dpi=100)
        plt.close(fig)
        written.append(out_dir / "toy-loss.png")

    anyms = AnyMS(pipe)
    variants = ["anyms", "mask", "none", "joint", "text"]
    header_h, cell = 14, 32 * 4 + 4
    for name, counts in (("toy-anyms.png", (2, 3, 4, 5)),):
        cases = [world.make_cases(n, 1, seed=7)[0] for n in counts]
        columns = ["refs", "target"] + variants
        sheet = Image.new("RGB", (cell * len(columns), header_h + cell * len(cases)), (255, 255, 255))
        draw = ImageDraw.Draw(sheet)
        for j, label in enumerate(columns):
            draw.text((j * cell + 4, 2), label, fill=(0, 0, 0))
        for i, case in enumerate(cases):
            colors = [s.rgb for s in case.sprites]
            y = header_h + i * cell
            refs = Image.new("RGB", (128, 128), (255, 255, 255))
            k = math.ceil(math.sqrt(len(case.references)))
            for r, ref in enumerate(case.references):
                refs.paste(ref.resize((128 // k, 128 // k), Image.NEAREST), ((r % k) * (128 // k), (r // k) * (128 // k)))
            sheet.paste(refs, (0, y))
            sheet.paste(draw_boxes(case.render(), case.boxes, colors), (cell, y))
            for j, variant in enumerate(variants):
                image = generate_case(anyms, case, variant, steps, guidance, 32)
                sheet.paste(draw_boxes(image, case.boxes, colors), ((j + 2) * cell, y))
        sheet.save(out_dir / name)
        written.append(out_dir / name)
    return written


def tune_sampling(pipe, weights_dir: str | Path, guidances: list[float], steps: list[int], n_cases: int = 20,
                  seed: int = 1, min_background: float = 0.9) -> dict:
    """Choose the weights' default guidance and steps on VALIDATION cases (seed 1, never the reported
    seed-0 set): the most placed subjects (anyms, 2 and 4 subjects) with background accuracy >=
    `min_background`, fewer steps on ties. Writes WEIGHTS/sampling.json."""
    trials = []
    for g in guidances:
        for k in steps:
            r = evaluate(pipe, [2, 4], n_cases, ["anyms"], seed=seed, steps=k, guidance=g, bootstrap=0, progress=False)
            placed = sum(r["groups"][n]["anyms"]["placed"]["mean"] for n in ("2", "4")) / 2
            background = min(r["groups"][n]["anyms"]["background"]["mean"] for n in ("2", "4"))
            trials.append({"guidance_scale": g, "num_inference_steps": k, "placed": placed, "background": background})
            print(trials[-1], file=sys.stderr)
    ok = [t for t in trials if t["background"] >= min_background] or trials
    best = max(ok, key=lambda t: (round(t["placed"], 3), -t["num_inference_steps"]))
    sampling = {"num_inference_steps": best["num_inference_steps"], "guidance_scale": best["guidance_scale"],
                "chosen_on": f"validation cases seed={seed}, {n_cases} per subject count", "trials": trials}
    (Path(weights_dir) / "sampling.json").write_text(json.dumps(sampling, indent=1) + "\n")
    return sampling


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m anyms_core.toy.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--subjects", type=int, nargs="+", default=[2, 3, 4, 5])
    p.add_argument("--cases", type=int, default=100)
    p.add_argument("--variants", nargs="+", default=["anyms", "mask", "none", "joint", "text"])
    p.add_argument("--out", default="results/toy_eval", help="writes OUT.json and OUT.md")
    p.add_argument("--weights", default=None, help="toy weights folder (default: the shipped ones)")
    p.add_argument("--seed", type=int, default=0, help="case set (0 = the reported held-out set)")
    p.add_argument("--steps", type=int, default=None, help="default: the pipeline's")
    p.add_argument("--guidance", type=float, default=None, help="default: the pipeline's")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--bootstrap", type=int, default=1000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--grid", default=None, help="also save a PNG grid of the first cases' images here")
    p.add_argument("--card-figures", default=None, help="only write the model card's figures to this folder")
    p.add_argument("--train-dir", default=None, help="training output folder (its loss_log.csv) for --card-figures")
    p.add_argument("--tune-guidance", type=float, nargs="+", default=None,
                   help="only choose the default guidance (and --tune-steps) on validation cases; writes WEIGHTS/sampling.json")
    p.add_argument("--tune-steps", type=int, nargs="+", default=[12])
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from .pipeline import load_toy_pipeline

    pipe = load_toy_pipeline(args.weights)
    if args.tune_guidance:
        from .pipeline import DEFAULT_WEIGHTS_DIR

        return tune_sampling(pipe, args.weights or DEFAULT_WEIGHTS_DIR, args.tune_guidance, args.tune_steps, n_cases=args.cases)
    if args.card_figures:
        paths = card_figures(pipe, args.card_figures, args.train_dir, guidance=args.guidance, steps=args.steps)
        print("\n".join(str(p) for p in paths))
        return {"figures": [str(p) for p in paths]}
    start = time.perf_counter()
    results = evaluate(
        pipe, args.subjects, args.cases, args.variants, seed=args.seed, steps=args.steps, guidance=args.guidance,
        size=args.size, bootstrap=args.bootstrap, keep_images=6 if args.grid else 0,
    )
    images = results.pop("images")
    report = {
        "command": "python -m anyms_core.toy.evaluate " + " ".join(sys.argv[1:] if argv is None else argv),
        "settings": {
            "subjects": args.subjects, "cases": args.cases, "variants": args.variants, "seed": args.seed,
            "steps": args.steps or pipe.default_num_inference_steps,
            "guidance": pipe.default_guidance_scale if args.guidance is None else args.guidance,
            "size": args.size, "weights": str(args.weights or "shipped"), "threads": args.threads,
        },
        "machine": {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__},
        "wall_seconds": round(time.perf_counter() - start, 1),
        **results,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    md = [
        "# Toy-world evaluation",
        "",
        f"Command: `{report['command']}`  ",
        f"Settings: {json.dumps(report['settings'])}  ",
        f"Mean with 95% bootstrap CI over cases; {args.cases} held-out cases per subject count. "
        "`text` (no subject images) is the floor, the rendered scene the ceiling.",
        "",
        markdown_table(report["groups"], args.variants),
        "",
        f"Seconds per image (generation only, {args.threads} thread): {json.dumps(report['seconds_per_image'])}",
    ]
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    if args.grid and images:
        from .train import image_grid

        rows = [im for key in sorted(images) for im in images[key]]
        image_grid(rows, columns=6).save(args.grid)
    print(markdown_table(report["groups"], args.variants))
    return report


if __name__ == "__main__":
    main()
