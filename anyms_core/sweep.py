"""Sweeps: generate every (case, variant, seed) of a spec into run folders, on one or many processes.

    anyms sweep SPEC --out DIR
    accelerate launch --num_processes N -m anyms_core.sweep SPEC --out DIR

A spec (JSON, or YAML with a ``.yaml``/``.yml`` suffix):

    model: toy                       # or "sdxl", or {"name": "sdxl", "base": ..., "ip_adapter": ...}
    variants: [anyms, mask, none]
    seeds: [0, 1]                    # or a count: 2 means [0, 1]
    generation: {steps: 12, guidance_scale: 3.0, ip_adapter_scale: 1.0, height: 32, width: 32}
    cases:
      - name: two-sprites            # optional; default case000, case001, ...
        prompt: a photo on grass
        subjects:
          - {image: "toy:red circle", box: [0.05, 0.3, 0.5, 0.95], class: "red circle"}
          - {image: cat.png, box: [0.55, 0.5, 0.9, 0.9], class: cat, priority: 1}
    toy_cases: {subjects: [2, 3], count: 2, seed: 0}   # optional: held-out toy-world cases, appended

Image paths are relative to the spec; ``toy:<colour> <shape>`` is a toy-world reference. ``class``
(the detector's text query for that subject) defaults to the subject's ``name``, which defaults to
the image spec without ``toy:``.

Output: ``DIR/runs/<case>__<variant>__s<seed>/`` (one :class:`~anyms_core.Run` each, written to a
temporary folder and renamed, so a folder that exists is finished), ``DIR/index.jsonl`` (one row per
finished run) and ``DIR/sweep.json`` (the resolved spec). Running again skips finished runs. Under
``accelerate launch`` the pending runs are split between the processes; each writes
``DIR/index.part<rank>.jsonl`` and the main process merges them into ``index.jsonl`` at the end.
Every run is seeded by its own seed on a CPU generator, so 1 or N processes give the same images.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

SPEC_FIELDS = {"model", "variants", "seeds", "generation", "cases", "toy_cases"}
CASE_FIELDS = {"name", "prompt", "subjects"}
SUBJECT_FIELDS = {"image", "box", "name", "class", "priority"}
GENERATION_FIELDS = {"steps", "guidance_scale", "ip_adapter_scale", "height", "width", "negative_prompt",
                     "priority_rule", "record", "previews"}
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
INDEX_NAME = "index.jsonl"
SPEC_COPY_NAME = "sweep.json"


class SpecError(ValueError):
    """A sweep spec that cannot be run; the message names the file and the offending field."""


@dataclass
class SweepItem:
    """One run of a sweep: a case, a variant and a seed; ``run_id`` is also its folder name."""

    case: str
    variant: str
    seed: int

    @property
    def run_id(self) -> str:
        return f"{self.case}__{self.variant}__s{self.seed}"


@dataclass
class SweepSpec:
    """A validated spec: cases as plain dicts (image specs unresolved), everything else resolved."""

    cases: list[dict]
    variants: list[str]
    seeds: list[int]
    model: str | dict = "toy"
    generation: dict = field(default_factory=dict)
    folder: Path = Path(".")

    def items(self) -> list[SweepItem]:
        """All runs, in a fixed order: case, then variant, then seed."""
        return [SweepItem(case["name"], variant, seed) for case in self.cases for variant in self.variants for seed in self.seeds]

    def case(self, name: str) -> dict:
        return next(case for case in self.cases if case["name"] == name)

    def to_json(self) -> dict:
        return {"model": self.model, "generation": self.generation, "variants": self.variants, "seeds": self.seeds,
                "cases": self.cases}


# --------------------------------------------------------------------------------------------
# Spec: read and validate everything before any model is loaded
# --------------------------------------------------------------------------------------------
def load_spec(spec: str | Path | dict, folder: str | Path | None = None) -> SweepSpec:
    """Reads (from a .json/.yaml/.yml file, or a dict) and validates a spec; raises :class:`SpecError`.

    ``folder``: where relative image paths are resolved (default: the spec file's folder, or the
    current folder for a dict).
    """
    if isinstance(spec, dict):
        where, raw = "spec", spec
        folder = Path(folder) if folder is not None else Path.cwd()
    else:
        path = Path(spec)
        where = str(path)
        folder = Path(folder) if folder is not None else path.parent
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise SpecError(f"{path}: no such spec file") from None
        raw = _parse_text(text, path)
    return _validate(raw, where, folder)


def _parse_text(text: str, path: Path) -> Any:
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise SpecError(f"{path}: YAML specs need pyyaml (pip install pyyaml), or write the spec as JSON") from None
        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise SpecError(f"{path}: not valid YAML ({' '.join(str(error).split())})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise SpecError(f"{path}: not valid JSON ({error}); use a .yaml suffix for YAML") from None


def _validate(raw: Any, where: str, folder: Path) -> SweepSpec:
    from .models import MODEL_NAMES
    from .processor import VARIANTS

    if not isinstance(raw, dict):
        raise SpecError(f"{where}: a spec is a mapping with 'cases' (or 'toy_cases'), 'variants' and 'seeds'")
    unknown = sorted(set(raw) - SPEC_FIELDS)
    if unknown:
        raise SpecError(f"{where}: unknown field(s) {unknown}; allowed: {sorted(SPEC_FIELDS)}")

    model = raw.get("model", "toy")
    model_name = model.get("name") if isinstance(model, dict) else model
    if model_name not in MODEL_NAMES:
        raise SpecError(f"{where}: field 'model' must be one of {list(MODEL_NAMES)} or a mapping with 'name', got {model!r}")

    variants = raw.get("variants", ["anyms"])
    if isinstance(variants, str):
        variants = [variants]
    if not isinstance(variants, list) or not variants:
        raise SpecError(f"{where}: field 'variants' must be a non-empty list of {list(VARIANTS)}")
    for variant in variants:
        if variant not in VARIANTS:
            raise SpecError(f"{where}: unknown variant {variant!r} in 'variants'; choose from {list(VARIANTS)}")
    if len(set(variants)) != len(variants):
        raise SpecError(f"{where}: 'variants' lists a variant twice: {variants}")

    seeds = raw.get("seeds", [0])
    if _is_int(seeds):
        if seeds <= 0:
            raise SpecError(f"{where}: field 'seeds' as a count must be positive, got {seeds}")
        seeds = list(range(seeds))
    if not isinstance(seeds, list) or not seeds or not all(_is_int(s) and s >= 0 for s in seeds):
        raise SpecError(f"{where}: field 'seeds' must be a count or a non-empty list of non-negative integers, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise SpecError(f"{where}: 'seeds' lists a seed twice: {seeds}")

    generation = raw.get("generation", {}) or {}
    if not isinstance(generation, dict):
        raise SpecError(f"{where}: field 'generation' must be a mapping of {sorted(GENERATION_FIELDS)}")
    unknown = sorted(set(generation) - GENERATION_FIELDS)
    if unknown:
        raise SpecError(f"{where}: generation: unknown field(s) {unknown}; allowed: {sorted(GENERATION_FIELDS)}")
    for name in ("steps", "height", "width"):
        if name in generation and not (_is_int(generation[name]) and generation[name] > 0):
            raise SpecError(f"{where}: generation.{name} must be a positive integer, got {generation[name]!r}")
    for name in ("guidance_scale", "ip_adapter_scale"):
        if name in generation and not (_is_number(generation[name])):
            raise SpecError(f"{where}: generation.{name} must be a number, got {generation[name]!r}")
    if generation.get("priority_rule", "order") not in ("order", "area"):
        raise SpecError(f"{where}: generation.priority_rule must be 'order' or 'area', got {generation['priority_rule']!r}")

    raw_cases = raw.get("cases", []) or []
    if not isinstance(raw_cases, list):
        raise SpecError(f"{where}: field 'cases' must be a list")
    if "toy_cases" in raw:
        from .scoring.toy import toy_case_specs

        toy = raw["toy_cases"]
        if not isinstance(toy, dict) or set(toy) - {"subjects", "count", "seed"} or "subjects" not in toy:
            raise SpecError(f"{where}: 'toy_cases' must be a mapping {{subjects: [2, 3], count: 10, seed: 0}}")
        counts = toy["subjects"] if isinstance(toy["subjects"], list) else [toy["subjects"]]
        try:
            raw_cases = list(raw_cases) + toy_case_specs(counts, int(toy.get("count", 1)), int(toy.get("seed", 0)))
        except (TypeError, ValueError) as error:
            raise SpecError(f"{where}: toy_cases: {error}") from None
    if not raw_cases:
        raise SpecError(f"{where}: the spec has no cases: give 'cases' or 'toy_cases'")
    cases = [_validate_case(case, index, where, folder) for index, case in enumerate(raw_cases)]
    names = [case["name"] for case in cases]
    duplicated = sorted({name for name in names if names.count(name) > 1})
    if duplicated:
        raise SpecError(f"{where}: case names must be unique; repeated: {duplicated}")
    return SweepSpec(cases=cases, variants=list(variants), seeds=[int(s) for s in seeds], model=model,
                     generation=dict(generation), folder=folder)


def _validate_case(case: Any, index: int, where: str, folder: Path) -> dict:
    from .layout import validate_box

    here = f"{where}: cases[{index}]"
    if not isinstance(case, dict):
        raise SpecError(f"{here} must be a mapping with 'prompt' and 'subjects'")
    unknown = sorted(set(case) - CASE_FIELDS)
    if unknown:
        raise SpecError(f"{here}: unknown field(s) {unknown}; allowed: {sorted(CASE_FIELDS)}")
    name = case.get("name", f"case{index:03d}")
    if not isinstance(name, str) or not NAME_PATTERN.match(name) or "__" in name:
        raise SpecError(f"{here}: 'name' must be letters, digits, '.', '_' or '-' (no '__'), got {name!r}")
    here = f"{where}: case {name!r}"
    if not isinstance(case.get("prompt"), str):
        raise SpecError(f"{here}: field 'prompt' must be a string")
    subjects = case.get("subjects")
    if not isinstance(subjects, list) or not subjects:
        raise SpecError(f"{here}: field 'subjects' must be a non-empty list")
    out = []
    for j, subject in enumerate(subjects):
        there = f"{here}: subjects[{j}]"
        if not isinstance(subject, dict):
            raise SpecError(f"{there} must be a mapping with 'image' and 'box'")
        unknown = sorted(set(subject) - SUBJECT_FIELDS)
        if unknown:
            raise SpecError(f"{there}: unknown field(s) {unknown}; allowed: {sorted(SUBJECT_FIELDS)}")
        for required in ("image", "box"):
            if required not in subject:
                raise SpecError(f"{there}: field '{required}' is missing")
        image = subject["image"]
        if not isinstance(image, str):
            raise SpecError(f"{there}: 'image' must be a path or 'toy:<colour> <shape>', got {image!r}")
        if image.startswith("toy:"):
            try:
                _toy_reference(image)
            except ValueError as error:
                raise SpecError(f"{there}: {error}") from None
        else:
            path = Path(image) if Path(image).is_absolute() else folder / image
            if not path.is_file():
                raise SpecError(f"{there}: image file {str(path)!r} does not exist")
            image = str(path.resolve())
        try:
            box = list(validate_box(subject["box"], what="box"))
        except ValueError as error:
            raise SpecError(f"{there}: {error}") from None
        label = subject.get("name") or (image.removeprefix("toy:").strip() if image.startswith("toy:") else Path(image).stem)
        detect = subject.get("class", label)
        if not isinstance(label, str) or not isinstance(detect, str) or not detect.strip():
            raise SpecError(f"{there}: 'name' and 'class' must be non-empty strings")
        priority = subject.get("priority")
        if priority is not None and not _is_number(priority):
            raise SpecError(f"{there}: 'priority' must be a number, got {priority!r}")
        out.append({"image": image, "box": box, "name": label, "class": detect.strip(), "priority": priority})
    return {"name": name, "prompt": case["prompt"], "subjects": out}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@functools.lru_cache(maxsize=256)
def _toy_reference(image: str):
    """The toy-world reference of ``toy:<colour> <shape>`` (rendered once per sprite: a sweep reuses them)."""
    from .toy import sprite_reference

    return sprite_reference(image.removeprefix("toy:").strip())


def case_subjects(case: dict) -> list:
    """The :class:`~anyms_core.Subject` list of a validated case (reference images loaded)."""
    from .layout import Subject

    return [
        Subject(image=_toy_reference(s["image"]) if s["image"].startswith("toy:") else s["image"],
                box=s["box"], name=s["name"], priority=s["priority"])
        for s in case["subjects"]
    ]


# --------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------
def index_row(spec: SweepSpec, item: SweepItem, run_json: dict | None = None, process: int | None = None,
              seconds: float | None = None) -> dict:
    """The index row of one finished run: what scoring needs without opening the run."""
    case = spec.case(item.case)
    row = {
        "run_id": item.run_id, "path": f"runs/{item.run_id}", "case": item.case, "variant": item.variant,
        "seed": item.seed, "n_subjects": len(case["subjects"]), "prompt": case["prompt"],
        "names": [s["name"] for s in case["subjects"]], "classes": [s["class"] for s in case["subjects"]],
        "images": [s["image"] for s in case["subjects"]], "boxes": [s["box"] for s in case["subjects"]],
        "process": process, "seconds": seconds,
    }
    if seconds is None and run_json is not None:
        row["seconds"] = run_json.get("timings", {}).get("total")
    return row


def check_output_folder(spec: SweepSpec, out: Path) -> None:
    """A resumed sweep may add cases, variants and seeds, but must not change a case, the model or the settings."""
    previous_path = out / SPEC_COPY_NAME
    if not previous_path.exists():
        return
    previous = json.loads(previous_path.read_text())
    current = json.loads(json.dumps(spec.to_json()))
    for key in ("model", "generation"):
        if previous.get(key) != current[key]:
            raise SpecError(f"{out} holds a sweep with another {key} ({previous.get(key)!r}); use a new --out folder")
    old_cases = {case["name"]: case for case in previous.get("cases", [])}
    for case in current["cases"]:
        if case["name"] in old_cases and old_cases[case["name"]] != case:
            raise SpecError(f"{out} holds a different case {case['name']!r}; rename the case or use a new --out folder")


def write_spec_copy(spec: SweepSpec, out: Path) -> None:
    """Writes DIR/sweep.json: the union of the cases, variants and seeds swept into this folder so far."""
    current = json.loads(json.dumps(spec.to_json()))
    path = out / SPEC_COPY_NAME
    if path.exists():
        previous = json.loads(path.read_text())
        names = {case["name"] for case in current["cases"]}
        current["cases"] = [c for c in previous.get("cases", []) if c["name"] not in names] + current["cases"]
        current["variants"] = list(dict.fromkeys(previous.get("variants", []) + current["variants"]))
        current["seeds"] = sorted(set(previous.get("seeds", [])) | set(current["seeds"]))
    _atomic_write_text(path, json.dumps(current, indent=1) + "\n")


def _atomic_write_text(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def is_finished(out: Path, item: SweepItem) -> bool:
    return (out / "runs" / item.run_id / "run.json").is_file()


def generate_item(anyms, spec: SweepSpec, item: SweepItem, out: Path, process: int = 0) -> dict:
    """Generates one run and moves it into place atomically; returns its index row."""
    case = spec.case(item.case)
    settings = spec.generation
    start = time.perf_counter()
    run = anyms.generate(
        case["prompt"], case_subjects(case), variant=item.variant, seed=item.seed,
        num_inference_steps=settings.get("steps"), guidance_scale=settings.get("guidance_scale"),
        ip_adapter_scale=settings.get("ip_adapter_scale"), height=settings.get("height"), width=settings.get("width"),
        negative_prompt=settings.get("negative_prompt"), priority_rule=settings.get("priority_rule", "order"),
        record=settings.get("record", None), previews=bool(settings.get("previews", False)),
    )
    final = out / "runs" / item.run_id
    temporary = out / "runs" / f".tmp-{item.run_id}-p{process}"
    shutil.rmtree(temporary, ignore_errors=True)
    run.save(temporary)
    try:
        os.rename(temporary, final)
    except OSError:  # finished meanwhile by another launch: keep that one
        shutil.rmtree(temporary, ignore_errors=True)
    return index_row(spec, item, process=process, seconds=round(time.perf_counter() - start, 4))


def merge_index(spec: SweepSpec, out: Path) -> list[dict]:
    """Merges DIR/index.jsonl and every DIR/index.part*.jsonl into DIR/index.jsonl; returns its rows.

    Rows are ordered like the spec's items; a finished run without a row (a crash between the rename
    and the row's write) gets one rebuilt from its run.json. The parts are removed afterwards.
    """
    known: dict[str, dict] = {}
    parts = sorted(out.glob("index.part*.jsonl"))
    for path in [out / INDEX_NAME, *parts]:
        if path.exists():
            for line in path.read_text().splitlines():
                if line.strip():
                    row = json.loads(line)
                    known[row["run_id"]] = row
    for item in spec.items():
        if item.run_id not in known and is_finished(out, item):
            run_json = json.loads((out / "runs" / item.run_id / "run.json").read_text())
            known[item.run_id] = index_row(spec, item, run_json=run_json)
    # in the order of DIR/sweep.json (the union of every spec swept into this folder): case, variant, seed
    swept = json.loads((out / SPEC_COPY_NAME).read_text()) if (out / SPEC_COPY_NAME).exists() else spec.to_json()
    case_rank = {case["name"]: i for i, case in enumerate(swept["cases"])}
    variant_rank = {variant: i for i, variant in enumerate(swept["variants"])}
    rows = [row for row in known.values() if (out / row["path"] / "run.json").is_file()]
    rows.sort(key=lambda r: (case_rank.get(r["case"], len(case_rank)), r["case"],
                             variant_rank.get(r["variant"], len(variant_rank)), r["variant"], r["seed"]))
    _atomic_write_text(out / INDEX_NAME, "".join(json.dumps(row) + "\n" for row in rows))
    for path in parts:
        path.unlink()
    return rows


def run_sweep(spec: SweepSpec | str | Path | dict, out: str | Path, device: str | None = None, progress: bool = True,
              limit: int | None = None) -> list[dict]:
    """Generates every pending run of ``spec`` into ``out``, sharded over accelerate's processes if launched so.

    Returns the merged index rows (on every process, after all have finished). ``limit``: generate at
    most this many pending runs in this call (e.g. to test resuming).
    """
    from accelerate import PartialState
    from tqdm.auto import tqdm

    spec = spec if isinstance(spec, SweepSpec) else load_spec(spec)
    out = Path(out)
    import torch

    # On a machine without CUDA, accelerate only forms a (gloo) process group when asked for the CPU.
    state = PartialState(cpu=device == "cpu" or not torch.cuda.is_available())
    check_output_folder(spec, out)  # on every process: a wrong --out stops them all (none waits for the others)
    state.wait_for_everyone()
    if state.is_main_process:
        (out / "runs").mkdir(parents=True, exist_ok=True)
        write_spec_copy(spec, out)
    state.wait_for_everyone()  # everyone sees the same finished set before anyone writes
    pending = [item for item in spec.items() if not is_finished(out, item)]
    if limit is not None:
        pending = pending[:limit]
    state.wait_for_everyone()
    with state.split_between_processes(pending) as mine:
        mine = list(mine)
    part = out / f"index.part{state.process_index:03d}.jsonl"
    if mine:
        from .models import load_pipeline
        from .sampler import AnyMS

        pipe = load_pipeline(spec.model, device=device or str(state.device))
        anyms = AnyMS(pipe)
        bar = tqdm(mine, desc=f"sweep [{state.process_index}/{state.num_processes}]", unit="run",
                   position=state.process_index, disable=not progress, dynamic_ncols=True)
        with open(part, "a") as handle:
            for item in bar:
                row = generate_item(anyms, spec, item, out, process=state.process_index)
                handle.write(json.dumps(row) + "\n")
                handle.flush()
        bar.close()
    state.wait_for_everyone()
    if state.is_main_process:
        merge_index(spec, out)
    state.wait_for_everyone()
    return read_index(out)


def read_index(out: str | Path) -> list[dict]:
    """The rows of DIR/index.jsonl (one per finished run)."""
    path = Path(out) / INDEX_NAME
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: run `anyms sweep SPEC --out {out}` first")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------
def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="anyms sweep", description=__doc__.split("\n\n")[0])
    parser.add_argument("spec", help="sweep spec (.json, .yaml or .yml)")
    parser.add_argument("--out", required=True, help="output folder (resumable: finished runs are skipped)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: the accelerate process's device)")
    parser.add_argument("--limit", type=int, default=None, help="generate at most this many pending runs now")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads per process")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument("--check", action="store_true", help="only validate the spec and list the runs")
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    return command(parse_args(argv))


def command(args: argparse.Namespace) -> int:
    """Runs the parsed ``sweep`` command; returns the exit status (2 on a bad spec)."""
    try:
        spec = load_spec(args.spec)
    except SpecError as error:
        print(f"anyms sweep: error: {error}", file=sys.stderr)
        return 2
    items = spec.items()
    if args.check:
        print(f"{args.spec}: {len(spec.cases)} cases x {len(spec.variants)} variants x {len(spec.seeds)} seeds = {len(items)} runs")
        return 0
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    try:
        rows = run_sweep(spec, args.out, device=args.device, progress=not args.no_progress, limit=args.limit)
    except SpecError as error:
        print(f"anyms sweep: error: {error}", file=sys.stderr)
        return 2
    from accelerate import PartialState

    if PartialState().is_main_process:  # already set up by run_sweep
        print(f"{len(rows)}/{len(items)} runs finished in {args.out} (index: {Path(args.out) / INDEX_NAME})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
