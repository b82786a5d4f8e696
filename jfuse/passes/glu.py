"""The ``glu`` pattern: ``act(x·Wg + bg) ⊙ (x·Wu + bu)``, the MLP of every modern LLM.

Anchored at the product. Each operand is traced back, through float converts, to a linear branch:
a matmul of the activation ``x`` with a 2-D weight (or ``W.T``), optionally plus a bias, where the
weight is its own matrix, a column half of a fused ``(K, 2N)`` weight (the product split by
``slice``, ``jnp.split`` or indexing), or one plane of tokamax's ``(K, 2, N)`` layout. One operand
must be a recognized activation of its branch (the gate, see ``_elementwise``); the other branch
is used as it is. Both must read the same ``x``. Trailing float converts of the product are
included, so bf16 models with f32 gates match.

Features-first layouts match too: ``W · x`` with ``W`` of shape (N, K) or (K, N) and the
features on any axis of ``x`` (Equinox's per-example ``eqx.nn.Linear`` under ``vmap``, with or
without the transpose back that a bias add brings), and any contracted axis of ``x`` in the usual
order. The emitted code moves ``x``'s contracted axis last for the op and the output features
back to where the block has them (exact transposes, fused by XLA). When both operands of the
matmuls are 2-D either could be the activations; the one the gate and up matmuls share is.
``penzai``'s ``copy`` steps between the matmuls and the product are read through.

Near-misses, with their reasons: a product (gate or up) read by anything else, and a gate computed
from a different input than the up branch.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax.numpy as jnp
import numpy as np

from jfuse._jax import jaxpr as jx
from jfuse._jax.source import user_source_line
from jfuse.debug import enabled as debug_enabled
from jfuse.debug import reject
from jfuse.config import FuseOptions
from jfuse.graph import Graph
from jfuse.ops.glu import fused_glu, glu_refusals
from jfuse.passes._elementwise import match_activation
from jfuse.passes._matmul import bias_source, is_float, is_miss, look_through_weight_transpose
from jfuse.passes._matmul import moves_first_axis_last, other_operand
from jfuse.passes.base import AUTODIFF_HINT, MatchResult, Pattern, Site, replay_block
from jfuse.report import MissedFusion, MissReason

NAME = "glu"
_MAX_GATE_DEPTH = 48
# Identity steps some libraries put between a matmul and its reader (penzai's named axes).
_COPIES = ("copy", "copy_p")


@dataclasses.dataclass
class _Branch:
    """One side of the product: ``value = select(x · w) (+ bias)``."""

    dot: jx.JaxprEqn
    x: Any
    w: Any
    w_is_nk: bool
    value: jx.Var  # the branch's output (pre-activation for the gate)
    eqns: list[jx.JaxprEqn]
    weight_select: Callable[[Any], Any] | None = None  # picks this branch's half of a fused weight
    bias: Any = None
    bias_select: Callable[[Any], Any] | None = None
    layout: str = "separate"
    x_axis: int = -1  # the axis of x the matmul contracts
    # W · x: the weight is the matmul's left operand; the value then has the features first,
    # unless a transpose back (absorbed in eqns) put them last.
    weight_first: bool = False
    features_first: bool = False


def _strip_converts(graph: Graph, var: Any) -> tuple[Any, list[jx.JaxprEqn]]:
    """Walk back through float-to-float converts and copies read only by the next step."""
    eqns = []
    while isinstance(var, jx.Var):
        producer = graph.producer(var)
        if (
            producer is None
            or producer.primitive.name not in ("convert_element_type",) + _COPIES
            or not isinstance(producer.invars[0], jx.Var)
            or not is_float(producer.invars[0].aval)
            or len(graph.users(var)) != 1
        ):
            break
        eqns.append(producer)
        var = producer.invars[0]
    return var, eqns


def _strip_copies(graph: Graph, var: Any) -> tuple[Any, list[jx.JaxprEqn]]:
    """Walk back through copies read only by the next step."""
    eqns = []
    while isinstance(var, jx.Var):
        producer = graph.producer(var)
        if (producer is None or producer.primitive.name not in _COPIES
                or len(graph.users(var)) != 1 or graph.is_output(var)):
            break
        eqns.append(producer)
        var = producer.invars[0]
    return var, eqns


def _transposed_back(graph: Graph, var: Any) -> jx.JaxprEqn | None:
    """The transpose that makes ``var`` from a features-first matmul output, moving the
    features last (Equinox's vmapped Linear, before its bias), if that is how ``var`` is made."""
    producer = graph.producer(var)
    if producer is None or producer.primitive.name != "transpose" or not moves_first_axis_last(
            producer):
        return None
    source, _ = _strip_copies(graph, producer.invars[0])
    if graph.sole_user(producer.invars[0]) is not producer or not _is_dot(graph, source):
        return None
    return producer


@dataclasses.dataclass
class _Half:
    """``var`` is one half of a fused-weight product ``source``: columns [lo, hi) of a (K, 2N)
    weight, or plane ``plane`` of a (K, 2, N) weight."""

    source: Any
    eqns: list[jx.JaxprEqn]
    lo: int = 0
    hi: int = 0
    plane: int | None = None

    @property
    def layout(self) -> str:
        return "(K, 2N)" if self.plane is None else "(K, 2, N)"

    def weight_select(self, w_is_nk: bool) -> Callable[[Any], Any]:
        if self.plane is not None:
            return lambda w, j=self.plane: w[:, j, :]
        if w_is_nk:
            return lambda w, lo=self.lo, hi=self.hi: w[lo:hi, :]
        return lambda w, lo=self.lo, hi=self.hi: w[:, lo:hi]

    def bias_select(self) -> Callable[[Any], Any]:
        if self.plane is not None:
            return lambda b, j=self.plane: b[j]
        return lambda b, lo=self.lo, hi=self.hi: jnp.reshape(b, (-1,))[lo:hi]


def _unit_strides(params) -> bool:
    strides = params.get("strides")
    return strides is None or all(s == 1 for s in strides)


def _slice_of_fused_product(graph: Graph, var: Any) -> _Half | None:
    """How ``var`` is half of a fused-weight product, or None."""
    producer = graph.producer(var)
    if producer is None:
        return None
    name = producer.primitive.name
    if name == "squeeze":  # tokamax (K, 2, N): h[..., j, :] is slice + squeeze
        dims = tuple(producer.params["dimensions"])
        inner = graph.producer(producer.invars[0])
        if len(dims) != 1 or inner is None or inner.primitive.name != "slice":
            return None
        source, axis = inner.invars[0], dims[0]
        if axis != source.aval.ndim - 2 or source.aval.shape[axis] != 2 or not _unit_strides(
                inner.params):
            return None
        return _Half(source, [producer, inner], plane=inner.params["start_indices"][axis])
    if name == "slice":
        source = producer.invars[0]
        axis = source.aval.ndim - 1
        starts, limits = producer.params["start_indices"], producer.params["limit_indices"]
        if not _unit_strides(producer.params) or any(
                starts[i] != 0 or limits[i] != source.aval.shape[i] for i in range(axis)):
            return None
        lo, hi = starts[axis], limits[axis]
    elif name == "split":
        source = producer.invars[0]
        if producer.params["axis"] != source.aval.ndim - 1:
            return None
        index = list(producer.outvars).index(var)
        sizes = [int(s) for s in producer.params["sizes"]]
        lo, hi = sum(sizes[:index]), sum(sizes[: index + 1])
    else:
        return None
    if 2 * (hi - lo) != source.aval.shape[-1]:
        return None
    return _Half(source, [producer], lo=lo, hi=hi)


def _feature_axis(graph: Graph, var: Any, weight_first: bool) -> int:
    """Where the output features sit in ``var``, a matmul output (through copies) or its
    transpose back: first for ``W · x`` not transposed back, else last."""
    if weight_first and _transposed_back(graph, var) is None:
        return 0
    return var.aval.ndim - 1


def _linear_branch(graph: Graph, var: Any, weight_first: bool = False) -> _Branch | None:
    """Describe ``var`` as a linear branch, or None. ``weight_first``: read the matmul as
    ``W · x`` (the weight its left operand) rather than ``x · W``."""
    eqns: list[jx.JaxprEqn] = []
    value = var
    bias = bias_select = None
    producer = graph.producer(var)
    if producer is not None and producer.primitive.name == "add":
        for operand in producer.invars:
            if not isinstance(operand, jx.Var) or not _reaches_dot(graph, operand):
                continue
            found = bias_source(graph, other_operand(producer, operand), producer, operand,
                                _feature_axis(graph, operand, weight_first))
            if found is not None and not is_miss(found):
                bias, bias_eqns = found
                eqns += [producer] + bias_eqns
                var = operand
                break
    var, copies = _strip_copies(graph, var)
    eqns += copies
    half = None if weight_first else _slice_of_fused_product(graph, var)
    layout = "separate"
    if half is not None:
        var, layout = half.source, half.layout
        eqns += half.eqns
        # A bias on the fused product, before the split: this branch takes its half.
        producer = graph.producer(var)
        if bias is None and producer is not None and producer.primitive.name == "add":
            for operand in producer.invars:
                if not isinstance(operand, jx.Var):
                    continue
                found = bias_source(graph, other_operand(producer, operand), producer, operand,
                                    operand.aval.ndim - 1)
                if found is not None and not is_miss(found) and _is_dot(graph, operand):
                    bias, bias_eqns = found
                    bias_select = half.bias_select()
                    eqns += [producer] + bias_eqns
                    var = operand
                    break
    back = _transposed_back(graph, var) if weight_first else None
    if back is not None:
        eqns.append(back)
        var, copies = _strip_copies(graph, back.invars[0])
        eqns += copies
    dot = graph.producer(var)
    if dot is None or dot.primitive.name != "dot_general":
        return None
    if layout == "(K, 2, N)":
        oriented = _tokamax_orientation(dot)
    else:
        oriented = _orientation(dot, weight_first)
    if oriented is None:
        return None
    x, w, w_is_nk, x_axis = oriented
    w, w_is_nk, weight_eqns = look_through_weight_transpose(graph, dot, w, w_is_nk)
    eqns += [dot] + weight_eqns
    weight_select = None if half is None else half.weight_select(w_is_nk)
    return _Branch(dot, x, w, w_is_nk, value, eqns, weight_select, bias, bias_select, layout,
                   x_axis, weight_first, weight_first and back is None)


def _orientation(dot: jx.JaxprEqn, weight_first: bool):
    """(x, w, w_is_nk, x_axis) for a matmul of activations ``x`` (any rank, contracted on
    ``x_axis``) with a 2-D weight, read as ``x · W`` or, with ``weight_first``, ``W · x``."""
    (lc, rc), (lb, rb) = dot.params["dimension_numbers"]
    if lb or rb or len(lc) != 1:
        return None
    if not all(is_float(a.aval) for a in (*dot.invars, dot.outvars[0])):
        return None
    lhs, rhs = dot.invars
    (x, x_axis), (w, w_axis) = ((rhs, rc[0]), (lhs, lc[0])) if weight_first else (
        (lhs, lc[0]), (rhs, rc[0]))
    if w.aval.ndim != 2:
        return None
    return x, w, w_axis == 1, int(x_axis)


def _is_dot(graph: Graph, var: Any) -> bool:
    producer = graph.producer(_strip_copies(graph, var)[0])
    return producer is not None and producer.primitive.name == "dot_general"


def _reaches_dot(graph: Graph, var: Any) -> bool:
    """``var`` is a matmul output (through copies, or a features-first one transposed back), or
    a slice of one (a fused-weight half)."""
    if _is_dot(graph, var) or _transposed_back(graph, var) is not None:
        return True
    half = _slice_of_fused_product(graph, var)
    if half is None:
        return False
    source = half.source
    producer = graph.producer(source)
    if producer is not None and producer.primitive.name == "add":
        return any(_is_dot(graph, v) for v in producer.invars)
    return _is_dot(graph, source)


def _tokamax_orientation(dot: jx.JaxprEqn):
    (lc, rc), (lb, rb) = dot.params["dimension_numbers"]
    x, w = dot.invars
    if lb or rb or len(lc) != 1 or w.aval.ndim != 3 or tuple(rc) != (0,):
        return None
    if lc[0] != x.aval.ndim - 1 or w.aval.shape[1] != 2:
        return None
    return x, w, False, int(lc[0])  # (x, w, w_is_nk, x_axis), as _orientation


def _gate(graph: Graph, operand: Any):
    """(pre-activation var, UnaryFunction) when ``operand`` is an activation of one value."""
    seen = 0
    stack = [operand]
    visited: set = set()
    while stack and seen < _MAX_GATE_DEPTH:
        var = stack.pop()
        if not isinstance(var, jx.Var) or var in visited:
            continue
        visited.add(var)
        seen += 1
        if _reaches_dot(graph, var) or _reaches_biased_dot(graph, var):
            activation = match_activation(graph, var)
            if activation is not None and activation.output is operand:
                return var, activation
            continue
        producer = graph.producer(var)
        if producer is None or len(producer.outvars) != 1:
            continue
        stack.extend(a for a in producer.invars if isinstance(a, jx.Var))
    return None


def _reaches_biased_dot(graph: Graph, var: Any) -> bool:
    producer = graph.producer(var)
    return (
        producer is not None
        and producer.primitive.name == "add"
        and any(isinstance(v, jx.Var) and _reaches_dot(graph, v) for v in producer.invars)
    )


def _miss(reason: MissReason, mul: jx.JaxprEqn, hint: str, detail: str) -> MissedFusion:
    return MissedFusion(NAME, reason, user_source_line(mul), hint, detail)


def match_glu(graph: Graph, mul: jx.JaxprEqn, options: FuseOptions) -> MatchResult | None:
    a, b = mul.invars
    if not all(isinstance(v, jx.Var) and is_float(v.aval) for v in (a, b)):
        return None
    if tuple(a.aval.shape) != tuple(b.aval.shape):
        return None
    why = []
    for gate_operand, up_operand in ((a, b), (b, a)):
        up_var, up_converts = _strip_converts(graph, up_operand)
        if not (_reaches_dot(graph, up_var) or _reaches_biased_dot(graph, up_var)):
            why.append("one operand is not a matmul (+ bias)")
            continue
        gate = _gate(graph, gate_operand)
        if gate is None:
            why.append("the other operand is not a recognized activation of a matmul")
            continue
        gate_pre, activation = gate
        readings = []
        for weight_first in (False, True):
            gate_branch = _linear_branch(graph, gate_pre, weight_first)
            up_branch = _linear_branch(graph, up_var, weight_first)
            if gate_branch is not None and up_branch is not None:
                readings.append((gate_branch, up_branch))
        if not readings:
            why.append("a branch is not x times a 2-D weight (or W times x)")
            continue
        # Two 2-D operands read either way: the activations are what both matmuls share.
        shared = [r for r in readings if r[0].x is r[1].x] or readings
        gate_branch, up_branch = shared[0]
        return _check_and_build(graph, mul, gate_branch, up_branch, activation, up_converts,
                                options)
    if debug_enabled(NAME) and any("matmul" in w for w in why[1:] + why[:1]):
        reject(NAME, mul, "; ".join(sorted(set(why))))
    return None


def _check_and_build(graph, mul, gate: _Branch, up: _Branch, activation, up_converts, options):
    result = MatchResult()
    if gate.x is not up.x:
        result.misses.append(_miss(
            MissReason.DIFFERENT_INPUTS, mul,
            "a GLU's gate and up projections must read the same activations; if they differ on "
            "purpose this is not a GLU",
            "the gate and up matmuls read different inputs"))
        return result
    if gate.layout != up.layout or gate.w_is_nk != up.w_is_nk or (
        gate.x_axis != up.x_axis or gate.features_first != up.features_first
    ) or (
        gate.layout == "separate" and tuple(gate.w.aval.shape) != tuple(up.w.aval.shape)
    ) or (gate.layout != "separate" and gate.w is not up.w):
        reject(NAME, mul, "gate and up weights differ in layout or shape")
        return None
    block = {id(e): e for e in gate.eqns + up.eqns + activation.eqns + up_converts + [mul]}
    out = mul.outvars[0]
    # Trailing float converts of the product (bf16 models casting back) belong to the block.
    while True:
        user = graph.sole_user(out)
        if user is None or user.primitive.name != "convert_element_type" or not is_float(
                user.outvars[0].aval):
            break
        block[id(user)] = user
        out = user.outvars[0]
    eqns = sorted(block.values(), key=graph.position)
    for eqn in eqns:
        for var in eqn.outvars:
            if var is out or isinstance(var, jx.DropVar):
                continue
            if not graph.read_only_within(var, eqns):
                readers = graph.readers_outside(var, eqns)
                which = ("gate" if var is gate.value else "up" if var is up.value
                         else "intermediate")
                if readers and graph.hidden_by_autodiff(readers[0]):
                    where, hint = "the backward pass", AUTODIFF_HINT
                else:
                    where = (f"{readers[0].primitive.name} at {user_source_line(readers[0])}"
                             if readers else "the function's outputs")
                    hint = ("a GLU fuses only when its gate and up products are used by the "
                            "gating product alone; compute what else reads them from the GLU "
                            "output, or accept the unfused MLP")
                result.misses.append(_miss(
                    MissReason.INTERMEDIATE_ESCAPES, mul, hint,
                    f"the {which} product {tuple(var.aval.shape)} is also read by {where}"))
                return result
    result.site = _site(graph, mul, eqns, gate, up, activation, out, options)
    return result


def _site(graph, mul, eqns, gate: _Branch, up: _Branch, activation, out, options) -> Site:
    # The op's params: the distinct weight/bias atoms, each once (a fused weight serves both).
    params: list[Any] = []

    def index_of(atom):
        for i, p in enumerate(params):
            if p is atom:
                return i
        params.append(atom)
        return len(params) - 1

    sources = (
        (index_of(gate.w), gate.weight_select),
        (index_of(up.w), up.weight_select),
        None if gate.bias is None else (index_of(gate.bias), gate.bias_select),
        None if up.bias is None else (index_of(up.bias), up.bias_select),
    )
    inputs = [gate.x] + params
    block_replay = replay_block(eqns, inputs, [out, gate.value, up.value], graph)
    dot = gate.dot
    out_dtype = out.aval.dtype
    # The op takes x with its contracted axis last and gives the features last.
    x_axis = gate.x_axis % gate.x.aval.ndim
    move_x = x_axis != gate.x.aval.ndim - 1
    features_first = gate.features_first and out.aval.ndim > 1

    def replay(x_, *param_values):  # the op's layout in and out, the user's equations inside
        results = block_replay(jnp.moveaxis(x_, -1, x_axis) if move_x else x_, *param_values)
        return tuple(jnp.moveaxis(r, 0, -1) for r in results) if features_first else results

    def emit(x, *param_values):
        y = fused_glu(
            jnp.moveaxis(x, x_axis, -1) if move_x else x,
            tuple(param_values),
            activation=activation.activation,
            sources=sources,
            weights_transposed=gate.w_is_nk,
            out_dtype=out_dtype,
            preactivation_dtype=gate.value.aval.dtype,
            precision=dot.params.get("precision"),
            implementation=options.implementation,
            replay=replay,
        )
        return [jnp.moveaxis(y, -1, 0) if features_first else y]

    x_shape = list(gate.x.aval.shape)
    k = x_shape.pop(x_axis)
    x_aval = gate.x.aval.update(shape=tuple(x_shape) + (k,))
    n = out.aval.shape[0 if features_first else -1]
    m = int(np.prod(x_shape, dtype=np.int64))
    biases = "+".join(b for b, v in (("bias_gate", gate.bias), ("bias_up", up.bias)) if v is not None)
    detail = (f"{activation.activation} gate{', ' + biases if biases else ''} "
              f"({m}x{k})@({k}x{n})x2 {np.dtype(out_dtype).name}")
    if gate.layout != "separate":
        detail += f", fused {gate.layout} weight"
    if gate.w_is_nk:
        detail += ", W as (N, K)"
    if gate.weight_first:
        detail += ", W·x" + (" (features first)" if features_first else "")
    refusals = glu_refusals(
        x_aval, [p.aval for p in params], activation=activation.activation, sources=sources,
        weights_transposed=gate.w_is_nk, out_dtype=out_dtype,
        preactivation_dtype=gate.value.aval.dtype, precision=dot.params.get("precision"),
        implementation=options.implementation)
    # Unfused, both (M, N) products go to memory and come back for the gate.
    saved = 2 * 2 * m * n * np.dtype(gate.dot.outvars[0].aval.dtype).itemsize
    return Site(NAME, eqns, inputs, [out], emit, user_source_line(mul), detail, saved,
                graph, refusals)


# Priority 10: before linear: a GLU's gate (matmul + activation) is also a linear site.
PATTERN = Pattern(NAME, frozenset({"mul"}), match_glu, priority=10)
