"""What differs between the JAX releases jfuse supports (jax 0.10 through 0.12), in one place.

Primitive names JAX renamed or split over releases, params whose layout changed, and features
only newer JAX has. Each entry says why jfuse needs it and which releases differ. This module
knows nothing about jfuse's passes, ops or markers.

(cuDNN's fused attention entry point differs between 0.10 and 0.12 only in arguments jfuse does
not pass: :mod:`jfuse._jax.cudnn` calls it by keyword, the same way on both.)
"""

from __future__ import annotations

from typing import Any

import jax
from jax.extend import core as jex_core

# --- primitive names -----------------------------------------------------------------------------

# A nested ``jax.jit`` call: ``pjit`` on older JAX, ``jit`` since it was renamed.
CALL_PRIMITIVES = frozenset({"jit", "pjit"})
# Call primitives with no jit params (``closed_call`` from ``core.closed_call``; ``core_call`` on
# older JAX): always safe to inline.
PLAIN_CALL_PRIMITIVES = frozenset({"closed_call", "core_call"})
# ``jax.checkpoint`` regions: ``checkpoint`` today, ``remat``/``remat2`` on older releases.
REMAT_PRIMITIVES = frozenset({"checkpoint", "remat", "remat2"})
# ``jax.custom_vjp`` regions (the ``_jaxpr`` form is what older JAX leaves after tracing).
CUSTOM_VJP_PRIMITIVES = frozenset({"custom_vjp_call", "custom_vjp_call_jaxpr"})
CUSTOM_JVP_PRIMITIVE = "custom_jvp_call"
# ``lax.platform_dependent`` lowers to a ``cond`` whose index comes from this primitive (an
# implementation detail of JAX with no public name).
PLATFORM_INDEX_PRIMITIVE = "platform_index"
# Control flow whose bodies keep their inputs and outputs when rewritten.
CONTROL_FLOW_PRIMITIVES = frozenset({"scan", "while", "cond"})

# Primitives grouped by how jfuse's sharding propagation treats them. JAX adds and renames
# primitives between releases (``copy_p``, ``square``, ``split`` came later), so the lists live
# here; a primitive missing from them is only "layout unknown", never an error.
ELEMENTWISE_PRIMITIVES = frozenset("""
    abs acos acosh add add_any and asin asinh atan atan2 atanh cbrt ceil clamp conj convert_element_type
    copy copy_p cos cosh digamma div eq erf erf_inv erfc exp exp2 expm1 floor ge gt igamma imag
    integer_pow is_finite le lgamma log log1p logistic lt max min mul ne neg nextafter not or pow
    real reduce_precision rem round rsqrt select_n shift_left shift_right_arithmetic
    shift_right_logical sign sin sinh sqrt square stop_gradient sub tan tanh xor
""".split())
REDUCTION_PRIMITIVES = frozenset(
    "reduce_sum reduce_max reduce_min reduce_prod reduce_and reduce_or reduce_xor argmax argmin"
    .split()
)
CUMULATIVE_PRIMITIVES = frozenset("cumsum cumprod cummax cummin cumlogsumexp".split())
# Shape-only primitives that insert, drop or regroup dims without touching values.
RESHAPE_PRIMITIVES = frozenset({"reshape", "squeeze", "expand_dims"})

# The param holding the body of each call-like primitive (the operands flow into it unchanged).
CALL_BODY_PARAMS = {
    **{name: "jaxpr" for name in CALL_PRIMITIVES | REMAT_PRIMITIVES},
    **{name: "call_jaxpr" for name in PLAIN_CALL_PRIMITIVES},
    CUSTOM_JVP_PRIMITIVE: "call_jaxpr",
    # jax.custom_derivatives.linear_call: its callee takes every operand (consts, residuals,
    # linear inputs); the LM-head loss's backward on a mesh is one (see ops/linear_cross_entropy)
    "linear_call": "callee",
    "custom_vjp_call": "call_jaxpr",
    "custom_vjp_call_jaxpr": "fun_jaxpr",
}


def is_call(eqn: Any) -> bool:
    """True for a nested ``jax.jit`` call (whatever this JAX names its primitive)."""
    return eqn.primitive.name in CALL_PRIMITIVES


def is_custom_vjp(eqn: Any) -> bool:
    return eqn.primitive.name in CUSTOM_VJP_PRIMITIVES


def is_platform_index(eqn: Any) -> bool:
    """True for the equation that picks ``lax.platform_dependent``'s branch by platform."""
    return eqn.primitive.name == PLATFORM_INDEX_PRIMITIVE


# --- params --------------------------------------------------------------------------------------

def bind_params(eqn: jex_core.JaxprEqn) -> dict[str, Any]:
    """The params to re-bind ``eqn.primitive`` with (a dict on every supported JAX)."""
    params = eqn.primitive.get_bind_params(eqn.params)
    if isinstance(params, tuple):  # (subfuns, params) on JAX older than 0.9.2
        raise NotImplementedError("jfuse needs jax >= 0.10")
    return params


def scan_operand_groups(eqn: jex_core.JaxprEqn, values: list) -> tuple[list, list, list]:
    """``values`` (one per operand of a ``scan``) split into (consts, carry, xs)."""
    params = eqn.params
    if "num_consts" in params:
        consts, carry = params["num_consts"], params["num_carry"]
        return list(values[:consts]), list(values[consts:consts + carry]), list(values[consts + carry:])
    # jax >= 0.12: the split is a FlatTree param
    consts, carry, xs = params["ft_in"].update(list(values)).unpack()
    return list(consts), list(carry), list(xs)


def scan_num_carry(eqn: jex_core.JaxprEqn) -> int:
    if "num_carry" in eqn.params:
        return eqn.params["num_carry"]
    _, carry = eqn.params["ft_out"].update(list(range(len(eqn.outvars)))).unpack()
    return len(list(carry))


def is_unspecified_sharding(sharding: Any) -> bool:
    """True for the placeholder a ``jit`` equation holds where no sharding was given.

    JAX has no public name for it (``UnspecifiedValue`` in ``jax._src.sharding_impls``), so it is
    recognised by its class name rather than imported from a private module.
    """
    return type(sharding).__name__ == "UnspecifiedValue"


# --- features of newer JAX -----------------------------------------------------------------------

def jit_inlined_at_lowering(fn):
    """``jax.jit(fn)`` whose calls stay ``jit`` equations through tracing and autodiff (so JAX
    caches their traces) and are inlined when lowered to MLIR, once per distinct body
    (``Inline.JAX_LATE``, jax >= 0.12); None where JAX has no such mode."""
    from jax._src import api  # the Inline enum has no public name yet

    late = getattr(getattr(api, "Inline", None), "JAX_LATE", None)
    return None if late is None else jax.jit(fn, inline=late)


def inlined_at_lowering(eqn: jex_core.JaxprEqn) -> bool:
    """True for a ``jit`` equation that lowering inlines (see :func:`jit_inlined_at_lowering`)."""
    return getattr(eqn.params.get("inline"), "value", None) == "jax_late"


def is_batched(values: Any) -> bool:
    """True when any leaf of ``values`` is being batched by ``jax.vmap`` (directly or under other
    tracers). ``jax.custom_derivatives.linear_call`` has no batching rule, so an op that would
    emit one must not while it is vmapped."""
    from jax._src.interpreters.batching import BatchTracer  # no public name

    return any(isinstance(leaf, BatchTracer) for leaf in jax.tree_util.tree_leaves(values))


def outside_any_trace() -> bool:
    """True when no JAX transformation or jit is tracing here (a call runs eagerly)."""
    from jax._src import core  # private: trace_state_clean has no public spelling (0.10, 0.12)

    return bool(core.trace_state_clean())
