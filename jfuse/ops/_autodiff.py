"""Helpers for the fused ops' derivative rules.

:func:`recompute_in_backward` wraps a tangent computation in ``jax.checkpoint`` so that ``grad``
saves only the function's primal inputs (the pre-activation, the GLU products, a norm's
statistics) and recomputes the rest in the backward. Its policy
(:func:`jfuse.core.markers.derivative_policy`) also marks the region as jfuse's own, so the
rewriter never rewrites inside a fused op's derivative.
"""

from __future__ import annotations

from typing import Callable

import jax

from jfuse.core.markers import derivative_policy


def recompute_in_backward(fn: Callable) -> Callable:
    return jax.checkpoint(fn, policy=derivative_policy)
