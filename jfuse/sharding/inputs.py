"""The layouts of a call's inputs, read from the concrete arguments and jax.jit's ``in_shardings``.

Inside ``jax.jit`` the traced values carry the mesh but, with automatic axes, not how each is
split (jax.jit decides that after tracing). ``jfuse.jit`` sees the arguments before jax.jit does:
:func:`input_layouts` reads each array's ``NamedSharding`` (or the ``in_shardings`` given to
``jfuse.jit``), which is what the partition pass starts from.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
from jax.sharding import Sharding

from jfuse.sharding.specs import MaybeSpec, from_sharding


@dataclasses.dataclass(frozen=True)
class InputLayouts:
    """Per argument leaf, its layout (None: unknown); the mesh they share, if any."""

    specs: tuple[MaybeSpec, ...]
    mesh: Any
    problem: str | None = None  # why the layouts cannot be used at all


def _shardings_per_leaf(args: tuple, in_shardings: Any) -> list | None:
    """``in_shardings`` broadcast to the leaves of ``args`` (None where not given)."""
    if in_shardings is None:
        return None
    if isinstance(in_shardings, Sharding):
        return [in_shardings] * len(jax.tree_util.tree_leaves(args))
    if not isinstance(in_shardings, (tuple, list)) or len(in_shardings) != len(args):
        return None
    out = []
    for prefix, arg in zip(in_shardings, args):
        n = len(jax.tree_util.tree_leaves(arg))
        if prefix is None or isinstance(prefix, Sharding):
            out += [prefix] * n
        else:
            leaves = jax.tree_util.tree_leaves(prefix, is_leaf=lambda s: isinstance(s, Sharding))
            if len(leaves) != n:
                return None
            out += leaves
    return out


def input_layouts(args: tuple, kwargs: dict, in_shardings: Any = None) -> InputLayouts:
    """The layouts of the leaves of ``(args, kwargs)``, in flattening order (a Python scalar or
    a non-array leaf counts as replicated)."""
    leaves = jax.tree_util.tree_leaves((args, kwargs))
    given = _shardings_per_leaf(args, in_shardings)  # covers the positional leaves, first
    specs: list[MaybeSpec] = []
    meshes = []
    for i, leaf in enumerate(leaves):
        try:
            ndim = len(jax.typeof(leaf).shape)
        except TypeError:  # not an array (a static argument)
            specs.append(None)
            continue
        sharding = given[i] if given is not None and i < len(given) else None
        if sharding is None:
            if isinstance(leaf, jax.core.Tracer):  # inside another trace: not known here
                specs.append(None)
                continue
            sharding = getattr(leaf, "sharding", None)
        spec, mesh = from_sharding(sharding, ndim)
        specs.append(spec)
        if mesh is not None and mesh.size > 1:
            meshes.append(mesh)
    mesh = meshes[0] if meshes else None
    problem = None
    if any(m.shape != mesh.shape or m.axis_names != mesh.axis_names for m in meshes):
        problem = "the inputs are laid out on different meshes"
    return InputLayouts(tuple(specs), mesh, problem)


def dynamic_specs(layouts: InputLayouts | None, n_leaves: int,
                  positions: Sequence[int]) -> tuple[MaybeSpec, ...]:
    """The layouts at ``positions`` of a flattening with ``n_leaves`` leaves (unknown if the
    flattening is not the one ``layouts`` was read from)."""
    if layouts is None or len(layouts.specs) != n_leaves:
        return (None,) * len(positions)
    return tuple(layouts.specs[i] for i in positions)
