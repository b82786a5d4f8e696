"""Fused-op calls on a multi-device mesh: a safe placeholder first, kernels per shard after.

XLA cannot partition a Pallas kernel ("Mosaic kernels cannot be automatically partitioned"), and
when a fused op is traced its operands' shardings are not known yet (jax.jit decides them after
tracing). So while jfuse traces a function (:func:`partition_context`), a fused op whose operands
live on a multi-device mesh does not emit its kernels. It emits a *marker*: a nested jit named
``jfuse_partitionable_<id>`` whose body is the op's XLA implementation, correct under any
sharding, and it records here how to run the op on one shard (:class:`PartitionableCall`).

After the rewrite, :mod:`jfuse.sharding.partition` propagates the inputs' shardings through the
program, and replaces each marker by the kernel inside a ``shard_map`` laid out from its operands'
shardings, or leaves the marker (XLA) and says why in the report. A marker nobody replaces is
still the right answer: that is what makes this safe.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import threading
from typing import Any, Callable, Sequence

import jax

MARKER_PREFIX = "jfuse_partitionable_"

# Operand roles the partition rules understand (see jfuse.sharding.rules).
X = "x"  # activations (..., K) or (..., H): leading dims are rows, the last is contracted/normalized
RESIDUAL = "residual"  # added to x before a norm: laid out like x
WEIGHT_KN = "weight_kn"  # (K, N)
WEIGHT_NK = "weight_nk"  # (N, K)
FUSED_WEIGHT = "fused_weight"  # a weight the op slices (GLU's (K, 2N), (K, 2, N)): not split on N
FUSED_WEIGHT_NK = "fused_weight_nk"  # the same with K last (torch-style (2N, K))
BIAS = "bias"  # an output-features vector (N,), maybe as (1, N) or a scalar
FUSED_BIAS = "fused_bias"  # a bias the op slices
FEATURE_VECTOR = "feature_vector"  # a norm's scale or bias over H: replicated


@dataclasses.dataclass(frozen=True, eq=False)
class PartitionableCall:
    """How to run one fused-op call per shard. Operands and outputs are flat lists of arrays."""

    pattern: str  # the report's name for it: "linear", "glu", "add_rms_norm", ...
    roles: tuple[str, ...]  # one per flat operand
    operand_avals: tuple[Any, ...]
    contracts_features: bool  # True for matmuls (linear, glu), False for norms
    reference: Callable[..., list]  # the global XLA implementation (replays the user's equations)
    local_reference: Callable[..., list]  # the XLA implementation for any shape, for one shard
    kernel: Callable[[str, bool], Callable[..., list]]  # (backend, interpret) -> flat function
    implementation: str | None
    output_avals: list = dataclasses.field(default_factory=list)  # filled once traced


class _Depth(threading.local):
    value = 0


_depth = _Depth()
_ids = itertools.count()
# Every marker's call, by id. Global rather than per trace because a fused function's cached
# rewrite can be evaluated again inside a later trace; bounded, oldest first out (a marker whose
# entry is gone simply stays XLA).
_CALLS: collections.OrderedDict[int, PartitionableCall] = collections.OrderedDict()
_MAX_CALLS = 1 << 16


class partition_context:
    """While active (jfuse tracing a function), fused ops on a mesh emit markers."""

    def __enter__(self) -> None:
        _depth.value += 1

    def __exit__(self, *exc) -> None:
        _depth.value -= 1


def partitioning_active() -> bool:
    return _depth.value > 0


def registered_call(uid: int) -> PartitionableCall | None:
    return _CALLS.get(uid)


def mesh_of(operands: Sequence[Any]):
    """The multi-device mesh the operands live on, or None for a single-device program.

    Read from the operands' abstract values (jax.jit puts the mesh of the inputs' shardings
    there). Axes that are all manual (inside the user's own ``shard_map``) count as one device:
    a kernel there already runs per shard.
    """
    for operand in operands:
        sharding = getattr(jax.typeof(operand), "sharding", None)
        mesh = getattr(sharding, "mesh", None)
        if mesh is None or getattr(mesh, "empty", True) or mesh.size <= 1:
            continue
        types = getattr(mesh, "axis_types", ())
        if types and all("Manual" in str(t) for t in types):
            continue
        return mesh
    return None


def emit_marker(call: PartitionableCall, body: Callable[..., list], operands: Sequence[Any]):
    """Register ``call`` and return ``body(*operands)`` wrapped in a marker the pass can find."""
    uid = next(_ids)
    _CALLS[uid] = call
    while len(_CALLS) > _MAX_CALLS:
        _CALLS.popitem(last=False)

    def marker(*leaves):
        return body(*leaves)

    marker.__name__ = marker.__qualname__ = f"{MARKER_PREFIX}{uid}"
    return jax.jit(marker)(*operands)


def marker_id(eqn: Any) -> int | None:
    """The id of a marker equation, or None for any other equation."""
    if eqn.primitive.name not in ("jit", "pjit"):
        return None
    name = str(eqn.params.get("name", ""))
    if not name.startswith(MARKER_PREFIX):
        return None
    try:
        return int(name[len(MARKER_PREFIX):])
    except ValueError:
        return None
