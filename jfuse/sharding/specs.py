"""The layout of one array on a mesh: for each dimension, the mesh axes that split it.

A :data:`Spec` is a tuple with one entry per dimension, each a tuple of mesh axis names (empty:
not split). ``None`` in place of a spec means "not known": jfuse then never guesses.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Optional

from jax.sharding import NamedSharding, PartitionSpec

Spec = tuple[tuple[str, ...], ...]
MaybeSpec = Optional[Spec]


def replicated(ndim: int) -> Spec:
    return ((),) * ndim


def from_partition_spec(pspec: Any, ndim: int) -> MaybeSpec:
    """A ``PartitionSpec`` as a Spec padded to ``ndim``; None if any entry is unconstrained."""
    entries = list(pspec) if pspec is not None else []
    if len(entries) > ndim:
        return None
    dims = []
    for entry in entries + [None] * (ndim - len(entries)):
        if entry is None:
            dims.append(())
        elif isinstance(entry, str):
            dims.append((entry,))
        elif isinstance(entry, (tuple, list)) and all(isinstance(a, str) for a in entry):
            dims.append(tuple(entry))
        else:  # PartitionSpec.UNCONSTRAINED and anything newer
            return None
    return tuple(dims)


def from_sharding(sharding: Any, ndim: int) -> tuple[MaybeSpec, Any]:
    """(spec, mesh) of a concrete sharding: a NamedSharding gives both; a single device is
    replicated with no mesh; any other kind of sharding is unknown."""
    if isinstance(sharding, NamedSharding):
        return from_partition_spec(sharding.spec, ndim), sharding.mesh
    if sharding is None or len(getattr(sharding, "device_set", ())) == 1:
        return replicated(ndim), None
    return None, None


def to_partition_spec(spec: Spec) -> PartitionSpec:
    return PartitionSpec(*[None if not axes else axes[0] if len(axes) == 1 else axes
                           for axes in spec])


def shard_count(axes: Iterable[str], mesh: Any) -> int:
    sizes = dict(mesh.shape)
    return math.prod(sizes[a] for a in axes)


def without_repeats(dims: Iterable[tuple[str, ...]]) -> Spec:
    """A mesh axis can split only one dimension: keep its first use."""
    seen: set[str] = set()
    out = []
    for axes in dims:
        kept = tuple(a for a in axes if a not in seen)
        seen.update(kept)
        out.append(kept)
    return tuple(out)


def describe(spec: Spec) -> str:
    return str(to_partition_spec(spec))
