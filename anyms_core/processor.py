"""The AnyMS attention processor: text cross-attention plus locally decoupled image cross-attention.

This is the file to read. One call of :class:`AnyMSAttnProcessor` computes, for one cross-attention
layer of the UNet (paper Sec. 3.3):

    Z_out = Z_text + Z_image                                              (Eq. 3, global decoupling)

where ``Z_text`` is the ordinary text cross-attention and ``Z_image`` depends on the variant:

- ``anyms`` (crop-and-merge, Eq. 5-6): for each subject j, only the queries inside its box B_j are
  cropped out (one gather for all boxes, padded to the largest box) and attend to subject j's image
  tokens; the results are merged back so that each cell takes the row of the subject that owns it
  (the higher priority where boxes overlap). Outside all boxes ``Z_image`` is exactly zero.
- ``mask`` (Eq. 7, "w/o crop and merge"): every query attends to each subject separately, each
  output is multiplied by its hard box mask, and the results are summed (overlaps get the sum).
- ``none`` ("w/o local decoupling"): each subject's own attention, summed everywhere.
- ``joint``: diffusers' stock multi-image behaviour: all subjects' tokens share one softmax.
- ``text``: no image branch (the text-only baseline).

Everything a processor needs to know about the layout lives on a :class:`DecoupledState` shared by
all processors of a session (diffusers drops unknown ``cross_attention_kwargs``, so layout cannot
travel there). What a processor observes is handed to ``state.recorder``; with no recorder the
processor does no extra work.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, IPAdapterAttnProcessor2_0

from .layout import GridLayout, level_grid

if TYPE_CHECKING:
    from .recording import AttentionRecorder

VARIANTS = ("anyms", "mask", "none", "joint", "text")


@dataclass
class DecoupledState:
    """Layout and run-time facts shared by all AnyMS processors of one session."""

    variant: str
    boxes: list[list[float]]
    paint_order: list[int]
    subject_scales: list[float] | None = None
    recorder: "AttentionRecorder | None" = None
    # Set by the session's UNet pre-hook before every UNet call.
    latent_size: tuple[int, int] | None = None
    record_batch_index: int = 0
    _grids: dict = field(default_factory=dict, repr=False)

    def grid_layout(self, sequence_length: int) -> GridLayout:
        if self.latent_size is None:
            raise RuntimeError("The AnyMS processors ran outside a UNet call of the session that installed them.")
        key = (self.latent_size, sequence_length)
        if key not in self._grids:
            height, width = level_grid(*self.latent_size, sequence_length)
            self._grids[key] = GridLayout.build(self.boxes, self.paint_order, height, width)
        return self._grids[key]


class AnyMSAttnProcessor(IPAdapterAttnProcessor2_0):
    """Replaces diffusers' ``IPAdapterAttnProcessor2_0`` on a cross-attention layer.

    It shares (does not copy) the adapter's ``to_k_ip`` / ``to_v_ip`` with the processor it replaces,
    so ``pipe.set_ip_adapter_scale`` and ``pipe.unload_ip_adapter`` keep working.
    """

    def __init__(self, stock: IPAdapterAttnProcessor2_0, layer_name: str, state: DecoupledState):
        torch.nn.Module.__init__(self)
        self.hidden_size = stock.hidden_size
        self.cross_attention_dim = stock.cross_attention_dim
        self.num_tokens = stock.num_tokens
        self.scale = stock.scale
        self.to_k_ip = stock.to_k_ip
        self.to_v_ip = stock.to_v_ip
        self.layer_name = layer_name
        self.state = state

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: tuple[torch.Tensor, list[torch.Tensor]] | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        scale: float = 1.0,
        ip_adapter_masks: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if not isinstance(encoder_hidden_states, tuple):
            raise ValueError(
                f"{self.layer_name}: AnyMS expects encoder_hidden_states as (text_embeds, [image_embeds]); "
                "call the pipeline with the session's ip_adapter_image."
            )
        if ip_adapter_masks is not None:
            raise ValueError("AnyMS places subjects by their boxes; do not pass ip_adapter_masks as well.")
        text_states, (image_states,) = encoder_hidden_states
        state = self.state
        residual = hidden_states

        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, num_queries, _ = hidden_states.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, text_states.shape[1], batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        # --- Text cross-attention (Eq. 2): Z_text = softmax(Q K_text^T / sqrt(d)) V_text --------------
        query = attn.to_q(hidden_states)
        if attn.norm_cross:
            text_states = attn.norm_encoder_hidden_states(text_states)
        key = attn.to_k(text_states)
        value = attn.to_v(text_states)
        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        hidden_states = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)

        recorder = state.recorder if state.recorder is not None and state.recorder.wants(self.layer_name) else None
        if recorder is not None and recorder.words:
            recorder.observe_text(self.layer_name, state, query, key)

        # --- Image cross-attention (Eq. 4): each subject's keys and values from the adapter ----------
        num_subjects = len(state.boxes)
        if image_states.shape[1] != num_subjects:
            raise ValueError(
                f"{self.layer_name}: got {image_states.shape[1]} reference images for {num_subjects} subjects; "
                "pass the session's ip_adapter_image (one image per subject, in the subjects' order)."
            )
        scales = self._subject_scales(num_subjects)
        if state.variant != "text" and any(s != 0 for s in scales):
            # [B, S, T, D] -> per-head keys/values [B, heads, S*T, head_dim]; subject j owns tokens j*T:(j+1)*T.
            num_tokens = image_states.shape[2]
            image_key = self.to_k_ip[0](image_states).view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
            image_value = self.to_v_ip[0](image_states).view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
            subject_keys = image_key.split(num_tokens, dim=2)
            subject_values = image_value.split(num_tokens, dim=2)

            if state.variant == "joint":
                # One softmax over all subjects' tokens: subjects compete for every query.
                if len(set(scales)) > 1:
                    raise ValueError("The `joint` variant mixes all subjects in one softmax: it takes one scale, not one per subject.")
                joint = F.scaled_dot_product_attention(query, image_key, image_value)
                joint = joint.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim).to(query.dtype)
                hidden_states = hidden_states + scales[0] * joint
                if recorder is not None:
                    recorder.observe_joint_contributions(self.layer_name, state, query, subject_keys, subject_values, scales[0])
            elif state.variant == "none":
                contributions = []
                for j in range(num_subjects):
                    z_j = self._attend(query, subject_keys[j], subject_values[j], batch_size, attn.heads * head_dim)
                    contributions.append(_scaled(z_j, scales[j]))
                    hidden_states = hidden_states + contributions[-1]
                if recorder is not None:
                    recorder.observe_contributions(self.layer_name, state, contributions)
            elif state.variant == "mask":
                # Eq. 7: Z_image = sum_j (softmax(Q K_j^T / sqrt(d)) V_j) * M_j, each query attends to every subject.
                layout = state.grid_layout(num_queries)
                masks = layout.masks_on(query.device, query.dtype)
                contributions = []
                for j in range(num_subjects):
                    z_j = self._attend(query, subject_keys[j], subject_values[j], batch_size, attn.heads * head_dim)
                    masked = _scaled(z_j * masks[j][None, :, None], scales[j])
                    contributions.append(masked)
                    hidden_states = hidden_states + masked
                if recorder is not None:
                    recorder.observe_contributions(self.layer_name, state, contributions)
            elif state.variant == "anyms":
                # Eq. 5-6, crop-and-merge. Crop: the queries inside each box B_j (one gather for all boxes);
                # each crop attends only to its own subject's tokens. Merge: every cell takes the row of the
                # subject that owns it (priority resolved when the layout was built); zero outside all boxes.
                layout = state.grid_layout(num_queries)
                crop_rows, merge_rows = layout.crop_and_merge_on(query.device)
                cropped = query[:, :, crop_rows].flatten(1, 2)  # [B, heads * S, L, d]
                keys = image_key.unflatten(2, (num_subjects, num_tokens)).flatten(1, 2)  # [B, heads * S, T, d]
                values = image_value.unflatten(2, (num_subjects, num_tokens)).flatten(1, 2)
                z = F.scaled_dot_product_attention(cropped, keys, values).unflatten(1, (attn.heads, num_subjects))
                if len(set(scales)) == 1:
                    z = _scaled(z, scales[0])  # the usual case: a Python scalar, no tensor built per call
                else:
                    z = z * torch.tensor(scales, device=z.device, dtype=z.dtype)[:, None, None]
                z = z.permute(0, 2, 3, 1, 4).reshape(batch_size, -1, attn.heads * head_dim)  # [B, S * L, C]
                z = torch.cat([z, z.new_zeros(batch_size, 1, z.shape[-1])], dim=1)
                image_part = z[:, merge_rows]  # [B, N, C]
                hidden_states = hidden_states + image_part
                if recorder is not None:
                    recorder.observe_owned_contributions(self.layer_name, state, layout, image_part)
            else:
                raise ValueError(f"Unknown AnyMS variant {state.variant!r}; choose one of {VARIANTS}.")

            if recorder is not None and "affinity" in recorder.kinds:
                recorder.observe_affinity(self.layer_name, state, query, image_key, num_subjects)

        # --- Output projection, exactly as in diffusers' processor ---------------------------------
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        hidden_states = hidden_states / attn.rescale_output_factor
        return hidden_states

    @staticmethod
    def _attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, batch_size: int, inner_dim: int) -> torch.Tensor:
        """softmax(Q K^T / sqrt(d)) V for one subject, merged back to [B, queries, heads * head_dim]."""
        out = F.scaled_dot_product_attention(query, key, value)
        return out.transpose(1, 2).reshape(batch_size, -1, inner_dim).to(query.dtype)

    def _subject_scales(self, num_subjects: int) -> list[float]:
        """Per-subject scales: the session's, else the adapter scale set by ``pipe.set_ip_adapter_scale``."""
        if self.state.subject_scales is not None:
            return self.state.subject_scales
        adapter_scale = self.scale[0]
        if isinstance(adapter_scale, list):
            if len(adapter_scale) != num_subjects:
                raise ValueError(
                    f"set_ip_adapter_scale gave {len(adapter_scale)} per-image scales for {num_subjects} subjects."
                )
            return [float(s) for s in adapter_scale]
        return [float(adapter_scale)] * num_subjects


def _scaled(tensor: torch.Tensor, scale: float) -> torch.Tensor:
    """scale * tensor, skipping the multiplication (one kernel launch per subject and layer) at 1.0."""
    return tensor if scale == 1.0 else scale * tensor


def replaceable_processors(processors: dict[str, object]) -> dict[str, IPAdapterAttnProcessor2_0]:
    """The IP-Adapter cross-attention processors of a UNet, by diffusers module name (``...attn2``)."""
    return {
        name.removesuffix(".processor"): processor
        for name, processor in processors.items()
        if isinstance(processor, IPAdapterAttnProcessor2_0)
    }


def check_variant(variant: str) -> str:
    if variant not in VARIANTS:
        raise ValueError(f"Unknown AnyMS variant {variant!r}; choose one of {VARIANTS}.")
    return variant


def sequence_of_floats(values: float | Sequence[float] | None, count: int, what: str) -> list[float] | None:
    if values is None:
        return None
    if isinstance(values, (int, float)):
        return [float(values)] * count
    values = [float(v) for v in values]
    if len(values) != count:
        raise ValueError(f"{what} has {len(values)} values for {count} subjects.")
    return values
