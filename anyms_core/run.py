"""``Run``: everything one generation produced, as plain data that widgets and figures read.

A run directory holds ``run.json`` (config, timings, metadata), ``image.png`` (+ ``image_1.png`` ...
for batches), ``subjects/{i}.png`` (reference images) and ``arrays.safetensors`` (attention maps in
fp16 and the per-step previews as uint8).
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from .config import RunConfig
from .layout import Subject
from .recording import AttentionMaps

RUN_FORMAT_VERSION = 2  # 2: config is a RunConfig dict (schema_version, subject images); "arrays" lists the tensors
READABLE_FORMAT_VERSIONS = (1, 2)


@dataclass
class Run:
    """The result of :meth:`anyms_core.AnyMS.generate`.

    Attributes:
        images: all generated images (``image`` is the first).
        config: the :class:`~anyms_core.config.RunConfig` with the values actually used (prompt,
            subjects, variant, seed, steps, guidance_scale, ...); ``config["seed"]`` also works.
        subject_images: the subjects' reference images (RGB), in the subjects' order.
        attention: recorded attention maps, or None when recording was off.
        previews: per denoising step, a small RGB uint8 array [h, w, 3] of the predicted clean image (x0).
        timings: seconds: ``total``, ``per_step`` (list) and ``steps_per_s``.
    """

    images: list[Image.Image]
    config: RunConfig
    subject_images: list[Image.Image]
    attention: AttentionMaps | None = None
    previews: list[np.ndarray] = field(default_factory=list)
    timings: dict = field(default_factory=dict)

    @property
    def image(self) -> Image.Image:
        return self.images[0]

    def __post_init__(self) -> None:
        if isinstance(self.config, dict):
            self.config = RunConfig.from_dict(self.config)
        if not isinstance(self.config, RunConfig):
            raise ValueError(f"Run.config must be a RunConfig (or its dict), got {type(self.config).__name__}.")

    @property
    def boxes(self) -> list[list[float]]:
        return [list(s.box) for s in self.config.subjects]

    @property
    def subject_names(self) -> list[str]:
        return [s.name for s in self.config.subjects]

    @property
    def variant(self) -> str:
        return self.config.variant

    @property
    def prompt(self) -> str:
        return self.config.prompt

    @property
    def num_steps(self) -> int:
        return len(self.previews) if self.previews else int(self.config.steps or 0)

    def subjects(self) -> list[Subject]:
        """The subjects again (reference image + box), e.g. to re-run the same case with another variant."""
        return [
            Subject(image=image, box=s.box, name=s.name, priority=s.priority)
            for image, s in zip(self.subject_images, self.config.subjects)
        ]

    def __repr__(self) -> str:
        return (f"Run(variant={self.variant!r}, prompt={self.prompt!r}, subjects={self.subject_names}, "
                f"size={self.image.size}, steps={self.num_steps}, attention={'yes' if self.attention else 'no'})")

    def save(self, directory: str | Path, overwrite: bool = False) -> Path:
        """Writes the run to ``directory`` (created; see the module docstring for its files).

        The run is written to a temporary folder beside ``directory`` and renamed into place, so a
        failure leaves no half-written run. A ``directory`` that exists and is not empty is refused
        unless ``overwrite=True``, which replaces it whole (no file of an older run survives).
        """
        directory = Path(directory).expanduser()
        if directory.exists() and not directory.is_dir():
            raise FileExistsError(f"Cannot save the run to {directory}: it is a file, not a directory.")
        if directory.is_dir() and any(directory.iterdir()) and not overwrite:
            raise FileExistsError(f"Cannot save the run to {directory}: the directory is not empty "
                                  "(pass overwrite=True to replace it whole).")
        directory.parent.mkdir(parents=True, exist_ok=True)
        staging = sibling_folder(directory, "partial")
        try:
            self._write(staging)
            if directory.exists():
                # replace whole: move the old directory aside first, so a failure can never mix the two,
                # and put it back if the new one cannot take its place
                retired = sibling_folder(directory, "old")
                os.replace(directory, retired / "run")
                try:
                    os.replace(staging, directory)
                except BaseException:
                    os.replace(retired / "run", directory)
                    shutil.rmtree(retired, ignore_errors=True)
                    raise
                shutil.rmtree(retired, ignore_errors=True)
            else:
                os.replace(staging, directory)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return directory

    def _write(self, directory: Path) -> None:
        (directory / "subjects").mkdir(parents=True, exist_ok=True)
        for index, image in enumerate(self.images):
            image.save(directory / ("image.png" if index == 0 else f"image_{index}.png"))
        for index, image in enumerate(self.subject_images):
            image.save(directory / "subjects" / f"{index}.png")
        tensors = {}
        if self.attention is not None:
            tensors.update(self.attention.to_tensors())
        if self.previews:
            tensors["previews"] = torch.from_numpy(np.ascontiguousarray(np.stack(self.previews))).contiguous()
        if tensors:
            save_file(tensors, directory / "arrays.safetensors")
        record = {
            "format_version": RUN_FORMAT_VERSION,
            "config": self.config.to_dict(),
            "timings": self.timings,
            "num_images": len(self.images),
            "attention": None if self.attention is None else self.attention.metadata(),
            "arrays": sorted(tensors),
        }
        (directory / "run.json").write_text(json.dumps(record, indent=2))

    @classmethod
    def load(cls, directory: str | Path) -> "Run":
        """Reads a run written by :meth:`save`; a ``ValueError`` names the file and what is wrong."""
        directory = Path(directory).expanduser()
        path = directory / "run.json"
        if not path.is_file():
            raise ValueError(f"{directory} is not a saved run: {path.name} is missing.")
        try:
            record = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"{path}: not valid JSON ({error}).") from None
        if not isinstance(record, dict):
            raise ValueError(f"{path}: a run record is a JSON object, got {type(record).__name__}.")
        version = record.get("format_version")
        if version not in READABLE_FORMAT_VERSIONS:
            raise ValueError(f"{path} has run format {version!r}, this version reads {list(READABLE_FORMAT_VERSIONS)}.")
        required = ("config", "num_images", "attention", "timings") + (("arrays",) if version >= 2 else ())
        missing = [key for key in required if key not in record]
        if missing:
            raise ValueError(f"{path}: field(s) {missing} missing.")
        try:
            config = RunConfig.from_dict(record["config"], where="config")
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from None
        num_images = record["num_images"]
        if not isinstance(num_images, int) or isinstance(num_images, bool) or num_images < 1:
            raise ValueError(f"{path}: num_images must be a positive integer, got {num_images!r}.")
        images = [_load_png(directory / ("image.png" if i == 0 else f"image_{i}.png")) for i in range(num_images)]
        subject_images = [_load_png(directory / "subjects" / f"{i}.png") for i in range(len(config.subjects))]
        arrays = directory / "arrays.safetensors"
        expected = set(record.get("arrays", []))
        tensors: dict[str, torch.Tensor] = {}
        if arrays.exists():
            try:
                tensors = load_file(arrays)
            except Exception as error:  # safetensors raises its own error types for broken files
                raise ValueError(f"{arrays}: cannot read it ({error}).") from None
        elif expected or (version < 2 and record["attention"] is not None):
            raise ValueError(f"{arrays} is missing, but {path.name} says the run recorded arrays.")
        absent = sorted(expected - set(tensors))
        if absent:
            raise ValueError(f"{arrays} lacks {len(absent)} array(s) that {path.name} lists, e.g. {absent[:3]}.")
        try:
            attention = None if record["attention"] is None else AttentionMaps.from_saved(record["attention"], tensors)
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"{path}: field 'attention' is malformed ({type(error).__name__}: {error}).") from None
        previews = list(tensors["previews"].numpy()) if "previews" in tensors else []
        return cls(images, config, subject_images, attention, previews, record["timings"])


def sibling_folder(directory: Path, kind: str) -> Path:
    """A new hidden folder beside ``directory`` (same file system, so a rename is atomic). Made with
    ``mkdir`` rather than ``tempfile.mkdtemp``, so that it gets the umask's permissions, not 0700."""
    for _ in range(100):
        folder = directory.parent / f".{directory.name}.{uuid.uuid4().hex[:12]}.{kind}"
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            continue
    raise FileExistsError(f"Cannot create a temporary folder beside {directory}.")


def _load_png(path: Path) -> Image.Image:
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except FileNotFoundError:
        raise ValueError(f"{path} is missing: the saved run is incomplete.") from None
    except OSError as error:
        raise ValueError(f"{path}: cannot read the image ({error}).") from None
