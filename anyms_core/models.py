"""Loading pipelines: the embedded toy world, tiny random test models, and real SDXL + IP-Adapter.

No weights are ever downloaded by the tests; the real loader keeps the hub ids and local-folder
layout users need, and says exactly what to download when something is missing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

DEFAULT_MODEL = "toy"
SDXL_BASE = "stabilityai/stable-diffusion-xl-base-1.0"
IP_ADAPTER_REPO = "h94/IP-Adapter"


@dataclass
class IPAdapterWeights:
    """Which IP-Adapter file to load from ``IP_ADAPTER_REPO`` (or a local copy of it), and its image encoder."""

    weight_name: str
    subfolder: str
    image_encoder_folder: str
    tokens: int


# The SDXL adapters of h94/IP-Adapter. "plus" adapters use 16 Resampler tokens; the *_vit-h ones use
# the ViT-H encoder that lives under models/, not the ViT-bigG one under sdxl_models/.
SDXL_IP_ADAPTERS = {
    "base": IPAdapterWeights("ip-adapter_sdxl.safetensors", "sdxl_models", "image_encoder", 4),
    "base-vit-h": IPAdapterWeights("ip-adapter_sdxl_vit-h.safetensors", "sdxl_models", "models/image_encoder", 4),
    "plus-vit-h": IPAdapterWeights("ip-adapter-plus_sdxl_vit-h.safetensors", "sdxl_models", "models/image_encoder", 16),
}
MODEL_NAMES = ("toy", "tiny-sdxl", "tiny-sd15", "sdxl")


def load_pipeline(model: str | dict | None = None, device: str | torch.device | None = None, dtype: torch.dtype | None = None):
    """Loads a pipeline with one IP-Adapter, ready for :class:`~anyms_core.AnyMS`.

    ``model``: ``"toy"`` (the embedded default, no download), ``"tiny-sdxl"`` / ``"tiny-sd15"``
    (random weights, for tests), ``"sdxl"`` (real weights from the hub cache), or a dict
    ``{"name": "sdxl", "base": path_or_id, "ip_adapter": path_or_id, "adapter": "plus-vit-h"}``.
    """
    spec = {"name": DEFAULT_MODEL} if model is None else {"name": model} if isinstance(model, str) else dict(model)
    name = spec.pop("name", None)
    device = device or ("cuda" if torch.cuda.is_available() and name == "sdxl" else "cpu")
    if name == "toy":
        from .toy import load_toy_pipeline

        _reject_extra(spec, name, allowed=("weights",))
        return load_toy_pipeline(spec.get("weights"), device=device, dtype=dtype or torch.float32)
    if name in ("tiny-sdxl", "tiny-sd15"):
        from .testing import tiny_sd15_pipeline, tiny_sdxl_pipeline

        _reject_extra(spec, name, allowed=("ip_adapter", "seed"))
        build = tiny_sdxl_pipeline if name == "tiny-sdxl" else tiny_sd15_pipeline
        pipe = build(ip_adapter=spec.get("ip_adapter", "base"), seed=int(spec.get("seed", 0)))
        pipe.anyms_model_name = name
        return pipe.to(device)
    if name == "sdxl":
        _reject_extra(spec, name, allowed=("base", "ip_adapter", "adapter"))
        return load_sdxl_with_ip_adapter(
            base=spec.get("base", SDXL_BASE), ip_adapter=spec.get("ip_adapter", IP_ADAPTER_REPO),
            adapter=spec.get("adapter", "base"), device=device, dtype=dtype or (torch.float16 if str(device).startswith("cuda") else torch.float32),
        )
    raise ValueError(f"Unknown model {name!r}; choose one of {MODEL_NAMES} (or a dict with 'name').")


def _reject_extra(spec: dict, name: str, allowed: tuple[str, ...]) -> None:
    extra = sorted(set(spec) - set(allowed))
    if extra:
        raise ValueError(f"Model {name!r} does not take {extra}; it takes {list(allowed)}.")


def load_sdxl_with_ip_adapter(
    base: str | os.PathLike = SDXL_BASE,
    ip_adapter: str | os.PathLike = IP_ADAPTER_REPO,
    adapter: str = "base",
    device: str | torch.device = "cuda",
    dtype: torch.dtype = torch.float16,
):
    """SDXL base + an h94/IP-Adapter SDXL adapter, from hub ids (already in the local cache) or local folders.

    ``ip_adapter`` is the repo id or a local folder with the repo's layout (``sdxl_models/...``,
    ``models/image_encoder``). Nothing is downloaded if it is not already cached when
    ``HF_HUB_OFFLINE=1``; otherwise diffusers fetches what is missing.
    """
    from diffusers import StableDiffusionXLPipeline

    if adapter not in SDXL_IP_ADAPTERS:
        raise ValueError(f"Unknown SDXL IP-Adapter {adapter!r}; choose one of {sorted(SDXL_IP_ADAPTERS)}.")
    weights = SDXL_IP_ADAPTERS[adapter]
    # diffusers reads a bare folder name under the weight's subfolder, a path with "/" from the repo root
    encoder_folder = (weights.image_encoder_folder if "/" in weights.image_encoder_folder
                      else f"{weights.subfolder}/{weights.image_encoder_folder}")
    _check_local_folder(base, ["model_index.json", "unet/config.json"], what="SDXL base", hub_id=SDXL_BASE)
    _check_local_folder(
        ip_adapter, [f"{weights.subfolder}/{weights.weight_name}", f"{encoder_folder}/config.json"],
        what="IP-Adapter", hub_id=IP_ADAPTER_REPO,
    )
    try:
        pipe = StableDiffusionXLPipeline.from_pretrained(os.fspath(base), torch_dtype=dtype)
        pipe.load_ip_adapter(
            os.fspath(ip_adapter), subfolder=weights.subfolder, weight_name=weights.weight_name,
            image_encoder_folder=weights.image_encoder_folder,
        )
    except (OSError, EnvironmentError) as error:
        raise ValueError(
            f"Could not load SDXL + IP-Adapter ({error}). Download them first, e.g.\n"
            f"  huggingface-cli download {SDXL_BASE}\n"
            f"  huggingface-cli download {IP_ADAPTER_REPO} {weights.subfolder}/{weights.weight_name} "
            f"--include '{encoder_folder}/*'\n"
            "or pass local folders with the same layout."
        ) from None
    pipe.anyms_model_name = f"sdxl+ip-adapter:{adapter}"
    return pipe.to(device)


def _check_local_folder(path: str | os.PathLike, required: list[str], what: str, hub_id: str) -> None:
    """A local folder must hold the files diffusers will read; a hub id is checked by diffusers itself."""
    folder = Path(path)
    looks_local = folder.exists() or os.fspath(path).startswith((".", "/", "~"))
    if not looks_local:
        return
    missing = [name for name in required if not (folder.expanduser() / name).exists()]
    if missing:
        raise ValueError(
            f"The {what} folder {os.fspath(path)!r} lacks {missing}. It needs the layout of {hub_id} "
            f"(e.g. `huggingface-cli download {hub_id} --local-dir {os.fspath(path)}`)."
        )
