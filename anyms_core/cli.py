"""``anyms`` command line: ``generate`` a case file; ``train-toy`` and ``evaluate-toy`` for the toy world.

A case file is a :class:`~anyms_core.config.RunConfig` as JSON (the ``config`` of a saved ``run.json``
is one too, so a run can be replayed):

    {"prompt": "a photo at night",
     "subjects": [{"name": "circle", "image": "toy:red circle", "box": [0.05, 0.1, 0.5, 0.55]},
                  {"name": "cat", "image": "cat.png", "box": [0.5, 0.45, 0.95, 0.9], "priority": 1}],
     "variant": "anyms", "seed": 0, "steps": 8, "guidance_scale": 3.0, "model": "toy"}

Image paths are relative to the case file; ``toy:<colour> <shape>`` makes a toy-world reference.
Only ``prompt`` and ``subjects`` are required; ``model`` defaults to the embedded toy world. A subject
without ``priority`` has priority 0 (higher owns overlaps; equal priorities: the later subject wins).
``pipeline``: further keyword arguments of the pipeline's ``__call__`` (e.g. ``{"strength": 0.6,
"image": {"path": "init.png"}}`` for img2img); ``{"path": ...}`` values are read as images.

Every user error is one line ``anyms: error: ...`` and a non-zero exit status; ``--debug`` shows the
traceback instead. Everything that can be checked without the model (the case file, its images,
``--out``, ``--device``, the model name) is checked before the model is loaded. This module imports
neither torch nor diffusers at import time, so ``anyms --help`` answers at once.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

from .config import ConfigError, RunConfig

# Subcommands that hand all their arguments to a module's own parser (python -m <module> --help).
DELEGATED = {"train-toy": "anyms_core.toy.train", "evaluate-toy": "anyms_core.toy.evaluate",
             "diagnose-toy": "anyms_core.toy.diagnostics", "sweep": "anyms_core.sweep", "score": "anyms_core.scoring"}
DELEGATED_HELP = {
    "train-toy": "train the toy-world model",
    "evaluate-toy": "evaluate the variants in the toy world",
    "diagnose-toy": "does a toy model use the shape it is told (by text, by reference image, by reference inside its AnyMS box), and what does it draw in a box?",
    "sweep": "generate every (case, variant, seed) of a spec into run folders, resumable, on one or many processes",
    "score": "score a sweep folder: per-image tables, 95%% CIs, Fig. 4-style plots",
}
DEFAULT_RECORD = True


class CaseError(ValueError):
    """A case file that cannot be run; the message names the file and the offending field."""


class CommandError(ValueError):
    """A user error of the command line (bad option, unusable output folder)."""


@dataclasses.dataclass
class Case:
    """A validated case file: its config, its subjects (reference images loaded) and pipeline arguments."""

    path: Path
    config: RunConfig
    subjects: list
    pipeline_kwargs: dict[str, Any]


def load_case(path: str | os.PathLike) -> Case:
    """Reads and validates a case file, loading its reference images; a :class:`CaseError` names the field."""
    path = Path(path).expanduser()
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise CaseError(f"{path}: no such case file") from None
    except IsADirectoryError:
        raise CaseError(f"{path}: is a directory, not a case file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CaseError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(data, dict):
        raise CaseError(f"{path}: a case file is a JSON object with 'prompt' and 'subjects'")
    data = dict(data)
    data.setdefault("model", "toy")
    record = data.get("record", DEFAULT_RECORD)
    if not isinstance(record, dict) and record is not None:
        from dataclasses import asdict

        from .recording import RecordConfig

        try:
            config = RecordConfig.from_arg(record)
        except (TypeError, ValueError) as error:
            raise CaseError(f"{path}: field 'record': {error}") from None
        record = None if config is None else asdict(config)
    data["record"] = record
    try:
        config = RunConfig.from_dict(data, where=str(path))
    except ConfigError as error:
        raise CaseError(str(error)) from None
    if data["record"] is not None:
        from .recording import RecordConfig

        try:
            RecordConfig(**data["record"])
        except (TypeError, ValueError) as error:
            raise CaseError(f"{path}: field 'record': {error}") from None

    from .layout import Subject

    subjects = []
    for index, entry in enumerate(config.subjects):
        where = f"{path}: subjects[{index}]"
        if entry.image is None:
            raise CaseError(f"{where}: field 'image' is missing")
        try:
            image = reference_image(entry.image, path.parent)
            subjects.append(Subject(image=image, box=entry.box, name=entry.name, priority=entry.priority))
        except ValueError as error:
            raise CaseError(f"{where}: {error}") from None
    pipeline_kwargs = {}
    for name, value in config.pipeline.items():
        try:
            pipeline_kwargs[name] = _pipeline_value(value, path.parent)
        except ValueError as error:
            raise CaseError(f"{path}: pipeline.{name}: {error}") from None
    return Case(path, config, subjects, pipeline_kwargs)


def reference_image(spec: str, folder: Path):
    """A subject's image from a case file: ``toy:<colour> <shape>`` or a path (relative to ``folder``)."""
    if spec.startswith("toy:"):
        from .toy import sprite_reference

        return sprite_reference(spec.removeprefix("toy:").strip())
    if spec.startswith("sha256:"):
        raise ValueError(f"field 'image' is {spec[:20]}..., the hash of an in-memory image: give its path instead")
    return resolve_path(spec, folder)


def resolve_path(spec: str | os.PathLike, folder: Path) -> Path:
    """``~`` expanded; a relative path is relative to ``folder`` (the case file's)."""
    path = Path(spec).expanduser()
    return path if path.is_absolute() else folder / path


def _pipeline_value(value: Any, folder: Path) -> Any:
    if isinstance(value, dict) and set(value) == {"path"}:
        from .layout import load_reference_image

        return load_reference_image(resolve_path(value["path"], folder))
    if isinstance(value, dict) and ("sha256" in value or "callable" in value):
        raise ValueError(f"{value} records an in-memory value that a case file cannot restore; give {{\"path\": ...}}")
    return value


def check_out_dir(out: str | os.PathLike, overwrite: bool) -> Path:
    """The output folder must be new or empty (or ``overwrite``), and its parent writable."""
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise CommandError(f"--out {out} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise CommandError(f"--out {out} is not empty (pass --overwrite to replace it)")
    parent = next((p for p in out.absolute().parents if p.exists()), Path("."))
    try:  # a real probe: os.access says yes to root on read-only or virtual file systems
        os.rmdir(tempfile.mkdtemp(prefix=".anyms-probe.", dir=parent))
    except OSError as error:
        raise CommandError(f"--out {out}: cannot write into {parent} ({error.strerror or error})") from None
    return out


def check_device(device: str | None) -> str | None:
    """``--device``: a torch device that exists on this machine (None: the loader's default)."""
    if device is None:
        return None
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise CommandError(f"--device {device!r} is not a device; use cpu, cuda or cuda:N") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise CommandError(f"--device {device}: CUDA is not available on this machine")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise CommandError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif parsed.type == "mps" and not torch.backends.mps.is_available():
        raise CommandError(f"--device {device}: MPS is not available on this machine")
    elif parsed.type not in ("cpu", "cuda", "mps"):
        raise CommandError(f"--device {device!r}: use cpu, cuda or cuda:N")
    return device


def generate_command(args: argparse.Namespace) -> int:
    from .models import check_model_spec

    case = load_case(args.case)
    out = check_out_dir(args.out, args.overwrite)
    device = check_device(args.device)
    check_model_spec(case.config.model)

    from .models import load_pipeline
    from .sampler import AnyMS

    pipe = load_pipeline(case.config.model, device=device, base_dir=case.path.parent)
    run = AnyMS(pipe).generate_from_config(case.config, case.subjects, progress=True, **case.pipeline_kwargs)
    # record the case's own references (paths as written, toy sprites, the model spec) instead of hashes
    run.config = dataclasses.replace(
        run.config, pipeline=case.config.pipeline,
        subjects=tuple(dataclasses.replace(s, image=_absolute_image(c.image, case.path.parent))
                       for s, c in zip(run.config.subjects, case.config.subjects)),
    )
    run.save(out, overwrite=args.overwrite)
    print(f"{run!r}\nwrote {out / 'image.png'}, {out / 'run.json'} and {out / 'arrays.safetensors'} "
          f"({run.timings['total']:.2f} s)")
    return 0


def _absolute_image(spec: str, folder: Path) -> str:
    return spec if spec.startswith(("toy:", "sha256:")) else os.fspath(resolve_path(spec, folder).resolve())


class _Parser(argparse.ArgumentParser):
    """argparse, with usage errors as one line ``anyms: error: ...`` (and exit status 2)."""

    def error(self, message: str):
        self.exit(2, f"anyms: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="anyms", description="AnyMS: layout-guided multi-subject generation by attention decoupling.")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    generate = commands.add_parser("generate", help="generate one case file into a run directory",
                                   description="Generate one case file (JSON, see anyms_core/cli.py) into a run directory.")
    generate.add_argument("case", help="case file (JSON)")
    generate.add_argument("--out", required=True, help="run directory to write (new or empty)")
    generate.add_argument("--overwrite", action="store_true", help="replace --out whole if it holds files")
    generate.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda for real SDXL if available, else cpu)")
    generate.set_defaults(handler=generate_command)
    for name, module in DELEGATED.items():
        # parsed by the module itself (see main); listed here for `anyms --help`
        commands.add_parser(name, help=f"{DELEGATED_HELP[name]} (anyms {name} --help)", add_help=False)
    return parser


def _delegate(module: str, argv: list[str]) -> int:
    result = importlib.import_module(module).main(argv)
    return result if isinstance(result, int) and not isinstance(result, bool) else 0


def main(argv: Sequence[str] | None = None, parser: argparse.ArgumentParser | None = None) -> int:
    """Runs the command line; returns the exit status (user errors: one line on stderr, status 1 or 2)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv[: _first_command_index(argv)]
    command_index = _first_command_index(argv)
    if command_index < len(argv) and argv[command_index] in DELEGATED:
        handler: Callable[[], int] = lambda: _delegate(DELEGATED[argv[command_index]], argv[command_index + 1:])  # noqa: E731
    else:
        parser = parser or build_parser()
        args = parser.parse_args(argv)
        handler = lambda: args.handler(args)  # noqa: E731
    return run_reporting_errors(handler, debug)


def _first_command_index(argv: list[str]) -> int:
    return next((i for i, arg in enumerate(argv) if not arg.startswith("-")), len(argv))


def run_reporting_errors(handler: Callable[[], int], debug: bool) -> int:
    """Calls ``handler``; an error becomes one line ``anyms: error: ...`` (``debug``: the traceback)."""
    try:
        return handler()
    except KeyboardInterrupt:
        if debug:
            raise
        print("anyms: interrupted", file=sys.stderr)
        return 130
    except SystemExit as exit:  # a delegated module's `raise SystemExit("message")`
        if debug or not isinstance(exit.code, str):
            raise
        print(f"anyms: error: {' '.join(exit.code.split())}", file=sys.stderr)
        return 1
    except Exception as error:  # noqa: BLE001 - every error reaches the user as one line
        if debug:
            raise
        print(f"anyms: error: {one_line(error)}", file=sys.stderr)
        return 2 if isinstance(error, (ValueError, TypeError, OSError)) else 1


def one_line(error: BaseException) -> str:
    message = " ".join(str(error).split()) or type(error).__name__
    if not isinstance(error, (ValueError, OSError)):
        message = f"{type(error).__name__}: {message} (anyms --debug COMMAND ... shows the traceback)"
    return message


if __name__ == "__main__":
    sys.exit(main())
