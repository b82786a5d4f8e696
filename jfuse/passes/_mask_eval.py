"""A small numpy evaluator for the index arithmetic around a block, run at match time.

Masks (``tril``, iota comparisons, windows, position vectors) and index vectors (``arange`` as
a gather's row indices) are computed from iotas, literals and a few inputs by integer and boolean
ops. Evaluating them in numpy while matching tells what they are: attention classifies a mask as
causal, a window, padding or segments (so the kernels get structure, not an array), and the
cross-entropy pass recognizes ``arange(n)`` rows. Transient and bounded: ``MAX_ELEMENTS``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from jfuse._jax import jaxpr as jx
from jfuse.graph import Graph

# Largest array (elements) evaluated at match time (numpy, transient): a larger mask is passed
# dense.
MAX_ELEMENTS = 1 << 26  # T = S = 8192


def _np_int_div(a, b):
    return np.trunc(np.asarray(a) / np.asarray(b))


RULES = {
    "and": lambda e, a, b: np.logical_and(a, b) if a.dtype == bool else np.bitwise_and(a, b),
    "or": lambda e, a, b: np.logical_or(a, b) if a.dtype == bool else np.bitwise_or(a, b),
    "xor": lambda e, a, b: np.logical_xor(a, b) if a.dtype == bool else np.bitwise_xor(a, b),
    "not": lambda e, a: np.logical_not(a) if a.dtype == bool else np.invert(a),
    "eq": lambda e, a, b: a == b, "ne": lambda e, a, b: a != b,
    "lt": lambda e, a, b: a < b, "le": lambda e, a, b: a <= b,
    "gt": lambda e, a, b: a > b, "ge": lambda e, a, b: a >= b,
    "add": lambda e, a, b: a + b, "sub": lambda e, a, b: a - b, "mul": lambda e, a, b: a * b,
    "max": lambda e, a, b: np.maximum(a, b), "min": lambda e, a, b: np.minimum(a, b),
    "div": lambda e, a, b: _np_int_div(a, b) if np.issubdtype(a.dtype, np.integer) else a / b,
    "rem": lambda e, a, b: np.fmod(a, b),
    "neg": lambda e, a: -a, "abs": lambda e, a: np.abs(a), "sign": lambda e, a: np.sign(a),
    "copy": lambda e, a: a, "copy_p": lambda e, a: a,
    "integer_pow": lambda e, a: a ** e.params["y"],
    "convert_element_type": lambda e, a: a,
    "select_n": lambda e, p, *cases: np.choose(np.asarray(p, np.int64),
                                               np.broadcast_arrays(*cases)),
    "iota": lambda e: np.broadcast_to(np.reshape(
        np.arange(e.params["shape"][e.params["dimension"]]),
        [-1 if i == e.params["dimension"] else 1 for i in range(len(e.params["shape"]))]),
        e.params["shape"]),
    "broadcast_in_dim": lambda e, a: np.broadcast_to(np.reshape(a, [
        a.shape[list(e.params["broadcast_dimensions"]).index(i)]
        if i in e.params["broadcast_dimensions"] else 1
        for i in range(len(e.params["shape"]))]), e.params["shape"]),
    "reshape": lambda e, a: np.reshape(a, e.outvars[0].aval.shape),
    "squeeze": lambda e, a: np.reshape(a, e.outvars[0].aval.shape),
    "expand_dims": lambda e, a: np.reshape(a, e.outvars[0].aval.shape),
    "transpose": lambda e, a: np.transpose(a, e.params["permutation"]),
}


def ancestors(graph: Graph, var: Any, limit: int = 64):
    """(equations computing ``var``, leaves): the leaves are the vars it is computed from that
    the evaluator cannot compute (inputs, or outputs of other primitives). None if too many."""
    eqns, leaves, seen, stack = {}, [], set(), [var]
    while stack:
        atom = stack.pop()
        if not isinstance(atom, jx.Var) or atom in seen:
            continue
        seen.add(atom)
        producer = graph.producer(atom)
        if (producer is None or producer.primitive.name not in RULES or producer.effects
                or len(producer.outvars) != 1 or (producer.primitive.name == "reshape"
                                                  and producer.params.get("dimensions"))):
            leaves.append(atom)
            continue
        eqns[id(producer)] = producer
        if len(eqns) > limit:
            return None
        stack.extend(producer.invars)
    return sorted(eqns.values(), key=graph.position), leaves


def evaluate(eqns, var, leaf_values: dict) -> np.ndarray | None:
    env = dict(leaf_values)
    for eqn in eqns:
        if any(int(np.prod(v.aval.shape)) > MAX_ELEMENTS for v in eqn.outvars):
            return None
        args = []
        for a in eqn.invars:
            if isinstance(a, jx.Literal):
                args.append(np.asarray(a.val))
            elif a in env:
                args.append(env[a])
            else:
                return None
        with np.errstate(all="ignore"):
            out = RULES[eqn.primitive.name](eqn, *args)
        env[eqn.outvars[0]] = np.asarray(out).astype(np.dtype(eqn.outvars[0].aval.dtype))
    return env.get(var)
