"""A scoped session that installs the AnyMS processors on a diffusers pipeline and always removes them.

    with anyms_core.decoupled(pipe, subjects, variant="anyms", record=True) as session:
        image = pipe(prompt, ip_adapter_image=session.ip_adapter_image).images[0]
    session.attention.maps("affinity")

Hooks are global state (TransformerLens's lesson): everything installed here is undone in
``finally``, also when the pipeline raises.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator, Sequence

import torch
from PIL import Image

from .layout import PRIORITY_RULES, Subject, paint_order, subject_names, validate_subjects
from .processor import AnyMSAttnProcessor, DecoupledState, replaceable_processors, sequence_of_floats
from .recording import AttentionMaps, AttentionRecorder, RecordConfig, find_word_tokens
from .variants import check_variant

# UNets (by id) that have a session open right now. One session per pipeline: a second one (nested, or
# from another thread) is refused before it touches anything, so the first restores exactly what it found.
_OPEN_SESSIONS: set[int] = set()
_OPEN_SESSIONS_LOCK = threading.Lock()


class DecoupledSession:
    """What :func:`decoupled` yields: the inputs to pass to the pipeline and, afterwards, the maps."""

    def __init__(self, subjects: list[Subject], state: DecoupledState, recorder: AttentionRecorder | None):
        self.subjects = subjects
        self.state = state
        self.recorder = recorder

    @property
    def ip_adapter_image(self) -> list[list[Image.Image]]:
        """The subjects' reference images as diffusers expects them: one adapter, one image per subject."""
        return [[subject.image for subject in self.subjects]]

    @property
    def variant(self) -> str:
        return self.state.variant

    @property
    def attention(self) -> AttentionMaps | None:
        """The recorded maps so far (None when recording is off)."""
        return None if self.recorder is None else self.recorder.finish()


def check_pipeline(pipe) -> dict[str, object]:
    """Returns the UNet's IP-Adapter processors, or raises a ``ValueError`` saying what is missing."""
    unet = getattr(pipe, "unet", None)
    if unet is None or not hasattr(unet, "attn_processors"):
        raise ValueError(f"{type(pipe).__name__} has no diffusers UNet (`pipe.unet`); AnyMS needs an SD1.5/SDXL-style pipeline.")
    stock = replaceable_processors(unet.attn_processors)
    if not stock:
        raise ValueError(
            "The pipeline has no IP-Adapter loaded: call pipe.load_ip_adapter(...) first "
            "(see anyms_core.models.load_sdxl_with_ip_adapter)."
        )
    adapters = {len(p.to_k_ip) for p in stock.values()}
    if adapters != {1}:
        raise ValueError(f"AnyMS uses exactly one IP-Adapter; this pipeline has {sorted(adapters)} loaded.")
    return stock


@contextlib.contextmanager
def decoupled(
    pipe,
    subjects: Sequence[Subject],
    variant: str = "anyms",
    record: RecordConfig | bool | str | Sequence[str] | dict | None = None,
    ip_adapter_scale: float | Sequence[float] | None = None,
    priority_rule: str = "order",
    prompt: str | None = None,
) -> Iterator[DecoupledSession]:
    """Installs AnyMS attention processors on ``pipe`` for the duration of the ``with`` block.

    Args:
        pipe: a diffusers SD1.5 / SDXL-style pipeline with one IP-Adapter loaded.
        subjects: the subjects, each a reference image and a normalized box.
        variant: ``"anyms"`` (crop-and-merge), ``"mask"``, ``"none"``, ``"joint"`` or ``"text"``.
        record: what attention to record (see :class:`~anyms_core.recording.RecordConfig`); None = off.
        ip_adapter_scale: one scale or one per subject; None keeps the adapter's own scale.
        priority_rule: who owns overlaps when subjects set no ``priority``: ``"order"`` (later wins)
            or ``"area"`` (smaller box wins).
        prompt: the prompt, needed only to locate the words of ``text`` maps.
    """
    check_variant(variant)
    if priority_rule not in PRIORITY_RULES:
        raise ValueError(f"Unknown priority rule {priority_rule!r}; choose one of {PRIORITY_RULES}.")
    subjects = validate_subjects(subjects)
    stock = check_pipeline(pipe)
    config = RecordConfig.from_arg(record)

    state = DecoupledState(
        variant=variant,
        boxes=[list(subject.box) for subject in subjects],
        paint_order=paint_order(subjects, priority_rule),
        subject_scales=sequence_of_floats(ip_adapter_scale, len(subjects), "ip_adapter_scale"),
    )
    recorder = None
    if config is not None:
        word_tokens = {}
        if config.words:
            if prompt is None:
                raise ValueError("Recording text maps needs the prompt: pass prompt= to decoupled().")
            word_tokens = find_word_tokens(pipe.tokenizer, prompt, config.words)
        recorder = AttentionRecorder(config, subject_names(subjects), word_tokens)
        state.recorder = recorder

    unet = pipe.unet
    with _OPEN_SESSIONS_LOCK:
        if id(unet) in _OPEN_SESSIONS or any(isinstance(p, AnyMSAttnProcessor) for p in unet.attn_processors.values()):
            raise RuntimeError(
                "This pipeline already has an AnyMS session open (decoupled() cannot nest or run from two threads "
                "on one pipeline); leave the first `with` block before opening another."
            )
        _OPEN_SESSIONS.add(id(unet))
    try:
        original = dict(unet.attn_processors)
        replaced = {
            name: AnyMSAttnProcessor(stock[name.removesuffix(".processor")], name.removesuffix(".processor"), state)
            if name.removesuffix(".processor") in stock else processor
            for name, processor in original.items()
        }

        @torch._dynamo.disable  # layout tensors are built here, outside any compiled graph
        def before_unet(module, args, kwargs):
            sample = args[0] if args else kwargs["sample"]
            state.prepare(sample.shape[-2:], sample.device, sample.dtype)
            if recorder is not None:
                recorder.begin_step(sample.shape[0], guided=bool(getattr(pipe, "do_classifier_free_guidance", False)))

        handle = unet.register_forward_pre_hook(before_unet, with_kwargs=True)
        try:
            unet.set_attn_processor(replaced)
            yield DecoupledSession(subjects, state, recorder)
        finally:
            handle.remove()
            unet.set_attn_processor(original)
            if recorder is not None:
                recorder.finish()
    finally:
        with _OPEN_SESSIONS_LOCK:
            _OPEN_SESSIONS.discard(id(unet))
