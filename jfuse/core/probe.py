"""Evaluate a block of jaxpr equations in float64 numpy on probe points: matching by meaning.

The passes recognise an activation or a norm by what it computes, not by how it is spelled: they
evaluate the candidate block on probe values in float64 and compare it with each known reference
(see :mod:`jfuse.passes._elementwise` and :mod:`jfuse.passes.norm`). This module is the
evaluator they share: one table of float64 rules per primitive (elementwise math, ``reduce_sum``,
broadcasts, transposes, batch-only products and unit-dim reshapes) and :func:`probe`, which runs
a block through it.

Broadcasts stay lazy: a value broadcast along a dim keeps size 1 there and numpy broadcasting
does the rest, so a probe of a (rows, hidden) block costs what the rows cost. A primitive outside
the table makes the probe answer None ("not something jfuse can recognise"), never an error.
This module knows jaxpr equations, not the patterns, the ops or the rewriter.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from jfuse._jax import compat
from jfuse._jax.jaxpr import Literal, literal_value

erf = np.vectorize(math.erf, otypes=[np.float64])
erfc = np.vectorize(math.erfc, otypes=[np.float64])


def sigmoid(x):
    return 0.5 * (1.0 + np.tanh(0.5 * x))


UNARY: dict[str, Callable[..., np.ndarray]] = {
    "neg": np.negative,
    "exp": np.exp,
    "exp2": np.exp2,
    "log": np.log,
    "log1p": np.log1p,
    "expm1": np.expm1,
    "tanh": np.tanh,
    "logistic": sigmoid,
    "erf": erf,
    "erfc": erfc,
    "sqrt": np.sqrt,
    "rsqrt": lambda x: 1.0 / np.sqrt(x),
    "abs": np.abs,
    "square": np.square,
    "sign": np.sign,
    "copy": lambda x: x,
    "copy_p": lambda x: x,
    "reduce_precision": lambda x: x,
}
BINARY: dict[str, Callable[..., np.ndarray]] = {
    "add": np.add,
    "sub": np.subtract,
    "mul": np.multiply,
    "div": np.divide,
    "max": np.maximum,
    "min": np.minimum,
    "pow": np.power,
    "gt": np.greater,
    "ge": np.greater_equal,
    "lt": np.less,
    "le": np.less_equal,
    "eq": np.equal,
    "ne": np.not_equal,
}
# The elementwise primitives the probe evaluates (converts are the identity in float64).
ELEMENTWISE = frozenset(UNARY) | frozenset(BINARY) | {"integer_pow", "select_n",
                                                      "convert_element_type"}
# The shape primitives it evaluates (lazily, see the module docstring).
SHAPE = frozenset({"broadcast_in_dim"}) | compat.RESHAPE_PRIMITIVES
# What moves axes or scales along them without mixing values: ``transpose``, and a
# ``dot_general`` with batch dimensions only (penzai applies a norm's scale this way: an
# elementwise product whose batch dims come first in the result). Passes that admit these into a
# block say so; they are not in ``SHAPE``.
LAYOUT = frozenset({"transpose", "dot_general"})


class _Unknown(Exception):
    """The probe cannot evaluate this equation on these values."""


def evaluate_elementwise(eqn: Any, args: list) -> np.ndarray | None:
    """One elementwise equation in float64 numpy (converts are the identity), or None if it is
    not one this module knows."""
    name = eqn.primitive.name
    if name in UNARY:
        return UNARY[name](args[0])
    if name in BINARY:
        return BINARY[name](args[0], args[1])
    if name == "integer_pow":
        return np.power(args[0], eqn.params["y"])
    if name == "select_n":
        return np.choose(np.asarray(args[0], np.int64), np.broadcast_arrays(*args[1:]))
    if name == "convert_element_type":
        return args[0]
    return None


def _reduce_sum(eqn, args):
    axes = tuple(eqn.params["axes"])
    in_shape = tuple(eqn.invars[0].aval.shape)
    value = np.asarray(args[0], np.float64)
    if value.ndim != len(in_shape):
        raise _Unknown
    # A dim kept at size 1 by lazy broadcasting holds one value repeated: scale it.
    factor = np.prod([in_shape[a] for a in axes if value.shape[a] == 1 and in_shape[a] != 1])
    return np.sum(value, axis=axes) * factor


def _broadcast_in_dim(eqn, args):
    value = np.asarray(args[0], np.float64)
    shape = [1] * len(eqn.outvars[0].aval.shape)
    for j, axis in enumerate(eqn.params["broadcast_dimensions"]):
        shape[axis] = value.shape[j] if value.ndim else 1
    return np.reshape(value, shape)


def _unit_dim_reshape(eqn, args):
    """A reshape that only inserts or removes unit dims, of a lazily broadcast value."""
    value = np.asarray(args[0], np.float64)
    in_shape = tuple(eqn.invars[0].aval.shape)
    out_shape = tuple(eqn.outvars[0].aval.shape)
    if value.ndim != len(in_shape):
        raise _Unknown
    if [d for d in in_shape if d != 1] != [d for d in out_shape if d != 1]:
        raise _Unknown
    sizes = iter([value.shape[i] for i, d in enumerate(in_shape) if d != 1])
    return np.reshape(value, [next(sizes) if d != 1 else 1 for d in out_shape])


def _transpose(eqn, args):
    value = np.asarray(args[0], np.float64)
    if value.ndim != len(eqn.params["permutation"]):
        raise _Unknown
    return np.transpose(value, eqn.params["permutation"])


def _batch_only_product(eqn, args):
    """A ``dot_general`` that contracts nothing: an elementwise product laid out as (batch dims,
    lhs free dims, rhs free dims). Sizes kept at 1 by lazy broadcasting broadcast as usual."""
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    lhs, rhs = (np.asarray(a, np.float64) for a in args)
    if lc or rc or lhs.ndim != eqn.invars[0].aval.ndim or rhs.ndim != eqn.invars[1].aval.ndim:
        raise _Unknown
    lfree = [i for i in range(lhs.ndim) if i not in lb]
    rfree = [i for i in range(rhs.ndim) if i not in rb]
    lhs = np.transpose(lhs, list(lb) + lfree)
    rhs = np.transpose(rhs, list(rb) + rfree)
    lhs = np.reshape(lhs, lhs.shape + (1,) * len(rfree))
    rhs = np.reshape(rhs, rhs.shape[:len(rb)] + (1,) * len(lfree) + rhs.shape[len(rb):])
    return lhs * rhs


_RULES: dict[str, Callable[[Any, list], np.ndarray]] = {
    "reduce_sum": _reduce_sum,
    "transpose": _transpose,
    "dot_general": _batch_only_product,
    "broadcast_in_dim": _broadcast_in_dim,
    **{name: _unit_dim_reshape for name in compat.RESHAPE_PRIMITIVES},
}

# rule(eqn, args): a caller's own float64 value for an equation (e.g. jax.nn.relu's custom_jvp),
# or None for the table's.
Override = Callable[[Any, list], "np.ndarray | None"]


def probe(
    eqns: Sequence[Any],
    values: Mapping[Any, np.ndarray],
    constants: Mapping[Any, float] | None = None,
    override: Override | None = None,
) -> np.ndarray | None:
    """The float64 value of the last of ``eqns`` (single-output equations, in program order).

    ``values`` gives the block's inputs, ``constants`` the scalar value of variables the block
    reads as constants (a broadcast literal); literals are read as scalars. Returns None when an
    equation is not one the probe can evaluate.
    """
    constants = constants or {}
    env: dict[Any, np.ndarray] = dict(values)

    def read(atom):
        if isinstance(atom, Literal):
            return np.float64(literal_value(atom))
        if atom in constants:
            return np.float64(constants[atom])
        return env[atom]

    with np.errstate(all="ignore"):
        for eqn in eqns:
            args = [read(a) for a in eqn.invars]
            out = None if override is None else override(eqn, args)
            if out is None:
                rule = _RULES.get(eqn.primitive.name)
                try:
                    out = rule(eqn, args) if rule is not None else evaluate_elementwise(eqn, args)
                except (_Unknown, ValueError):  # ValueError: operands that do not broadcast
                    return None
            if out is None:
                return None
            env[eqn.outvars[0]] = np.asarray(out, np.float64)
    return env[eqns[-1].outvars[0]]
