"""The fused ops, for direct use. Each takes ``implementation=None | "xla" | "pallas" | "interpret"``.

Every module here whose name does not start with ``_`` is one op: its public functions (its
``__all__``) are exported from ``jfuse.ops``, its :class:`~jfuse.ops._op.FusedOp` joins
:data:`OPS` and its benchmark declarations join :data:`BENCHMARKS`. Adding an op is adding its
module; nothing here changes.
"""

from __future__ import annotations

import importlib
import pkgutil

from jfuse.core.activations import ACTIVATIONS
from jfuse.ops._op import Benchmark, FusedOp

OPS: tuple[FusedOp, ...] = ()  # one declaration per op, in module order
BENCHMARKS: tuple[Benchmark, ...] = ()  # what benchmarks/ops.py times, declared beside each op
__all__ = ["ACTIVATIONS", "BENCHMARKS", "OPS"]

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda info: info.name):
    if _info.name.startswith("_"):
        continue
    _module = importlib.import_module(f"{__name__}.{_info.name}")
    _missing = [name for name in ("__all__", "BENCHMARKS") if not hasattr(_module, name)]
    if _missing:
        raise ImportError(f"jfuse.ops.{_info.name} must declare {_missing} (its public functions "
                          "and what the benchmarks time; see jfuse/ops/_op.py)")
    for _name in _module.__all__:
        globals()[_name] = getattr(_module, _name)
        __all__.append(_name)
    OPS += tuple(v for v in vars(_module).values() if isinstance(v, FusedOp))
    BENCHMARKS += tuple(_module.BENCHMARKS)
