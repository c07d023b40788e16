"""The names of the AnyMS variants: the one place that lists and validates them.

Every other module (processor, CLI, widgets, figures) imports :data:`VARIANTS` and
:func:`check_variant` from here; the maths of each variant is in :mod:`anyms_core.processor`.
"""

from __future__ import annotations

VARIANTS: tuple[str, ...] = ("anyms", "mask", "none", "joint", "text")

# Column titles in the paper's words (Sec. 4.4 and Fig. 6); the figures use these.
VARIANT_LABELS: dict[str, str] = {
    "anyms": "AnyMS (crop-and-merge)",
    "mask": "w/o crop-and-merge (mask)",
    "none": "w/o local decoupling",
    "joint": "joint softmax (stock IP-Adapter)",
    "text": "text only",
}


def check_variant(variant: str) -> str:
    """Returns ``variant`` if it names an AnyMS variant, else raises a ``ValueError`` listing them."""
    if not isinstance(variant, str) or variant not in VARIANTS:
        raise ValueError(f"Unknown AnyMS variant {variant!r}; choose one of {VARIANTS}.")
    return variant
