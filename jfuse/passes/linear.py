"""The ``linear`` pattern: a matmul with a 2-D weight, then a bias and/or an activation.

Recognized spellings: ``x @ W``, ``x @ W.T`` (torch-style weights), ``jnp.dot``, ``einsum`` with
leading batch/sequence dims, and Equinox's vmapped ``W · x`` whose output has the features first
(the transpose back may come before or after the bias and activation, or never). The bias is any
value that varies only along the output features, reaching the add through ``reshape``,
``broadcast_in_dim`` or a float ``convert``, on either side of the add. Activations are matched by
meaning (see ``_elementwise``).

A bare matmul is not a site. When the pre-activation is read elsewhere, only the matmul and bias
fuse and a miss explains why the activation did not.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jfuse._jax import jaxpr as jx
from jfuse._jax.source import user_source_line
from jfuse.debug import reject
from jfuse.config import FuseOptions
from jfuse.graph import Graph
from jfuse.ops.linear import fused_linear, linear_refusals
from jfuse.passes._elementwise import (
    activation_hidden_by_shared_intermediates,
    match_activation,
    unrecognized_activation,
)
from jfuse.passes._matmul import bias_source, is_miss, look_through_weight_transpose
from jfuse.passes._matmul import matmul_orientation, moves_first_axis_last, other_operand
from jfuse.passes.base import AUTODIFF_HINT, MatchResult, Pattern, Site, replay_block
from jfuse.report import MissedFusion, MissReason

NAME = "linear"


class _Block:
    """The equations matched so far, and where the output features sit in the current value."""

    def __init__(self, graph: Graph, dot: jx.JaxprEqn):
        self.graph = graph
        self.dot = dot
        self.eqns: list[jx.JaxprEqn] = [dot]
        self.value: jx.Var = dot.outvars[0]
        self.features_first = False

    def absorb(self, eqn: jx.JaxprEqn) -> None:
        self.eqns.append(eqn)
        self.value = eqn.outvars[0]

    def feature_axis(self) -> int:
        return 0 if self.features_first else self.value.aval.ndim - 1

    def take_transpose_back(self) -> None:
        """Absorb a following transpose that puts features last (Equinox's vmap)."""
        if not self.features_first or self.value.aval.ndim < 2:
            self.features_first = False
            return
        user = self.graph.sole_user(self.value)
        if user is not None and user.primitive.name == "transpose" and moves_first_axis_last(user):
            self.absorb(user)
            self.features_first = False


def _where(eqn: jx.JaxprEqn) -> str:
    return user_source_line(eqn)


def _escape_miss(graph: Graph, block: _Block, what: str, readers) -> MissedFusion:
    reader = readers[0] if readers else None
    if reader is not None and graph.hidden_by_autodiff(reader):
        hint = AUTODIFF_HINT
        by = "the backward pass"
    elif reader is None:
        by = "the function's outputs"
        hint = (f"the {what} is returned as well; return only the activated value (or recompute "
                f"the {what} where it is needed) to let the epilogue fuse")
    else:
        by = f"{reader.primitive.name} at {user_source_line(reader)}"
        hint = (f"the {what} is also read by {by}; compute what reads it from the fused output, "
                "or accept the unfused epilogue")
    return MissedFusion(
        NAME,
        MissReason.INTERMEDIATE_ESCAPES,
        _where(block.dot),
        hint,
        f"{what} of a {tuple(block.dot.outvars[0].aval.shape)} matmul read by {by}",
    )


def _activation_misses(graph: Graph, block: _Block, preactivation) -> list[MissedFusion]:
    """Why the elementwise block after the matmul (+ bias), if any, was not fused."""
    hidden = activation_hidden_by_shared_intermediates(graph, preactivation)
    if hidden is not None:
        activation, readers = hidden
        miss = _escape_miss(graph, block, f"{activation} activation's intermediates", readers)
        return [miss]
    names = unrecognized_activation(graph, preactivation)
    if names is None:
        return []
    return [MissedFusion(
        NAME,
        MissReason.UNSUPPORTED_ACTIVATION,
        _where(block.dot),
        "jfuse fuses relu, gelu (tanh or exact), silu/swish, sigmoid and tanh epilogues; "
        + ("the matmul and bias were fused and this function runs after them"
           if block.value is not block.dot.outvars[0] else "this matmul is left to XLA"),
        f"the elementwise function after the matmul ({names}) is not a supported activation",
    )]


def match_linear(graph: Graph, dot: jx.JaxprEqn, options: FuseOptions) -> MatchResult | None:
    oriented = matmul_orientation(graph, dot)
    if oriented is None:
        reject(NAME, dot, "not an activation times a 2-D weight contracting the activation's "
               f"last dim (dimension_numbers={dot.params['dimension_numbers']}, or not float)")
        return None
    x, w, w_is_nk, features_first = oriented
    block = _Block(graph, dot)
    block.features_first = features_first
    result = MatchResult()
    w, w_is_nk, weight_eqns = look_through_weight_transpose(graph, dot, w, w_is_nk)
    block.take_transpose_back()

    bias = None
    users = graph.users(block.value)
    adds = [u for u in users if u.primitive.name == "add"]
    if len(adds) == 1 and len(users) == 1 and not graph.is_output(block.value):
        add = adds[0]
        found = bias_source(graph, other_operand(add, block.value), add, block.value,
                            block.feature_axis())
        if is_miss(found):
            reason, text = found
            reject(NAME, dot, f"addend is not a bias: {text}")
            if match_activation(graph, add.outvars[0]) is not None:
                hint = "make the bias a vector over the output features (shape (N,))"
                result.misses.append(MissedFusion(NAME, reason, _where(dot), hint, text))
            return result
        if found is not None:
            bias, bias_eqns = found
            block.eqns.extend(bias_eqns)
            block.absorb(add)
            block.take_transpose_back()
    else:
        for add in adds:  # a bias add, but the matmul output is read by something else too
            found = bias_source(graph, other_operand(add, block.value), add, block.value,
                                block.feature_axis())
            if found is not None and not is_miss(found):
                readers = [u for u in users if u is not add]
                reject(NAME, dot, "the matmul output feeds a bias add and is also read elsewhere")
                result.misses.append(_escape_miss(graph, block, "matmul output", readers))
                return result

    preactivation = block.value
    activation = match_activation(graph, preactivation)
    if activation is None:
        reject(NAME, dot, "no recognized activation follows (the elementwise block after the "
               "matmul/bias is not relu/gelu/silu/sigmoid/tanh, or its intermediates are shared)")
        result.misses.extend(_activation_misses(graph, block, preactivation))
    else:
        if graph.read_only_within(preactivation, activation.eqns):
            block.eqns.extend(activation.eqns)
            block.value = activation.output
            block.take_transpose_back()
        else:
            readers = graph.readers_outside(preactivation, activation.eqns)
            reject(NAME, dot, "the pre-activation is read outside the activation")
            result.misses.append(_escape_miss(graph, block, "pre-activation", readers))
            activation = None
    if bias is None and activation is None:
        reject(NAME, dot, "a bare matmul (no bias, no activation) is not a site")
        return result
    result.site = _make_site(graph, block, x, w, w_is_nk, bias, preactivation, activation,
                             weight_eqns, options)
    return result


def _make_site(graph, block, x, w, w_is_nk, bias, preactivation, activation, weight_eqns,
               options: FuseOptions) -> Site:
    eqns = sorted({id(e): e for e in block.eqns + weight_eqns}.values(), key=graph.position)
    inputs = [x, w] + ([bias] if bias is not None else [])
    out = block.value
    features_first = block.features_first and out.aval.ndim > 1
    block_replay = replay_block(eqns, inputs, [out, preactivation], graph)

    def replay(x_, w_, b_):
        y, z = block_replay(x_, w_, *([] if bias is None else [b_]))
        if features_first:  # the op's own layout has the features last
            y, z = _moveaxis(y, 0, -1), _moveaxis(z, 0, -1)
        return y, z

    act_name = activation.activation if activation is not None else None
    dot = block.dot

    def emit(x_, w_, b_=None):
        y = fused_linear(
            x_,
            w_,
            b_,
            activation=act_name,
            transpose_w=w_is_nk,
            out_dtype=out.aval.dtype,
            preactivation_dtype=preactivation.aval.dtype,
            precision=dot.params.get("precision"),
            implementation=options.implementation,
            replay=replay,
        )
        return [_moveaxis(y, -1, 0) if features_first else y]

    k = x.aval.shape[-1]
    n = w.aval.shape[0] if w_is_nk else w.aval.shape[1]
    m = int(np.prod(x.aval.shape[:-1], dtype=np.int64))
    parts = [p for p in (act_name, "bias" if bias is not None else None) if p]
    detail = f"{'+'.join(parts)} ({m}x{k})@({k}x{n}) {np.dtype(out.aval.dtype).name}"
    if w_is_nk:
        detail += ", W as (N, K)"
    refusals = linear_refusals(
        x.aval, w.aval, None if bias is None else bias.aval, activation=act_name,
        transpose_w=w_is_nk, out_dtype=out.aval.dtype,
        preactivation_dtype=preactivation.aval.dtype, precision=dot.params.get("precision"),
        implementation=options.implementation)
    # Unfused, the matmul result goes to memory and comes back for the bias/activation.
    matmul_out = dot.outvars[0].aval
    saved = 2 * m * n * np.dtype(matmul_out.dtype).itemsize
    return Site(NAME, eqns, inputs, [out], emit, _where(dot), detail, saved, graph,
                refusals)


def _moveaxis(a, source: int, destination: int):
    return jnp.moveaxis(a, source, destination)


# Priority 20: after glu, whose gate it would otherwise claim.
PATTERN = Pattern(NAME, frozenset({"dot_general"}), match_linear, priority=20)
