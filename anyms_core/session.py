"""A scoped session that installs the AnyMS processors on a diffusers pipeline and always removes them.

    with anyms_core.decoupled(pipe, subjects, variant="anyms", record=True) as session:
        image = pipe(prompt, ip_adapter_image=session.ip_adapter_image).images[0]
    session.attention.maps("affinity")

Hooks are global state (TransformerLens's lesson): everything installed here is undone in
``finally``, also when the pipeline raises. What the user changes on the pipeline inside the block is
kept on exit, never silently undone: ``set_ip_adapter_scale`` acts on the adapter itself,
``unload_ip_adapter()`` stays unloaded, and processors set inside the block (``enable_attention_slicing()``,
``fuse_qkv_projections()``, ``set_attn_processor``) stay set. A UNet call made after such a change while
an IP-Adapter is still loaded is refused with an error saying why (stock diffusers fails there too).
"""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator, Mapping, Sequence

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

    def __init__(self, subjects: list[Subject], state: DecoupledState, recorder: AttentionRecorder | None,
                 other_adapter_images: Mapping[int, object] | None = None):
        self.subjects = subjects
        self.state = state
        self.recorder = recorder
        self.other_adapter_images = dict(other_adapter_images or {})

    @property
    def ip_adapter_image(self) -> list:
        """The pipeline's ``ip_adapter_image``: one entry per loaded adapter, in load order; the decoupled
        adapter's entry is the subjects' images (one per subject), the others' are ``other_adapter_images``."""
        count = len(self.other_adapter_images) + 1
        return [[subject.image for subject in self.subjects] if index == self.state.adapter_index
                else self.other_adapter_images[index] for index in range(count)]

    @property
    def variant(self) -> str:
        return self.state.variant

    @property
    def attention(self) -> AttentionMaps | None:
        """The recorded maps so far (None when recording is off)."""
        return None if self.recorder is None else self.recorder.finish()


def check_pipeline(pipe, adapter_index: int = 0) -> tuple[dict[str, object], int]:
    """Returns the UNet's IP-Adapter processors and how many adapters are loaded, or raises a ``ValueError``
    saying what is missing."""
    unet = getattr(pipe, "unet", None)
    if unet is None or not hasattr(unet, "attn_processors"):
        raise ValueError(f"{type(pipe).__name__} has no diffusers UNet (`pipe.unet`); AnyMS needs an SD1.5/SDXL-style pipeline.")
    stock = replaceable_processors(unet.attn_processors)
    if not stock and getattr(unet, "encoder_hid_proj", None) is not None:
        cross = sorted({type(p).__name__ for name, p in unet.attn_processors.items() if name.endswith("attn2.processor")})
        raise ValueError(
            f"An IP-Adapter is loaded, but its cross-attention processors were replaced by {', '.join(cross)} "
            "(pipe.enable_attention_slicing() and pipe.fuse_qkv_projections() do that); these drop the image "
            "tokens, so stock diffusers fails with this adapter too. pipe.unfuse_qkv_projections() brings the "
            "adapter's processors back; after attention slicing, load the adapter again (pipe.load_ip_adapter)."
        )
    if not stock:
        raise ValueError(
            "The pipeline has no IP-Adapter loaded: call pipe.load_ip_adapter(...) first "
            "(see anyms_core.models.load_sdxl_with_ip_adapter)."
        )
    adapters = {len(p.to_k_ip) for p in stock.values()}
    if len(adapters) != 1:
        raise ValueError(f"The UNet's layers hold different numbers of IP-Adapters ({sorted(adapters)}); load them again.")
    count = adapters.pop()
    if not isinstance(adapter_index, int) or not 0 <= adapter_index < count:
        raise ValueError(f"adapter_index={adapter_index!r}, but {count} IP-Adapter(s) are loaded: choose 0..{count - 1}.")
    return stock, count


def check_other_adapter_images(other_adapter_images: Mapping[int, object] | None, adapter_index: int,
                               count: int) -> dict[int, object]:
    """The images of the adapters AnyMS does not decouple, keyed by adapter index: exactly one entry each."""
    given = dict(other_adapter_images or {})
    others = [index for index in range(count) if index != adapter_index]
    if sorted(given) != others:
        raise ValueError(
            f"{count} IP-Adapters are loaded and AnyMS decouples adapter {adapter_index} (adapter_index): pass "
            f"other_adapter_images with one entry (an image or a list of images) for each of the others, keys "
            f"{others}; got keys {sorted(given)}."
        )
    return given


@contextlib.contextmanager
def decoupled(
    pipe,
    subjects: Sequence[Subject],
    variant: str = "anyms",
    record: RecordConfig | bool | str | Sequence[str] | dict | None = None,
    ip_adapter_scale: float | Sequence[float] | None = None,
    priority_rule: str = "order",
    prompt: str | None = None,
    adapter_index: int = 0,
    other_adapter_images: Mapping[int, object] | None = None,
) -> Iterator[DecoupledSession]:
    """Installs AnyMS attention processors on ``pipe`` for the duration of the ``with`` block.

    Args:
        pipe: a diffusers SD1.5 / SDXL-style pipeline with one or more IP-Adapters loaded.
        subjects: the subjects, each a reference image and a normalized box.
        variant: ``"anyms"`` (crop-and-merge), ``"mask"``, ``"none"``, ``"joint"`` or ``"text"``.
        record: what attention to record (see :class:`~anyms_core.recording.RecordConfig`); None = off.
        ip_adapter_scale: one scale or one per subject; None keeps the adapter's own scale.
        priority_rule: who owns overlaps when subjects set no ``priority``: ``"order"`` (later wins)
            or ``"area"`` (smaller box wins).
        prompt: the prompt, needed only to locate the words of ``text`` maps.
        adapter_index: with several IP-Adapters loaded, the one (in load order) whose images are the subjects;
            the others keep diffusers' behaviour (their images attended everywhere, with their own scale).
        other_adapter_images: the other adapters' images, ``{index: image or [images]}``; required when
            several adapters are loaded. ``session.ip_adapter_image`` then lists every adapter's images.
    """
    check_variant(variant)
    if priority_rule not in PRIORITY_RULES:
        raise ValueError(f"Unknown priority rule {priority_rule!r}; choose one of {PRIORITY_RULES}.")
    subjects = validate_subjects(subjects)
    stock, adapter_count = check_pipeline(pipe, adapter_index)
    other_adapter_images = check_other_adapter_images(other_adapter_images, adapter_index, adapter_count)
    config = RecordConfig.from_arg(record)

    state = DecoupledState(
        variant=variant,
        boxes=[list(subject.box) for subject in subjects],
        paint_order=paint_order(subjects, priority_rule),
        subject_scales=sequence_of_floats(ip_adapter_scale, len(subjects), "ip_adapter_scale"),
        adapter_index=adapter_index,
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
        installed = {
            name: AnyMSAttnProcessor(stock[name.removesuffix(".processor")], name.removesuffix(".processor"), state)
            if name.removesuffix(".processor") in stock else processor
            for name, processor in original.items()
        }
        modules = {name: unet.get_submodule(name.removesuffix(".processor")) for name in original}
        ours = [(modules[name], processor) for name, processor in installed.items()
                if isinstance(processor, AnyMSAttnProcessor)]

        @torch._dynamo.disable  # layout tensors are built here, outside any compiled graph
        def before_unet(module, args, kwargs):
            replaced = [layer for layer, processor in ours if layer.processor is not processor]
            if replaced and getattr(unet, "encoder_hid_proj", None) is not None:
                raise RuntimeError(
                    f"The AnyMS processors of {len(replaced)} layers were replaced inside the `with decoupled(...)` "
                    f"block (now {type(replaced[0].processor).__name__}: pipe.enable_attention_slicing(), "
                    "fuse_qkv_projections() or set_attn_processor() do that), so the subjects cannot be placed; "
                    "stock diffusers cannot run the IP-Adapter with them either. Your processors stay set when the "
                    "block ends; undo that change inside the block, or make it outside any session."
                )
            sample = args[0] if args else kwargs["sample"]
            state.prepare(sample.shape[-2:], sample.device, sample.dtype)
            if recorder is not None:
                recorder.begin_step(sample.shape[0], guided=bool(getattr(pipe, "do_classifier_free_guidance", False)))

        handle = unet.register_forward_pre_hook(before_unet, with_kwargs=True)
        try:
            unet.set_attn_processor(dict(installed))  # diffusers empties the dict it is given
            yield DecoupledSession(subjects, state, recorder, other_adapter_images)
        finally:
            handle.remove()
            # Put back what we found, except where the user set something else inside the block.
            unet.set_attn_processor({
                name: original[name] if modules[name].processor is installed[name] else modules[name].processor
                for name in original
            })
            saved = getattr(unet, "original_attn_processors", None)  # kept by fuse_qkv_projections() for unfuse
            if isinstance(saved, dict) and any(isinstance(p, AnyMSAttnProcessor) for p in saved.values()):
                unet.original_attn_processors = {
                    name: original[name] if isinstance(p, AnyMSAttnProcessor) and name in original else p
                    for name, p in saved.items()
                }
            if recorder is not None:
                recorder.finish()
    finally:
        with _OPEN_SESSIONS_LOCK:
            _OPEN_SESSIONS.discard(id(unet))
