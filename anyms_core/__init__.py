"""AnyMS: layout-guided, training-free multi-subject customization by attention decoupling."""

from .layout import Subject
from .processor import AnyMSAttnProcessor
from .variants import VARIANTS
from .recording import AttentionMaps, RecordConfig
from .run import Run
from .sampler import AnyMS
from .session import decoupled

__all__ = ["AnyMS", "Run", "Subject", "VARIANTS", "AnyMSAttnProcessor", "AttentionMaps", "RecordConfig", "decoupled"]
