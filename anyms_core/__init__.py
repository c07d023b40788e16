"""AnyMS: layout-guided, training-free multi-subject customization by attention decoupling.

The public names below are imported on first use (PEP 562), so that ``import anyms_core.config`` and
the ``anyms`` command line start without importing torch or diffusers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "AnyMS": ".sampler",
    "Run": ".run",
    "RunConfig": ".config",
    "SubjectConfig": ".config",
    "ConfigError": ".config",
    "Subject": ".layout",
    "VARIANTS": ".variants",
    "AnyMSAttnProcessor": ".processor",
    "AttentionMaps": ".recording",
    "RecordConfig": ".recording",
    "decoupled": ".session",
}

__all__ = list(_EXPORTS)

if TYPE_CHECKING:
    from .config import ConfigError, RunConfig, SubjectConfig
    from .layout import Subject
    from .processor import AnyMSAttnProcessor
    from .recording import AttentionMaps, RecordConfig
    from .run import Run
    from .sampler import AnyMS
    from .session import decoupled
    from .variants import VARIANTS


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'anyms_core' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
