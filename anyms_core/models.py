"""Loading pipelines: the embedded toy world, tiny random test models, and real SD1.5 / SDXL + IP-Adapter.

No weights are ever downloaded by the tests; the real loader keeps the hub ids and local-folder
layout users need, and says exactly what to download (``hf download ...``, the command of current
huggingface_hub) when something is missing.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

DEFAULT_MODEL = "toy"
SDXL_BASE = "stabilityai/stable-diffusion-xl-base-1.0"
SD15_BASE = "stable-diffusion-v1-5/stable-diffusion-v1-5"
IP_ADAPTER_REPO = "h94/IP-Adapter"


@dataclass(frozen=True)
class IPAdapterWeights:
    """Which IP-Adapter file to load from ``IP_ADAPTER_REPO`` (or a local copy of it), and its image encoder.

    ``image_encoder_folder`` is relative to the repository root (diffusers' convention for a path with "/").
    """

    weight_name: str
    subfolder: str
    image_encoder_folder: str
    tokens: int

    @property
    def files(self) -> list[str]:
        """The files to fetch from the adapter repository: the weights and the whole image encoder."""
        return [f"{self.subfolder}/{self.weight_name}", f"{self.image_encoder_folder}/*"]


# The adapters of h94/IP-Adapter. "plus" adapters use 16 Resampler tokens. The SDXL *_vit-h adapters use
# the ViT-H encoder under models/, the plain SDXL one the ViT-bigG encoder under sdxl_models/.
SDXL_IP_ADAPTERS = {
    "base": IPAdapterWeights("ip-adapter_sdxl.safetensors", "sdxl_models", "sdxl_models/image_encoder", 4),
    "base-vit-h": IPAdapterWeights("ip-adapter_sdxl_vit-h.safetensors", "sdxl_models", "models/image_encoder", 4),
    "plus": IPAdapterWeights("ip-adapter-plus_sdxl_vit-h.safetensors", "sdxl_models", "models/image_encoder", 16),
    "plus-face": IPAdapterWeights("ip-adapter-plus-face_sdxl_vit-h.safetensors", "sdxl_models", "models/image_encoder", 16),
}
SDXL_IP_ADAPTERS["plus-vit-h"] = SDXL_IP_ADAPTERS["plus"]  # the name used before "plus"
SD15_IP_ADAPTERS = {
    "base": IPAdapterWeights("ip-adapter_sd15.safetensors", "models", "models/image_encoder", 4),
    "plus": IPAdapterWeights("ip-adapter-plus_sd15.safetensors", "models", "models/image_encoder", 16),
    "plus-face": IPAdapterWeights("ip-adapter-plus-face_sd15.safetensors", "models", "models/image_encoder", 16),
}
FAMILIES = {"sdxl": (SDXL_BASE, SDXL_IP_ADAPTERS), "sd15": (SD15_BASE, SD15_IP_ADAPTERS)}
MODEL_NAMES = ("toy", "tiny-sdxl", "tiny-sd15", "sdxl", "sd15")
MODEL_OPTIONS = {
    "toy": ("weights",),
    "tiny-sdxl": ("ip_adapter", "seed", "task"),
    "tiny-sd15": ("ip_adapter", "seed", "task"),
    "sdxl": ("base", "ip_adapter", "adapter", "variant", "task"),
    "sd15": ("base", "ip_adapter", "adapter", "variant", "task"),
}
# task -> the diffusers auto pipeline that shares the loaded components (UNet with its IP-Adapter included)
TASKS = ("text2img", "img2img", "inpaint")


def check_model_spec(model: str | Mapping[str, Any] | None) -> tuple[str, dict]:
    """Validates a model name or dict without loading anything; returns ``(name, options)``."""
    if model is None:
        return DEFAULT_MODEL, {}
    if isinstance(model, str):
        spec: dict = {"name": model}
    elif isinstance(model, Mapping):
        spec = dict(model)
    else:
        raise ValueError(f"A model is a name {MODEL_NAMES} or a dict with 'name', got {type(model).__name__} {model!r}.")
    name = spec.pop("name", None)
    if name not in MODEL_OPTIONS:
        raise ValueError(f"Unknown model {name!r}; choose one of {MODEL_NAMES} (or a dict with 'name').")
    extra = sorted(set(spec) - set(MODEL_OPTIONS[name]))
    if extra:
        raise ValueError(f"Model {name!r} does not take {extra}; it takes {list(MODEL_OPTIONS[name])}.")
    if name in FAMILIES and spec.get("adapter", "base") not in FAMILIES[name][1]:
        raise ValueError(f"Unknown {name.upper()} IP-Adapter {spec['adapter']!r}; choose one of {sorted(FAMILIES[name][1])}.")
    if name in ("tiny-sdxl", "tiny-sd15") and spec.get("ip_adapter", "base") not in ("base", "plus"):
        raise ValueError(f"Model {name!r} takes ip_adapter 'base' or 'plus', got {spec['ip_adapter']!r}.")
    if spec.get("task", "text2img") not in TASKS:
        raise ValueError(f"Model {name!r}: task must be one of {list(TASKS)}, got {spec['task']!r}.")
    for key in ("base", "ip_adapter", "weights", "variant"):
        if key in spec and name not in ("tiny-sdxl", "tiny-sd15") and not isinstance(spec[key], (str, os.PathLike)):
            raise ValueError(f"Model {name!r}: {key!r} must be a path or hub id, got {spec[key]!r}.")
    return name, spec


def load_pipeline(
    model: str | Mapping[str, Any] | None = None,
    device: "str | torch.device | None" = None,  # noqa: F821
    dtype: "torch.dtype | None" = None,  # noqa: F821
    variant: str | None = None,
    base_dir: str | os.PathLike | None = None,
):
    """Loads a pipeline with one IP-Adapter, ready for :class:`~anyms_core.AnyMS`.

    ``model``: ``"toy"`` (the embedded default, no download), ``"tiny-sdxl"`` / ``"tiny-sd15"``
    (random weights, for tests), ``"sdxl"`` / ``"sd15"`` (real weights from the hub cache), or a dict
    ``{"name": "sdxl", "base": path_or_id, "ip_adapter": path_or_id, "adapter": "plus", "variant": "fp16"}``.
    ``variant``: weight file variant (e.g. ``"fp16"`` for folders holding only ``*.fp16.safetensors``).
    ``base_dir``: folder that relative paths are relative to (the CLI passes the case file's); ``~`` is expanded.
    """
    import torch

    name, spec = check_model_spec(model)
    device = device or ("cuda" if torch.cuda.is_available() and name in FAMILIES else "cpu")
    if name == "toy":
        from .toy import load_toy_pipeline

        weights = spec.get("weights")
        weights = None if weights is None else _local_path(weights, base_dir)
        pipe = load_toy_pipeline(weights, device=device, dtype=dtype or torch.float32)
        pipe.anyms_model = replayable_spec(name, spec, base_dir, variant)
        return pipe
    if name in ("tiny-sdxl", "tiny-sd15"):
        from .testing import tiny_sd15_pipeline, tiny_sdxl_pipeline

        build = tiny_sdxl_pipeline if name == "tiny-sdxl" else tiny_sd15_pipeline
        pipe = build(ip_adapter=spec.get("ip_adapter", "base"), seed=int(spec.get("seed", 0)))
        pipe.anyms_model_name = name
        pipe = pipe.to(device)
    else:
        default_base, _ = FAMILIES[name]
        pipe = load_with_ip_adapter(
            name, base=spec.get("base", default_base), ip_adapter=spec.get("ip_adapter", IP_ADAPTER_REPO),
            adapter=spec.get("adapter", "base"), device=device, variant=spec.get("variant", variant), base_dir=base_dir,
            dtype=dtype or (torch.float16 if str(device).startswith("cuda") else torch.float32),
        )
    pipe = for_task(pipe, spec.get("task", "text2img"))
    pipe.anyms_model = replayable_spec(name, spec, base_dir, variant)
    return pipe


def replayable_spec(name: str, spec: dict, base_dir: str | os.PathLike | None = None,
                    variant: str | None = None) -> str | dict:
    """What ``run.config.model`` records: a model spec that loads the same pipeline again from anywhere
    (local folders made absolute, hub ids kept, ``variant=`` folded in); the bare name when it has no options."""
    spec = dict(spec)
    if variant is not None and name in FAMILIES:
        spec.setdefault("variant", variant)
    for key in ("base", "ip_adapter", "weights"):
        if key in spec:
            path = _local_path(spec[key], base_dir)
            spec[key] = path if isinstance(path, str) else os.fspath(Path(path).resolve())
    return {"name": name, **spec} if spec else name


def for_task(pipe, task: str):
    """The same components (UNet and IP-Adapter included, nothing copied) as an img2img or inpainting pipeline."""
    if task == "text2img":
        return pipe
    from diffusers import AutoPipelineForImage2Image, AutoPipelineForInpainting

    if task not in TASKS:
        raise ValueError(f"task must be one of {list(TASKS)}, got {task!r}.")
    auto = AutoPipelineForImage2Image if task == "img2img" else AutoPipelineForInpainting
    converted = auto.from_pipe(pipe)
    converted.set_progress_bar_config(**getattr(pipe, "_progress_bar_config", {}))
    converted.anyms_model_name = f"{pipe.anyms_model_name}:{task}"
    return converted


def load_with_ip_adapter(
    family: str,
    base: str | os.PathLike | None = None,
    ip_adapter: str | os.PathLike = IP_ADAPTER_REPO,
    adapter: str = "base",
    device: "str | torch.device" = "cuda",  # noqa: F821
    dtype: "torch.dtype | None" = None,  # noqa: F821
    variant: str | None = None,
    base_dir: str | os.PathLike | None = None,
):
    """An SD1.5 (``family="sd15"``) or SDXL (``"sdxl"``) base + an h94/IP-Adapter adapter, from hub ids
    (in the local Hugging Face cache, or downloaded by diffusers unless ``HF_HUB_OFFLINE=1``) or local
    folders with the same layouts (``sdxl_models/...``, ``models/image_encoder``)."""
    import torch
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if family not in FAMILIES:
        raise ValueError(f"Unknown model family {family!r}; choose one of {sorted(FAMILIES)}.")
    default_base, adapters = FAMILIES[family]
    if adapter not in adapters:
        raise ValueError(f"Unknown {family.upper()} IP-Adapter {adapter!r}; choose one of {sorted(adapters)}.")
    weights = adapters[adapter]
    base = _local_path(base or default_base, base_dir)
    ip_adapter = _local_path(ip_adapter, base_dir)
    unet_weights = f"unet/diffusion_pytorch_model{'.' + variant if variant else ''}.safetensors"
    _check_local_folder(base, ["model_index.json", "unet/config.json", unet_weights], what=f"{family.upper()} base",
                        hub_id=default_base, download=_base_download(default_base, variant))
    _check_local_folder(ip_adapter, [f"{weights.subfolder}/{weights.weight_name}", f"{weights.image_encoder_folder}/config.json"],
                        what="IP-Adapter", hub_id=IP_ADAPTER_REPO, download=_adapter_download(weights))
    pipeline_class = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    extra = {"safety_checker": None, "requires_safety_checker": False} if family == "sd15" else {}
    try:
        pipe = pipeline_class.from_pretrained(os.fspath(base), dtype=dtype or torch.float32, variant=variant, **extra)
        pipe.load_ip_adapter(os.fspath(ip_adapter), subfolder=weights.subfolder, weight_name=weights.weight_name,
                             image_encoder_folder=weights.image_encoder_folder)
    except OSError as error:
        detail = " ".join(str(error).split())
        detail = detail if len(detail) <= 300 else detail[:300] + "..."
        raise ValueError(
            f"Could not load {family.upper()} + IP-Adapter {adapter!r} ({detail}). "
            f"Download them first: `{_base_download(default_base, variant)}` and `{_adapter_download(weights)}`, "
            "or pass local folders with the same layout."
        ) from None
    pipe.anyms_model_name = f"{family}+ip-adapter:{adapter}"
    return pipe.to(device)


def load_sdxl_with_ip_adapter(
    base: str | os.PathLike = SDXL_BASE,
    ip_adapter: str | os.PathLike = IP_ADAPTER_REPO,
    adapter: str = "base",
    device: "str | torch.device" = "cuda",  # noqa: F821
    dtype: "torch.dtype | None" = None,  # noqa: F821
    variant: str | None = None,
):
    """SDXL base + an h94/IP-Adapter SDXL adapter: ``load_with_ip_adapter("sdxl", ...)``."""
    import torch

    return load_with_ip_adapter("sdxl", base, ip_adapter, adapter, device, dtype or torch.float16, variant)


def hf_download_command(repo_id: str, patterns: list[str], local_dir: str | os.PathLike | None = None) -> str:
    """The ``hf download`` command (huggingface_hub >= 1.0) that fetches ``patterns`` of ``repo_id``.

    Each pattern gets its own ``--include``: ``hf`` takes a bare name after the first as a file name,
    and with file names given it ignores ``--include`` (so an image encoder would never arrive).
    """
    command = f"hf download {repo_id} " + " ".join(f'--include "{pattern}"' for pattern in patterns)
    return command + (f" --local-dir {os.fspath(local_dir)}" if local_dir is not None else "")


def base_patterns(variant: str | None) -> list[str]:
    weights = [f"*/*.{variant}.safetensors"] if variant else ["*/diffusion_pytorch_model.safetensors", "*/model.safetensors"]
    return ["model_index.json", "*/*.json", "*/*.txt"] + weights


def _base_download(hub_id: str, variant: str | None, local_dir: str | os.PathLike | None = None) -> str:
    return hf_download_command(hub_id, base_patterns(variant), local_dir)


def _adapter_download(weights: IPAdapterWeights, local_dir: str | os.PathLike | None = None) -> str:
    return hf_download_command(IP_ADAPTER_REPO, weights.files, local_dir)


def _local_path(path: str | os.PathLike, base_dir: str | os.PathLike | None) -> str | Path:
    """A hub id stays as it is; ``~`` is expanded; a relative path that exists (or starts with ``.``) is
    taken relative to ``base_dir`` (default: the current folder)."""
    text = os.fspath(path)
    expanded = Path(text).expanduser()
    if expanded.is_absolute():
        return expanded
    anchored = Path(base_dir or ".").expanduser() / expanded
    if text.startswith((".", "~")) or anchored.exists() or not _looks_like_hub_id(text):
        return anchored
    return text


def _looks_like_hub_id(text: str) -> bool:
    parts = text.split("/")
    return len(parts) == 2 and all(parts) and not text.startswith((".", "/", "~"))


def _check_local_folder(path: str | os.PathLike, required: list[str], what: str, hub_id: str, download: str) -> None:
    # ``download`` is the hub command; for a local folder it gains --local-dir
    """A local folder must hold the files diffusers will read; a hub id is checked by diffusers itself."""
    if isinstance(path, str) and _looks_like_hub_id(path):
        return
    folder = Path(path)
    missing = [name for name in required if not (folder / name).exists()]
    variants = sorted({p.name.split(".")[-2] for p in folder.glob("unet/diffusion_pytorch_model.*.safetensors")})
    if missing and variants and "unet/config.json" not in missing:
        raise ValueError(f"The {what} folder {os.fspath(folder)!r} lacks {missing} but holds the weight variant(s) "
                         f"{variants}: pass variant={variants[0]!r} (in a case file: \"variant\": {json.dumps(variants[0])}).")
    if missing:
        local = f"{download} --local-dir {folder}"
        raise ValueError(
            f"The {what} folder {os.fspath(folder)!r} lacks {missing}. It needs the layout of {hub_id}: `{local}`."
        )
