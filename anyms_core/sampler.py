"""``AnyMS(pipe).generate(...) -> Run``: the high-level call that notebooks and widgets use.

It opens a :func:`~anyms_core.session.decoupled` session, calls the pipeline as usual, and collects
what a visualisation needs: the image, the full config, the recorded attention, a small preview of
the predicted clean image (x0) at every step, and timings.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import asdict
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .layout import Subject, subject_names, validate_subjects
from .recording import RecordConfig
from .run import Run
from .session import decoupled

PREVIEW_MAX_SIDE = 96

# Linear maps from SD-family latents to approximate RGB in [-1, 1], for cheap per-step previews
# (the usual "latent preview" approximation; decoding with the VAE at every step would cost more
# than the step itself).
_LATENT_RGB = {
    "sdxl": ([[0.3651, 0.4232, 0.4341], [-0.2533, -0.0042, 0.1068], [0.1076, 0.1111, -0.0362], [-0.3165, -0.2492, -0.2188]],
             [0.1084, -0.0175, -0.0011]),
    "sd15": ([[0.3512, 0.2297, 0.3227], [0.3250, 0.4974, 0.2350], [-0.2829, 0.1762, 0.2721], [-0.2120, -0.2616, -0.7177]],
             [0.0, 0.0, 0.0]),
}


class AnyMS:
    """Layout-guided multi-subject generation on any diffusers SD1.5/SDXL-style pipeline with an IP-Adapter.

    >>> anyms = AnyMS(pipe)
    >>> run = anyms.generate("a photo on grass", [Subject(cat, [0.1, 0.4, 0.5, 0.9]), Subject(dog, [0.5, 0.3, 0.95, 0.9])])
    """

    def __init__(self, pipe, model_name: str | None = None):
        self.pipe = pipe
        self.model_name = model_name or getattr(pipe, "anyms_model_name", type(pipe).__name__)

    def generate(
        self,
        prompt: str,
        subjects: Sequence[Subject],
        variant: str = "anyms",
        seed: int = 0,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        ip_adapter_scale: float | Sequence[float] | None = None,
        height: int | None = None,
        width: int | None = None,
        record: RecordConfig | bool | str | Sequence[str] | dict | None = True,
        previews: bool = True,
        negative_prompt: str | None = None,
        num_images_per_prompt: int = 1,
        priority_rule: str = "order",
        progress: bool = False,
        callback: Callable[[dict], None] | None = None,
    ) -> Run:
        """Generates one composition and returns a :class:`Run`.

        Arguments left as None take the pipeline's own defaults; the values actually used are in
        ``run.config``. ``seed`` seeds a CPU generator, so a seed gives the same image on any device.
        ``callback``, if given, is called after every denoising step with a plain dict (k-diffusion
        style): ``{"step", "num_steps", "elapsed", "preview"}`` (``preview``: the step's x0 preview or None).
        """
        pipe = self.pipe
        subjects = validate_subjects(subjects)
        record_config = RecordConfig.from_arg(record)
        call_kwargs = {
            key: value for key, value in dict(
                num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, height=height,
                width=width, negative_prompt=negative_prompt,
            ).items() if value is not None
        }
        step_times: list[float] = []
        start_time = [time.perf_counter()]
        preview_images: list[np.ndarray] = []

        with contextlib.ExitStack() as stack:
            session = stack.enter_context(decoupled(
                pipe, subjects, variant=variant, record=record_config, ip_adapter_scale=ip_adapter_scale,
                priority_rule=priority_rule, prompt=prompt,
            ))
            stack.enter_context(_progress_bar(pipe, enabled=progress))
            handle = pipe.unet.register_forward_hook(
                lambda module, args, kwargs, output: _on_unet_output(
                    pipe, args, kwargs, output, step_times, preview_images if previews else None, callback, start_time),
                with_kwargs=True,
            )
            stack.callback(handle.remove)
            start = start_time[0] = time.perf_counter()
            output = pipe(
                prompt, ip_adapter_image=session.ip_adapter_image, num_images_per_prompt=num_images_per_prompt,
                generator=torch.Generator("cpu").manual_seed(seed), **call_kwargs,
            )
            total = time.perf_counter() - start
        images = list(output.images)
        per_step = [b - a for a, b in zip([start] + step_times[:-1], step_times)]
        config = {
            "prompt": prompt,
            "negative_prompt": negative_prompt,
            "subjects": [
                {"name": name, "box": list(subject.box), "priority": subject.priority}
                for name, subject in zip(subject_names(subjects), subjects)
            ],
            "variant": variant,
            "seed": seed,
            "steps": len(step_times),
            "guidance_scale": float(getattr(pipe, "guidance_scale", guidance_scale or 0.0)),
            "ip_adapter_scale": ip_adapter_scale if ip_adapter_scale is None or isinstance(ip_adapter_scale, (int, float)) else list(ip_adapter_scale),
            "height": images[0].height,
            "width": images[0].width,
            "num_images_per_prompt": num_images_per_prompt,
            "priority_rule": priority_rule,
            "model": self.model_name,
            "record": None if record_config is None else asdict(record_config),
        }
        config = json.loads(json.dumps(config))  # exactly what Run.save writes and Run.load reads back
        timings = {"total": total, "per_step": per_step, "steps_per_s": len(per_step) / total if total > 0 else None}
        return Run(images, config, [s.image for s in subjects], session.attention, preview_images, timings)


@contextlib.contextmanager
def _progress_bar(pipe, enabled: bool):
    previous = dict(getattr(pipe, "_progress_bar_config", {}))
    pipe.set_progress_bar_config(**{**previous, "disable": not enabled})
    try:
        yield
    finally:
        pipe._progress_bar_config = previous


def _on_unet_output(pipe, args, kwargs, output, step_times: list[float], previews: list[np.ndarray] | None,
                    callback: Callable[[dict], None] | None, start_time: list[float]) -> None:
    step_times.append(time.perf_counter())
    preview = None
    if previews is not None:
        sample = args[0] if args else kwargs["sample"]
        timestep = args[1] if len(args) > 1 else kwargs["timestep"]
        prediction = output[0] if isinstance(output, tuple) else output.sample
        preview = _preview_rgb(pipe, predicted_clean_sample(pipe, sample, timestep, prediction))
        previews.append(preview)
    if callback is not None:
        callback({"step": len(step_times) - 1, "num_steps": len(pipe.scheduler.timesteps),
                  "elapsed": step_times[-1] - start_time[0], "preview": preview})


def predicted_clean_sample(pipe, sample: torch.Tensor, timestep, prediction: torch.Tensor) -> torch.Tensor:
    """x0 of the first image, from the UNet's input and (guided) output, for VP schedulers.

    For Euler-type schedulers the UNet input is x / sqrt(sigma^2 + 1), which is exactly the VP sample
    sqrt(a) x0 + sqrt(1 - a) eps, so one formula serves both.
    """
    if bool(getattr(pipe, "do_classifier_free_guidance", False)) and prediction.shape[0] > 1:
        uncond, cond = prediction.chunk(2)
        prediction = uncond + float(pipe.guidance_scale) * (cond - uncond)
        sample = sample.chunk(2)[1]
    sample, prediction = sample[:1].float(), prediction[:1].float()
    alphas = pipe.scheduler.alphas_cumprod
    t = int(round(float(timestep.flatten()[0] if torch.is_tensor(timestep) else timestep)))
    alpha = alphas[min(max(t, 0), len(alphas) - 1)].to(sample.device).float()
    if pipe.scheduler.config.prediction_type == "v_prediction":
        return alpha.sqrt() * sample - (1 - alpha).sqrt() * prediction
    if pipe.scheduler.config.prediction_type == "sample":
        return prediction
    return (sample - (1 - alpha).sqrt() * prediction) / alpha.sqrt()


def _preview_rgb(pipe, x0: torch.Tensor) -> np.ndarray:
    if hasattr(pipe, "preview_from_latents"):
        rgb = pipe.preview_from_latents(x0)[0]
    elif x0.shape[1] == 4:
        factors, bias = _LATENT_RGB["sdxl" if hasattr(pipe, "text_encoder_2") else "sd15"]
        weight = torch.tensor(factors, device=x0.device)
        rgb = torch.einsum("chw,cr->rhw", x0[0], weight) + torch.tensor(bias, device=x0.device)[:, None, None]
        rgb = (rgb + 1) / 2
    else:
        rgb = x0[0].mean(0, keepdim=True).expand(3, -1, -1) * 0.5 + 0.5
    height, width = rgb.shape[-2:]
    if max(height, width) > PREVIEW_MAX_SIDE:
        scale = PREVIEW_MAX_SIDE / max(height, width)
        rgb = F.interpolate(rgb[None], size=(max(1, round(height * scale)), max(1, round(width * scale))), mode="area")[0]
    return np.ascontiguousarray((rgb.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy())
