"""Helpers for the fused ops' derivative rules.

:func:`recompute_in_backward` wraps a tangent computation in ``jax.checkpoint`` so that ``grad``
saves only the function's primal inputs (the pre-activation, the GLU products, a norm's
statistics) and recomputes the rest in the backward; a norm also keeps the per-row statistics
its derivative computes (``save_at_most``), instead of reducing over the rows again. Its policy
(:class:`jfuse.core.markers.DerivativePolicy`) also marks the region as jfuse's own, so the
rewriter never rewrites inside a fused op's derivative.

:func:`as_forward_runs` picks, per lowering platform, the derivative that matches what the forward
runs there: the kernel's own derivative where the kernel runs, and elsewhere the derivative of
the XLA implementation (inside a rewrite, the user's own equations), so a gradient is always the
derivative of the values the forward computed.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
from jax import lax

from jfuse.core import targets
from jfuse.core.markers import DerivativePolicy
from jfuse.ops import _partitionable
from jfuse.ops._op import KERNEL_BACKENDS, FusedOp, OpSpec


def recompute_in_backward(fn: Callable, save_at_most: int = 0) -> Callable:
    """``fn`` under ``jax.checkpoint`` with jfuse's policy: nothing saved, or values of at most
    ``save_at_most`` elements (see :class:`jfuse.core.markers.DerivativePolicy`)."""
    return jax.checkpoint(fn, policy=DerivativePolicy(save_at_most))


def kernel_platforms(op: FusedOp, spec: OpSpec, operands: Sequence[Any]) -> frozenset[str] | None:
    """The lowering platforms whose forward runs ``op``'s kernel for this call, by the rules
    :func:`jfuse.ops._dispatch.dispatch` applies; None when every platform runs it (interpret
    mode).

    On a mesh while jfuse traces, the partition pass decides per shard later: a platform whose
    kernel accepts the whole call is counted as running it (a shard it refuses runs the op's
    generic XLA implementation, whose statistics are the kernel's).
    """
    implementation = spec.implementation
    if implementation == "interpret":
        return None
    if implementation == "xla":
        return frozenset()
    mesh = _partitionable.mesh_of(jax.tree_util.tree_leaves(tuple(operands)))
    if (mesh is not None and implementation is None
            and not _partitionable.partitioning_active()):
        return frozenset()
    avals = [None if o is None else jax.typeof(o) for o in operands]
    return frozenset(KERNEL_BACKENDS) - frozenset(op.refusals(spec, avals))


def _lowered_kernel_platforms(op: FusedOp, spec: OpSpec,
                              operands: Sequence[Any]) -> frozenset[str] | None:
    """:func:`kernel_platforms`, less the platforms this program will not be lowered for (as
    the forward's dispatch leaves them out)."""
    platforms = kernel_platforms(op, spec, operands)
    if platforms is None:
        return None
    return frozenset(p for p in platforms if targets.wanted(p))


def runs_xla_everywhere(op: FusedOp, spec: OpSpec, operands: Sequence[Any]) -> bool:
    """True when no platform this program may be lowered for runs ``op``'s kernel for this
    call: the forward is the XLA implementation wherever it runs (a CPU program, ``"xla"``)."""
    return _lowered_kernel_platforms(op, spec, operands) == frozenset()


def as_forward_runs(op: FusedOp, spec: OpSpec, operands: Sequence[Any],
                    kernel_derivative: Callable, xla_derivative: Callable) -> Callable:
    """One derivative function that runs ``kernel_derivative`` on the platforms whose forward
    runs the kernel (:func:`kernel_platforms`) and ``xla_derivative`` on every other one, chosen
    at lowering time (``lax.platform_dependent``). Both take the same arguments and return the
    same structure."""
    platforms = _lowered_kernel_platforms(op, spec, operands)
    if platforms is None:
        return kernel_derivative
    if not platforms:
        return xla_derivative

    def derivative(*args):
        return lax.platform_dependent(
            *args, default=xla_derivative, **{p: kernel_derivative for p in sorted(platforms)})

    return derivative
