"""Fused-op calls on a multi-device mesh: a safe placeholder first, kernels per shard after.

XLA cannot partition a Pallas kernel ("Mosaic kernels cannot be automatically partitioned"), and
when a fused op is traced its operands' shardings are not known yet (jax.jit decides them after
tracing). So while jfuse traces a function (:func:`~jfuse.core.markers.partition_context`), a
fused op whose operands live on a multi-device mesh does not emit its kernels. It emits a
*marker*: a nested jit whose body is the op's XLA implementation, correct under any sharding, and
it registers how to run the op on one shard (:class:`~jfuse.core.markers.PartitionableCall`).

After the rewrite, :mod:`jfuse.sharding.partition` propagates the inputs' shardings through the
program, and replaces each marker by the kernel inside a ``shard_map`` laid out from its operands'
shardings, or leaves the marker (XLA) and says why in the report. A marker nobody replaces is
still the right answer: that is what makes this safe.

The marker's vocabulary (its name, the operand roles, the registry) is shared with the engine and
lives in :mod:`jfuse.core.markers`; this module only emits markers.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax

from jfuse.core.markers import (  # noqa: F401  (the roles and the call, re-exported for the ops)
    BIAS,
    FEATURE_VECTOR,
    FUSED_BIAS,
    FUSED_WEIGHT,
    FUSED_WEIGHT_NK,
    RESIDUAL,
    WEIGHT_KN,
    WEIGHT_NK,
    X,
    PartitionableCall,
    mesh_of,
    partitioning_active,
    register_call,
)


def emit_marker(call: PartitionableCall, body: Callable[..., list], operands: Sequence[Any]):
    """Register ``call`` and return ``body(*operands)`` wrapped in a marker the pass can find."""

    def marker(*leaves):
        return body(*leaves)

    marker.__name__ = marker.__qualname__ = register_call(call)
    return jax.jit(marker)(*operands)
