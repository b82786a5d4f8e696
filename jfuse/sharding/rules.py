"""The per-shard layout of one fused-op call, from its operands' layouts.

One rule serves the three ops, because their operands play a few roles
(:mod:`jfuse.core.markers`): rows (the leading dims of ``x``) and output features (``N`` of a
weight) can be split, and the split carries to the outputs unchanged; the contracted or
normalized dim (``K``, ``H``) cannot, because the kernel needs the whole row.

- Rows split over some mesh axes (data parallel, sequence sharded): every shard runs the kernel on
  its rows.
- A weight split on ``N`` (tensor parallel) splits the outputs on ``N``, as XLA would.
- A weight split on ``K`` alone (FSDP) is gathered on entry, as XLA gathers it for the matmul.
- ``x`` split on ``K`` (a row-parallel linear) or ``H`` (a norm over a split hidden dim) would
  need the all-reduced sum before the activation or the statistics, inside the kernel: declined,
  and the call runs XLA's partitioned ops with the reason in the report.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

from jfuse.core import markers as roles
from jfuse.sharding.specs import MaybeSpec, Spec, describe, shard_count


@dataclasses.dataclass(frozen=True)
class Layout:
    """The ``shard_map`` layout of one call."""

    in_specs: tuple[Spec, ...]
    out_specs: tuple[Spec, ...]
    description: str
    # The op's own per-shard program, for an op whose shards must talk (the LM-head loss combines
    # partial log-sum-exps across a split vocabulary): plain JAX over the flat operand shards,
    # free to use collectives over the mesh axes the specs name. It runs on every platform; None:
    # the op's kernel (or its local XLA reference) per shard on TPU/GPU, the global XLA
    # implementation elsewhere.
    per_shard: Callable[..., Any] | None = None


_WEIGHTS = {roles.WEIGHT_KN: (0, 1), roles.WEIGHT_NK: (1, 0)}  # role -> (K dim, N dim)
_FUSED_WEIGHTS = {roles.FUSED_WEIGHT: 0, roles.FUSED_WEIGHT_NK: -1}  # role -> K dim


def _axes_text(axes: Sequence[str]) -> str:
    return "'" + "', '".join(axes) + "'"


def plan(call: roles.PartitionableCall, specs: Sequence[MaybeSpec],
         out_avals: Sequence[Any], mesh: Any) -> Layout | str:
    """The layout for ``call`` given its operands' layouts, or the reason it is declined."""
    avals = call.operand_avals
    names = set(mesh.axis_names)
    for role, spec, aval in zip(call.roles, specs, avals):
        if spec is None:
            return f"the layout of its {role.replace('_', ' ')} operand {aval.str_short()} is " \
                   "not known to jfuse"
        stray = {a for axes in spec for a in axes} - names
        if stray:
            return f"its {role} operand is laid out over mesh axes {sorted(stray)} that are not " \
                   f"on the mesh {tuple(mesh.axis_names)}"
    x_index = call.roles.index(roles.X)
    x_spec, x_aval = specs[x_index], avals[x_index]
    rows, last = x_spec[:-1], x_spec[-1]
    if last:
        what = ("contraction dim K" if call.contracts_features else "normalized dim")
        need = ("the activation needs the all-reduced sum (a row-parallel matmul)"
                if call.contracts_features else "the statistics need an all-reduce across them")
        return f"x's {what} ({x_aval.shape[-1]}) is split over {_axes_text(last)}: {need}"
    row_axes = {a for axes in rows for a in axes}
    for dim, axes in zip(x_aval.shape[:-1], rows):
        if axes and dim % shard_count(axes, mesh):
            return f"a row dim of {dim} does not divide into {shard_count(axes, mesh)} shards"

    # Output features: the split of the first weight on N, minus mesh axes the rows already use.
    n, n_axes = None, ()
    for role, spec, aval in zip(call.roles, specs, avals):
        if role in _WEIGHTS:
            n_dim = _WEIGHTS[role][1]
            n = aval.shape[n_dim]
            n_axes = tuple(a for a in spec[n_dim] if a not in row_axes)
            break
    if n_axes and n % shard_count(n_axes, mesh):
        n_axes = ()  # uneven output features: gathered rather than padded

    gathered: list[str] = []
    in_specs = []
    for role, spec, aval in zip(call.roles, specs, avals):
        ndim = len(aval.shape)
        if role in (roles.X, roles.RESIDUAL):
            in_specs.append(tuple(rows) + ((),))
        elif role in _WEIGHTS:
            k_dim, n_dim = _WEIGHTS[role]
            if spec[k_dim]:
                gathered += [a for a in spec[k_dim] if a not in gathered]
            dims = [()] * ndim
            dims[n_dim] = n_axes
            in_specs.append(tuple(dims))
        elif role in _FUSED_WEIGHTS:
            k_dim = _FUSED_WEIGHTS[role] % ndim
            split = [d for d in range(ndim) if d != k_dim and spec[d]]
            if split:
                return ("its fused gate/up weight is split along its output features "
                        f"({describe(spec)}); the kernel takes the gate and up halves whole")
            if spec[k_dim]:
                gathered += [a for a in spec[k_dim] if a not in gathered]
            in_specs.append(((),) * ndim)
        elif role == roles.BIAS:
            dims = [()] * ndim
            if n_axes and ndim and aval.shape[-1] == n:
                dims[-1] = n_axes
            in_specs.append(tuple(dims))
        elif role in (roles.FUSED_BIAS, roles.FEATURE_VECTOR):
            if any(spec):
                gathered += [a for axes in spec for a in axes if a not in gathered]
            in_specs.append(((),) * ndim)
        else:
            return f"an operand with role {role!r} has no sharding rule"

    lead = tuple(x_aval.shape[:-1])
    out_specs = []
    for aval in out_avals:
        shape = tuple(aval.shape)
        if len(shape) != len(lead) + 1 or shape[:-1] != lead:
            return f"an output of shape {shape} is not laid out by rows"
        features = n_axes if (call.contracts_features and shape[-1] == n) else ()
        out_specs.append(tuple(rows) + (features,))

    parts = []
    if row_axes:
        parts.append(f"rows over {_axes_text(sorted(row_axes))}")
    if n_axes:
        parts.append(f"output features over {_axes_text(n_axes)}")
    if gathered:
        parts.append(f"parameters gathered over {_axes_text(gathered)} (as XLA gathers them)")
    description = ", ".join(parts) or "replicated (every device runs the whole call)"
    return Layout(tuple(in_specs), tuple(out_specs), description)
