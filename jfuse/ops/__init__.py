"""The fused ops, for direct use. Each takes ``implementation=None | "xla" | "pallas" | "interpret"``."""

from jfuse.core.activations import ACTIVATIONS
from jfuse.ops.glu import glu
from jfuse.ops.linear import linear
from jfuse.ops.norm import layer_norm, rms_norm

__all__ = ["ACTIVATIONS", "glu", "layer_norm", "linear", "rms_norm"]
