"""Helpers for the fused ops' derivative rules.

:func:`recompute_in_backward` wraps a tangent computation in ``jax.checkpoint`` so that ``grad``
saves only the function's primal inputs (the pre-activation, the GLU products, a norm's
statistics) and recomputes the rest in the backward. Its policy object also marks the region as
jfuse's own, so the rewriter never rewrites inside a fused op's derivative
(:func:`is_derivative_region`).
"""

from __future__ import annotations

from typing import Any, Callable

import jax


def _save_nothing(*_, **__) -> bool:
    """A checkpoint policy: nothing inside is saved (as ``nothing_saveable``), and it is ours."""
    return False


def recompute_in_backward(fn: Callable) -> Callable:
    return jax.checkpoint(fn, policy=_save_nothing)


def is_derivative_region(eqn: Any) -> bool:
    """True for the ``checkpoint`` equation of a fused op's tangent rule."""
    return eqn.params.get("policy") is _save_nothing
