"""``Run``: everything one generation produced, as plain data that widgets and figures read.

A run directory holds ``run.json`` (config, timings, metadata), ``image.png`` (+ ``image_1.png`` ...
for batches), ``subjects/{i}.png`` (reference images) and ``arrays.safetensors`` (attention maps in
fp16 and the per-step previews as uint8).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from .layout import Subject
from .recording import AttentionMaps

RUN_FORMAT_VERSION = 1


@dataclass
class Run:
    """The result of :meth:`anyms_core.AnyMS.generate`.

    Attributes:
        images: all generated images (``image`` is the first).
        config: the full configuration: prompt, subjects (name, box, priority), variant, seed, steps,
            guidance_scale, ip_adapter_scale, height, width, model, priority_rule, record.
        subject_images: the subjects' reference images (RGB), in the subjects' order.
        attention: recorded attention maps, or None when recording was off.
        previews: per denoising step, a small RGB uint8 array [h, w, 3] of the predicted clean image (x0).
        timings: seconds: ``total``, ``per_step`` (list) and ``steps_per_s``.
    """

    images: list[Image.Image]
    config: dict
    subject_images: list[Image.Image]
    attention: AttentionMaps | None = None
    previews: list[np.ndarray] = field(default_factory=list)
    timings: dict = field(default_factory=dict)

    @property
    def image(self) -> Image.Image:
        return self.images[0]

    @property
    def boxes(self) -> list[list[float]]:
        return [list(s["box"]) for s in self.config["subjects"]]

    @property
    def subject_names(self) -> list[str]:
        return [s["name"] for s in self.config["subjects"]]

    @property
    def variant(self) -> str:
        return self.config["variant"]

    @property
    def prompt(self) -> str:
        return self.config["prompt"]

    @property
    def num_steps(self) -> int:
        return len(self.previews) if self.previews else int(self.config["steps"])

    def subjects(self) -> list[Subject]:
        """The subjects again (reference image + box), e.g. to re-run the same case with another variant."""
        return [
            Subject(image=image, box=s["box"], name=s["name"], priority=s.get("priority"))
            for image, s in zip(self.subject_images, self.config["subjects"])
        ]

    def __repr__(self) -> str:
        return (f"Run(variant={self.variant!r}, prompt={self.prompt!r}, subjects={self.subject_names}, "
                f"size={self.image.size}, steps={self.num_steps}, attention={'yes' if self.attention else 'no'})")

    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
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
            "config": self.config,
            "timings": self.timings,
            "num_images": len(self.images),
            "attention": None if self.attention is None else self.attention.metadata(),
        }
        (directory / "run.json").write_text(json.dumps(record, indent=2))
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> "Run":
        directory = Path(directory)
        path = directory / "run.json"
        if not path.exists():
            raise ValueError(f"{directory} is not a saved run: {path.name} is missing.")
        record = json.loads(path.read_text())
        if record.get("format_version") != RUN_FORMAT_VERSION:
            raise ValueError(f"{path} has run format {record.get('format_version')}, this version reads {RUN_FORMAT_VERSION}.")
        images = [_load_png(directory / ("image.png" if i == 0 else f"image_{i}.png")) for i in range(record["num_images"])]
        subject_images = [_load_png(directory / "subjects" / f"{i}.png") for i in range(len(record["config"]["subjects"]))]
        arrays = directory / "arrays.safetensors"
        tensors = load_file(arrays) if arrays.exists() else {}
        attention = None if record["attention"] is None else AttentionMaps.from_saved(record["attention"], tensors)
        previews = list(tensors["previews"].numpy()) if "previews" in tensors else []
        return cls(images, record["config"], subject_images, attention, previews, record["timings"])


def _load_png(path: Path) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")
