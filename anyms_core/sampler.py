"""``AnyMS(pipe).generate(...) -> Run``: the high-level call that notebooks and widgets use.

It opens a :func:`~anyms_core.session.decoupled` session, calls the pipeline as usual, and collects
what a visualisation needs: the image, the full config, the recorded attention, a small preview of
the predicted clean image (x0) at every step, and timings.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import inspect
import math
import time
import warnings
from dataclasses import asdict
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .config import RESERVED_PIPELINE_ARGS, RunConfig
from .layout import Subject, image_digest, subject_names, validate_subjects
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
        adapter_index: int = 0,
        other_adapter_images: Mapping[int, Any] | None = None,
        **pipeline_kwargs: Any,
    ) -> Run:
        """Generates one composition and returns a :class:`Run`.

        Arguments left as None take the pipeline's own defaults; the values actually used are in
        ``run.config`` (a :class:`~anyms_core.config.RunConfig`, validated before the pipeline runs).
        ``seed`` seeds a CPU generator, so a seed gives the same image on any device.
        ``pipeline_kwargs``: any further keyword argument of the pipeline's ``__call__`` (``image=``,
        ``strength=``, ``prompt_2=``, ``callback_on_step_end=`` ...), checked against its signature and
        recorded in ``run.config.pipeline`` (images by the hash of their pixels).
        ``callback``, if given, is called after every UNet call with a plain dict (k-diffusion style):
        ``{"step", "num_steps", "elapsed", "preview"}`` (``preview``: the x0 preview or None).
        ``adapter_index`` / ``other_adapter_images``: with several IP-Adapters loaded, which one holds the
        subjects and the others' images (see :func:`~anyms_core.session.decoupled`); not in ``run.config``.

        Steps: ``run.config.steps`` is the scheduler's ``num_inference_steps`` (what replays the run);
        previews, the callback and the attention maps count UNet calls, which are more for Heun/KDPM2
        (two per step) and PNDM (a warm-up call); ``run.timings["unet_calls"]`` says how many. Schedulers
        without ``alphas_cumprod`` (EDM) get no x0 previews (a warning says so).
        """
        pipe = self.pipe
        subjects = validate_subjects(subjects)
        record_config = RecordConfig.from_arg(record)
        pipeline_kwargs = check_pipeline_kwargs(pipe, pipeline_kwargs)
        requested = RunConfig(
            prompt=prompt, variant=variant, seed=seed,
            subjects=tuple(dataclasses.replace(subject.to_config(), name=name)
                           for subject, name in zip(subjects, subject_names(subjects))),
            steps=num_inference_steps, guidance_scale=guidance_scale, ip_adapter_scale=ip_adapter_scale,
            height=height, width=width, negative_prompt=negative_prompt, num_images_per_prompt=num_images_per_prompt,
            priority_rule=priority_rule, model=getattr(pipe, "anyms_model", None) or self.model_name,
            record=None if record_config is None else asdict(record_config),
            pipeline=describe_pipeline_kwargs(pipeline_kwargs),
        )
        call_kwargs = {
            key: value for key, value in dict(
                num_inference_steps=requested.steps, guidance_scale=requested.guidance_scale, height=requested.height,
                width=requested.width, negative_prompt=negative_prompt,
            ).items() if value is not None
        }
        observer = _StepObserver(pipe, previews, callback)

        with contextlib.ExitStack() as stack:
            session = stack.enter_context(decoupled(
                pipe, subjects, variant=variant, record=record_config, ip_adapter_scale=requested.ip_adapter_scale,
                priority_rule=priority_rule, prompt=prompt, adapter_index=adapter_index,
                other_adapter_images=other_adapter_images,
            ))
            stack.enter_context(_progress_bar(pipe, enabled=progress))
            stack.enter_context(observer.installed())
            start = observer.start = time.perf_counter()
            output = pipe(
                prompt, ip_adapter_image=session.ip_adapter_image, num_images_per_prompt=num_images_per_prompt,
                generator=torch.Generator("cpu").manual_seed(requested.seed), **call_kwargs, **pipeline_kwargs,
            )
            observer.finish()
            total = time.perf_counter() - start
        if observer.without_x0:
            warnings.warn(f"{type(pipe.scheduler).__name__} gives no x0 prediction and has no alphas_cumprod "
                          f"(an EDM/flow scheduler): per-step x0 previews are off for this run.", stacklevel=2)
        step_times, preview_images = observer.times, ([] if observer.without_x0 else observer.previews)
        images = list(output.images)
        per_step = [b - a for a, b in zip([start] + step_times[:-1], step_times)]
        # the scheduler's steps (what num_inference_steps means), not UNet calls: Heun/KDPM2 call it twice a step
        steps = requested.steps or getattr(pipe.scheduler, "num_inference_steps", None) or len(step_times)
        # as at the first UNet call: a callback may set pipe._guidance_scale = 0 mid-run (dynamic CFG)
        used_guidance = observer.first_guidance
        if used_guidance is None:
            used_guidance = getattr(pipe, "guidance_scale", guidance_scale)
        config = dataclasses.replace(
            requested, steps=int(steps),
            guidance_scale=None if used_guidance is None else float(used_guidance),
            height=images[0].height, width=images[0].width,
        )
        timings = {"total": total, "per_step": per_step, "steps_per_s": len(per_step) / total if total > 0 else None,
                   "unet_calls": len(step_times)}
        return Run(images, config, [s.image for s in subjects], session.attention, preview_images, timings)


    def generate_from_config(self, config: RunConfig, subjects: Sequence[Subject] | None = None, *,
                             record: RecordConfig | bool | str | Sequence[str] | dict | None | type(...) = ...,
                             previews: bool = True, progress: bool = False,
                             callback: Callable[[dict], None] | None = None, **pipeline_kwargs: Any) -> Run:
        """Generates what ``config`` describes (e.g. ``Run.load(path).config``, or a case file).

        ``subjects``: the subjects with their reference images; by default ``config``'s subjects must
        name image files (``image`` a path). ``pipeline_kwargs`` replace ``config.pipeline``, which is
        used as it is otherwise (its values must then be plain JSON values, not recorded hashes).
        ``record``: by default ``config.record``.
        """
        if not isinstance(config, RunConfig):
            raise TypeError(f"config must be a RunConfig, got {type(config).__name__}; use RunConfig.from_dict(...).")
        if subjects is None:
            subjects = [Subject(image=_config_image(s), box=s.box, name=s.name, priority=s.priority) for s in config.subjects]
        subjects = validate_subjects(subjects)
        if len(subjects) != len(config.subjects):
            raise ValueError(f"config has {len(config.subjects)} subjects, got {len(subjects)} Subject(s).")
        for index, (subject, expected) in enumerate(zip(subjects, config.subjects)):
            if tuple(subject.box) != tuple(expected.box) or subject.priority != expected.priority:
                raise ValueError(f"subjects[{index}] has box {list(subject.box)} and priority {subject.priority}, "
                                 f"but config.subjects[{index}] has {list(expected.box)} and {expected.priority}.")
        if not pipeline_kwargs:
            recorded = sorted(name for name, value in config.pipeline.items() if isinstance(value, dict)
                              and ({"sha256", "callable", "repr", "path"} & set(value)))
            if recorded:
                raise ValueError(f"config.pipeline records {recorded} by hash, name or path: pass them again as keywords.")
            pipeline_kwargs = dict(config.pipeline)
        return self.generate(
            config.prompt, subjects, variant=config.variant, seed=config.seed, num_inference_steps=config.steps,
            guidance_scale=config.guidance_scale, ip_adapter_scale=config.ip_adapter_scale, height=config.height,
            width=config.width, record=config.record if record is ... else record, previews=previews,
            negative_prompt=config.negative_prompt, num_images_per_prompt=config.num_images_per_prompt,
            priority_rule=config.priority_rule, progress=progress, callback=callback, **pipeline_kwargs,
        )


def _config_image(subject) -> str:
    if subject.image is None or subject.image.startswith(("sha256:", "toy:")):
        if subject.image and subject.image.startswith("toy:"):
            from .toy import sprite_reference

            return sprite_reference(subject.image.removeprefix("toy:").strip())
        raise ValueError(f"subject {subject.name!r} has no image file in the config ({subject.image!r}): "
                         "pass subjects= with its reference image.")
    return subject.image


def check_pipeline_kwargs(pipe, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Checks extra keyword arguments against the pipeline's ``__call__`` signature; a ``TypeError`` names
    any that it does not accept (or that generate() sets itself)."""
    reserved = sorted(set(kwargs) & set(RESERVED_PIPELINE_ARGS))
    if reserved:
        raise TypeError("generate() sets " + "; ".join(f"{name!r} itself ({RESERVED_PIPELINE_ARGS[name]})" for name in reserved) + ".")
    parameters = inspect.signature(pipe.__call__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return dict(kwargs)
    unknown = sorted(set(kwargs) - set(parameters))
    if unknown:
        accepted = sorted(set(parameters) - set(RESERVED_PIPELINE_ARGS) - {"self"})
        raise TypeError(f"{type(pipe).__name__}.__call__ does not take {unknown}; it takes {accepted}.")
    return dict(kwargs)


def describe_pipeline_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """A JSON-able record of extra pipeline arguments: plain values as they are, images and tensors by
    the hash of their contents, callables by name (these cannot be replayed from the record alone)."""
    return {name: _describe(value) for name, value in kwargs.items()}


def _describe(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, Image.Image):
        return {"sha256": image_digest(value.convert("RGB")), "size": list(value.size)}
    if isinstance(value, (torch.Tensor, np.ndarray)):
        array = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else value
        return {"sha256": "sha256:" + hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest(),
                "shape": list(array.shape), "dtype": str(value.dtype)}
    if isinstance(value, dict):
        return {str(k): _describe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_describe(v) for v in value]
    if callable(value):
        return {"callable": getattr(value, "__qualname__", type(value).__name__)}
    return {"repr": repr(value)}


@contextlib.contextmanager
def _progress_bar(pipe, enabled: bool):
    previous = dict(getattr(pipe, "_progress_bar_config", {}))
    pipe.set_progress_bar_config(**{**previous, "disable": not enabled})
    try:
        yield
    finally:
        pipe._progress_bar_config = previous


class _StepObserver:
    """Per UNet call: the time, an x0 preview and the user's callback.

    The preview is the scheduler's own x0 (``pred_original_sample`` of its ``step`` output) where it gives
    one (DDIM, Euler, Heun, LMS, EDM Euler ...), else the VP formula of :func:`predicted_clean_sample`
    from the UNet's input and output (schedulers with ``alphas_cumprod``); with neither, previews are off.
    """

    def __init__(self, pipe, previews: bool, callback: Callable[[dict], None] | None):
        self.pipe, self.previews_on, self.callback = pipe, previews, callback
        self.times: list[float] = []
        self.previews: list[np.ndarray] = []
        self.without_x0 = False
        self.first_guidance: float | None = None  # pipe.guidance_scale at the first UNet call
        self.start = time.perf_counter()
        self._pending: tuple | None = None

    @contextlib.contextmanager
    def installed(self):
        pipe = self.pipe
        handle = pipe.unet.register_forward_hook(self._after_unet, with_kwargs=True)
        scheduler = pipe.scheduler
        had_own_step = "step" in vars(scheduler)
        original_step = scheduler.step
        signature = inspect.signature(original_step)

        @functools.wraps(original_step)  # keeps its signature: pipelines pass generator= only if step() names it
        def step(*args, **kwargs):
            if not active:  # left behind by interleaved generate() calls: pass through
                return original_step(*args, **kwargs)
            # ask for the output object (same computation) to read its named x0, then answer as asked
            bound = signature.bind(*args, **kwargs)
            wants_dict = bound.arguments.get("return_dict", True)
            bound.arguments["return_dict"] = True
            result = original_step(*bound.args, **bound.kwargs)
            self._finish(getattr(result, "pred_original_sample", None))
            return result if wants_dict else result.to_tuple()

        active = True
        scheduler.step = step
        try:
            yield self
        finally:
            active = False
            handle.remove()
            if vars(scheduler).get("step") is step:  # else someone wrapped it after us: theirs to restore
                if had_own_step:
                    scheduler.step = original_step
                else:
                    del scheduler.step

    def _after_unet(self, module, args, kwargs, output) -> None:
        self._finish(None)  # a UNet call whose scheduler step never came (a custom loop)
        if not self.times:
            self.first_guidance = getattr(self.pipe, "guidance_scale", None)
        self.times.append(time.perf_counter())
        sample = args[0] if args else kwargs["sample"]
        timestep = args[1] if len(args) > 1 else kwargs["timestep"]
        prediction = output[0] if isinstance(output, tuple) else output.sample
        self._pending = (sample, timestep, prediction)

    def finish(self) -> None:
        self._finish(None)

    def _finish(self, own_x0: torch.Tensor | None) -> None:
        if self._pending is None:
            return
        sample, timestep, prediction = self._pending
        self._pending = None
        preview = None
        if self.previews_on and not self.without_x0:
            if own_x0 is not None:
                x0 = own_x0[:1].float()
            elif getattr(self.pipe.scheduler, "alphas_cumprod", None) is not None:
                x0 = predicted_clean_sample(self.pipe, sample, timestep, prediction)
            else:
                x0 = None
                self.without_x0 = True
            if x0 is not None:
                preview = _preview_rgb(self.pipe, x0)
                self.previews.append(preview)
        if self.callback is not None:
            self.callback({"step": len(self.times) - 1, "num_steps": len(self.pipe.scheduler.timesteps),
                           "elapsed": self.times[-1] - self.start, "preview": preview})


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
        dy, dx = getattr(pipe, "fold_shift", (0, 0))  # the toy pipeline's UNet may run on a rolled image
        if (dy, dx) != (0, 0):
            rgb = torch.roll(rgb, shifts=(-dy, -dx), dims=(-2, -1))
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
