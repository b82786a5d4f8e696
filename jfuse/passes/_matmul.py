"""Helpers shared by the patterns that start at a matmul (``linear``, ``glu``).

Which operand of a ``dot_general`` is the activation and which the 2-D weight, whether the weight
arrives as ``W.T`` (torch-style, read in place by the kernels), and whether an addend is a bias
over the output features.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np

from jfuse._jax import jaxpr as jx
from jfuse.core import probe
from jfuse.graph import Graph, literal_value
from jfuse.report import MissReason


def is_float(aval) -> bool:
    return jnp.issubdtype(aval.dtype, jnp.floating)


def moves_first_axis_last(eqn: jx.JaxprEqn) -> bool:
    if eqn.primitive.name != "transpose":
        return False
    perm = tuple(eqn.params["permutation"])
    return perm == tuple(range(1, len(perm))) + (0,)


def matmul_orientation(graph: Graph, dot: jx.JaxprEqn):
    """(x, w, w_is_nk, features_first) for a linear-layer matmul, else None."""
    (lc, rc), (lb, rb) = dot.params["dimension_numbers"]
    if lb or rb or len(lc) != 1:
        return None
    lhs, rhs = dot.invars
    if not all(is_float(a.aval) for a in (lhs, rhs, dot.outvars[0])):
        return None
    activation_first = rhs.aval.ndim == 2 and lc[0] == lhs.aval.ndim - 1
    weight_first = lhs.aval.ndim == 2 and rc[0] == rhs.aval.ndim - 1
    if activation_first and weight_first:
        # Both operands 2-D: `W·xᵀ` announces itself by the transpose that puts features last.
        user = graph.sole_user(dot.outvars[0])
        weight_first = user is not None and user.primitive.name == "transpose" and (
            moves_first_axis_last(user)
        )
        activation_first = not weight_first
    if activation_first:
        return lhs, rhs, rc[0] == 1, False
    if weight_first:
        return rhs, lhs, lc[0] == 1, rhs.aval.ndim > 1
    return None


def other_operand(eqn: jx.JaxprEqn, value: Any) -> Any:
    a, b = eqn.invars
    return b if a is value else a


def is_miss(found) -> bool:
    return isinstance(found, tuple) and isinstance(found[0], MissReason)


def bias_source(graph: Graph, operand: Any, add: jx.JaxprEqn, value: Any, feature_axis: int):
    """Trace an addend back to a vector over the output features.

    ``add`` broadcasts size-1 dims itself, so the addend may be (1, N), (M, 1), (M, N) or a
    scalar. A full (M, N) addend is a bias when it is a private broadcast of such a vector along
    the output features (Haiku's ``out + jnp.broadcast_to(b, out.shape)``). Returns (source, eqns)
    where ``eqns`` are the private broadcast/reshape/convert steps between the source and the add,
    or a (MissReason, text) pair when the addend varies along other axes, or None when it is not a
    bias at all.
    """
    if literal_value(operand) is not None:
        return operand, []
    shape = tuple(operand.aval.shape)
    value_shape = tuple(value.aval.shape)
    if len(shape) == len(value_shape):
        varying = [i for i, d in enumerate(shape) if d != 1]
        others = [i for i in varying if i != feature_axis]
        if others:
            source, chain = _private_vector_chain(graph, operand, add)
            spread = _axes_spread_along(chain, source) if chain else None
            if spread is not None and set(spread) <= {feature_axis}:
                return source, chain
            if spread:  # a broadcast vector, but along other axes (a per-row term)
                others = [i for i in spread if i != feature_axis]
            elif shape == value_shape:
                return MissReason.BIAS_SHAPE, (
                    f"the added term is a full {shape} array (a residual?), not a bias over the "
                    "output features"
                )
            return MissReason.BIAS_SHAPE, (
                f"the added term {shape} varies along axis {others[0]}, not only along the "
                "output features"
            )
    elif shape:
        return None
    current, chain = _private_vector_chain(graph, operand, add)
    if sum(d != 1 for d in np.shape(current.aval)) > 1:
        return None
    return current, chain


def _private_vector_chain(graph: Graph, operand: Any, add: jx.JaxprEqn):
    """(source, eqns): walk back from ``operand`` through the steps that keep a vector a vector
    (reshape, squeeze, broadcast, float convert), each read only by the next; stop where a value
    is shared or stops being a vector. ``eqns`` are in reverse program order."""
    chain: list[jx.JaxprEqn] = []
    current = operand
    while isinstance(current, jx.Var):
        producer = graph.producer(current)
        reader = chain[-1] if chain else add
        readers = graph.users(current)
        if producer is None or len(readers) != 1 or readers[0] is not reader:
            break
        source = producer.invars[0] if producer.invars else None
        name = producer.primitive.name
        if source is None or sum(d != 1 for d in np.shape(source.aval)) > 1:
            break
        if name == "convert_element_type":
            if not (is_float(source.aval) and is_float(producer.outvars[0].aval)):
                break
        elif name not in ("reshape", "squeeze", "broadcast_in_dim", "expand_dims"):
            break
        chain.append(producer)
        current = source
    return current, chain


def _axes_spread_along(chain: list[jx.JaxprEqn], source: Any) -> list[int] | None:
    """The axes of the result along which the steps in ``chain`` (reverse program order) lay out
    ``source``, a vector or a scalar ([] for a scalar: the same value everywhere); None when the
    probe cannot tell. Evaluated on distinct values by the probe, whose broadcasts stay lazy
    (size 1 along every dim a value is repeated on)."""
    if not isinstance(source, jx.Var) or sum(d != 1 for d in np.shape(source.aval)) > 1:
        return None
    shape = tuple(source.aval.shape)
    values = np.arange(1.0, 1.0 + int(np.prod(shape, dtype=np.int64))).reshape(shape)
    out = probe.probe(list(reversed(chain)), {source: values})
    if out is None or np.ndim(out) != len(chain[0].outvars[0].aval.shape):
        return None
    return [i for i, d in enumerate(np.shape(out)) if d != 1]


def look_through_weight_transpose(graph: Graph, dot: jx.JaxprEqn, w: Any, w_is_nk: bool):
    """(w, w_is_nk, eqns): read ``W`` itself when the dot reads ``W.T`` and nothing else does."""
    producer = graph.producer(w)
    if (
        producer is not None
        and producer.primitive.name == "transpose"
        and tuple(producer.params["permutation"]) == (1, 0)
        and graph.sole_user(w) is dot
    ):
        return producer.invars[0], not w_is_nk, [producer]
    return w, w_is_nk, []
