"""The ``anyms`` console script: anyms_core's commands plus ``demo``, which draws figures.

It lives here because drawing is anyms_viz's job and anyms_core never imports anyms_viz.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Sequence

# Nothing heavy is imported here (no torch, diffusers or matplotlib): `anyms --help` answers at once.
from anyms_core.cli import build_parser, check_out_dir
from anyms_core.cli import main as core_main

# A fixed multi-subject case of the toy world: three subjects, two of them overlapping, so the
# variants differ both in placement and in the overlap (priority vs sum).
DEMO_PROMPT = "a photo at night"
DEMO_SUBJECTS = [
    ("red circle", [0.06, 0.08, 0.48, 0.5]),
    ("cyan square", [0.52, 0.1, 0.94, 0.52]),
    ("yellow triangle", [0.3, 0.42, 0.72, 0.92]),
]
DEMO_VARIANTS = ("anyms", "mask", "none")


def side_by_side(runs, scale: int = 4, gap: int = 8):
    """The runs' images upscaled (nearest) in one row, each titled with its variant."""
    from PIL import Image, ImageDraw

    from anyms_core.variants import VARIANT_LABELS

    width, height = runs[0].image.width * scale, runs[0].image.height * scale
    title = 16
    sheet = Image.new("RGB", (len(runs) * width + (len(runs) - 1) * gap, height + title), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for i, run in enumerate(runs):
        sheet.paste(run.image.resize((width, height), Image.NEAREST), (i * (width + gap), title))
        draw.text((i * (width + gap) + 2, 2), VARIANT_LABELS[run.variant], fill=(0, 0, 0))
    return sheet


def demo_command(args: argparse.Namespace) -> int:
    from anyms_core.models import check_model_spec

    out = check_out_dir(args.out, args.overwrite)
    check_model_spec(args.model)

    from tqdm.auto import tqdm

    from anyms_core import AnyMS, Subject
    from anyms_core.models import load_pipeline
    from anyms_core.run import sibling_folder
    from anyms_core.toy import sprite_reference

    from . import figures

    start = time.perf_counter()
    pipe = load_pipeline(args.model)
    subjects = [Subject(sprite_reference(sprite), box, name=sprite) for sprite, box in DEMO_SUBJECTS]
    anyms = AnyMS(pipe)
    out.parent.mkdir(parents=True, exist_ok=True)
    # everything is written to a temporary folder beside --out and renamed at the end: a failed demo
    # leaves nothing behind (and never half of a demo in --out)
    staging = sibling_folder(out, "partial")
    try:
        runs = []
        for variant in tqdm(DEMO_VARIANTS, desc="anyms demo", unit="variant"):
            run = anyms.generate(DEMO_PROMPT, subjects, variant=variant, seed=args.seed)
            run.save(staging / "runs" / variant)
            run.image.resize((run.image.width * 4, run.image.height * 4), 0).save(staging / f"{variant}.png")
            runs.append(run)
        side_by_side(runs).save(staging / "variants.png")
        # contribution: where each subject's image tokens were actually injected under each variant
        figures.save(figures.plot_comparison(runs, kind="contribution", differences=False), staging / "comparison.png", dpi=200)
        # affinity: where each position "wants" each subject, whatever the variant allows
        figures.save(figures.plot_attention(runs[0], kind="affinity"), staging / "attention.png", dpi=200)
        figures.save(figures.plot_comparison(runs, kind="contribution"), staging / "comparison_with_differences.png", dpi=200)
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    written = sorted(p.name for p in out.iterdir() if p.is_file())
    print(f"wrote {', '.join(written)} and per-variant runs under {out} in {time.perf_counter() - start:.1f} s")
    return 0


def parser() -> argparse.ArgumentParser:
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    demo = commands.add_parser("demo", help="render the paper's three variants on a toy-world case, with figures")
    demo.add_argument("--out", required=True, help="folder to write images, figures and runs into (new or empty)")
    demo.add_argument("--overwrite", action="store_true", help="replace --out whole if it holds files")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--model", default="toy", help="toy (default), tiny-sdxl or tiny-sd15")
    demo.set_defaults(handler=demo_command)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return core_main(argv, parser=parser())


if __name__ == "__main__":
    sys.exit(main())
