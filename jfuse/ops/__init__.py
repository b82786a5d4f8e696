"""The fused ops, for direct use. Each takes ``implementation=None | "xla" | "pallas" | "interpret"``."""

from jfuse.ops.activations import ACTIVATIONS
from jfuse.ops.linear import linear

__all__ = ["ACTIVATIONS", "linear"]
