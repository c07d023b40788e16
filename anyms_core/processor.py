"""The AnyMS attention processor: text cross-attention plus locally decoupled image cross-attention.

This is the file to read. One call of :class:`AnyMSAttnProcessor` computes, for one cross-attention
layer of the UNet (paper Sec. 3.3):

    Z_out = Z_text + Z_image                                              (Eq. 3, global decoupling)

where ``Z_text`` is the ordinary text cross-attention and ``Z_image`` is computed by the variant's
image branch, one small function each, chosen once when the session is built:

- ``anyms`` -> :func:`crop_and_merge` (Eq. 5-6): for each subject j, only the queries inside its box
  B_j are cropped out (one gather for all boxes, padded to the largest box) and attend to subject j's
  image tokens; the results are merged back so that each cell takes the row of the subject that owns
  it (the higher priority where boxes overlap). Outside all boxes ``Z_image`` is exactly zero.
- ``mask`` -> :func:`masked_sum` (Eq. 7, "w/o crop and merge"): every query attends to each subject
  separately, each output is multiplied by its hard box mask, and the results are summed.
- ``none`` -> :func:`global_sum` ("w/o local decoupling"): each subject's own attention, summed everywhere.
- ``joint`` -> :func:`joint_softmax`: diffusers' stock multi-image behaviour, one softmax over all subjects.
- ``text``: no image branch (the text-only baseline).

With several IP-Adapters loaded (a style adapter next to the subjects' one, say), only the adapter named
by ``adapter_index`` is decoupled; each other adapter is added exactly as diffusers adds it.

The layout reaches the processors as tensors only: a :class:`DecoupledState`, shared by all
processors of a session, holds per UNet level (keyed by the number of queries) the box masks and the
crop/merge index tensors, built once per latent size outside any compiled graph. ``torch.compile``
therefore sees them as graph inputs, not constants: a UNet compiled once runs any layout with the
same number of subjects without recompiling (the crop length, the largest box's cell count, is marked
dynamic), also across sessions. What does recompile, once each, because it changes the maths or the
shapes: another number of subjects, another variant, recording switched on or off, another latent
size, other per-subject scales (Python floats, as in diffusers' own processor). Under CUDA graphs
(``mode="reduce-overhead"``) a new crop length means a new graph recording, not a recompilation (not yet
measured on a GPU).
What a processor observes is handed to ``state.recorder`` (see :mod:`anyms_core.recording`); with no
recorder the processor does no extra work.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, IPAdapterAttnProcessor2_0

from .layout import GridLayout
from .variants import VARIANTS, check_variant

MAX_LEVELS = 16


class Level:
    """One UNet level's layout as tensors: what the processors of that grid read, nothing else.

    ``masks``: [S, N] hard 0/1 box masks; ``crop``: [S, L] flat indices of each box's cells, padded to
    the largest box (at least 2, so a compiled graph never specialises on a one-cell box); ``merge``:
    [N] for each cell the row of its owner in the concatenated crops, ``S * L`` (a zero row) outside
    all boxes; ``owner_one_hot``: [N, S] float32, 1 where subject j owns the cell (for recording).
    """

    def __init__(self, layout: GridLayout, device: torch.device, dtype: torch.dtype):
        self.height, self.width = layout.height, layout.width
        crop, merge = layout.crop_and_merge_on(torch.device("cpu"))
        if crop.shape[1] == 1:  # merge rows are j * L + position: doubling L doubles them (and the zero row)
            crop, merge = crop.repeat(1, 2), merge * 2
        self.masks = layout.masks.to(device=device, dtype=dtype)
        self.crop = crop.to(device)
        self.merge = merge.to(device)
        self.owner_one_hot = layout.owner_one_hot_on(torch.device("cpu")).to(device)
        torch._dynamo.maybe_mark_dynamic(self.crop, 1)  # the largest box's cell count changes with the layout


class DecoupledState:
    """Layout and run-time facts shared by all AnyMS processors of one session.

    ``image_branch`` is the variant's function, chosen here once. ``levels`` maps a layer's number of
    queries to its :class:`Level`; :meth:`prepare` (called by the session before every UNet call)
    builds them once per latent size, device and dtype. ``adapter_index``: the loaded IP-Adapter whose
    images are the subjects (diffusers' load order); any other adapter keeps its stock behaviour.
    """

    def __init__(self, variant: str, boxes: Sequence[Sequence[float]], paint_order: Sequence[int],
                 subject_scales: list[float] | None = None, recorder: Any = None, adapter_index: int = 0):
        self.variant = check_variant(variant)
        self.adapter_index = adapter_index  # which loaded IP-Adapter is decoupled; the others stay stock
        self.image_branch: Callable | None = IMAGE_BRANCHES[variant]
        self.boxes = [list(box) for box in boxes]
        self.paint_order = list(paint_order)
        self.subject_scales = subject_scales
        self.recorder = recorder
        self.levels: dict[int, Level] = {}
        self._latent_size: tuple[int, int] | None = None
        self._built: dict[tuple, dict[int, Level]] = {}

    @property
    def num_subjects(self) -> int:
        return len(self.boxes)

    @property
    def latent_size(self) -> tuple[int, int] | None:
        return self._latent_size

    @latent_size.setter
    def latent_size(self, size: tuple[int, int]) -> None:
        self.prepare(size)

    @torch._dynamo.disable
    def prepare(self, latent_size: tuple[int, int], device: torch.device | str = "cpu",
                dtype: torch.dtype = torch.float32) -> None:
        """Points ``levels`` at the layout tensors of every UNet level of a ``latent_size`` latent."""
        latent_size = (int(latent_size[0]), int(latent_size[1]))
        device = torch.device(device)
        key = (latent_size, device, dtype)
        if key not in self._built:
            levels, (height, width) = {}, latent_size
            for _ in range(MAX_LEVELS):  # UNet levels halve with ceil: ceil(h / 2^k) x ceil(w / 2^k)
                layout = GridLayout.build(self.boxes, self.paint_order, height, width)
                levels[height * width] = Level(layout, device, dtype)
                if height == 1 and width == 1:
                    break
                height, width = -(-height // 2), -(-width // 2)
            self._built[key] = levels
        self._latent_size = latent_size
        self.levels = self._built[key]


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
        text_states, adapter_states = encoder_hidden_states
        state = self.state
        if len(adapter_states) != len(self.to_k_ip):
            raise ValueError(
                f"{self.layer_name}: got image embeds for {len(adapter_states)} IP-Adapters, {len(self.to_k_ip)} are loaded."
            )
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

        level = state.levels.get(num_queries)
        if level is None:
            raise RuntimeError(
                f"{self.layer_name}: no UNet level of the {state.latent_size} latent has {num_queries} positions; "
                "the AnyMS processors ran outside a UNet call of the session that installed them."
            )
        recorder = state.recorder if state.recorder is not None and state.recorder.wants(self.layer_name) else None
        row = None if recorder is None else recorder.batch_index  # the batch row (sample) that is recorded
        grid = (level.height, level.width)

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
        if recorder is not None and "text" in recorder.kinds:
            recorder.add(self.layer_name, "text", attention_probabilities(query[row], key[row]).mean(0), grid)

        # --- Image cross-attention, adapter by adapter in load order ---------------------------------
        # The adapter named by ``state.adapter_index`` holds the subjects and is decoupled (Eq. 4-7); any other
        # loaded adapter (a style adapter, say) is added exactly as diffusers does: its images in one softmax,
        # times its scale. Embeds may have more rows than the queries (diffusers' dynamic-CFG recipe drops the
        # unconditional half of the text mid-run but not of the image embeds): diffusers then lets each sample
        # attend to the tokens of all rows (``view(batch_size, -1, ...)``); the decoupled adapter does the same
        # per subject.
        for index, image_states in enumerate(adapter_states):
            if index != state.adapter_index:
                hidden_states = _stock_adapter(hidden_states, query, image_states, self.scale[index],
                                               self.to_k_ip[index], self.to_v_ip[index])
                continue
            num_subjects = state.num_subjects
            if image_states.shape[1] != num_subjects:
                raise ValueError(
                    f"{self.layer_name}: got {image_states.shape[1]} reference images for {num_subjects} subjects; "
                    "pass the session's ip_adapter_image (one image per subject, in the subjects' order)."
                )
            scales = self._subject_scales(num_subjects)
            if state.image_branch is None or all(s == 0 for s in scales):
                continue
            # [B, S, T, D] -> per-head keys/values [B, heads, S*T, head_dim]; subject j owns tokens j*T:(j+1)*T.
            image_key = _rows_per_subject(self.to_k_ip[index](image_states), batch_size)
            image_value = _rows_per_subject(self.to_v_ip[index](image_states), batch_size)
            image_key = image_key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
            image_value = image_value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
            want_contribution = recorder is not None and "contribution" in recorder.kinds
            hidden_states, contribution = state.image_branch(
                hidden_states, query, image_key, image_value, scales, level, row if want_contribution else None)
            if want_contribution:
                recorder.add(self.layer_name, "contribution", contribution, grid)
            if recorder is not None and "affinity" in recorder.kinds:
                recorder.add(self.layer_name, "affinity", subject_affinity(query[row], image_key[row], num_subjects), grid)
            if recorder is not None and "joint_share" in recorder.kinds:
                recorder.add(self.layer_name, "joint_share", joint_share(query[row], image_key[row], num_subjects), grid)

        # --- Output projection, exactly as in diffusers' processor ---------------------------------
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        hidden_states = hidden_states / attn.rescale_output_factor
        return hidden_states

    def _subject_scales(self, num_subjects: int) -> list[float]:
        """Per-subject scales: the session's, else the adapter scale set by ``pipe.set_ip_adapter_scale``."""
        if self.state.subject_scales is not None:
            return self.state.subject_scales
        adapter_scale = self.scale[self.state.adapter_index]
        if isinstance(adapter_scale, list):
            if len(adapter_scale) != num_subjects:
                raise ValueError(
                    f"set_ip_adapter_scale gave {len(adapter_scale)} per-image scales for {num_subjects} subjects."
                )
            return [float(s) for s in adapter_scale]
        return [float(adapter_scale)] * num_subjects


def _rows_per_subject(projected: torch.Tensor, batch_size: int) -> torch.Tensor:
    """[R, S, T, C] adapter keys or values for ``batch_size`` samples -> [batch_size, S, (R / batch_size) * T, C].

    Usually R == batch_size and nothing changes. When the image embeds kept more rows than the queries have
    (the dynamic-CFG recipe), diffusers' ``view(batch_size, -1, ...)`` gives each sample the tokens of all
    rows; here each subject gets its own tokens of all rows, in diffusers' order."""
    rows, num_subjects, tokens, channels = projected.shape
    if rows == batch_size:
        return projected
    per_sample = projected.view(batch_size, rows // batch_size, num_subjects, tokens, channels)
    return per_sample.transpose(1, 2).reshape(batch_size, num_subjects, -1, channels)


def _stock_adapter(hidden_states: torch.Tensor, query: torch.Tensor, image_states: torch.Tensor,
                   scale: float | list[float], to_k_ip: torch.nn.Module, to_v_ip: torch.nn.Module) -> torch.Tensor:
    """A loaded adapter that AnyMS does not decouple, exactly as ``IPAdapterAttnProcessor2_0`` adds it (no
    masks): all of its images' tokens in one softmax, times its scale."""
    if isinstance(scale, list):
        if all(s == 0 for s in scale):
            return hidden_states
        raise ValueError(
            f"Per-image scales {scale} on an IP-Adapter that AnyMS does not decouple: diffusers takes them only "
            "with ip_adapter_masks. Give that adapter one scale (pipe.set_ip_adapter_scale)."
        )
    if scale == 0:
        return hidden_states
    batch_size, heads, _, head_dim = query.shape
    key = to_k_ip(image_states).view(batch_size, -1, heads, head_dim).transpose(1, 2)
    value = to_v_ip(image_states).view(batch_size, -1, heads, head_dim).transpose(1, 2)
    return hidden_states + scale * _attend(query, key, value)


# --- The image branches, one per variant ------------------------------------------------------------
# Each takes Z_text (``hidden_states``, [B, N, C]), the queries [B, heads, N, d], the subjects' image keys
# and values [B, heads, S*T, d] (subject j owns tokens j*T:(j+1)*T), the per-subject scales, the layer's
# Level, and ``row``: the batch row whose per-subject contribution norms to return ([N, S] float32), or
# None to skip that work. Each returns (Z_text + Z_image, contribution or None).

def crop_and_merge(hidden_states: torch.Tensor, query: torch.Tensor, image_key: torch.Tensor, image_value: torch.Tensor,
                   scales: list[float], level: Level, row: int | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Eq. 5-6. Crop: the queries inside each box B_j (one gather for all boxes); each crop attends only to
    its own subject's tokens. Merge: every cell takes the row of the subject that owns it (priority resolved
    when the layout was built); Z_image is zero outside all boxes."""
    batch_size, heads, _, head_dim = query.shape
    num_subjects = level.crop.shape[0]
    cropped = query[:, :, level.crop].flatten(1, 2)  # [B, heads * S, L, d]
    keys = image_key.unflatten(2, (num_subjects, -1)).flatten(1, 2)  # [B, heads * S, T, d]
    values = image_value.unflatten(2, (num_subjects, -1)).flatten(1, 2)
    z = F.scaled_dot_product_attention(cropped, keys, values).unflatten(1, (heads, num_subjects))
    if len(set(scales)) == 1:
        z = _scaled(z, scales[0])  # the usual case: a Python scalar, no tensor built per call
    else:
        z = z * torch.tensor(scales, device=z.device, dtype=z.dtype)[:, None, None]
    z = z.permute(0, 2, 3, 1, 4).reshape(batch_size, -1, heads * head_dim)  # [B, S * L, C]
    z = torch.cat([z, z.new_zeros(batch_size, 1, z.shape[-1])], dim=1)
    image_part = z[:, level.merge]  # [B, N, C]
    contribution = None
    if row is not None:  # the owner's norm in the cells it owns, zero for the others
        norms = torch.linalg.vector_norm(image_part[row], dim=-1, dtype=torch.float32)  # [N]
        contribution = norms[:, None] * level.owner_one_hot
    return hidden_states + image_part, contribution


def masked_sum(hidden_states: torch.Tensor, query: torch.Tensor, image_key: torch.Tensor, image_value: torch.Tensor,
               scales: list[float], level: Level, row: int | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Eq. 7, "w/o crop and merge": Z_image = sum_j s_j (softmax(Q K_j^T / sqrt(d)) V_j) * M_j; every query
    attends to every subject, overlaps get the sum."""
    masks = level.masks if level.masks.dtype == query.dtype else level.masks.to(query.dtype)
    num_subjects = masks.shape[0]
    norms = []
    for j, (key_j, value_j) in enumerate(zip(image_key.chunk(num_subjects, dim=2), image_value.chunk(num_subjects, dim=2))):
        masked = _scaled(_attend(query, key_j, value_j) * masks[j][None, :, None], scales[j])
        hidden_states = hidden_states + masked
        if row is not None:
            norms.append(torch.linalg.vector_norm(masked[row], dim=-1, dtype=torch.float32))
    return hidden_states, None if row is None else torch.stack(norms, dim=-1)


def global_sum(hidden_states: torch.Tensor, query: torch.Tensor, image_key: torch.Tensor, image_value: torch.Tensor,
               scales: list[float], level: Level, row: int | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """"w/o local decoupling": Z_image = sum_j s_j softmax(Q K_j^T / sqrt(d)) V_j at every position."""
    num_subjects = level.masks.shape[0]
    norms = []
    for j, (key_j, value_j) in enumerate(zip(image_key.chunk(num_subjects, dim=2), image_value.chunk(num_subjects, dim=2))):
        z_j = _scaled(_attend(query, key_j, value_j), scales[j])
        hidden_states = hidden_states + z_j
        if row is not None:
            norms.append(torch.linalg.vector_norm(z_j[row], dim=-1, dtype=torch.float32))
    return hidden_states, None if row is None else torch.stack(norms, dim=-1)


def joint_softmax(hidden_states: torch.Tensor, query: torch.Tensor, image_key: torch.Tensor, image_value: torch.Tensor,
                  scales: list[float], level: Level, row: int | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """diffusers' stock multi-image IP-Adapter: Z_image = s softmax(Q [K_1..K_S]^T / sqrt(d)) [V_1..V_S];
    subjects compete for every query in one softmax."""
    if len(set(scales)) > 1:
        raise ValueError("The `joint` variant mixes all subjects in one softmax: it takes one scale, not one per subject.")
    hidden_states = hidden_states + scales[0] * _attend(query, image_key, image_value)
    contribution = None
    if row is not None:  # each subject's share of the joint output: its probabilities times its values
        num_subjects = level.masks.shape[0]
        probs = attention_probabilities(query[row], image_key[row])  # [heads, N, S*T]
        values = image_value[row].float().unflatten(1, (num_subjects, -1))  # [heads, S, T, d]
        shares = torch.einsum("hnst,hstd->hnsd", probs.unflatten(-1, (num_subjects, -1)), values)
        contribution = torch.linalg.vector_norm(scales[0] * shares, dim=(0, -1))
    return hidden_states, contribution


IMAGE_BRANCHES: dict[str, Callable | None] = {
    "anyms": crop_and_merge, "mask": masked_sum, "none": global_sum, "joint": joint_softmax, "text": None,
}
assert tuple(IMAGE_BRANCHES) == VARIANTS


# --- What the recorder is given ---------------------------------------------------------------------

def attention_probabilities(query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d)) over the keys of each query, in float32: [heads, N, keys]."""
    return torch.softmax((query @ key.transpose(-1, -2)) * query.shape[-1] ** -0.5, dim=-1, dtype=torch.float32)


def subject_affinity(query: torch.Tensor, image_key: torch.Tensor, num_subjects: int) -> torch.Tensor:
    """Where each subject's tokens look: for every token (and head), a softmax over the positions of
    Q K^T / sqrt(d), averaged over the subject's tokens and the heads, times N so that 1 is uniform: [N, S].

    Normalised over space (as DAAM does per word), so it is blind to a per-subject offset of the logits,
    which single-subject adapter training never fixes (see ``joint_share``)."""
    logits = (query @ image_key.transpose(-1, -2)).float() * query.shape[-1] ** -0.5  # [heads, N, S*T]
    over_space = torch.softmax(logits, dim=-2)
    return over_space.unflatten(-1, (num_subjects, -1)).mean(-1).mean(0) * query.shape[-2]


def joint_share(query: torch.Tensor, image_key: torch.Tensor, num_subjects: int) -> torch.Tensor:
    """Each subject's share of one softmax over all subjects' tokens, averaged over heads: [N, S].

    Exactly the mixing weights of the ``joint`` variant. For the other variants it compares logits of
    subjects that the adapter never saw together: adding a constant to one subject's logits changes
    nothing a single-subject adapter was trained on, so this share carries an arbitrary per-subject
    offset and must not be read as "where a position wants the subject"."""
    return attention_probabilities(query, image_key).unflatten(-1, (num_subjects, -1)).sum(-1).mean(0)


def _attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d)) V, merged back to [B, queries, heads * head_dim]."""
    out = F.scaled_dot_product_attention(query, key, value)
    batch_size, heads, _, head_dim = out.shape
    return out.transpose(1, 2).reshape(batch_size, -1, heads * head_dim).to(query.dtype)


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


def sequence_of_floats(values: float | Sequence[float] | None, count: int, what: str) -> list[float] | None:
    if values is None:
        return None
    if isinstance(values, (int, float)):
        return [float(values)] * count
    values = [float(v) for v in values]
    if len(values) != count:
        raise ValueError(f"{what} has {len(values)} values for {count} subjects.")
    return values
