"""The ``attention`` pattern: ``softmax(Q·Kᵀ·scale + bias, masked) · V`` as real code writes it.

Anchored at the PV ``dot_general``. The block is recognized by what each part computes:

1. **The probabilities.** One operand of the PV product is, through float converts and
   transposes, the output of a softmax of some scores ``s`` over one axis: ``exp(s - max) / sum``
   with or without the ``stop_gradient`` of the max, ``jax.nn.softmax``'s ``custom_jvp``, in any
   dtype. The candidate is checked by evaluating it in float64 on probe rows against a softmax
   over the reduced axis (:mod:`jfuse.core.probe`).
2. **The scores.** From ``s`` back to the QK ``dot_general``: float converts, transposes, a scale
   (multiply or divide by a constant, on the scores; a scale on q or k stays the user's and is
   read as it is), Gemma's soft-cap ``tanh(s / c) · c``, additive biases (any array: ALiBi,
   relative positions, an additive ``-inf`` mask) and ``where(mask, s, c)`` selects.
3. **The masks**, classified by meaning: a mask computed from constants alone (``jnp.tril``,
   ``iota`` comparisons, ``nn.make_causal_mask``, or arrays captured at trace time, which the
   jaxpr holds as constvars: :meth:`Graph.constant` gives their values) is evaluated and becomes ``is_causal`` or a
   sliding window when it is one, else a constant dense mask; a mask computed from one integer
   ``(B,)`` array that equals ``j < lengths[b]`` on probe values becomes key lengths; one that
   equals ``q_ids[b, i] == kv_ids[b, j]`` becomes segment ids; anything else is the op's dense
   boolean ``mask``.
4. **The layout.** The QK product's batch dims are the op's batch (the first) and heads (the
   rest); the query's free dims are the query sequence (the first) and GQA groups (the rest), so
   ``jax.nn.dot_product_attention``'s 5-D ``(B, T, K, G, H)`` form, ``jnp.repeat``-ed K/V (read
   through, never repeated) and vmapped per-example code (Equinox) map onto one ``(B, N, T, H)``
   call. The output is laid out as the user's PV product was.

The op computes the scores and the softmax in f32 whatever the user's dtype; its answer differs
from the dense one only by rounding. Near misses are reported and left exact: the probabilities
read elsewhere, dropout (or anything else) between the softmax and the PV product, a softmax
over another axis, normalisation after the PV product of anything but ``exp(s - max)`` by its
own row sums (MaxText's ``local_out / local_sum`` fuses: it is the same quantity), scores
computed in a way the op cannot express (a scale after the bias, different masking constants), a layout it cannot take.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jfuse._jax import compat
from jfuse._jax import jaxpr as jx
from jfuse._jax.source import user_source_line
from jfuse.config import FuseOptions
from jfuse.core import probe
from jfuse.debug import reject
from jfuse.graph import Graph, literal_value
from jfuse.ops.attention import ATTENTION, DEFAULT_MASK_VALUE, AttentionSpec, fused_attention
from jfuse.passes import _mask_eval as mask_eval
from jfuse.passes._matmul import is_float
from jfuse.passes.base import AUTODIFF_HINT, MatchResult, Pattern, Site, scalar_value
from jfuse.report import MissedFusion, MissReason

NAME = "attention"
_MAX_CHAIN = 40
_MAX_SOFTMAX = 24
# Primitives that draw random bits: a product with their output between softmax and PV is dropout.
_RANDOM = frozenset({"random_bits", "threefry2x32", "rng_bit_generator", "random_wrap",
                     "random_unwrap", "random_seed", "rng_uniform"})
_SOFTMAX_OPS = frozenset({"reduce_max", "max", "broadcast_in_dim", "stop_gradient", "sub", "exp",
                          "reduce_sum", "div", "mul", "convert_element_type", "is_finite",
                          "select_n", "copy", "copy_p", "transpose"}) | compat.RESHAPE_PRIMITIVES


def _reject(anchor: jx.JaxprEqn, why: str) -> None:
    reject(NAME, anchor, why)


def _miss(reason: MissReason, anchor: jx.JaxprEqn, hint: str, detail: str) -> MatchResult:
    return MatchResult(misses=[MissedFusion(NAME, reason, user_source_line(anchor), hint, detail)])


# --- roles and the op's canonical layout ---------------------------------------------------------
# A role names what an axis is: ("b", i) the i-th batch dim of the QK product, ("q", j) the j-th
# free dim of the query (j = 0 is the query sequence T), "S" the key sequence, "H" the contracted
# head dim, "Hv" the value's head dim. The op's layout groups them: B = ("b", 0); N = the other
# batch dims, then the other query dims (GQA groups); T; S or H.

@dataclasses.dataclass(frozen=True)
class _Roles:
    n_batch: int
    n_query: int
    sizes: dict  # role -> size in the scores

    @property
    def heads(self) -> list:
        return [("b", i) for i in range(1, self.n_batch)] + [("q", j) for j in range(1, self.n_query)]

    @property
    def batch(self) -> list:
        return [("b", 0)] if self.n_batch else []

    @property
    def kv_heads(self) -> list:
        return [("b", i) for i in range(1, self.n_batch)]

    def scores(self) -> list[list]:
        """The groups of a scores-shaped array: (B, N, T, S)."""
        return [self.batch, self.heads, [("q", 0)], ["S"]]


def _to_canonical(xp, x, roles_of_axes: list, groups: list[list], sizes: dict):
    """``x`` (axes named by ``roles_of_axes``, None for unit dims) as one axis per group: each
    group's roles transposed together and merged; a role absent from ``x`` is a unit dim; a group
    mixing broadcast and full dims is broadcast first."""
    present = [r for r in roles_of_axes if r is not None]
    x = xp.reshape(x, [d for d, r in zip(x.shape, roles_of_axes) if r is not None])
    order = [r for g in groups for r in g]
    perm = [present.index(r) for r in order if r in present]
    x = xp.transpose(x, perm)
    shape = []
    it = iter(x.shape)
    for r in order:
        shape.append(next(it) if r in present else 1)
    x = xp.reshape(x, shape)
    out_shape, full, pos = [], list(shape), 0
    for g in groups:
        dims = shape[pos:pos + len(g)]
        if any(d != 1 for d in dims) and any(d == 1 for d in dims):
            for i, r in enumerate(g):
                full[pos + i] = sizes[r]
        else:
            full[pos:pos + len(g)] = dims
        out_shape.append(int(np.prod([full[pos + i] for i in range(len(g))], dtype=np.int64)))
        pos += len(g)
    if full != shape:
        x = xp.broadcast_to(x, full)
    return xp.reshape(x, out_shape)


# --- the probabilities ---------------------------------------------------------------------------

def _back_through_layout(graph: Graph, atom: Any):
    """(var, eqns, axis_map): ``atom`` traced back through float converts, copies and transposes;
    ``axis_map[i]`` is the axis of ``var`` that axis ``i`` of ``atom`` is."""
    eqns, axis_map = [], list(range(len(atom.aval.shape)))
    while isinstance(atom, jx.Var):
        producer = graph.producer(atom)
        if producer is None:
            break
        name = producer.primitive.name
        if name == "convert_element_type" and is_float(producer.invars[0].aval):
            pass
        elif name in ("copy", "copy_p"):
            pass
        elif name == "transpose":
            perm = producer.params["permutation"]
            axis_map = [perm[a] for a in axis_map]
        else:
            break
        eqns.append(producer)
        atom = producer.invars[0]
    return atom, eqns, axis_map


def _probe_override(eqn, args):
    name = eqn.primitive.name
    if name == "reduce_max":
        return np.max(args[0], axis=tuple(eqn.params["axes"]))
    if name == "stop_gradient":
        return args[0]
    if name == "is_finite":
        return np.isfinite(args[0])
    if name == "transpose":
        return np.transpose(args[0], eqn.params["permutation"])
    if name == compat.CUSTOM_JVP_PRIMITIVE or compat.is_call(eqn):
        body, consts = jx.open_and_consts(jx.call_body(eqn))
        if consts or len(body.outvars) != 1:
            return None
        values = dict(zip(body.invars, args))
        if not body.eqns:
            return values.get(body.outvars[0])
        return probe.probe(body.eqns, values, {}, _probe_override)
    return None


@dataclasses.dataclass
class _Softmax:
    scores: jx.Var  # s, before any transpose the softmax applies on the way
    axis: int  # the normalized axis, of s
    p_to_s: list  # p's axis i is s's axis p_to_s[i]
    eqns: list
    dtype: Any  # what the exponentials are computed in


def _softmax_root(graph: Graph, p: jx.Var):
    """The scores a candidate softmax output ``p`` reads, found structurally (then checked)."""
    producer = graph.producer(p)
    if producer is None:
        return None
    if producer.primitive.name == compat.CUSTOM_JVP_PRIMITIVE:  # jax_softmax_custom_jvp
        if all(isinstance(a, jx.Literal) for a in producer.invars[1:]):
            return producer.invars[0]
        return None
    if producer.primitive.name != "div":
        return None
    e, _ = _strip(graph, producer.invars[0])
    exp = graph.producer(e)
    if exp is None or exp.primitive.name != "exp":
        return None
    x = exp.invars[0]
    sub = graph.producer(x)
    if sub is not None and sub.primitive.name == "sub":
        x = sub.invars[0]
    return x


def _exp_root(graph: Graph, e: jx.Var):
    """The scores ``s`` of a candidate ``e = exp(s - max)``, found structurally (then checked)."""
    exp = graph.producer(e)
    if exp is None or exp.primitive.name != "exp":
        return None
    sub = graph.producer(exp.invars[0])
    return sub.invars[0] if sub is not None and sub.primitive.name == "sub" else None


def _strip(graph: Graph, atom: Any):
    eqns = []
    while isinstance(atom, jx.Var):
        producer = graph.producer(atom)
        if producer is None or producer.primitive.name not in ("convert_element_type", "copy",
                                                               "copy_p"):
            break
        eqns.append(producer)
        atom = producer.invars[0]
    return atom, eqns


def _softmax(graph: Graph, p: Any, normalized: bool = True) -> _Softmax | None:
    """``p = softmax(s, axis)`` for some scores ``s``, checked in float64, or None; with
    ``normalized=False``, ``p = exp(s - max(s, axis))``, the numerator of a softmax whose
    division comes after the PV product.

    ``s`` is found through the converts and transposes in front of the exponential (jax.nn
    reduces the max before its transpose and subtracts it after), and the block is every
    equation computed from ``s`` alone (and constants) that ``p`` depends on.
    """
    if not isinstance(p, jx.Var) or not is_float(p.aval):
        return None
    root = _softmax_root(graph, p) if normalized else _exp_root(graph, p)
    if root is None or not isinstance(root, jx.Var):
        return None
    s, _, p_to_s = _back_through_layout(graph, root)
    if not isinstance(s, jx.Var) or len(s.aval.shape) != len(p.aval.shape):
        return None
    members, eqns, constants, frontier, ids = {s}, [], {}, [s], set()
    while frontier and len(eqns) < _MAX_SOFTMAX:
        var = frontier.pop()
        for user in graph.users(var):
            name = user.primitive.name
            if id(user) in ids or user.effects or len(user.outvars) != 1:
                continue
            if name not in _SOFTMAX_OPS and not (name == compat.CUSTOM_JVP_PRIMITIVE
                                                 and user.outvars[0] is p):
                continue
            ok = True
            for a in user.invars:
                if isinstance(a, jx.Literal) or a in members:
                    continue
                c = scalar_value(graph, a)
                if c is None:
                    ok = False
                    break
                constants[a] = c
            if ok:
                ids.add(id(user))
                eqns.append(user)
                members.add(user.outvars[0])
                frontier.append(user.outvars[0])
    if p not in members:
        return None
    block = graph.ancestors_within(p, eqns)
    shape = tuple(p.aval.shape)
    s_shape = tuple(s.aval.shape)
    rng = np.random.default_rng(0)
    rows = [rng.standard_normal(max(s_shape)) * spread for spread in (1.0, 30.0)]
    for axis in range(len(shape)):  # which axis it normalizes, by evaluating it
        if shape[axis] == 1:
            continue
        ok = True
        for row in rows:
            row = row[:shape[axis]]
            s_axis = p_to_s[axis]
            value = np.reshape(row, [shape[axis] if i == s_axis else 1
                                     for i in range(len(s_shape))])
            got = probe.probe(block, {s: value}, constants, _probe_override)
            if got is None:
                return None
            want = np.exp(row - row.max())
            if normalized:
                want = want / np.sum(want)
            want = np.reshape(want, [shape[axis] if i == axis else 1 for i in range(len(shape))])
            try:
                got = np.broadcast_to(got, np.broadcast_shapes(np.shape(got), want.shape))
            except ValueError:
                return None
            if not np.all(np.isfinite(got)) or np.max(np.abs(got - want)) > 1e-9:
                ok = False
                break
        if ok:
            exps = [e for e in block if e.primitive.name == "exp"]
            dtype = exps[0].outvars[0].aval.dtype if exps else p.aval.dtype
            return _Softmax(s, p_to_s[axis], list(p_to_s), block, dtype)
    return None


# --- the scores ----------------------------------------------------------------------------------

@dataclasses.dataclass
class _Chain:
    """The path from the QK product to the softmax's scores, forward order."""

    dot: jx.JaxprEqn | None = None
    eqns: list = dataclasses.field(default_factory=list)
    # tokens, forward order: ("scale", c), ("tanh",), ("bias", var, axis_map),
    # ("mask", pred, axis_map, negate, constant)
    tokens: list = dataclasses.field(default_factory=list)
    axis_map: list = dataclasses.field(default_factory=list)  # scores axis -> dot output axis
    stop: str = ""  # why the walk stopped before a dot_general (empty when it reached one)
    dtypes: set = dataclasses.field(default_factory=set)


def _chain_operand(graph: Graph, eqn: jx.JaxprEqn, depth: int = 12) -> int | None:
    """Which operand of a binary step continues the scores back to a batched dot_general."""
    for i, a in enumerate(eqn.invars):
        if not isinstance(a, jx.Var) or tuple(a.aval.shape) != tuple(eqn.outvars[0].aval.shape):
            continue
        if scalar_value(graph, a) is not None or not is_float(a.aval):
            continue
        atom, d = a, depth
        while d and isinstance(atom, jx.Var):
            producer = graph.producer(atom)
            if producer is None:
                break
            if producer.primitive.name == "dot_general":
                return i
            floats = [v for v in producer.invars if isinstance(v, jx.Var) and is_float(v.aval)
                      and tuple(v.aval.shape) == tuple(producer.outvars[0].aval.shape)
                      or producer.primitive.name == "transpose" and v is producer.invars[0]]
            if not floats:
                break
            atom, d = floats[0], d - 1
    return None


def _scores_chain(graph: Graph, s: jx.Var) -> _Chain:
    chain = _Chain()
    cur, axis_map = s, list(range(len(s.aval.shape)))
    tokens = []
    for _ in range(_MAX_CHAIN):
        producer = graph.producer(cur)
        if producer is None:
            chain.stop = "the scores are an input of the function"
            break
        name = producer.primitive.name
        chain.dtypes.add(np.dtype(cur.aval.dtype))
        if name == "dot_general":
            chain.dot = producer
            break
        step_eqn = producer
        if name in ("convert_element_type", "copy", "copy_p", "reduce_precision"):
            if not is_float(producer.invars[0].aval):
                chain.stop = "the scores are converted from a non-float array"
                break
            nxt = producer.invars[0]
        elif name == "transpose":
            perm = producer.params["permutation"]
            axis_map = [perm[a] for a in axis_map]
            nxt = producer.invars[0]
        elif name in ("mul", "div"):
            a, b = producer.invars
            cb, ca = scalar_value(graph, b), scalar_value(graph, a)
            if cb is not None and isinstance(a, jx.Var):
                tokens.append(("scale", cb if name == "mul" else 1.0 / cb))
                nxt = a
            elif ca is not None and name == "mul" and isinstance(b, jx.Var):
                tokens.append(("scale", ca))
                nxt = b
            else:
                chain.stop = (f"the scores are {'multiplied' if name == 'mul' else 'divided'} by "
                              "an array, not a constant")
                break
        elif name == "tanh":
            tokens.append(("tanh",))
            nxt = producer.invars[0]
        elif name == "add":
            i = _chain_operand(graph, producer)
            if i is None:
                chain.stop = "an add of two arrays neither of which comes from the QK product"
                break
            other = producer.invars[1 - i]
            if scalar_value(graph, other) is not None:
                chain.stop = "a constant is added to the scores"
                break
            if not is_float(other.aval):
                chain.stop = "a non-float array is added to the scores"
                break
            tokens.append(("bias", other, list(axis_map)))
            nxt = producer.invars[i]
        elif name == "select_n" and len(producer.invars) == 3:
            pred, c0, c1 = producer.invars
            k0, k1 = scalar_value(graph, c0), scalar_value(graph, c1)
            if pred.aval.dtype != np.bool_:
                chain.stop = "a select on a non-boolean predicate"
                break
            if k0 is not None and k1 is None:
                tokens.append(("mask", pred, list(axis_map), False, k0))
                nxt = c1
            elif k1 is not None and k0 is None:
                tokens.append(("mask", pred, list(axis_map), True, k1))
                nxt = c0
            else:
                chain.stop = ("where(mask, scores, x) with x an array, not a constant masking "
                              "value")
                break
        else:
            chain.stop = f"the scores pass through {name}"
            break
        chain.eqns.append(step_eqn)
        cur = nxt
    else:
        chain.stop = "the path from the QK product is too long"
    chain.tokens = tokens[::-1]
    chain.eqns = chain.eqns[::-1]
    chain.axis_map = axis_map
    return chain


@dataclasses.dataclass
class _Scores:
    scale: float = 1.0
    soft_cap: float | None = None
    biases: list = dataclasses.field(default_factory=list)  # (var, axis_map)
    masks: list = dataclasses.field(default_factory=list)  # (pred, axis_map, negate)
    mask_value: float | None = None


def _interpret(tokens) -> _Scores | str:
    """The op's (scale, soft_cap, biases, masks) from the chain's steps, or why it can't take them."""
    out = _Scores()
    tanh = [i for i, t in enumerate(tokens) if t[0] == "tanh"]
    if len(tanh) > 1:
        return "tanh is applied to the scores more than once"
    first_other = next((i for i, t in enumerate(tokens) if t[0] in ("bias", "mask")), len(tokens))
    if tanh:
        k = tanh[0]
        if k == 0 or tokens[k - 1][0] != "scale" or k + 1 >= len(tokens) or tokens[k + 1][0] != "scale":
            return "tanh of the scores that is not a soft-cap c·tanh(s / c)"
        if first_other < k:
            return "a bias or mask is applied before the soft-cap"
        cap = tokens[k + 1][1]
        if not cap > 0:
            return f"soft-cap {cap} is not positive"
        before = math.prod(t[1] for t in tokens[:k])
        out.scale, out.soft_cap = before * cap, cap
        rest = tokens[k + 2:]
    else:
        rest = tokens[first_other:]
        out.scale = math.prod(t[1] for t in tokens[:first_other] if t[0] == "scale")
        if any(t[0] == "tanh" for t in tokens[:first_other]):
            return "tanh of the scores that is not a soft-cap"
    if any(t[0] == "scale" for t in rest):
        return "the scores are scaled after a bias, mask or soft-cap"
    constants = set()
    masked = False
    for t in rest:
        if t[0] == "mask":
            constants.add(t[4])
            out.masks.append((t[1], t[2], t[3]))
            masked = True
        else:
            if masked and not all(c == -math.inf or c <= -1e30 for c in constants):
                return ("a bias is added after a mask with a finite masking constant (the masked "
                        "scores would differ by the bias)")
            out.biases.append((t[1], t[2]))
    if len(constants) > 1:
        return f"masks use different masking constants {sorted(constants)}"
    if constants:
        out.mask_value = constants.pop()
    return out


# --- masks ---------------------------------------------------------------------------------------

@dataclasses.dataclass
class _MaskTerm:
    var: Any
    roles: list  # role per axis of var (None: a unit dim)
    negate: bool = False


def _terms(graph: Graph, var, roles, negate, out: list) -> None:
    """Split a predicate into terms that are AND-ed: through ``and``, broadcasts, transposes."""
    producer = graph.producer(var)
    if producer is not None and not negate and len(graph.users(var)) >= 1:
        name = producer.primitive.name
        if name == "and" and var.aval.dtype == np.bool_:
            for a in producer.invars:
                if isinstance(a, jx.Literal):
                    if not bool(a.val):
                        out.append(_MaskTerm(var, roles))  # all False: keep as a whole
                        return
                    continue
                _terms(graph, a, roles, False, out)
            return
        if name == "broadcast_in_dim" and isinstance(producer.invars[0], jx.Var):
            src = producer.invars[0]
            dims = producer.params["broadcast_dimensions"]
            _terms(graph, src, [roles[d] for d in dims], False, out)
            return
        if name == "broadcast_in_dim":  # a broadcast literal
            if bool(literal_value(producer.invars[0])):
                return
        if name == "transpose":
            perm = producer.params["permutation"]
            src_roles = [None] * len(roles)
            for i, p in enumerate(perm):
                src_roles[p] = roles[i]
            _terms(graph, producer.invars[0], src_roles, False, out)
            return
    out.append(_MaskTerm(var, roles, negate))


@dataclasses.dataclass
class _Masks:
    is_causal: bool = False
    window: tuple | None = None
    constant: np.ndarray | None = None  # a dense constant mask, canonical (B|1, N|1, T|1, S|1)
    dense: list = dataclasses.field(default_factory=list)  # _MaskTerm read at run time
    lengths: Any = None
    segments: tuple | None = None  # (q ids var, kv ids var)
    labels: list = dataclasses.field(default_factory=list)


def _classify_band(c: np.ndarray, t: int, s: int):
    """(is_causal, window) when a (T, S) boolean is a band i-left <= j <= i+right, else None."""
    i = np.arange(t)[:, None]
    j = np.arange(s)[None, :]
    if not c.any():
        return None
    d = (i - j)[c]
    left, right = int(d.max()), int(-d.min())
    if right < 0 or left < 0:
        return None
    band = (j >= i - left) & (j <= i + right)
    if not np.array_equal(band, c):
        return None
    open_left = left >= t - 1
    open_right = right >= s - 1
    if right == 0:
        return True, (None if open_left else (left, None))
    if open_left and open_right:
        return False, None
    return False, (None if open_left else left, None if open_right else right)


def _classify_masks(graph: Graph, scores: _Scores, score_roles: list, roles: _Roles):
    """Each mask term as structure (causal, window, lengths, segments) or a dense mask."""
    out = _Masks()
    terms: list[_MaskTerm] = []
    for pred, axis_map, negate in scores.masks:
        pred_roles = [None] * len(axis_map)
        for s_axis, a in enumerate(axis_map):
            pred_roles[a] = score_roles[s_axis]
        _terms(graph, pred, pred_roles, negate, terms)
    groups = roles.scores()
    sizes = roles.sizes
    t, s = sizes[("q", 0)], sizes["S"]
    b = sizes.get(("b", 0), 1)
    constant = None
    for term in terms:
        found = mask_eval.ancestors(graph, term.var)
        value = None
        if found is not None:
            eqns, leaves = found
            # The jaxpr's constants (a numpy mask or index array captured at trace time) are
            # known: only the other leaves are the mask's run-time inputs.
            known = _constant_leaves(graph, leaves)
            leaves = [leaf for leaf in leaves if leaf not in known]
            if not leaves:
                value = mask_eval.evaluate(eqns, term.var, known)
            if value is not None:
                if term.negate:
                    value = ~value
                value = _to_canonical(np, value, term.roles, groups, sizes)
                constant = value if constant is None else (constant & value)
                continue
            if leaves and _as_lengths(eqns, term, leaves, known, groups, sizes, b, s, out):
                continue
            if leaves and _as_segments(eqns, term, leaves, known, groups, sizes, b, t, s, out):
                continue
        out.dense.append(term)
        out.labels.append("dense mask")
    if constant is not None:
        if np.array_equal(constant, np.broadcast_to(constant[:1, :1], constant.shape)):
            constant = constant[:1, :1]  # the same (T, S) mask for every example and head
        if constant.all():
            pass
        elif constant.shape[0] == 1 and constant.shape[1] == 1:
            band = _classify_band(np.broadcast_to(constant[0, 0], (t, s)), t, s)
            if band is not None:
                out.is_causal, out.window = band
                if out.is_causal:
                    out.labels.append("causal")
                if out.window is not None:
                    out.labels.append(f"window {out.window}")
            else:
                out.constant = constant
                out.labels.append("constant mask")
        else:
            out.constant = constant
            out.labels.append("constant mask")
    return out


def _constant_leaves(graph: Graph, leaves) -> dict:
    """The values of the leaves that are the jaxpr's constants (small enough to evaluate)."""
    known = {}
    for leaf in leaves:
        if int(np.prod(leaf.aval.shape, dtype=np.int64)) > mask_eval.MAX_ELEMENTS:
            continue
        value = graph.constant(leaf)
        if value is not None and tuple(value.shape) == tuple(leaf.aval.shape):
            known[leaf] = value.astype(np.dtype(leaf.aval.dtype))
    return known


def _int_leaf(leaf, size: int) -> bool:
    return (np.issubdtype(np.dtype(leaf.aval.dtype), np.integer)
            and int(np.prod(leaf.aval.shape, dtype=np.int64)) == size)


def _as_lengths(eqns, term, leaves, known, groups, sizes, b, s, out: _Masks) -> bool:
    if out.lengths is not None or len(leaves) != 1 or not _int_leaf(leaves[0], b):
        return False
    leaf = leaves[0]
    rng = np.random.default_rng(1)
    for _ in range(3):
        lengths = rng.integers(0, s + 1, size=b)
        value = mask_eval.evaluate(eqns, term.var, {
            **known, leaf: lengths.reshape(leaf.aval.shape).astype(leaf.aval.dtype)})
        if value is None:
            return False
        if term.negate:
            value = ~value
        value = _to_canonical(np, value, term.roles, groups, sizes)
        want = (np.arange(s)[None, :] < lengths[:, None])[:, None, None, :]
        if not np.array_equal(np.broadcast_to(value, np.broadcast_shapes(value.shape, want.shape)),
                              np.broadcast_to(want, np.broadcast_shapes(value.shape, want.shape))):
            return False
        if value.shape[1] != 1 or value.shape[2] != 1:
            return False
    out.lengths = leaf
    out.labels.append("key lengths")
    return True


def _as_segments(eqns, term, leaves, known, groups, sizes, b, t, s, out: _Masks) -> bool:
    if out.segments is not None or len(leaves) not in (1, 2):
        return False
    if len(leaves) == 1:
        if t != s or not _int_leaf(leaves[0], b * t):
            return False
        options = [(leaves[0], leaves[0])]
    else:
        options = [(x, y) for x, y in (leaves, leaves[::-1])
                   if _int_leaf(x, b * t) and _int_leaf(y, b * s)]
    rng = np.random.default_rng(2)
    for qv, kv in options:
        ok = True
        for _ in range(3):
            q_ids = rng.integers(0, 3, size=(b, t))
            k_ids = q_ids if qv is kv else rng.integers(0, 3, size=(b, s))
            values = {**known, qv: q_ids.reshape(qv.aval.shape).astype(qv.aval.dtype),
                      kv: k_ids.reshape(kv.aval.shape).astype(kv.aval.dtype)}
            value = mask_eval.evaluate(eqns, term.var, values)
            if value is None:
                return False
            if term.negate:
                value = ~value
            value = _to_canonical(np, value, term.roles, groups, sizes)
            want = (q_ids[:, :, None] == k_ids[:, None, :])[:, None]
            shape = np.broadcast_shapes(value.shape, want.shape)
            if value.shape[1] != 1 or not np.array_equal(np.broadcast_to(value, shape),
                                                         np.broadcast_to(want, shape)):
                ok = False
                break
        if ok:
            out.segments = (qv, kv)
            out.labels.append("segment ids")
            return True
    return False


# --- GQA through jnp.repeat ----------------------------------------------------------------------

def _repeat_source(graph: Graph, x: Any, axis: int):
    """(source, groups, eqns, unit) when ``x`` is ``jnp.repeat(source, groups, axis)`` (broadcast to a
    new axis after ``axis``, then merged into it), else None. ``unit``: the source kept a unit
    axis for the groups (``k[:, :, :, None]`` broadcast, then reshaped)."""
    reshape = graph.producer(x)
    if reshape is None or reshape.primitive.name != "reshape" or reshape.params.get("dimensions"):
        return None
    bcast = graph.producer(reshape.invars[0])
    if bcast is None or bcast.primitive.name != "broadcast_in_dim":
        return None
    src = bcast.invars[0]
    wide = tuple(bcast.outvars[0].aval.shape)
    shape = tuple(x.aval.shape)
    if len(wide) != len(shape) + 1 or wide[:axis] != shape[:axis] or wide[axis + 2:] != shape[axis + 1:]:
        return None
    kv, groups = wide[axis], wide[axis + 1]
    if kv * groups != shape[axis] or groups == 1 or not isinstance(src, jx.Var):
        return None
    dims = tuple(bcast.params["broadcast_dimensions"])
    src_shape = tuple(src.aval.shape)
    if dims == tuple(i for i in range(len(wide)) if i != axis + 1) and src_shape == wide[:axis + 1] + wide[axis + 2:]:
        return src, groups, [bcast, reshape], False
    if dims == tuple(range(len(wide))) and src_shape == wide[:axis + 1] + (1,) + wide[axis + 2:]:
        return src, groups, [bcast, reshape], True
    return None


# --- the pass ------------------------------------------------------------------------------------

def _probabilities(graph: Graph, pv: jx.JaxprEqn):
    """(side, softmax, layout eqns, axis map) for the PV operand that is a softmax, or a miss, or
    None when neither operand comes from a softmax."""
    for side in (0, 1):
        operand = pv.invars[side]
        if not isinstance(operand, jx.Var):
            continue
        p, steps, axis_map = _back_through_layout(graph, operand)
        softmax = _softmax(graph, p)
        if softmax is not None:
            return side, softmax, steps, axis_map, None
    for side in (0, 1):  # exp(s - max) · V, divided by the sum after the product
        operand = pv.invars[side]
        if not isinstance(operand, jx.Var):
            continue
        p, steps, axis_map = _back_through_layout(graph, operand)
        softmax = _softmax(graph, p, normalized=False)
        if softmax is None:
            continue
        e_axis = softmax.p_to_s.index(softmax.axis)
        post = _normalization_after(graph, pv, side, p, e_axis, axis_map)
        if isinstance(post, str):
            return _miss(MissReason.NORMALIZED_AFTER_PV, pv,
                         "jfuse fuses exp(s - max) @ v divided by the sum of exp(s - max) after "
                         "the product; write softmax(s) @ v (jax.nn.softmax) to fuse this one",
                         f"the PV product reads exp(scores) and {post}")
        return side, softmax, steps, axis_map, post
    for side in (0, 1):
        operand = pv.invars[side]
        if not isinstance(operand, jx.Var):
            continue
        p, _, _ = _back_through_layout(graph, operand)
        miss = _modified_probabilities(graph, pv, p)
        if miss is not None:
            return miss
    return None


@dataclasses.dataclass
class _Normalization:
    """The division of ``exp(s - max) · V`` by ``Σ exp(s - max)`` after the PV product (MaxText's
    ``local_out / local_sum``): the same quantity as ``softmax(s) · V``, so the block fuses with
    the division's output as the site's output."""

    div: jx.JaxprEqn
    numerator: list  # layout equations from the PV product's output to the division
    eqns: list  # every equation of the normalization: the sum, both paths, the division

    @property
    def out(self) -> jx.Var:
        return self.div.outvars[0]


_LAYOUT = frozenset({"transpose", "convert_element_type", "copy", "copy_p", "broadcast_in_dim",
                     "squeeze"}) | compat.RESHAPE_PRIMITIVES
# Largest PV output (elements) whose normalization is checked at match time (numpy, transient).
_MAX_CHECKED_ELEMENTS = 1 << 25


def _is_layout(eqn: jx.JaxprEqn, broadcasts: bool) -> bool:
    name = eqn.primitive.name
    if name not in _LAYOUT or len(eqn.outvars) != 1 or not isinstance(eqn.invars[0], jx.Var):
        return False
    if name == "convert_element_type":
        return is_float(eqn.invars[0].aval) and is_float(eqn.outvars[0].aval)
    if name == "reshape" and eqn.params.get("dimensions"):
        return False
    return broadcasts or name not in ("broadcast_in_dim", "squeeze")


def _run_layout(eqns, var, value):
    env = {var: value}
    for eqn in eqns:
        env[eqn.outvars[0]] = np.asarray(mask_eval.RULES[eqn.primitive.name](eqn, env[eqn.invars[0]]))
    return env[eqns[-1].outvars[0]] if eqns else value


def _normalization_after(graph: Graph, pv: jx.JaxprEqn, side: int, e: jx.Var, e_axis: int,
                         p_axis_map: list) -> _Normalization | str:
    """How ``exp(s - max) · V`` is divided by the sum of the exponentials, or why it is not
    recognized: the sum over the PV product's contracted axis, and a division whose numerator is
    the PV output and whose denominator is that sum, both only laid out (transposes, reshapes,
    broadcasts), paired row by row (checked by evaluating both paths on row indices)."""
    sum_eqns, frontier = [], [e]
    total = None
    while frontier and total is None:
        var = frontier.pop()
        for user in graph.users(var):
            name = user.primitive.name
            if name == "convert_element_type" and _is_layout(user, False):
                sum_eqns.append(user)
                frontier.append(user.outvars[0])
            elif name == "reduce_sum" and tuple(user.params["axes"]) == (e_axis,):
                sum_eqns.append(user)
                total = user.outvars[0]
                break
    if total is None:
        return f"no sum of exp(scores) over the PV product's contracted axis {e_axis}"
    numerator, cur = [], pv.outvars[0]
    while True:
        user = graph.sole_user(cur)
        if user is None:
            return "the PV product's output is read by more than one equation"
        if user.primitive.name == "div" and user.invars[0] is cur:
            div = user
            break
        if not _is_layout(user, False):
            return f"the PV product's output passes through {user.primitive.name}"
        numerator.append(user)
        cur = user.outvars[0]
    denominator, cur = [], div.invars[1]
    while cur is not total:
        producer = graph.producer(cur) if isinstance(cur, jx.Var) else None
        if producer is None or not _is_layout(producer, True):
            return "the PV product is divided by something other than the sum of exp(scores)"
        denominator.append(producer)
        cur = producer.invars[0]
    denominator.reverse()
    out_shape = tuple(pv.outvars[0].aval.shape)
    if int(np.prod(out_shape, dtype=np.int64)) > _MAX_CHECKED_ELEMENTS:
        return f"the PV output {out_shape} is too large to check its normalization"
    # Row codes: the sum's element r is row r; the PV output's element is the row of its
    # probabilities' (batch, free) axes. Both paths must deliver each row's sum to its outputs.
    e_shape = tuple(e.aval.shape)
    rows = np.arange(int(np.prod(total.aval.shape, dtype=np.int64)), dtype=np.int64)
    rows = rows.reshape(total.aval.shape)
    (lc, rc), (lb, rb) = pv.params["dimension_numbers"]
    p_batch, p_contract = (lb, lc) if side == 0 else (rb, rc)
    n_p = len(p_axis_map)
    p_free = [a for a in range(n_p) if a not in p_batch and a not in p_contract]
    n_v_free = len(out_shape) - len(p_batch) - len(p_free)
    out_p_axes = list(p_batch) + ((p_free + [None] * n_v_free) if side == 0
                                  else ([None] * n_v_free + p_free))
    row_axis = [a for a in range(len(e_shape)) if a != e_axis]  # e axis of each axis of rows
    perm = [row_axis.index(p_axis_map[a]) for a in out_p_axes if a is not None]
    code = np.transpose(rows, perm)
    code = np.reshape(code, [out_shape[i] if a is not None else 1
                             for i, a in enumerate(out_p_axes)])
    code = np.broadcast_to(code, out_shape)
    try:
        got_num = _run_layout(numerator, pv.outvars[0], code)
        got_den = _run_layout(denominator, total, rows)
        shape = np.broadcast_shapes(got_num.shape, got_den.shape)
        same = np.array_equal(np.broadcast_to(got_num, shape), np.broadcast_to(got_den, shape))
    except (ValueError, KeyError, IndexError):
        same = False
    if not same:
        return "the PV output is divided by the sums of other rows"
    return _Normalization(div, numerator, sum_eqns + denominator + numerator + [div])


def _modified_probabilities(graph: Graph, pv: jx.JaxprEqn, p: jx.Var) -> MatchResult | None:
    """A miss when ``p`` is computed elementwise from a softmax (dropout, a renormalisation), or
    is an unnormalised ``exp`` of attention scores (normalised after the PV product)."""
    producer = graph.producer(p)
    if producer is None:
        return None
    if producer.primitive.name == "exp":
        x = producer.invars[0]
        sub = graph.producer(x)
        if sub is not None and sub.primitive.name == "sub":
            x = sub.invars[0]
        if isinstance(x, jx.Var) and _scores_chain(graph, x).dot is not None:
            return _miss(MissReason.NORMALIZED_AFTER_PV, pv,
                         "jfuse fuses exp(s - max(s)) @ v / sum: subtract the row max before the "
                         "exp, or write softmax(s) @ v (jax.nn.softmax)",
                         "the PV product reads exp(scores) without the row max subtracted (it "
                         "can overflow where softmax does not), normalized after the product")
    # Search a few elementwise steps back for a softmax.
    frontier, seen = [(p, 0)], set()
    while frontier:
        var, depth = frontier.pop()
        if var in seen or depth > 4:
            continue
        seen.add(var)
        producer = graph.producer(var)
        if producer is None or len(producer.outvars) != 1:
            continue
        if depth and _softmax(graph, var) is not None:
            random = _reads_random(graph, p, var)
            if random:
                return _miss(MissReason.DROPOUT, pv,
                             "dropout on the attention probabilities keeps them in memory; "
                             "run without dropout (inference, or dropout_rate=0) to fuse, or "
                             "accept the unfused attention",
                             f"the probabilities {tuple(var.aval.shape)} pass through "
                             "random masking before the PV product")
            return _miss(MissReason.PROBABILITIES_TRANSFORMED, pv,
                         "jfuse fuses softmax(s) @ v with nothing between the softmax and the "
                         "PV product; move the change to the scores or the output",
                         f"the probabilities {tuple(var.aval.shape)} are changed by "
                         f"{producer.primitive.name if depth == 1 else 'elementwise ops'} "
                         "before the PV product")
        if producer.primitive.name not in compat.ELEMENTWISE_PRIMITIVES:
            continue
        for a in producer.invars:
            if isinstance(a, jx.Var) and tuple(a.aval.shape) == tuple(var.aval.shape) and is_float(a.aval):
                frontier.append((a, depth + 1))
    return None


def _reads_random(graph: Graph, out: jx.Var, softmax_out: jx.Var) -> bool:
    stack, seen = [out], set()
    while stack and len(seen) < 200:
        var = stack.pop()
        if not isinstance(var, jx.Var) or var in seen or var is softmax_out:
            continue
        seen.add(var)
        producer = graph.producer(var)
        if producer is None:
            continue
        if producer.primitive.name in _RANDOM:
            return True
        stack.extend(producer.invars)
    return False


def match_attention(graph: Graph, pv: jx.JaxprEqn, options: FuseOptions) -> MatchResult | None:
    found = _probabilities(graph, pv)
    if found is None:
        return None
    if isinstance(found, MatchResult):
        return found
    side, softmax, p_steps, p_axis_map, post = found
    (lc, rc), (lb, rb) = pv.params["dimension_numbers"]
    p_contract = (lc if side == 0 else rc)
    p_batch = list(lb if side == 0 else rb)
    v_batch = list(rb if side == 0 else lb)
    v = pv.invars[1 - side]
    p_axis_map = [softmax.p_to_s[a] for a in p_axis_map]  # PV operand axis -> axis of s
    if len(p_contract) != 1 or p_axis_map[p_contract[0]] != softmax.axis:
        return _miss(MissReason.SOFTMAX_AXIS, pv,
                     "attention normalizes over the keys: the softmax axis must be the axis the "
                     "PV product contracts",
                     f"softmax over axis {softmax.axis} of {softmax.scores.aval.str_short()}, PV "
                     f"product contracts axes {tuple(p_contract)} of the probabilities")
    chain = _scores_chain(graph, softmax.scores)
    if chain.dot is None:
        # Scores from somewhere else: not attention unless a QK product is behind the odd step.
        if _reaches_batched_dot(graph, softmax.scores):
            return _miss(MissReason.SCORE_FUNCTION, pv,
                         "jfuse's attention takes scores (q·kᵀ)·scale, an optional soft-cap "
                         "c·tanh(s/c), additive biases and where(mask, s, constant) masks",
                         chain.stop)
        _reject(pv, f"softmax·V whose scores do not come from a product: {chain.stop}")
        return None
    scores = _interpret(chain.tokens)
    if isinstance(scores, str):
        return _miss(MissReason.SCORE_FUNCTION, pv,
                     "write the scores as (q·kᵀ)·scale, then an optional soft-cap, then biases "
                     "and masks (one masking constant)", scores)
    qk = chain.dot
    (qlc, qrc), (qlb, qrb) = qk.params["dimension_numbers"]
    n_batch = len(qlb)
    free0 = [i for i in range(qk.invars[0].aval.ndim) if i not in qlc and i not in qlb]
    free1 = [i for i in range(qk.invars[1].aval.ndim) if i not in qrc and i not in qrb]
    s_dot_axis = chain.axis_map[softmax.axis]
    if len(qlc) != 1:
        return _miss(MissReason.ATTENTION_LAYOUT, pv,
                     "the op contracts one head dim; reshape q and k to a single head dim",
                     f"the QK product contracts {len(qlc)} dims")
    if n_batch + len(free0) <= s_dot_axis < n_batch + len(free0) + len(free1) and len(free1) == 1:
        q_side = 0
    elif n_batch <= s_dot_axis < n_batch + len(free0) and len(free0) == 1:
        q_side = 1
    else:
        return _miss(MissReason.ATTENTION_LAYOUT, pv,
                     "the key operand of the QK product must have one sequence axis and the "
                     "softmax must run over it",
                     f"softmax over axis {s_dot_axis} of the QK product "
                     f"{qk.outvars[0].aval.str_short()}")
    q, k = qk.invars[q_side], qk.invars[1 - q_side]
    q_batch, k_batch = (list(qlb), list(qrb)) if q_side == 0 else (list(qrb), list(qlb))
    q_contract = (qlc if q_side == 0 else qrc)[0]
    k_contract = (qrc if q_side == 0 else qlc)[0]
    q_free = free0 if q_side == 0 else free1
    k_free = (free1 if q_side == 0 else free0)[0]
    out_dims = qk.outvars[0].aval.shape
    # Roles of the QK product's output axes.
    dot_roles = [("b", i) for i in range(n_batch)]
    q_free_roles = [("q", j) for j in range(len(q_free))]
    dot_roles += (q_free_roles + ["S"]) if q_side == 0 else (["S"] + q_free_roles)
    sizes = {r: int(d) for r, d in zip(dot_roles, out_dims)}
    roles = _Roles(n_batch, len(q_free), sizes)
    score_roles = [dot_roles[chain.axis_map[i]] for i in range(len(chain.axis_map))]
    q_roles = [None] * q.aval.ndim
    for i, a in enumerate(q_batch):
        q_roles[a] = ("b", i)
    for j, a in enumerate(q_free):
        q_roles[a] = ("q", j)
    q_roles[q_contract] = "H"
    k_roles = [None] * k.aval.ndim
    for i, a in enumerate(k_batch):
        k_roles[a] = ("b", i)
    k_roles[k_free] = "S"
    k_roles[k_contract] = "H"
    # The PV product: V's roles from the pairing with the probabilities' axes.
    p_roles = [score_roles[p_axis_map[i]] for i in range(len(p_axis_map))]
    if sorted(map(str, (p_roles[a] for a in p_batch))) != sorted(map(str, roles.batch + [
            ("b", i) for i in range(1, n_batch)])):
        return _miss(MissReason.ATTENTION_LAYOUT, pv,
                     "the PV product must batch over the same dims as the QK product",
                     f"PV batch dims {[p_roles[a] for a in p_batch]}")
    v_roles = [None] * v.aval.ndim
    for pa, va in zip(p_batch, v_batch):
        v_roles[va] = p_roles[pa]
    v_contract = (rc if side == 0 else lc)[0]
    v_roles[v_contract] = "S"
    v_free = [i for i, r in enumerate(v_roles) if r is None]
    if len(v_free) != 1:
        return _miss(MissReason.ATTENTION_LAYOUT, pv, "V must have one head dim",
                     f"V {v.aval.str_short()} has {len(v_free)} free dims")
    v_roles[v_free[0]] = "Hv"
    p_free = [p_roles[i] for i in range(len(p_roles)) if i not in p_batch and i not in p_contract]
    out_roles = [p_roles[a] for a in p_batch] if side == 0 else [v_roles[a] for a in v_batch]
    out_roles += (p_free + ["Hv"]) if side == 0 else (["Hv"] + p_free)
    # GQA through jnp.repeat of K and V on the last head axis.
    k_src, v_src, repeat_eqns, groups = k, v, [], 1
    if n_batch >= 2:
        r = ("b", n_batch - 1)
        rk = _repeat_source(graph, k, k_roles.index(r))
        rv = _repeat_source(graph, v, v_roles.index(r))
        if rk is not None and rv is not None and rk[1] == rv[1]:
            k_src, v_src, groups = rk[0], rv[0], rk[1]
            repeat_eqns = rk[2] + rv[2]
            if rk[3]:
                k_roles = _with_unit_axis(k_roles, k_roles.index(r) + 1)
            if rv[3]:
                v_roles = _with_unit_axis(v_roles, v_roles.index(r) + 1)
    masks = _classify_masks(graph, scores, score_roles, roles)
    # The block, and what else reads its intermediates.
    absorbed = {id(e): e for e in [qk] + chain.eqns + softmax.eqns + p_steps + [pv]
                + (post.eqns if post is not None else [])}
    for e in repeat_eqns:
        if graph.read_only_within(e.outvars[0], list(absorbed.values()) + repeat_eqns):
            absorbed[id(e)] = e
    eqns = sorted(absorbed.values(), key=graph.position)
    probs_ids = {id(e) for e in softmax.eqns + p_steps}
    final = pv if post is None else post.div  # the block's output
    for eqn in eqns:
        if eqn is final:
            continue
        for var in eqn.outvars:
            if isinstance(var, jx.DropVar) or graph.read_only_within(var, eqns):
                continue
            readers = graph.readers_outside(var, eqns)
            what = "probabilities" if id(eqn) in probs_ids else "scores"
            if readers and graph.hidden_by_autodiff(readers[0]):
                where, hint = "the backward pass", AUTODIFF_HINT
            else:
                where = (f"{readers[0].primitive.name} at {user_source_line(readers[0])}"
                         if readers else "the function's outputs")
                hint = (f"the attention {what} are used elsewhere (returned, or in a loss), so "
                        "they must exist in memory; drop that use to fuse the attention")
            reason = (MissReason.PROBABILITIES_ESCAPE if what == "probabilities"
                      else MissReason.INTERMEDIATE_ESCAPES)
            return _miss(reason, pv, hint,
                         f"the attention {what} {var.aval.str_short()} are also read by {where}")
    return MatchResult(site=_site(graph, pv, side, eqns, q, k_src, v_src, q_roles, k_roles,
                                  v_roles, out_roles, roles, scores, score_roles, masks, softmax,
                                  groups, options, post))


def _with_unit_axis(roles: list, at: int) -> list:
    return roles[:at] + [None] + roles[at:]


def _reaches_batched_dot(graph: Graph, var: Any, depth: int = 16) -> bool:
    stack, seen = [(var, 0)], set()
    while stack:
        atom, d = stack.pop()
        if not isinstance(atom, jx.Var) or atom in seen or d > depth:
            continue
        seen.add(atom)
        producer = graph.producer(atom)
        if producer is None:
            continue
        if producer.primitive.name == "dot_general" and producer.params["dimension_numbers"][1][0]:
            return True
        stack.extend((a, d + 1) for a in producer.invars
                     if isinstance(a, jx.Var) and is_float(a.aval))
    return False


def _site(graph, pv, side, eqns, q, k, v, q_roles, k_roles, v_roles, out_roles, roles: _Roles,
          scores: _Scores, score_roles, masks: _Masks, softmax: _Softmax, groups, options,
          post: _Normalization | None = None) -> Site:
    sizes = dict(roles.sizes)
    batch_heads = roles.kv_heads
    q_groups = [roles.batch, roles.heads, [("q", 0)], ["H"]]
    kv_groups = [roles.batch, batch_heads, ["S"], ["H"]]
    v_groups = [roles.batch, batch_heads, ["S"], ["Hv"]]
    score_groups = roles.scores()
    bias_terms = []
    for var, axis_map in scores.biases:
        term_roles = [None] * len(axis_map)
        for s_axis, a in enumerate(axis_map):
            term_roles[a] = score_roles[s_axis]
        bias_terms.append((var, term_roles))
    v_shape = tuple(v.aval.shape)
    inputs: list = [q, k, v]
    inputs += [var for var, _ in bias_terms]
    inputs += [term.var for term in masks.dense]
    if masks.lengths is not None:
        inputs.append(masks.lengths)
    if masks.segments is not None:
        inputs += list(dict.fromkeys(masks.segments))
    constant = masks.constant
    b = sizes.get(("b", 0), 1)
    t, s = sizes[("q", 0)], sizes["S"]
    out = pv.outvars[0] if post is None else post.out
    out_dtype = pv.outvars[0].aval.dtype
    probs_dtype = pv.invars[side].aval.dtype
    spec_fields = dict(scale=float(scores.scale), layout="BNTH", is_causal=masks.is_causal,
                       window=masks.window, soft_cap=scores.soft_cap,
                       mask_value=(float(scores.mask_value) if scores.mask_value is not None
                                   else DEFAULT_MASK_VALUE),
                       probs_dtype=probs_dtype, out_dtype=out_dtype)
    out_order = [roles.batch, roles.heads, [("q", 0)], ["Hv"]]
    sizes["Hv"] = v_shape[v_roles.index("Hv")]
    segments = masks.segments

    def emit(*values):
        values = list(values)
        q_val, k_val, v_val = values[:3]
        rest = values[3:]
        q_c = _to_canonical(jnp, q_val, q_roles, q_groups, sizes)
        # K and V by their own sizes: read through a repeat, they hold the kv heads only.
        k_c = _to_canonical(jnp, k_val, k_roles, kv_groups, _actual_sizes(k_val, k_roles))
        v_c = _to_canonical(jnp, v_val, v_roles, v_groups, _actual_sizes(v_val, v_roles))
        bias = None
        for _, term_roles in bias_terms:
            term = _to_canonical(jnp, rest.pop(0), term_roles, score_groups, sizes)
            term = term.astype(jnp.promote_types(term.dtype, jnp.float32))
            bias = term if bias is None else bias + term
        mask = None if constant is None else jnp.asarray(constant)
        for term in masks.dense:
            value = rest.pop(0)
            if term.negate:
                value = jnp.logical_not(value)
            value = _to_canonical(jnp, value, term.roles, score_groups, sizes)
            mask = value if mask is None else jnp.logical_and(mask, value)
        lengths = q_seg = kv_seg = None
        if masks.lengths is not None:
            lengths = jnp.reshape(rest.pop(0), (b,)).astype(jnp.int32)
        if segments is not None:
            q_ids = rest.pop(0)
            k_ids = q_ids if segments[0] is segments[1] else rest.pop(0)
            q_seg = jnp.reshape(q_ids, (b, t)).astype(jnp.int32)
            kv_seg = jnp.reshape(k_ids, (b, s)).astype(jnp.int32)
        o = fused_attention(q_c, k_c, v_c, bias, mask, q_seg, kv_seg, lengths,
                            implementation=options.implementation, **spec_fields)
        # (B, N, T, Hv) -> the user's PV output layout.
        split = [sizes[r] for g in out_order for r in g]
        o = jnp.reshape(o, split)
        flat = [r for g in out_order for r in g]
        o = jnp.transpose(o, [flat.index(r) for r in out_roles])
        if post is not None:  # normalized already: lay it out as the user's division reads it
            for eqn in post.numerator:
                [o] = jx.bind(eqn, [o])
        return [o]

    n_q = int(np.prod([sizes[r] for r in roles.heads], dtype=np.int64)) if roles.heads else 1
    n_k = int(np.prod([sizes[r] for r in batch_heads], dtype=np.int64)) if batch_heads else 1
    n_k //= groups
    h = q.aval.shape[q_roles.index("H")]
    parts = [f"scale={scores.scale:.4g}"] + masks.labels
    if scores.soft_cap is not None:
        parts.append(f"soft-cap {scores.soft_cap:g}")
    if scores.biases:
        parts.append("bias" if len(scores.biases) == 1 else f"{len(scores.biases)} biases")
    if n_q != n_k:
        parts.append(f"GQA {n_q}/{n_k} heads" + (" (K/V repeat read through)" if groups > 1 else ""))
    if scores.mask_value is not None:
        parts.append(f"mask value {scores.mask_value:.3g}")
    if post is not None:
        parts.append("normalized after the PV product")
    if np.dtype(softmax.dtype).itemsize < 4:
        parts.append(f"softmax computed in {np.dtype(softmax.dtype).name} by the user; the "
                     "kernel computes it in f32")
    detail = (f"B={b} N={n_q} T={t} S={s} H={h} {np.dtype(q.aval.dtype).name}: "
              + ", ".join(parts))
    spec = AttentionSpec(implementation=options.implementation, **spec_fields)
    # What each platform's kernel is asked to serve: the canonical (B, N, T, H) operands and
    # which optional ones the call passes (their shapes do not change the answer).
    def struct(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype)

    hv = sizes["Hv"]
    operand_avals = [
        struct((b, n_q, t, h), q.aval.dtype), struct((b, n_k, s, h), k.aval.dtype),
        struct((b, n_k, s, hv), v.aval.dtype),
        struct((1, 1, t, s), np.float32) if bias_terms else None,
        struct((1, 1, t, s), np.bool_) if constant is not None or masks.dense else None,
        struct((b, t), np.int32) if segments is not None else None,
        struct((b, s), np.int32) if segments is not None else None,
        struct((b,), np.int32) if masks.lengths is not None else None,
    ]
    refusals = ATTENTION.refusals(spec, operand_avals)
    # Unfused, the f32 scores and probabilities (B, N, T, S) are written and read back, and kept
    # for the backward.
    saved = 2 * b * n_q * t * s * 4
    return Site(NAME, eqns, inputs, [out], emit, user_source_line(pv), detail, saved, graph,
                refusals, ATTENTION.kernel_names(spec, operand_avals))


def _actual_sizes(x, roles) -> dict:
    return {r: int(d) for r, d in zip(roles, x.shape) if r is not None}


# Priority 5: before glu, linear and norm, so the QK and PV products are attention's.
PATTERN = Pattern(NAME, frozenset({"dot_general"}), match_attention, priority=5)
