"""The ``linear_cross_entropy`` pattern: an LM head's logits ``h·W (+ b)`` read only by the
per-token reductions of a cross-entropy loss.

Anchored at the logits ``dot_general`` (an activation times a 2-D weight: ``h @ W``, ``h @ E.T``
for tied embeddings, ``einsum``, leading batch/sequence dims). The block is recognized in three
steps:

1. **The logits** ``z``: the matmul, then private float converts (bf16 → f32 upcasts), a bias over
   the vocabulary, reshapes that keep the vocabulary last, and an optional final soft-cap
   ``tanh(z / c) · c``.
2. **The rowwise region**: everything computed from ``z`` that stays ``(rows, V)``-shaped or
   per-row: ``z - stop_gradient(max)``, ``exp``, row sums and maxima over the vocabulary, the
   label's logit picked by ``take_along_axis``/``z[arange, y]`` gathers or by a one-hot
   (``iota == label``) contraction, and the per-row arithmetic that combines them (``log``, the
   max added back, ``lse - z_label``). Its outputs are the per-row values the rest of the program
   reads; what follows (masks, z-loss, smoothing, means) stays the user's own equations.
3. **By meaning, exactly**: the region is evaluated by a small symbolic interpreter in which every
   ``(rows, V)`` value is ``a·z + c(row)``, ``exp(z + c(row))``, the label's one-hot, or one-hot
   times ``a·z + c(row)``. Each row reduction of such a value is an exact identity in the op's
   per-token statistics ``lse``, ``z_label``, ``z_mean`` (``Σ exp(z + c) = exp(lse + c)``,
   ``Σ onehot·(a·z + c) = valid·(a·z_label + c)``, ...); the one reduction that is not, the row
   max, is replaced by ``lse`` (a shift), and a float64 check on per-row probe values confirms the
   region's outputs do not depend on which shift is used. Anything the interpreter cannot express
   is a named miss, never a guess.

Label semantics are the user's: a gather's out-of-range index gives its fill value (NaN, as
``take_along_axis`` does) or is clamped (``promise_in_bounds``/``clip``), per the gather's own mode;
a one-hot of an out-of-range label is all zeros. The index normalization before the gather (the
``label + V`` wrap) stays the user's equations.

Named misses: the logits or a ``(rows, V)`` value derived from them read elsewhere (returned,
argmax/accuracy: then the logits must exist), soft labels that are not a one-hot of an integer
label, a softmax over an axis other than the vocabulary, and losses the op cannot express.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
from jax import lax
import numpy as np

from jfuse._jax import compat
from jfuse._jax import jaxpr as jx
from jfuse._jax.source import user_source_line
from jfuse.config import FuseOptions
from jfuse.core import probe
from jfuse.debug import reject
from jfuse.graph import Graph, literal_value
from jfuse.ops.linear_cross_entropy import linear_cross_entropy_refusals, logit_statistics
from jfuse.passes import _mask_eval as mask_eval
from jfuse.passes._matmul import bias_source, is_float, is_miss, look_through_weight_transpose
from jfuse.passes._matmul import matmul_orientation, moves_first_axis_last
from jfuse.passes.base import AUTODIFF_HINT, MatchResult, Pattern, Site, scalar_value
from jfuse.report import MissedFusion, MissReason

NAME = "linear_cross_entropy"
_MAX_REGION = 96
# Per-row primitives the region may hold (evaluated concretely on (rows,) values).
_ROW_OPS = probe.ELEMENTWISE | probe.SHAPE | {"stop_gradient", "is_finite", "reduce_max",
                                             "reduce_sum", "gather"}
_FULL_OPS = probe.ELEMENTWISE | {"broadcast_in_dim", "stop_gradient", "exp", "reduce_max",
                                 "reduce_sum", "gather"}
_LOGITS_HINT = ("the logits must exist for that use, so the loss cannot be fused; compute it "
                "from other values, or call jfuse.ops.linear_cross_entropy for the loss and "
                "keep the logits only where they are needed")


class _Unsupported(Exception):
    """The region computes something the op's statistics cannot express."""


def _reject(anchor: jx.JaxprEqn, why: str) -> None:
    reject(NAME, anchor, why)


def _miss(reason: MissReason, anchor: jx.JaxprEqn, hint: str, detail: str) -> MatchResult:
    return MatchResult(misses=[MissedFusion(NAME, reason, user_source_line(anchor), hint, detail)])


# --- step 1: the logits -----------------------------------------------------------------------

@dataclasses.dataclass
class _Logits:
    dot: jx.JaxprEqn
    h: Any
    w: Any
    transpose_w: bool
    eqns: list
    z: Any
    vocab_axis: int
    bias: Any = None
    soft_cap: float | None = None


def _soft_cap(graph: Graph, value: Any):
    """(cap, eqns, out) when ``value`` is only read by ``tanh(value / c) * c``."""
    first = graph.sole_user(value)
    if first is None or graph.is_output(value) or first.primitive.name not in ("div", "mul"):
        return None
    if first.invars[0] is not value:
        return None
    c = scalar_value(graph, first.invars[1])
    if c is None or c == 0:
        return None
    cap = c if first.primitive.name == "div" else 1.0 / c
    th = graph.sole_user(first.outvars[0])
    if th is None or th.primitive.name != "tanh" or graph.is_output(first.outvars[0]):
        return None
    out = graph.sole_user(th.outvars[0])
    if out is None or out.primitive.name != "mul" or graph.is_output(th.outvars[0]):
        return None
    other = out.invars[1] if out.invars[0] is th.outvars[0] else out.invars[0]
    c2 = scalar_value(graph, other)
    if c2 is None or not np.isclose(c2, cap, rtol=1e-6):
        return None
    return float(c2), [first, th, out], out.outvars[0]


def _logits(graph: Graph, dot: jx.JaxprEqn):
    oriented = matmul_orientation(graph, dot)
    if oriented is None:
        return None
    h, w, w_is_nk, features_first = oriented
    w, w_is_nk, weight_eqns = look_through_weight_transpose(graph, dot, w, w_is_nk)
    out = dot.outvars[0]
    vocab_axis = 0 if features_first else out.aval.ndim - 1
    found = _Logits(dot, h, w, w_is_nk, [dot] + weight_eqns, out, vocab_axis)
    vocab = out.aval.shape[vocab_axis]
    while True:
        z = found.z
        user = graph.sole_user(z)
        if user is None or graph.is_output(z):
            return found
        name = user.primitive.name
        if name == "convert_element_type" and is_float(user.outvars[0].aval):
            found.eqns.append(user)
            found.z = user.outvars[0]
        elif found.vocab_axis == 0 and moves_first_axis_last(user):
            # `W·xᵀ` (a per-example `W @ x` under vmap: Equinox's Linear) moved back to
            # (tokens..., vocab): the same logits as `x @ Wᵀ`, which the op computes.
            found.eqns.append(user)
            found.z = user.outvars[0]
            found.vocab_axis = user.outvars[0].aval.ndim - 1
        elif (name in compat.RESHAPE_PRIMITIVES and found.vocab_axis == z.aval.ndim - 1
              and user.outvars[0].aval.shape[-1:] == (vocab,)
              and not user.params.get("dimensions")):
            found.eqns.append(user)
            found.z = user.outvars[0]
            found.vocab_axis = user.outvars[0].aval.ndim - 1
        elif name == "add" and found.bias is None and found.soft_cap is None:
            other = user.invars[1] if user.invars[0] is z else user.invars[0]
            source = bias_source(graph, other, user, z, found.vocab_axis)
            if source is None or is_miss(source) or literal_value(source[0]) is not None:
                return found
            found.bias = source[0]
            found.eqns += source[1] + [user]
            found.z = user.outvars[0]
        elif name in ("div", "mul") and found.soft_cap is None:
            capped = _soft_cap(graph, z)
            if capped is None:
                return found
            found.soft_cap, eqns, found.z = capped
            found.eqns += eqns
        else:
            return found


# --- step 2: the rowwise region -----------------------------------------------------------------

@dataclasses.dataclass
class _Region:
    eqns: list
    full: tuple  # the (rows..., V) shape
    hot: dict  # id(eqn reading a one-hot) -> (label var, eqns building the one-hot)
    soft_labels: list  # (eqn, operand) full-shape float operands that are not a one-hot
    other_axis: bool  # a reduction of a (rows..., V) value over another axis
    escapes: list  # (var, readers) of (rows..., V) values read outside


def _is_row(shape, full) -> bool:
    shape = tuple(shape)
    return shape == full[:-1] or shape == full[:-1] + (1,)


def _one_hot(graph: Graph, atom: Any, full: tuple):
    """(label, eqns) when ``atom`` is ``convert(label == iota over the vocabulary)``."""
    eqns = []
    while isinstance(atom, jx.Var):
        producer = graph.producer(atom)
        if producer is None:
            return None
        if producer.primitive.name == "convert_element_type":
            eqns.append(producer)
            atom = producer.invars[0]
            continue
        if producer.primitive.name != "eq":
            return None
        eqns.append(producer)
        a, b = producer.invars
        for label, iota in ((a, b), (b, a)):
            ip = graph.producer(iota) if isinstance(iota, jx.Var) else None
            if (ip is not None and ip.primitive.name == "iota"
                    and ip.params["dimension"] == len(ip.params["shape"]) - 1
                    and tuple(ip.params["shape"])[-1] == full[-1] and isinstance(label, jx.Var)
                    and np.issubdtype(np.dtype(label.aval.dtype), np.integer)
                    and _is_row(label.aval.shape, full)):
                return label, eqns + [ip]
        return None
    return None


def _region(graph: Graph, logits: _Logits) -> _Region:
    full = tuple(logits.z.aval.shape)
    members = {logits.z}
    eqns, hot, soft, escapes = [], {}, [], []
    other_axis = False
    seen: set[int] = set()
    frontier = [logits.z]
    while frontier and len(eqns) < _MAX_REGION:
        var = frontier.pop()
        for user in graph.users(var):
            if id(user) in seen or user.effects or len(user.outvars) != 1:
                continue
            name = user.primitive.name
            out_shape = tuple(user.outvars[0].aval.shape)
            is_full = tuple(var.aval.shape) == full
            if name in ("reduce_max", "reduce_sum") and is_full and tuple(
                    user.params["axes"]) != (len(full) - 1,):
                # a softmax over one other axis (a sum over everything is just a reader)
                other_axis = other_axis or len(user.params["axes"]) == 1
                continue
            allowed = _FULL_OPS if is_full else _ROW_OPS
            if name not in allowed or not (out_shape == full or _is_row(out_shape, full)):
                continue
            ok, hot_here = True, None
            for a in user.invars:
                if isinstance(a, jx.Literal) or a in members or scalar_value(graph, a) is not None:
                    continue
                if name == "gather" and a is user.invars[1]:
                    continue  # the label index
                if (tuple(a.aval.shape) == full and is_float(a.aval)
                        and name in ("mul", "convert_element_type")):
                    found = _one_hot(graph, a, full)
                    if found is None:
                        soft.append((user, a))
                        ok = False
                        break
                    hot_here = found
                    continue
                ok = False
                break
            if not ok:
                continue
            seen.add(id(user))
            if hot_here is not None:
                hot[id(user)] = hot_here
            eqns.append(user)
            members.add(user.outvars[0])
            frontier.append(user.outvars[0])
    eqns.sort(key=graph.position)
    for var in [logits.z] + [e.outvars[0] for e in eqns]:
        if tuple(var.aval.shape) == full and not graph.read_only_within(var, eqns):
            escapes.append((var, graph.readers_outside(var, eqns)))
    return _Region(eqns, full, hot, soft, other_axis, escapes)


# --- step 3: the symbolic interpreter -----------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Lin:
    """``a·z + off`` with ``a`` a number and ``off`` per row (keepdims) or a scalar."""
    a: float
    off: Any


@dataclasses.dataclass(frozen=True)
class _Exp:
    """``exp(z + off)``."""
    off: Any


@dataclasses.dataclass(frozen=True)
class _Hot:
    """The label's one-hot times ``a·z + off`` (``lin`` None: the one-hot itself)."""
    lin: _Lin | None = None


@dataclasses.dataclass
class _Stats:
    """Per-row statistics in keepdims shape (rows..., 1): what the op computes."""
    lse: Any
    z_label: Any  # for the gather's index
    hot_label: Any  # for the one-hot (0 where the label matches no column)
    valid: Any  # the one-hot has a one (as the stats' float dtype)
    z_mean: Any
    shift: Any  # added to lse where a row max stood (0 in the rewrite; a probe in the check)
    in_range: Any = None  # the gather's index picks a column (bool); else its fill value
    fill: bool = False  # the gather fills out-of-range picks (NaN) rather than clamping


class _Interpreter:
    """Runs the region on :class:`_Stats`, over numpy (the float64 check) or jax.numpy (emit)."""

    def __init__(self, region: _Region, graph: Graph, xp, bind):
        self.region, self.graph, self.xp, self.bind = region, graph, xp, bind
        self.vocab = region.full[-1]
        self.used = set()

    def _keep(self, value):
        """A per-row value as (rows..., 1)."""
        shape = np.shape(value)
        if len(shape) == len(self.region.full):
            return value
        return self.xp.reshape(value, tuple(shape) + (1,))

    def _full_operand(self, value):
        """A concrete operand of a full-shape op: a scalar, or per row (keepdims)."""
        if np.ndim(value) == 0:
            return value
        shape = tuple(np.shape(value))
        if shape == self.region.full:
            raise _Unsupported("a full (rows, V) operand")
        if _is_row(shape, self.region.full):
            return self._keep(value)
        raise _Unsupported(f"operand of shape {shape}")

    def run(self, stats: _Stats, constant) -> dict:
        env: dict = {self.region_z: _Lin(1.0, 0.0)}
        for eqn in self.region.eqns:
            args = []
            for a in eqn.invars:
                if isinstance(a, jx.Literal):
                    args.append(a.val)
                elif a in env:
                    args.append(env[a])
                else:
                    try:
                        args.append(constant(a))
                    except _Unsupported:
                        args.append(None)  # the label index, or the one-hot: read by the rules
            env[eqn.outvars[0]] = self._eqn(eqn, args, stats)
        return env

    region_z: Any = None

    def _eqn(self, eqn, args, stats: _Stats):
        name = eqn.primitive.name
        symbolic = [isinstance(a, (_Lin, _Exp, _Hot)) for a in args]
        if id(eqn) in self.region.hot:
            # mul / convert reading the one-hot: the one-hot is the non-member full operand
            index = [i for i, a in enumerate(eqn.invars) if not symbolic[i]
                     and isinstance(a, jx.Var) and tuple(a.aval.shape) == self.region.full]
            args = [(_Hot() if i in index else a) for i, a in enumerate(args)]
            symbolic = [isinstance(a, (_Lin, _Exp, _Hot)) for a in args]
        if not any(symbolic):
            if name == "reduce_max" and tuple(np.shape(args[0])) == self.region.full:
                raise _Unsupported("row max of a full value")
            return self.bind(eqn, args)
        # Row-constant symbolic values (a = 0) are concrete per-row values broadcast.
        if all(not s or (isinstance(a, _Lin) and a.a == 0) for a, s in zip(args, symbolic)) and (
                name not in ("reduce_sum", "reduce_max", "gather")):
            return _Lin(0.0, self._row_apply(eqn, [a.off if isinstance(a, _Lin) else a
                                                   for a in args]))
        if name in ("convert_element_type", "copy", "copy_p"):
            return args[0]
        if name == "stop_gradient":
            if isinstance(args[0], _Lin) and args[0].a == 0:
                return args[0]
            raise _Unsupported("stop_gradient of the logits")
        if name == "neg":
            return self._scale(args[0], -1.0)
        if name in ("add", "sub"):
            x, y = args
            sign = 1.0 if name == "add" else -1.0
            if isinstance(x, _Lin) and isinstance(y, _Lin):
                return _Lin(x.a + sign * y.a, x.off + sign * y.off)
            if isinstance(x, _Lin) and not symbolic[1]:
                return _Lin(x.a, x.off + sign * self._full_operand(y))
            if isinstance(y, _Lin) and not symbolic[0]:
                return _Lin(sign * y.a, self._full_operand(x) + sign * y.off)
            raise _Unsupported(f"{name} of {type(x).__name__} and {type(y).__name__}")
        if name in ("mul", "div"):
            x, y = args
            if name == "mul" and isinstance(y, (_Lin, _Exp, _Hot)) and not isinstance(
                    x, (_Lin, _Exp, _Hot)):
                x, y = y, x
            c = self._number(y) if not isinstance(y, (_Lin, _Exp, _Hot)) else None
            if c is not None:
                return self._scale(x, c if name == "mul" else 1.0 / c)
            if name == "mul" and isinstance(x, _Hot) and x.lin is None and isinstance(y, _Lin):
                return _Hot(y)
            if name == "mul" and isinstance(y, _Hot) and y.lin is None and isinstance(x, _Lin):
                return _Hot(x)
            raise _Unsupported(f"{name} of {type(x).__name__} and {type(y).__name__}")
        if name == "exp":
            x = args[0]
            if isinstance(x, _Lin) and x.a == 1.0:
                return _Exp(x.off)
            raise _Unsupported("exp of something other than z + c")
        if name == "reduce_sum":
            return self._squeeze(eqn, self._row_sum(args[0], stats))
        if name == "reduce_max":
            x = args[0]
            if isinstance(x, _Lin) and x.a == 1.0:
                self.used.add("lse")
                return self._squeeze(eqn, stats.lse + stats.shift + x.off)
            raise _Unsupported("row max of something other than z + c")
        if name == "gather":
            return self._gather(eqn, args[0], stats)
        raise _Unsupported(f"{name} of the logits")

    def _number(self, value):
        if np.ndim(value) == 0:
            try:
                return float(value)
            except (TypeError, Exception):  # a tracer: a per-row value, not a number
                return None
        return None

    def _scale(self, x, c: float):
        if isinstance(x, _Lin):
            return _Lin(x.a * c, x.off * c)
        if isinstance(x, _Hot) and x.lin is not None:
            return _Hot(_Lin(x.lin.a * c, x.lin.off * c))
        raise _Unsupported(f"scaling {type(x).__name__}")

    def _row_sum(self, x, stats: _Stats):
        xp, v = self.xp, self.vocab
        if isinstance(x, _Exp):
            self.used.add("lse")
            return xp.exp(stats.lse + x.off)
        if isinstance(x, _Lin):
            if x.a != 0:
                self.used.add("mean")
                return x.a * v * stats.z_mean + v * x.off
            return v * x.off + 0.0 * stats.lse
        if isinstance(x, _Hot):
            self.used.add("hot")
            if x.lin is None:
                return stats.valid
            return stats.valid * (x.lin.a * stats.hot_label + x.lin.off)
        raise _Unsupported("row sum")

    def _squeeze(self, eqn, value):
        shape = tuple(eqn.outvars[0].aval.shape)
        value = self.xp.broadcast_to(value, self.region.full[:-1] + (1,))
        value = self.xp.reshape(value, shape)
        # In the rewrite each value takes the user's dtype; the float64 check stays float64.
        return value if self.xp is np else value.astype(eqn.outvars[0].aval.dtype)

    def _gather(self, eqn, x, stats: _Stats):
        if not isinstance(x, _Lin) or x.a == 0 or not _picks_label(self.graph, eqn, self.region):
            raise _Unsupported("a gather the op cannot express")
        self.used.add("take")
        picked = x.a * stats.z_label + x.off
        if stats.fill:
            # The whole pick is the fill value, with no derivative, as the user's gather's is.
            picked = self.xp.where(stats.in_range, picked, np.nan)
        return self._squeeze(eqn, picked)

    def _row_apply(self, eqn, args):
        """A full-shape elementwise op on row-constant operands: computed per row."""
        if eqn.primitive.name not in probe.ELEMENTWISE | {"broadcast_in_dim", "stop_gradient",
                                                          "exp"}:
            raise _Unsupported(eqn.primitive.name)
        if eqn.primitive.name == "broadcast_in_dim":
            return self._keep_broadcast(eqn, args[0])
        if eqn.primitive.name == "stop_gradient":
            return args[0]
        return self.row_elementwise(eqn, [self._full_operand(a) for a in args])

    def _keep_broadcast(self, eqn, value):
        """``broadcast_in_dim`` of a per-row value to the full shape, kept per row."""
        dims = tuple(eqn.params["broadcast_dimensions"])
        shape = [1] * len(self.region.full)
        for j, axis in enumerate(dims):
            shape[axis] = np.shape(value)[j]
        if shape[-1] != 1:
            raise _Unsupported("a broadcast along the vocabulary of a varying value")
        return self.xp.reshape(value, tuple(shape))

    row_elementwise: Any = None


def _picks_label(graph: Graph, gather: jx.JaxprEqn, region: _Region) -> bool:
    """The gather takes one column per row of a full (rows..., V) value: the
    ``take_along_axis`` form (batched over the rows) or ``x[arange(rows), labels]``."""
    return _label_index(graph, gather, region) is not None


def _label_index(graph: Graph, gather: jx.JaxprEqn, region: _Region):
    """(index var, eqns to absorb) for a label-picking gather, else None."""
    full = region.full
    rank = len(full)
    dn = gather.params["dimension_numbers"]
    index = gather.invars[1]
    if tuple(gather.invars[0].aval.shape) != full or not isinstance(index, jx.Var):
        return None
    sizes = tuple(gather.params["slice_sizes"])
    if sizes != (1,) * rank:
        return None
    batching = tuple(getattr(dn, "operand_batching_dims", ()))
    index_batching = tuple(getattr(dn, "start_indices_batching_dims", ()))
    # take_along_axis: every row axis is batched, except size-1 axes, which JAX makes offset
    # dims of slice size 1 instead (a batch of one); rows keep their order in the index.
    unit = tuple(d for d in range(rank - 1) if d not in batching)
    rows = int(np.prod(full[:-1], dtype=np.int64))
    if (tuple(dn.collapsed_slice_dims) == (rank - 1,) and tuple(dn.start_index_map) == (rank - 1,)
            and all(full[d] == 1 for d in unit) and len(dn.offset_dims) == len(unit)
            and list(batching) == sorted(batching) and len(index_batching) == len(batching)
            and list(index_batching) == sorted(index_batching)
            and index.aval.shape[-1] == 1
            and int(np.prod(index.aval.shape, dtype=np.int64)) == rows
            and int(np.prod(gather.outvars[0].aval.shape, dtype=np.int64)) == rows):
        return index, []
    if tuple(dn.offset_dims) != ():
        return None
    if (rank == 2 and not batching and tuple(dn.collapsed_slice_dims) == (0, 1)
            and tuple(dn.start_index_map) == (0, 1) and tuple(index.aval.shape) == (full[0], 2)):
        cat = graph.producer(index)
        if cat is None or cat.primitive.name != "concatenate" or len(cat.invars) != 2:
            return None
        rows, label = cat.invars
        if not _is_arange(graph, rows, full[0]) or not isinstance(label, jx.Var):
            return None
        return label, ([cat] if graph.sole_user(index) is gather else [])
    return None


def _is_arange(graph: Graph, atom: Any, n: int) -> bool:
    """``atom`` (shape (n, 1)) is computed from constants alone and equals ``arange(n)``."""
    found = mask_eval.ancestors(graph, atom)
    if found is None or found[1]:
        return False
    value = mask_eval.evaluate(found[0], atom, {})
    return value is not None and np.array_equal(np.reshape(value, (-1,)), np.arange(n))


# --- numpy rules for the float64 check --------------------------------------------------------

def _np_bind(eqn, args):
    name = eqn.primitive.name
    out_shape = tuple(eqn.outvars[0].aval.shape)
    args = [np.asarray(a) for a in args]
    with np.errstate(all="ignore"):
        if name in ("stop_gradient", "copy", "copy_p"):
            out = args[0]
        elif name == "is_finite":
            out = np.isfinite(args[0])
        elif name == "reduce_max":
            out = np.max(args[0], axis=tuple(eqn.params["axes"]))
        elif name == "reduce_sum":
            out = np.sum(args[0], axis=tuple(eqn.params["axes"]))
        elif name == "broadcast_in_dim":
            shape = [1] * len(out_shape)
            for j, axis in enumerate(eqn.params["broadcast_dimensions"]):
                shape[axis] = args[0].shape[j]
            out = np.broadcast_to(np.reshape(args[0], shape), out_shape)
        elif name in compat.RESHAPE_PRIMITIVES:
            out = np.reshape(args[0], out_shape)
        elif name == "gather":
            out = _np_take_last(eqn, args)
        else:
            out = probe.evaluate_elementwise(eqn, [a.astype(np.float64)
                                                   if a.dtype.kind == "f" else a for a in args])
            if out is None:
                raise _Unsupported(name)
    out = np.asarray(out)
    if out.dtype.kind == "f" or np.dtype(eqn.outvars[0].aval.dtype).kind == "f":
        return np.broadcast_to(out.astype(np.float64), out_shape)
    return np.broadcast_to(out, out_shape)


def _np_take_last(eqn, args):
    """optax's ``take_along_axis(...)[..., 0]``: a per-row gather of a constant column."""
    x, index = args
    dn = eqn.params["dimension_numbers"]
    rank = x.ndim
    if (tuple(dn.collapsed_slice_dims) != (rank - 1,) or tuple(dn.start_index_map) != (rank - 1,)
            or index.size != 1 or getattr(dn, "operand_batching_dims", ())):
        raise _Unsupported("a gather of per-row values")
    i = int(np.reshape(index, ()))
    if not 0 <= i < x.shape[-1]:
        raise _Unsupported("an out-of-range constant gather")
    return x[..., i]


def _jnp_bind(eqn, args):
    return jx.bind(eqn, args)[0]


# --- the pass ---------------------------------------------------------------------------------

def _looks_like_cross_entropy(region: _Region) -> bool:
    names = {e.primitive.name for e in region.eqns}
    label = "gather" in names or region.hot or region.soft_labels
    return "exp" in names and "reduce_sum" in names and bool(label)


def _escape_miss(graph: Graph, dot, var, readers) -> MatchResult:
    if readers and graph.hidden_by_autodiff(readers[0]):
        where, hint = "the backward pass", AUTODIFF_HINT
    else:
        where = (f"{readers[0].primitive.name} at {user_source_line(readers[0])}"
                 if readers else "the function's outputs")
        hint = _LOGITS_HINT
    return _miss(MissReason.LOGITS_ESCAPE, dot, hint,
                 f"the logits (or a (tokens, vocab) value computed from them, "
                 f"{var.aval.str_short()}) are also read by {where}")


def match_cross_entropy(graph: Graph, dot: jx.JaxprEqn, options: FuseOptions) -> MatchResult | None:
    logits = _logits(graph, dot)
    if logits is None:
        _reject(dot, "not an activation times a 2-D weight")
        return None
    region = _region(graph, logits)
    if not _looks_like_cross_entropy(region):
        if region.other_axis and _softmax_like(graph, logits):
            return _axis_miss(dot, logits)
        _reject(dot, "the logits do not feed a log-sum-exp and a label pick")
        return None
    if logits.vocab_axis != len(region.full) - 1 or region.other_axis:
        return _axis_miss(dot, logits)
    if region.soft_labels:
        eqn, operand = region.soft_labels[0]
        if graph.hidden_by_autodiff(eqn):
            # A gradient taken before jfuse saw the function: its backward multiplies the
            # probabilities by a cotangent, which is no label at all.
            read = next(a for a in eqn.invars if a is not operand)
            return _escape_miss(graph, dot, read, [eqn])
        return _miss(MissReason.SOFT_LABELS, dot,
                     "the op takes integer labels (a one-hot of them, jax.nn.one_hot, is read "
                     "through); soft or smoothed targets need the full logits",
                     f"the loss multiplies the log-probabilities by {operand.aval.str_short()}, "
                     f"which is not a one-hot of integer labels")
    if region.escapes:
        return _escape_miss(graph, dot, *region.escapes[0])
    for intermediate in [e.outvars[0] for e in logits.eqns if e.outvars[0] is not logits.z]:
        if not graph.read_only_within(intermediate, logits.eqns):
            return _escape_miss(graph, dot, intermediate,
                                graph.readers_outside(intermediate, logits.eqns))
    labels = _labels(graph, region)
    if isinstance(labels, str):
        return _miss(MissReason.LOSS_FORM, dot, "one label array per loss", labels)
    outputs = [e.outvars[0] for e in region.eqns
               if not isinstance(e.outvars[0], jx.DropVar)
               and not graph.read_only_within(e.outvars[0], region.eqns)]
    checked = _check(graph, logits, region, labels, outputs)
    if isinstance(checked, str):
        return _miss(MissReason.LOSS_FORM, dot,
                     "jfuse fuses losses built from logsumexp, the label's logit (gather or "
                     "one-hot) and the mean logit; this one is left to XLA", checked)
    used = checked
    return MatchResult(site=_site(graph, logits, region, labels, outputs, used, options))


def _softmax_like(graph: Graph, logits: _Logits) -> bool:
    stack, seen = [logits.z], set()
    while stack and len(seen) < _MAX_REGION:
        var = stack.pop()
        for user in graph.users(var):
            if id(user) in seen:
                continue
            seen.add(id(user))
            if user.primitive.name == "exp":
                return True
            if user.primitive.name in _FULL_OPS | {"transpose"} and len(user.outvars) == 1:
                stack.append(user.outvars[0])
    return False


def _axis_miss(dot, logits: _Logits) -> MatchResult:
    return _miss(MissReason.VOCAB_AXIS, dot,
                 "put the vocabulary last: compute the logits as h @ W (tokens, vocab) and "
                 "reduce over axis -1",
                 f"the logits {logits.z.aval.str_short()} have the vocabulary on axis "
                 f"{logits.vocab_axis} or are reduced over another axis")


@dataclasses.dataclass
class _Labels:
    var: Any  # the gather's index or the one-hot's label
    mode: str  # "fill" (out of range -> NaN), "clip" or "one_hot"
    eqns: list  # equations building the one-hot, absorbed when private


def _labels(graph: Graph, region: _Region):
    found = []
    for eqn in region.eqns:
        if eqn.primitive.name == "gather" and tuple(eqn.invars[0].aval.shape) == region.full:
            picked = _label_index(graph, eqn, region)
            if picked is None:
                return "a gather of the logits that is not one column per row"
            mode = str(eqn.params["mode"]).rsplit(".", 1)[-1].upper()
            fill = eqn.params.get("fill_value")
            if "FILL" in mode:
                if fill is not None and not np.isnan(fill):
                    return f"a gather filling out-of-range labels with {fill}"
                found.append(_Labels(picked[0], "fill", picked[1]))
            else:
                found.append(_Labels(picked[0], "clip", picked[1]))
    for label, eqns in region.hot.values():
        found.append(_Labels(label, "one_hot", eqns))
    if len({(id(f.var), f.mode) for f in found}) > 1:
        return "the loss picks logits with more than one label array or indexing mode"
    return found[0] if found else None


def _constant_of(graph: Graph, xp):
    def constant(atom):
        value = scalar_value(graph, atom)
        if value is None:
            raise _Unsupported(f"{atom} is not a constant")
        return xp.full(tuple(atom.aval.shape), value, np.dtype(atom.aval.dtype))
    return constant


def _check(graph: Graph, logits: _Logits, region: _Region, labels: _Labels, outputs):
    """The float64 check: on random per-row statistics, the region's outputs must not depend on
    the shift that replaces the row max. Returns the statistics used, or why not."""
    rng = np.random.default_rng(0)
    keep = region.full[:-1] + (1,)
    results = []
    interp = _Interpreter(region, graph, np, _np_bind)
    interp.region_z = logits.z
    interp.row_elementwise = lambda eqn, args: _np_elementwise(eqn, args)
    base = _Stats(lse=rng.standard_normal(keep) * 3 + 5, z_label=rng.standard_normal(keep),
                  hot_label=rng.standard_normal(keep),
                  valid=(rng.random(keep) < 0.8).astype(np.float64),
                  z_mean=rng.standard_normal(keep), shift=0.0, in_range=rng.random(keep) < 0.8,
                  fill=labels is not None and labels.mode == "fill")
    try:
        for shift in (0.0, 2.5 + rng.random(keep)):
            env = interp.run(dataclasses.replace(base, shift=shift), _constant_of(graph, np))
            results.append([np.asarray(env[v], np.float64) for v in outputs])
    except _Unsupported as e:
        return str(e)
    for var, a, b in zip(outputs, *results):
        if isinstance(a, (_Lin, _Exp, _Hot)) or np.shape(a) != tuple(var.aval.shape):
            return f"{var.aval.str_short()} is not a per-token value"
        same = np.isclose(a, b, rtol=1e-9, atol=1e-9) | (np.isnan(a) & np.isnan(b))
        if not np.all(same):
            return (f"the per-token value {var.aval.str_short()} depends on the row maximum "
                    "itself, not only on the log-sum-exp")
    used = set(interp.used)
    if ("take" in used or "hot" in used) and labels is None:
        return "no label"
    return used


def _np_elementwise(eqn, args):
    out = probe.evaluate_elementwise(eqn, [np.asarray(a, np.float64) if np.asarray(a).dtype.kind
                                           == "f" else np.asarray(a) for a in args])
    if out is None:
        if eqn.primitive.name == "is_finite":
            return np.isfinite(args[0])
        raise _Unsupported(eqn.primitive.name)
    return out


def _jnp_row_elementwise(eqn, args):
    """A full-shape elementwise equation on per-row (keepdims) operands, each in the dtype the
    user's equation reads."""
    cast = [jnp.asarray(a).astype(v.aval.dtype) if isinstance(v, jx.Var) and np.ndim(a) else a
            for a, v in zip(args, eqn.invars)]
    return jx.bind(eqn, cast)[0]


def _site(graph, logits: _Logits, region: _Region, labels: _Labels, outputs, used,
          options: FuseOptions) -> Site:
    absorbed = {id(e): e for e in logits.eqns + region.eqns}
    label_eqns = labels.eqns if labels is not None else []
    for e in label_eqns:
        if graph.read_only_within(e.outvars[0], list(absorbed.values()) + label_eqns):
            absorbed[id(e)] = e
    eqns = sorted(absorbed.values(), key=graph.position)
    inputs = [logits.h, logits.w] + ([logits.bias] if logits.bias is not None else [])
    if labels is not None:
        inputs.append(labels.var)
    full = region.full
    rows = int(np.prod(full[:-1], dtype=np.int64))
    vocab = full[-1]
    keep = full[:-1] + (1,)
    k = logits.h.aval.shape[-1]
    has_bias = logits.bias is not None
    label_mode = "one_hot" if labels is not None and labels.mode == "one_hot" else "take"
    mode = labels.mode if labels is not None else None
    with_mean = "mean" in used
    spec_fields = dict(transpose_w=logits.transpose_w, soft_cap=logits.soft_cap,
                       label_mode=label_mode, with_mean=with_mean)

    def emit(*values):
        values = list(values)
        h, w = values[0], values[1]
        bias = values[2] if has_bias else None
        label = values[-1] if labels is not None else jnp.zeros((rows,), jnp.int32)
        label = jnp.reshape(label, (rows,)).astype(jnp.int32)
        valid = (label >= 0) & (label < vocab)
        if mode == "fill":  # out of range: take's NaN (vocab is out of range and not wrapped)
            label = jnp.where(valid, label, vocab)
        elif mode == "clip":
            label = jnp.clip(label, 0, vocab - 1)
        lse, zl, zm = logit_statistics(jnp.reshape(h, (rows, k)), w, label, bias,
                                       implementation=options.implementation, **spec_fields)
        if mode == "clip":
            # The user's gather clamps an out-of-range index in the forward, and its transpose
            # (a scatter) drops it: that pick has no derivative.
            zl = jnp.where(valid, zl, lax.stop_gradient(zl))
        shaped = lambda a: None if a is None else jnp.reshape(a, keep)  # noqa: E731
        stats = _Stats(lse=shaped(lse), z_label=shaped(zl), hot_label=shaped(zl),
                       valid=shaped(valid.astype(lse.dtype)), z_mean=shaped(zm), shift=0.0,
                       in_range=shaped(valid), fill=mode == "fill")
        interp = _Interpreter(region, graph, jnp, _jnp_bind)
        interp.region_z = logits.z
        interp.row_elementwise = _jnp_row_elementwise
        env = interp.run(stats, _constant_of(graph, jnp))
        return [jnp.asarray(env[v]).astype(v.aval.dtype) for v in outputs]

    dtype = np.dtype(logits.h.aval.dtype).name
    parts = [{"fill": "take_along_axis labels", "clip": "indexed labels",
              "one_hot": "one-hot labels", None: "no labels"}[mode]]
    if logits.transpose_w:
        parts.append("W as (V, K)")
    if has_bias:
        parts.append("bias")
    if logits.soft_cap is not None:
        parts.append(f"soft-cap {logits.soft_cap:g}")
    if with_mean:
        parts.append("mean logit")
    detail = f"({rows}x{k})@({k}x{vocab}) {dtype}: " + ", ".join(parts)
    label_aval = labels.var.aval if labels is not None else None
    refusals = linear_cross_entropy_refusals(
        logits.h.aval, logits.w.aval, label_aval,
        None if logits.bias is None else logits.bias.aval, **spec_fields)
    # Unfused, the f32 logits, their exponentials and the softmax for the backward are written
    # and read back.
    saved = 3 * rows * vocab * 4
    return Site(NAME, eqns, inputs, outputs, emit, user_source_line(logits.dot), detail, saved,
                graph, refusals)


# Priority 15: after attention (5) and glu (10), whose matmuls are never an LM head, and before
# linear (20), which would otherwise take the logits matmul (with a bias) for itself.
PATTERN = Pattern(NAME, frozenset({"dot_general"}), match_cross_entropy, priority=15)
