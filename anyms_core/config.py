"""``RunConfig``: one typed, frozen description of a generation, validated once where it is built.

The same object is what :meth:`anyms_core.AnyMS.generate` builds from its arguments (before it touches
the pipeline), what a CLI case file is parsed into, and what ``run.json`` stores (``to_dict`` /
``from_dict``, with a ``schema_version``). ``Run.config`` is a ``RunConfig``.

Validation is strict and loud, never a silent correction: numbers must be real numbers (not strings,
bytes or booleans) and finite; boxes are four such numbers; steps >= 1; seeds fit a
``torch.Generator`` (0 .. 2**64 - 1). This module imports neither torch nor diffusers, so the command
line can check a case file before any model is loaded.
"""

from __future__ import annotations

from .variants import VARIANTS  # no torch: validating a case file stays light

import json
import math
import numbers
from dataclasses import dataclass, field, fields
from typing import Any, Mapping

SCHEMA_VERSION = 1
MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed accepts 0 .. 2**64 - 1
PRIORITY_RULES = ("order", "area")


class ConfigError(ValueError):
    """An invalid run configuration; the message names the field and what is wrong."""


# --- scalar checks ------------------------------------------------------------------------------------
def _is_real(value: Any) -> bool:
    """True for int/float and numpy/torch scalars; False for bool, str, bytes and everything else."""
    if isinstance(value, (bool, str, bytes, bytearray)):
        return False
    if type(value).__name__ == "bool_":  # numpy.bool_
        return False
    if isinstance(value, numbers.Real):
        return True
    # torch / numpy 0-d arrays of a real dtype
    shape = getattr(value, "shape", None)
    dtype = str(getattr(value, "dtype", ""))
    return shape is not None and tuple(shape) == () and any(k in dtype for k in ("float", "int")) and "bool" not in dtype


def real_number(value: Any, what: str, minimum: float | None = None, maximum: float | None = None) -> float:
    """``value`` as a finite float within [minimum, maximum], or a :class:`ConfigError` naming ``what``."""
    if not _is_real(value):
        raise ConfigError(f"{what} must be a number, got {type(value).__name__} {value!r}.")
    number = float(value)
    if not math.isfinite(number):
        raise ConfigError(f"{what} must be finite (not NaN or infinity), got {number}.")
    if minimum is not None and number < minimum:
        raise ConfigError(f"{what} must be >= {minimum}, got {number}.")
    if maximum is not None and number > maximum:
        raise ConfigError(f"{what} must be <= {maximum}, got {number}.")
    return number


def integer(value: Any, what: str, minimum: int | None = None, maximum: int | None = None) -> int:
    """``value`` as an int within [minimum, maximum]; floats are refused even when whole (say 3, not 3.0)."""
    if not _is_real(value) or isinstance(value, float) or "float" in str(getattr(value, "dtype", "")):
        raise ConfigError(f"{what} must be an integer, got {type(value).__name__} {value!r}.")
    number = int(value)
    if minimum is not None and number < minimum:
        raise ConfigError(f"{what} must be >= {minimum}, got {number}.")
    if maximum is not None and number > maximum:
        raise ConfigError(f"{what} must be <= {maximum}, got {number}.")
    return number


def _optional_text(value: Any, what: str) -> str | None:
    if value is not None and not isinstance(value, str):
        raise ConfigError(f"{what} must be a string, got {type(value).__name__} {value!r}.")
    return value


def validate_box(box: Any, what: str = "box") -> tuple[float, float, float, float]:
    """Checks a normalized ``[x0, y0, x1, y1]`` box (origin top-left) and returns it as a tuple of floats.

    A string or bytes is refused (``"0011"`` is not four numbers), as are booleans, NaN and infinity.
    """
    if isinstance(box, (str, bytes, bytearray)) or not hasattr(box, "__len__") or not hasattr(box, "__iter__"):
        raise ConfigError(f"{what} must be four numbers [x0, y0, x1, y1], got {type(box).__name__} {box!r}.")
    if getattr(box, "shape", None) == ():  # a 0-d array has __len__ but no length
        raise ConfigError(f"{what} must be four numbers [x0, y0, x1, y1], got a scalar {box!r}.")
    items = list(box)
    if len(items) != 4:
        raise ConfigError(f"{what} must be four numbers [x0, y0, x1, y1], got {len(items)} values.")
    values = tuple(real_number(v, f"{what}[{i}]") for i, v in enumerate(items))
    x0, y0, x1, y1 = values
    if min(values) < 0.0 or max(values) > 1.0:
        raise ConfigError(f"{what} {list(values)} is outside [0, 1]; boxes are normalized [x0, y0, x1, y1].")
    if x0 >= x1 or y0 >= y1:
        raise ConfigError(f"{what} {list(values)} is empty: need x0 < x1 and y0 < y1 (origin top-left).")
    return values


def validate_scale(scale: Any, what: str = "ip_adapter_scale") -> float | tuple[float, ...] | None:
    """One scale or a sequence of per-subject scales, each a finite number >= 0; None keeps the adapter's."""
    if scale is None:
        return None
    if _is_real(scale):
        return real_number(scale, what, minimum=0.0)
    if isinstance(scale, (str, bytes, bytearray)) or not hasattr(scale, "__iter__"):
        raise ConfigError(f"{what} must be a number or a list of numbers (one per subject), got {type(scale).__name__} {scale!r}.")
    values = tuple(real_number(v, f"{what}[{i}]", minimum=0.0) for i, v in enumerate(scale))
    if not values:
        raise ConfigError(f"{what} is an empty list; give one number, or one per subject.")
    return values


def _json_value(value: Any, what: str) -> Any:
    """``value`` as plain JSON data (tuples become lists), so that a config equals itself after a save and load."""
    try:
        return json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError) as error:
        raise ConfigError(f"{what} must be plain JSON data (numbers, strings, lists, objects): {error}.") from None


# --- the configuration ----------------------------------------------------------------------------
# Arguments generate() passes itself; the rest of the pipeline's __call__ may be given as keywords. Refused by
# RunConfig (a case's `pipeline`, before any model loads) and by the sampler (generate()'s keywords).
RESERVED_PIPELINE_ARGS = {
    "prompt": "the first argument of generate()",
    "ip_adapter_image": "generate() passes the subjects' images",
    "ip_adapter_image_embeds": "generate() passes the subjects' images",
    "generator": "use seed=",
    "output_type": "a Run holds PIL images",
    "return_dict": "generate() reads the pipeline's output object",
}


@dataclass(frozen=True)
class SubjectConfig:
    """One subject as configuration: its box, name, priority and where its reference image came from.

    ``image``: a path (relative to the case file), ``"toy:<colour> <shape>"``, ``"sha256:<hex>"`` (the
    hash of the RGB pixels of an in-memory image) or None (unknown).
    """

    box: tuple[float, float, float, float]
    name: str | None = None
    priority: float | None = None
    image: str | None = None

    def __post_init__(self) -> None:
        label = f"subject {self.name!r}" if self.name else "subject"
        object.__setattr__(self, "name", _optional_text(self.name, f"name of {label}"))
        object.__setattr__(self, "box", validate_box(self.box, f"box of {label}"))
        if self.priority is not None:
            object.__setattr__(self, "priority", real_number(self.priority, f"priority of {label}"))
        object.__setattr__(self, "image", _optional_text(self.image, f"image of {label}"))

    def to_dict(self) -> dict:
        return {"name": self.name, "box": list(self.box), "priority": self.priority, "image": self.image}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "subject") -> "SubjectConfig":
        if not isinstance(data, Mapping):
            raise ConfigError(f"{where} must be an object with 'box' (and 'image', 'name', 'priority'), got {data!r}.")
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise ConfigError(f"{where}: unknown field(s) {unknown}; allowed: {sorted(f.name for f in fields(cls))}.")
        if "box" not in data:
            raise ConfigError(f"{where}: field 'box' is missing.")
        try:
            return cls(**data)
        except ConfigError as error:
            raise ConfigError(f"{where}: {error}") from None

    # mapping-style read access, for code written when Run.config was a dict
    def __getitem__(self, key: str) -> Any:
        return self.to_dict()[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.to_dict().get(key, default)


@dataclass(frozen=True)
class RunConfig:
    """Everything that determines one generation (with the reference images), frozen and validated.

    Fields left None take the pipeline's defaults when generating; a ``Run`` records the values used.
    ``pipeline``: further keyword arguments of the pipeline's ``__call__`` (JSON-able; images as
    ``{"path": ...}`` or ``{"sha256": ...}``). ``model``: a model name or dict for
    :func:`anyms_core.models.load_pipeline`. ``record``: a :class:`~anyms_core.recording.RecordConfig`
    as a dict, or None (off).
    """

    prompt: str
    subjects: tuple[SubjectConfig, ...]
    variant: str = "anyms"
    seed: int = 0
    steps: int | None = None
    guidance_scale: float | None = None
    ip_adapter_scale: float | tuple[float, ...] | None = None
    height: int | None = None
    width: int | None = None
    negative_prompt: str | None = None
    num_images_per_prompt: int = 1
    priority_rule: str = "order"
    model: str | dict | None = None
    record: dict | None = None
    pipeline: dict = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen dataclass)
        if self.schema_version != SCHEMA_VERSION:
            raise ConfigError(f"schema_version {self.schema_version!r} is not supported; this version reads {SCHEMA_VERSION}.")
        if not isinstance(self.prompt, str):
            raise ConfigError(f"prompt must be a string, got {type(self.prompt).__name__} {self.prompt!r}.")
        if isinstance(self.subjects, (str, bytes, Mapping)) or not hasattr(self.subjects, "__iter__"):
            raise ConfigError(f"subjects must be a non-empty list, got {type(self.subjects).__name__}.")
        subjects = tuple(
            s if isinstance(s, SubjectConfig) else SubjectConfig.from_dict(s, f"subjects[{i}]")
            for i, s in enumerate(self.subjects)
        )
        if not subjects:
            raise ConfigError("subjects must be a non-empty list: AnyMS needs at least one subject.")
        set_("subjects", subjects)
        if self.variant not in VARIANTS:
            raise ConfigError(f"variant must be one of {list(VARIANTS)}, got {self.variant!r}.")
        set_("seed", integer(self.seed, "seed", 0, MAX_SEED))
        if self.steps is not None:
            set_("steps", integer(self.steps, "steps", minimum=1))
        if self.guidance_scale is not None:
            set_("guidance_scale", real_number(self.guidance_scale, "guidance_scale", minimum=0.0))
        scale = validate_scale(self.ip_adapter_scale)
        if isinstance(scale, tuple) and len(scale) != len(subjects):
            raise ConfigError(f"ip_adapter_scale has {len(scale)} values for {len(subjects)} subjects.")
        set_("ip_adapter_scale", scale)
        for name in ("height", "width"):
            if getattr(self, name) is not None:
                set_(name, integer(getattr(self, name), name, minimum=1))
        _optional_text(self.negative_prompt, "negative_prompt")
        set_("num_images_per_prompt", integer(self.num_images_per_prompt, "num_images_per_prompt", minimum=1))
        if self.priority_rule not in PRIORITY_RULES:
            raise ConfigError(f"priority_rule must be one of {list(PRIORITY_RULES)}, got {self.priority_rule!r}.")
        if self.model is not None and not isinstance(self.model, (str, Mapping)):
            raise ConfigError(f"model must be a name or an object with 'name', got {self.model!r}.")
        if isinstance(self.model, Mapping):
            set_("model", _json_value(self.model, "model"))
        if self.record is not None and not isinstance(self.record, Mapping):
            raise ConfigError(f"record must be an object (a RecordConfig as a dict) or null, got {self.record!r}.")
        if self.record is not None:
            set_("record", _json_value(self.record, "record"))
        if not isinstance(self.pipeline, Mapping) or not all(isinstance(k, str) for k in self.pipeline):
            raise ConfigError(f"pipeline must be an object of keyword arguments, got {self.pipeline!r}.")
        # every field reaches generate() by its own name (steps as num_inference_steps): repeated in `pipeline`
        # it would be passed twice
        own = {f.name: f.name for f in fields(self) if f.name != "pipeline"} | {"num_inference_steps": "steps"}
        repeated = sorted(set(self.pipeline) & set(own))
        if repeated:
            raise ConfigError("pipeline must not repeat the case's own fields: "
                              + ", ".join(f"{name!r} (use the field {own[name]!r})" for name in repeated) + ".")
        reserved = sorted(set(self.pipeline) & set(RESERVED_PIPELINE_ARGS))
        if reserved:
            raise ConfigError("pipeline must not set what generate() sets itself: "
                              + "; ".join(f"{name!r} ({RESERVED_PIPELINE_ARGS[name]})" for name in reserved) + ".")
        set_("pipeline", _json_value(self.pipeline, "pipeline"))

    def to_dict(self) -> dict:
        """A JSON-able dict; ``RunConfig.from_dict(config.to_dict()) == config``."""
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["subjects"] = [s.to_dict() for s in self.subjects]
        if isinstance(self.ip_adapter_scale, tuple):
            data["ip_adapter_scale"] = list(self.ip_adapter_scale)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "config") -> "RunConfig":
        """Builds and validates a config from a dict (a case file or ``run.json``'s ``config``).

        Unknown fields are an error; ``schema_version`` may be left out (then it is the current one).
        """
        if not isinstance(data, Mapping):
            raise ConfigError(f"{where} must be a JSON object with 'prompt' and 'subjects', got {type(data).__name__}.")
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"{where}: unknown field(s) {unknown}; allowed: {sorted(names)}.")
        for required in ("prompt", "subjects"):
            if required not in data:
                raise ConfigError(f"{where}: field '{required}' is missing.")
        values = dict(data)
        if isinstance(values.get("ip_adapter_scale"), list):
            values["ip_adapter_scale"] = tuple(values["ip_adapter_scale"])
        try:
            return cls(**values)
        except ConfigError as error:
            raise ConfigError(f"{where}: {error}") from None

    def __hash__(self) -> int:  # dict fields (model, record, pipeline) hash by their JSON text
        return hash(json.dumps(self.to_dict(), sort_keys=True))

    def replace(self, **changes: Any) -> "RunConfig":
        """A copy with ``changes`` applied (and validated again)."""
        return RunConfig.from_dict({**self.to_dict(), **changes})

    # mapping-style read access, for code written when Run.config was a dict (``run.config["seed"]``)
    def __getitem__(self, key: str) -> Any:
        if key not in {f.name for f in fields(self)}:
            raise KeyError(key)
        return self.to_dict()[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.to_dict().get(key, default)
