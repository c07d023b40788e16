"""Recording what the AnyMS processors observe: per-subject attention maps per layer and step.

The processors hand their observations (already reduced to ``[positions, items]`` for the recorded
conditional sample, averaged over heads) to an :class:`AttentionRecorder`. It aggregates them under
an explicit policy, stores them on the CPU in fp16 within a memory budget, and says what it dropped.
The result, :class:`AttentionMaps`, is plain data: it is what a ``Run`` holds and what widgets and
figures read.

Kinds of map, per subject and position:

- ``affinity``: where the subject's reference tokens look in the image: for each of its tokens, a
  softmax over all positions of the query-key logits (as DAAM does per word), averaged over its tokens
  and the heads, times the number of positions (so 1 = uniform, > 1 = above chance). Computed for every
  position whatever the variant allows, so it shows where a subject "would go" and how that changes
  over the steps.
- ``joint_share``: the subject's share of one softmax over all subjects' image tokens (sums to 1 over
  subjects). It is exactly the mixing weight of the ``joint`` variant; for other variants it compares
  subjects whose logits were never trained against each other (an adapter trained on one subject at a
  time is blind to a per-subject logit offset), so it is no measure of preference. This was the
  toolkit's first ``affinity``; in the toy world it read backwards (lowest inside a subject's own box).
- ``contribution``: the L2 norm of what the subject actually injects at each position under the
  variant (for ``anyms``: zero outside the cells it owns).
- ``text``: DAAM-style text cross-attention probability of chosen prompt words (summed over a word's
  tokens), per word.

Why these and not the mean of a subject's own softmax: that mean is always 1/T (see the notes).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

KINDS = ("affinity", "joint_share", "contribution", "text")
POLICIES = ("layer", "resolution", "mean")
DEFAULT_BUDGET_BYTES = 64 * 2**20


@dataclass
class RecordConfig:
    """What to record. ``kinds`` from :data:`KINDS`; ``words`` are prompt words for ``text`` maps.

    ``policy``: ``"layer"`` keeps every layer, ``"resolution"`` averages the layers of each grid size,
    ``"mean"`` averages all layers (upsampled to the largest grid). ``layers``: substrings of diffusers
    module names to record (None = all cross-attention layers). ``budget_bytes``: hard cap on stored maps.
    """

    kinds: tuple[str, ...] = ("affinity", "contribution")
    words: tuple[str, ...] = ()
    policy: str = "resolution"
    layers: tuple[str, ...] | None = None
    budget_bytes: int = DEFAULT_BUDGET_BYTES

    def __post_init__(self) -> None:
        self.kinds = tuple(self.kinds)
        self.words = tuple(self.words)
        if self.words and "text" not in self.kinds:
            self.kinds = self.kinds + ("text",)
        for kind in self.kinds:
            if kind not in KINDS:
                raise ValueError(f"Unknown attention kind {kind!r}; choose from {KINDS}.")
        if "text" in self.kinds and not self.words:
            raise ValueError("Recording `text` maps needs `words`: the prompt words to map.")
        if self.policy not in POLICIES:
            raise ValueError(f"Unknown aggregation policy {self.policy!r}; choose one of {POLICIES}.")
        if self.layers is not None:
            self.layers = (self.layers,) if isinstance(self.layers, str) else tuple(self.layers)
        if int(self.budget_bytes) <= 0:
            raise ValueError(f"budget_bytes must be positive, got {self.budget_bytes}.")
        self.budget_bytes = int(self.budget_bytes)

    @classmethod
    def from_arg(cls, record: "RecordConfig | bool | str | Sequence[str] | dict | None") -> "RecordConfig | None":
        """Accepts ``None``/``False`` (off), ``True`` (defaults), a kind, a list of kinds, a dict or a config."""
        if record is None or record is False:
            return None
        if record is True:
            return cls()
        if isinstance(record, cls):
            return record
        if isinstance(record, str):
            return cls(kinds=(record,))
        if isinstance(record, dict):
            return cls(**record)
        if isinstance(record, (list, tuple)):
            return cls(kinds=tuple(record))
        raise ValueError(f"record= takes None, True, a kind, a list of kinds, a dict or a RecordConfig; got {record!r}.")


class AttentionRecorder:
    """Collects what the processors observe during the pipeline calls of one session, and aggregates it.

    The API, all of it: the session calls :meth:`begin_step` before every UNet call (which closes the
    previous step and picks the batch row to record) and :meth:`finish` at the end; a processor asks
    :meth:`wants` for its layer, reads :attr:`batch_index` and :attr:`kinds`, and hands its maps to
    :meth:`add`. The recorder owns its step counter, its batch index and its budget.

    :meth:`add` only appends to an inbox (so a compiled UNet traces it without a graph break); the
    maps are summed, averaged and moved to the CPU in fp16 when the step closes, and a step is stored
    whole or, if it would not fit the budget, dropped whole.
    """

    def __init__(self, config: RecordConfig, subject_names: Sequence[str], word_tokens: dict[str, list[int]]):
        self.config = config
        self.kinds = config.kinds
        self.words = list(word_tokens)
        self.word_tokens = word_tokens
        self.subject_names = list(subject_names)
        self.step = -1
        self.batch_index = 0
        self._warned = False
        self._inbox: list[tuple[str, str, torch.Tensor, tuple[int, int]]] = []
        self.maps = AttentionMaps(
            kinds=list(self.kinds), subjects=self.subject_names, words=self.words, policy=config.policy,
            budget_bytes=config.budget_bytes,
        )

    # --- driven by the session -------------------------------------------------------------------
    def begin_step(self, batch_size: int = 1, guided: bool = False) -> None:
        """Closes the previous step and starts the next one. Under classifier-free guidance
        (``guided``, batch ``[uncond; cond]``) the first conditional sample is recorded, else the first."""
        self._flush()
        self.step += 1
        self.batch_index = batch_size // 2 if guided and batch_size > 1 else 0

    def finish(self) -> "AttentionMaps":
        self._flush()
        if self.maps.dropped and not self._warned:
            self._warned = True
            warnings.warn(
                f"Attention recording hit its budget of {self.config.budget_bytes / 2**20:.1f} MB and dropped "
                f"steps {self.maps.dropped_steps} whole (see AttentionMaps.dropped); use a coarser policy or a larger budget.",
                stacklevel=2,
            )
        return self.maps

    # --- called by the processors ----------------------------------------------------------------
    def wants(self, layer_name: str) -> bool:
        return self.config.layers is None or any(part in layer_name for part in self.config.layers)

    def add(self, layer: str, kind: str, values: torch.Tensor, grid: tuple[int, int]) -> None:
        """One layer's map of one kind for the recorded sample: ``values`` is ``[h*w, items]`` on ``grid``
        (items: subjects; for ``text``, all text tokens: the recorder keeps its words' columns)."""
        self._inbox.append((layer, kind, values, grid))

    # --- aggregation -----------------------------------------------------------------------------
    def _flush(self) -> None:
        inbox, self._inbox = self._inbox, []
        if not inbox or self.step < 0:
            return
        policy = self.config.policy
        pending: dict[tuple[str, str], list] = {}  # (kind, key) -> [sum [N, items], count, grid]
        for layer, kind, values, grid in inbox:
            if kind == "text":
                values = torch.stack([values[:, indices].sum(-1) for indices in self.word_tokens.values()], dim=-1)
            key = layer if policy == "layer" else f"{grid[0]}x{grid[1]}" if policy == "resolution" else "mean"
            self.maps.layer_grids.setdefault(layer, grid)
            if (kind, key) not in pending:
                pending[(kind, key)] = [values, 1, grid]
                continue
            total, count, pending_grid = pending[(kind, key)]
            if grid != pending_grid:  # only under "mean": bring both to the larger grid
                if grid[0] * grid[1] > pending_grid[0] * pending_grid[1]:
                    total, pending_grid = _resize_rows(total, pending_grid, grid), grid
                else:
                    values = _resize_rows(values, grid, pending_grid)
            pending[(kind, key)] = [total + values, count + 1, pending_grid]
        step_maps = {
            (kind, key): ((total / count).transpose(0, 1).reshape(-1, *grid).to("cpu", torch.float16), grid)
            for (kind, key), (total, count, grid) in pending.items()
        }
        self.maps._store_step(self.step, step_maps)


def _resize_rows(rows: torch.Tensor, grid: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """[h*w, items] on ``grid`` -> [size_h*size_w, items], resized bilinearly."""
    maps = rows.transpose(0, 1).reshape(-1, *grid)
    return _resize(maps, size).flatten(1).transpose(0, 1)


def _resize(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(maps[None].float(), size=size, mode="bilinear", align_corners=False)[0]


@dataclass
class AttentionMaps:
    """Recorded attention: ``entries[(kind, step, key)] = fp16 tensor [items, h, w]`` on the CPU.

    ``key`` is a layer name (policy ``layer``), a grid like ``"32x32"`` (``resolution``) or ``"mean"``.
    Items are ``subjects`` for ``affinity`` / ``joint_share`` / ``contribution`` and ``words`` for ``text``.
    """

    kinds: list[str]
    subjects: list[str]
    words: list[str]
    policy: str
    budget_bytes: int
    entries: dict[tuple[str, int, str], torch.Tensor] = field(default_factory=dict)
    grids: dict[str, tuple[int, int]] = field(default_factory=dict)
    layer_grids: dict[str, tuple[int, int]] = field(default_factory=dict)
    dropped: list[tuple[str, int, str]] = field(default_factory=list)
    nbytes: int = 0
    averaged_steps: list[int] = field(default_factory=list, compare=False)

    def _store_step(self, step: int, step_maps: dict[tuple[str, str], tuple[torch.Tensor, tuple[int, int]]]) -> None:
        """Stores one step's maps, ``{(kind, key): (maps, grid)}``, whole, or drops them whole if they would
        not fit the budget (so that every stored step averages the same layers)."""
        size = sum(maps.numel() * maps.element_size() for maps, _ in step_maps.values())
        if self.nbytes + size > self.budget_bytes:
            self.dropped.extend((kind, step, key) for kind, key in step_maps)
            return
        for (kind, key), (maps, grid) in step_maps.items():
            self.entries[(kind, step, key)] = maps
            self.grids[key] = grid
        self.nbytes += size

    # --- query API -------------------------------------------------------------------------------
    @property
    def steps(self) -> list[int]:
        return sorted({step for _, step, _ in self.entries})

    @property
    def dropped_steps(self) -> list[int]:
        """Steps the budget dropped (whole: every kind and layer of such a step)."""
        return sorted({step for _, step, _ in self.dropped})

    @property
    def keys(self) -> list[str]:
        """Layer names, grid names or ``"mean"``, by policy; largest grid first."""
        return sorted(self.grids, key=lambda k: (-self.grids[k][0] * self.grids[k][1], k))

    @property
    def resolutions(self) -> list[tuple[int, int]]:
        return sorted(set(self.grids.values()), key=lambda g: -g[0] * g[1])

    def items(self, kind: str) -> list[str]:
        return self.words if kind == "text" else self.subjects

    def maps(
        self,
        kind: str = "affinity",
        *,
        steps: int | Sequence[int] | slice | None = None,
        layers: str | Sequence[str] | None = None,
        resolution: int | tuple[int, int] | None = None,
        items: Sequence[int | str] | None = None,
        size: tuple[int, int] | None = None,
        per_step: bool = False,
    ) -> np.ndarray:
        """Maps of one kind, averaged over the selected layers (and steps unless ``per_step``).

        ``steps``: recorded step indices (int, list or slice; None = all). ``layers``: substrings of the
        stored keys (diffusers layer names under policy ``layer``). ``resolution``: a grid height or
        ``(h, w)``. ``items``: subject (or word) names or indices. ``size``: output ``(height, width)``,
        default the largest selected grid; maps are upsampled bilinearly. Returns float32
        ``[items, H, W]``, or ``[steps, items, H, W]`` with ``per_step=True``.

        After each call, :attr:`averaged_steps` lists the steps it averaged (or stacked): steps dropped
        by the budget (:attr:`dropped_steps`) are never among them.
        """
        if kind not in self.kinds:
            raise ValueError(f"{kind!r} maps were not recorded; recorded kinds: {self.kinds}.")
        keys = self._select_keys(layers, resolution)
        selected_steps = self._select_steps(steps, kind)
        item_indices = self._select_items(kind, items)
        if size is None:
            size = max((self.grids[k] for k in keys), key=lambda g: g[0] * g[1])
        per_step_maps = []
        for step in selected_steps:
            layer_maps = [
                _resize(self.entries[(kind, step, key)][item_indices].float(), size)
                for key in keys if (kind, step, key) in self.entries
            ]
            if not layer_maps:
                raise ValueError(f"No {kind!r} maps recorded at step {step} for keys {keys} (dropped by the budget?).")
            per_step_maps.append(torch.stack(layer_maps).mean(0))
        stacked = torch.stack(per_step_maps)
        self.averaged_steps = list(selected_steps)
        result = stacked if per_step else stacked.mean(0)
        return result.numpy().astype(np.float32)

    def _select_keys(self, layers: str | Sequence[str] | None, resolution: int | tuple[int, int] | None) -> list[str]:
        keys = self.keys
        if layers is not None:
            parts = (layers,) if isinstance(layers, str) else tuple(layers)
            keys = [k for k in keys if any(part in k for part in parts)]
        if resolution is not None:
            wanted = (lambda g: g[0] == resolution) if isinstance(resolution, int) else (lambda g: tuple(g) == tuple(resolution))
            keys = [k for k in keys if wanted(self.grids[k])]
        if not keys:
            raise ValueError(f"No recorded maps match layers={layers!r}, resolution={resolution!r}; keys: {self.keys}.")
        return keys

    def _select_steps(self, steps: int | Sequence[int] | slice | None, kind: str) -> list[int]:
        recorded = sorted({s for k, s, _ in self.entries if k == kind})
        if not recorded:
            raise ValueError(f"No {kind!r} maps were recorded.")
        if steps is None:
            return recorded
        if isinstance(steps, slice):
            selected = recorded[steps]
            if not selected:
                raise ValueError(f"steps={steps} selects none of the recorded steps {recorded}.")
            return selected
        wanted = [steps] if isinstance(steps, int) else list(steps)
        if not wanted:
            raise ValueError(f"steps=[] selects no step; recorded steps: {recorded}.")
        missing = [s for s in wanted if s not in recorded]
        if missing:
            dropped = f" (dropped by the budget: {self.dropped_steps})" if self.dropped_steps else ""
            raise ValueError(f"Steps {missing} were not recorded; recorded steps: {recorded}{dropped}.")
        return wanted

    def _select_items(self, kind: str, items: Sequence[int | str] | None) -> list[int]:
        names = self.items(kind)
        if items is None:
            return list(range(len(names)))
        indices = []
        for item in items:
            if isinstance(item, str):
                if item not in names:
                    raise ValueError(f"{item!r} is not among the recorded {'words' if kind == 'text' else 'subjects'} {names}.")
                indices.append(names.index(item))
            else:
                if not 0 <= int(item) < len(names):
                    raise ValueError(f"Item index {item} is out of range for {len(names)} items.")
                indices.append(int(item))
        return indices

    # --- persistence (used by Run.save / Run.load) -----------------------------------------------
    def to_tensors(self) -> dict[str, torch.Tensor]:
        return {f"attention/{kind}/{step}/{key}": maps.contiguous() for (kind, step, key), maps in self.entries.items()}

    def metadata(self) -> dict:
        return {
            "kinds": self.kinds, "subjects": self.subjects, "words": self.words, "policy": self.policy,
            "budget_bytes": self.budget_bytes, "nbytes": self.nbytes,
            "grids": {k: list(v) for k, v in self.grids.items()},
            "layer_grids": {k: list(v) for k, v in self.layer_grids.items()},
            "dropped": [list(d) for d in self.dropped],
        }

    @classmethod
    def from_saved(cls, metadata: dict, tensors: dict[str, torch.Tensor]) -> "AttentionMaps":
        maps = cls(
            kinds=list(metadata["kinds"]), subjects=list(metadata["subjects"]), words=list(metadata["words"]),
            policy=metadata["policy"], budget_bytes=int(metadata["budget_bytes"]),
            grids={k: tuple(v) for k, v in metadata["grids"].items()},
            layer_grids={k: tuple(v) for k, v in metadata["layer_grids"].items()},
            dropped=[tuple(d) for d in metadata["dropped"]], nbytes=int(metadata["nbytes"]),
        )
        for name, tensor in tensors.items():
            if name.startswith("attention/"):
                _, kind, step, key = name.split("/", 3)
                maps.entries[(kind, int(step), key)] = tensor
        return maps


def find_word_tokens(tokenizer, prompt: str, words: Iterable[str]) -> dict[str, list[int]]:
    """Token positions of each word in the tokenized prompt (BOS counted), for text maps."""
    prompt_ids = tokenizer(prompt, truncation=True, max_length=tokenizer.model_max_length).input_ids
    found = {}
    for word in words:
        word_ids = tokenizer(word, add_special_tokens=False).input_ids
        positions = [
            list(range(start, start + len(word_ids)))
            for start in range(len(prompt_ids) - len(word_ids) + 1)
            if prompt_ids[start:start + len(word_ids)] == word_ids
        ]
        if not word_ids or not positions:
            raise ValueError(f"The word {word!r} is not in the prompt {prompt!r} (as tokenized); cannot map it.")
        found[word] = [index for occurrence in positions for index in occurrence]
    return found
