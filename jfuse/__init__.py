"""jfuse: fused kernels for JAX models, without changing their code.

``jfuse.jit(fn)`` traces ``fn``, replaces the blocks a dedicated kernel does better than XLA's
generic fusion (matmul + bias + activation, ...) with fused ops, and compiles the result with
``jax.jit``. ``jfuse.fuse`` is the rewrite alone; ``jfuse.explain`` reports what would fuse;
``jfuse.ops`` holds the fused ops for direct use.
"""

from jfuse import ops
from jfuse.api import FusedFunction, FusionError, JittedFusedFunction, explain, fuse, jit
from jfuse.report import FusedSite, FusionReport, MissedFusion, MissReason

__version__ = "0.1.0"

__all__ = [
    "FusedFunction",
    "FusedSite",
    "FusionError",
    "FusionReport",
    "JittedFusedFunction",
    "MissReason",
    "MissedFusion",
    "explain",
    "fuse",
    "jit",
    "ops",
    "__version__",
]
