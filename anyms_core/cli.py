"""``anyms`` command line: ``generate`` a case file; ``train-toy`` and ``evaluate-toy`` for the toy world.

A case file (JSON):

    {"prompt": "a photo on grass",
     "subjects": [{"name": "cat", "image": "cat.png", "box": [0.05, 0.3, 0.5, 0.95]},
                  {"name": "ball", "image": "toy:red circle", "box": [0.55, 0.5, 0.9, 0.9], "priority": 1}],
     "variant": "anyms", "seed": 0, "steps": 12, "guidance_scale": 3.0, "ip_adapter_scale": 1.0,
     "height": 32, "width": 32, "model": "toy"}

Image paths are relative to the case file; ``toy:<colour> <shape>`` makes a toy-world reference.
Only ``prompt`` and ``subjects`` are required; ``model`` defaults to the embedded toy world.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

from .layout import Subject
from .variants import VARIANTS

CASE_FIELDS = {"prompt", "subjects", "variant", "seed", "steps", "guidance_scale", "ip_adapter_scale", "height", "width",
               "model", "negative_prompt", "priority_rule", "record"}
SUBJECT_FIELDS = {"name", "image", "box", "priority"}


class CaseError(ValueError):
    """A case file that cannot be run; the message names the offending field."""


def load_case(path: str | Path) -> dict:
    """Reads and validates a case file; returns the pipeline arguments with ``subjects`` as Subjects."""
    path = Path(path)
    try:
        case = json.loads(path.read_text())
    except FileNotFoundError:
        raise CaseError(f"{path}: no such case file") from None
    except json.JSONDecodeError as error:
        raise CaseError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(case, dict):
        raise CaseError(f"{path}: a case file is a JSON object with 'prompt' and 'subjects'")
    unknown = sorted(set(case) - CASE_FIELDS)
    if unknown:
        raise CaseError(f"{path}: unknown field(s) {unknown}; allowed: {sorted(CASE_FIELDS)}")
    if not isinstance(case.get("prompt"), str):
        raise CaseError(f"{path}: field 'prompt' must be a string")
    if not isinstance(case.get("subjects"), list) or not case["subjects"]:
        raise CaseError(f"{path}: field 'subjects' must be a non-empty list")
    if case.get("variant", "anyms") not in VARIANTS:
        raise CaseError(f"{path}: field 'variant' must be one of {list(VARIANTS)}, got {case.get('variant')!r}")
    for name, kind in (("seed", int), ("steps", int), ("height", int), ("width", int)):
        if name in case and (not isinstance(case[name], int) or isinstance(case[name], bool) or case[name] <= 0 and name != "seed"):
            raise CaseError(f"{path}: field '{name}' must be a positive integer, got {case[name]!r}")
    if "guidance_scale" in case and not isinstance(case["guidance_scale"], (int, float)):
        raise CaseError(f"{path}: field 'guidance_scale' must be a number")
    subjects = []
    for index, entry in enumerate(case["subjects"]):
        where = f"{path}: subjects[{index}]"
        if not isinstance(entry, dict):
            raise CaseError(f"{where} must be an object with 'image' and 'box'")
        unknown = sorted(set(entry) - SUBJECT_FIELDS)
        if unknown:
            raise CaseError(f"{where}: unknown field(s) {unknown}; allowed: {sorted(SUBJECT_FIELDS)}")
        for required in ("image", "box"):
            if required not in entry:
                raise CaseError(f"{where}: field '{required}' is missing")
        try:
            image = _reference_image(entry["image"], path.parent)
            subjects.append(Subject(image=image, box=entry["box"], name=entry.get("name"), priority=entry.get("priority")))
        except ValueError as error:
            raise CaseError(f"{where}: {error}") from None
    return {
        "prompt": case["prompt"], "subjects": subjects, "variant": case.get("variant", "anyms"),
        "seed": case.get("seed", 0), "num_inference_steps": case.get("steps"), "guidance_scale": case.get("guidance_scale"),
        "ip_adapter_scale": case.get("ip_adapter_scale"), "height": case.get("height"), "width": case.get("width"),
        "negative_prompt": case.get("negative_prompt"), "priority_rule": case.get("priority_rule", "order"),
        "record": case.get("record", True), "model": case.get("model", "toy"),
    }


def _reference_image(spec, folder: Path):
    if not isinstance(spec, str):
        raise ValueError(f"field 'image' must be a path or 'toy:<colour> <shape>', got {spec!r}")
    if spec.startswith("toy:"):
        from .toy import sprite_reference

        return sprite_reference(spec.removeprefix("toy:").strip())
    path = Path(spec)
    return path if path.is_absolute() else folder / path


def generate_command(args: argparse.Namespace) -> int:
    from .models import load_pipeline
    from .sampler import AnyMS

    case = load_case(args.case)
    model = case.pop("model")
    pipe = load_pipeline(model, device=args.device)
    run = AnyMS(pipe).generate(**case, progress=True)
    out = run.save(args.out)
    print(f"{run!r}\nwrote {out / 'image.png'}, {out / 'run.json'} and {out / 'arrays.safetensors'} "
          f"({run.timings['total']:.2f} s)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="anyms", description="AnyMS: layout-guided multi-subject generation by attention decoupling.")
    commands = parser.add_subparsers(dest="command", required=True)
    generate = commands.add_parser("generate", help="generate one case file into a run directory")
    generate.add_argument("case", help="case file (JSON)")
    generate.add_argument("--out", required=True, help="run directory to write")
    generate.add_argument("--device", default=None, help="cpu or cuda (default: cuda for real SDXL if available, else cpu)")
    generate.set_defaults(handler=generate_command)

    train = commands.add_parser("train-toy", help="train the toy-world model (see python -m anyms_core.toy.train --help)", add_help=False)
    train.set_defaults(handler=lambda args: _delegate("anyms_core.toy.train", args.rest))
    evaluate = commands.add_parser("evaluate-toy", help="evaluate variants in the toy world (python -m anyms_core.toy.evaluate --help)", add_help=False)
    evaluate.set_defaults(handler=lambda args: _delegate("anyms_core.toy.evaluate", args.rest))
    for sub in (train, evaluate):
        sub.add_argument("rest", nargs=argparse.REMAINDER)
    from . import scoring, sweep  # their own options: anyms_core/sweep.py, anyms_core/scoring/__init__.py

    sweep.build_parser(commands.add_parser("sweep", help="generate every (case, variant, seed) of a spec into run folders")).set_defaults(handler=sweep.command)
    scoring.build_parser(commands.add_parser("score", help="score a sweep folder: tables, 95%% CIs, Fig. 4-style plots")).set_defaults(handler=scoring.command)
    return parser


def _delegate(module: str, argv: list[str]) -> int:
    import importlib

    result = importlib.import_module(module).main(argv)
    return int(result or 0)


def main(argv: Sequence[str] | None = None, parser: argparse.ArgumentParser | None = None) -> int:
    parser = parser or build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except CaseError as error:
        print(f"anyms: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
