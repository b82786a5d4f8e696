"""The norm patterns: ``rms_norm``, ``layer_norm``, and ``add_rms_norm`` / ``add_layer_norm``
when the residual add ``h = x + y`` feeds the norm.

Every library spells a norm differently (``mean(x*x)``, ``square``, ``x**2``, ``sum/n``;
``E[x²] − E[x]²`` clamped or not; ``x * rsqrt(v + eps)`` or ``x / sqrt(v + eps)``; Gemma's
``(1 + w)``; f32 upcasts in Llama's or Gemma's places), so the block is recognized by meaning:

1. Start at the ``rsqrt`` / ``sqrt`` / ``pow(·, -0.5)``; find the row reductions (``reduce_sum``
   over the last axis) behind it and the one value ``h`` they all reduce (the *root*).
2. Collect the region computed from ``h``, per-row statistics, vectors over the hidden dim
   (scale/bias parameters) and constants.
3. For each candidate output (latest first) whose intermediates are private, evaluate the block
   in float64 on probe rows (large/small mean and variance, so ``eps`` matters) and compare with
   the reference norm for every configuration: RMS or LayerNorm, which parameter is the scale,
   which the bias, scale offset 0 or 1, ``eps`` among the block's constants. The first exact match
   (relative error < 1e-6) is the fused op's configuration.

A norm over one axis that is not last (a features-first array, penzai's named axes) fuses too:
the emitted code moves that axis last for the op and the result back to the block's layout
(transposes XLA fuses into its neighbours). The block may itself move axes and apply its scale
through a batch-only ``dot_general`` (penzai does both); its output may be any permutation of
``h``. A norm over several axes is a miss (``NORMALIZED_AXIS``), as is one whose ``eps`` is a
traced value rather than a constant (``TRACED_CONSTANT``: the op takes ``eps`` as a number).
A scalar the jaxpr holds as a constant (penzai's ``epsilon``, an array captured at trace time)
counts as a constant. When ``h = x + y`` of two full arrays, the add joins the block; if ``h`` is
read elsewhere (the next residual add) the fused op returns it as a second output.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any

import jax.numpy as jnp
import numpy as np

from jfuse._jax import jaxpr as jx
from jfuse._jax.source import user_source_line
from jfuse.debug import reject
from jfuse.config import FuseOptions
from jfuse.core import probe
from jfuse.graph import Graph, literal_value
from jfuse.ops.norm import fused_norm, norm_refusals
from jfuse.passes._matmul import is_float
from jfuse.passes.base import AUTODIFF_HINT, MatchResult, Pattern, Site, scalar_value
from jfuse.passes.base import replay_block
from jfuse.report import MissedFusion, MissReason

# The pass's name, which stands for all four patterns in patterns=, JFUSE_DISABLE and JFUSE_DEBUG.
NAME = "norm"
NAMES = ("rms_norm", "layer_norm", "add_rms_norm", "add_layer_norm")
_MAX_REGION = 64
_SHAPE_OPS = probe.SHAPE
# What a norm block is made of: exactly what the float64 probe can evaluate.
_REGION_OPS = probe.ELEMENTWISE | probe.SHAPE | probe.LAYOUT | {"reduce_sum"}
# A block's output is compared against every layout of the norm with these many axes at most.
_MAX_RANK = 6


def _strip_converts(graph: Graph, var: Any) -> Any:
    while isinstance(var, jx.Var):
        producer = graph.producer(var)
        if producer is None or producer.primitive.name != "convert_element_type" or not is_float(
                producer.invars[0].aval):
            return var
        var = producer.invars[0]
    return var


def _reduced_base(graph: Graph, t: Any, axis: int) -> Any:
    """What a row reduction over ``axis`` reduces, seen through ``x*x``, ``x**2``, ``square``,
    ``x - mean`` and the float converts libraries put around reductions of narrow dtypes."""
    t = _strip_converts(graph, t)
    producer = graph.producer(t)
    if producer is not None:
        name = producer.primitive.name
        if name == "mul" and producer.invars[0] is producer.invars[1]:
            t = producer.invars[0]
        elif name == "integer_pow" and producer.params["y"] == 2:
            t = producer.invars[0]
        elif name == "square":
            t = producer.invars[0]
        elif name == "pow" and literal_value(producer.invars[1]) == 2.0:
            t = producer.invars[0]
    t = _strip_converts(graph, t)
    producer = graph.producer(t)
    if producer is not None and producer.primitive.name == "sub":
        a, b = producer.invars
        keeps_axis = isinstance(b, jx.Var) and b.aval.ndim == a.aval.ndim and b.aval.shape[axis] == 1
        if keeps_axis or scalar_value(graph, b) is not None:
            t = a
        elif isinstance(b, jx.Var) and graph.producer(b) is not None and graph.producer(b).primitive.name == "broadcast_in_dim":
            t = a
    return _strip_converts(graph, t)


def _reductions_behind(graph: Graph, var: Any) -> list[jx.JaxprEqn]:
    """The reduce_sum equations among ``var``'s ancestors, through region ops (bounded)."""
    found, stack, seen = [], [var], set()
    while stack and len(seen) < _MAX_REGION:
        v = stack.pop()
        if not isinstance(v, jx.Var) or v in seen:
            continue
        seen.add(v)
        producer = graph.producer(v)
        if producer is None or producer.primitive.name not in _REGION_OPS:
            continue
        if producer.primitive.name == "reduce_sum":
            found.append(producer)
            continue
        stack.extend(producer.invars)
    return found


class _Region:
    """Equations computed from the root ``h``, statistics, hidden-dim vectors and constants;
    ``axis`` is the normalized axis of ``h``."""

    def __init__(self, graph: Graph, root: jx.Var, axis: int):
        self.graph = graph
        self.root = root
        self.axis = axis
        self.hidden = root.aval.shape[axis]
        self.eqns: list[jx.JaxprEqn] = []
        self.params: list[Any] = []  # vectors over the hidden dim entering the block
        self.constants: dict[Any, float] = {}
        # Full-shape operands that broadcast a hidden-dim vector along the rows (Haiku's
        # ``jnp.broadcast_to(scale, x.shape)``): the broadcast joins the block, the vector is the
        # parameter.
        self._spread_params: dict[Any, jx.JaxprEqn] = {}
        members = {root}
        frontier = [root]
        seen: set[int] = set()
        while frontier and len(self.eqns) < _MAX_REGION:
            var = frontier.pop()
            for user in graph.users(var):
                if id(user) in seen or user.primitive.name not in _REGION_OPS or user.effects:
                    continue
                if len(user.outvars) != 1 or not all(self._operand(a, members) for a in user.invars):
                    continue
                if user.primitive.name == "convert_element_type" and not is_float(user.outvars[0].aval):
                    continue
                if user.primitive.name == "dot_general" and any(
                        user.params["dimension_numbers"][0]):
                    continue  # a contraction mixes rows: the next layer, not this norm
                seen.add(id(user))
                self.eqns.append(user)
                members.add(user.outvars[0])
                frontier.append(user.outvars[0])
        self.eqns.extend(self._spread_params.values())
        self.eqns.sort(key=graph.position)
        self.members = members

    def _is_vector(self, atom: Any) -> bool:
        shape = tuple(atom.aval.shape)
        if self.axis == self.root.aval.ndim - 1:
            return bool(shape) and shape[-1] == self.hidden and all(d == 1 for d in shape[:-1])
        # The block may move axes, so a vector may lie along any one axis; the probe checks
        # that it scales the normalized one.
        return self.hidden in shape and sum(d != 1 for d in shape) <= (self.hidden != 1)

    def _operand(self, atom: Any, members: set) -> bool:
        if isinstance(atom, jx.Literal):
            return literal_value(atom) is not None
        if atom in members:
            return True
        constant = scalar_value(self.graph, atom)
        if constant is not None:
            self.constants[atom] = constant
            return True
        if self._is_vector(atom) and is_float(atom.aval) and len(tuple(atom.aval.shape)) <= len(
                self.root.aval.shape):
            if atom not in self.params:
                self.params.append(atom)
            return True
        broadcast = self._broadcast_of_vector(atom)
        if broadcast is not None:
            self._spread_params[atom] = broadcast
            if broadcast.invars[0] not in self.params:
                self.params.append(broadcast.invars[0])
            return True
        return False

    def _broadcast_of_vector(self, atom: Any) -> jx.JaxprEqn | None:
        """The ``broadcast_in_dim`` that spreads a hidden-dim vector along the rows into
        ``atom``, if that is how ``atom`` is made."""
        if atom in self._spread_params:
            return self._spread_params[atom]
        producer = self.graph.producer(atom)
        if producer is None or producer.primitive.name != "broadcast_in_dim":
            return None
        source = producer.invars[0]
        if not isinstance(source, jx.Var) or not is_float(source.aval) or not self._is_vector(source):
            return None
        shape = tuple(atom.aval.shape)
        # where the normalized axis sits in ``atom``, which broadcasts against h from the right
        target = self.axis - (len(self.root.aval.shape) - len(shape))
        if target < 0 or shape[target] != self.hidden or source.aval.shape[-1] != self.hidden:
            return None
        # the vector's hidden dim (its last) must land on the normalized axis, not on a row axis
        if tuple(producer.params["broadcast_dimensions"])[-1] != target:
            return None
        return producer

    def ancestors(self, out: jx.Var) -> list[jx.JaxprEqn]:
        return self.graph.ancestors_within(out, self.eqns)


# --- float64 probe ---------------------------------------------------------------------------

def _probe_rows(hidden: int, rng: np.random.Generator) -> np.ndarray:
    noise = rng.standard_normal((6, hidden))
    return np.stack([
        3.0 + 2.0 * noise[0],
        -1.0 + 0.5 * noise[1],
        5.0 + 1e-3 * noise[2],  # LayerNorm variance ~1e-6: eps decides the answer
        1e-3 * noise[3],  # RMS mean square ~1e-6: likewise
        noise[4],
        0.2 + 0.1 * noise[5],
    ])


def _reference_norm(h, subtract_mean, eps, scale, offset, bias):
    mean = h.mean(axis=-1, keepdims=True) if subtract_mean else 0.0
    centered = h - mean
    # A constant probe row with eps = 0 divides 0 by 0: that candidate simply does not match.
    with np.errstate(invalid="ignore", divide="ignore"):
        n = centered / np.sqrt(np.mean(centered * centered, axis=-1, keepdims=True) + eps)
    if scale is not None:
        n = n * (scale + offset)
    if bias is not None:
        n = n + bias
    return n


def output_layouts(root_shape: tuple, out_shape: tuple) -> list[tuple[int, ...]]:
    """Every permutation ``perm`` with ``out = transpose(h, perm)`` possible by shape alone
    (identity first): the layouts a norm's output may have relative to its input ``h``."""
    rank = len(root_shape)
    if len(out_shape) != rank or sorted(root_shape) != sorted(out_shape) or rank > _MAX_RANK:
        return []
    return [perm for perm in itertools.permutations(range(rank))
            if tuple(root_shape[i] for i in perm) == tuple(out_shape)]


def _identify(region: _Region, eqns, out, eps_candidates, rng):
    """(subtract_mean, eps, scale index, offset, bias index, layout) the block computes, or
    None; ``layout`` is the permutation of ``h``'s axes that is the output's."""
    hidden, axis = region.hidden, region.axis
    rows = _probe_rows(hidden, rng)
    rank = len(region.root.aval.shape)
    layouts = output_layouts(tuple(region.root.aval.shape), tuple(out.aval.shape))
    lead = {1: [(1,)] * 0, 2: (6,), 3: (2, 3)}.get(rank, (1,) * (rank - 3) + (2, 3))
    if rank == 1:
        root_values = [rows[i] for i in range(6)]
    else:  # probe rows along the normalized axis
        root_values = [np.moveaxis(rows.reshape(tuple(lead) + (hidden,)), -1, axis)]
    params = [p for p in region.params if any(p in e.invars for e in eqns)]
    param_values = {p: rng.standard_normal(tuple(p.aval.shape)) + 1.5 for p in params}
    got = []
    for value in root_values:
        value_out = probe.probe(eqns, {region.root: value, **param_values}, region.constants)
        if value_out is None:
            return None
        got.append(value_out)
    vectors = {p: np.reshape(v, (-1,)) for p, v in param_values.items()}

    def matches(value_out, want, layout) -> bool:
        # the reference, normalized along the last axis, in h's layout and then the output's
        want = np.transpose(np.moveaxis(want, -1, axis), layout)
        try:
            value_out = np.broadcast_to(value_out, want.shape)
        except ValueError:
            return False
        err = np.max(np.abs(value_out - want) / (1.0 + np.abs(want)))
        return bool(np.isfinite(err) and err <= 1e-6)

    options = [None] + params
    for subtract_mean, eps in itertools.product((False, True), eps_candidates):
        for scale, bias in itertools.product(options, options):
            if scale is not None and scale is bias:
                continue
            used = {p for p in (scale, bias) if p is not None}
            if used != set(params):  # every parameter the block reads must play a role
                continue
            for offset in ((0.0, 1.0) if scale is not None else (0.0,)):
                wants = [_reference_norm(np.moveaxis(value, axis, -1), subtract_mean, eps,
                                         None if scale is None else vectors[scale], offset,
                                         None if bias is None else vectors[bias])
                         for value in root_values]
                for layout in layouts:
                    if all(matches(value_out, want, layout)
                           for value_out, want in zip(got, wants)):
                        return subtract_mean, eps, scale, offset, bias, layout
    return None


# --- the pass --------------------------------------------------------------------------------

def _anchor_input(eqn: jx.JaxprEqn) -> Any:
    name = eqn.primitive.name
    if name in ("rsqrt", "sqrt"):
        return eqn.invars[0]
    if name == "pow" and literal_value(eqn.invars[1]) == -0.5:
        return eqn.invars[0]
    return None


def _param_chain(graph: Graph, atom: Any, block_ids: set[int]):
    """(source, eqns): walk a parameter back through private reshape/broadcast/convert steps."""
    eqns = []
    while isinstance(atom, jx.Var):
        producer = graph.producer(atom)
        readers = graph.users(atom)
        if producer is None or graph.is_output(atom) or any(id(r) not in block_ids for r in readers):
            break
        name = producer.primitive.name
        source = producer.invars[0] if producer.invars else None
        if source is None or not isinstance(source, jx.Var):
            break
        if name == "convert_element_type":
            if not is_float(source.aval):
                break
        elif name not in _SHAPE_OPS:
            break
        if sum(d != 1 for d in source.aval.shape) > 1:
            break
        eqns.append(producer)
        block_ids.add(id(producer))
        atom = source
    return atom, eqns


def _root_aliases(graph: Graph, root: Any, eqns) -> set:
    """Float converts and transposes of the root (``h.astype(f32)``, penzai's move of the
    normalized axis), which CSE may share with other code."""
    aliases = set()
    frontier = [root]
    ids = {id(e) for e in eqns}
    while frontier:
        var = frontier.pop()
        for user in graph.users(var):
            if (id(user) in ids and user.primitive.name in ("convert_element_type", "transpose")
                    and user.outvars[0] not in aliases):
                aliases.add(user.outvars[0])
                frontier.append(user.outvars[0])
    return aliases


def _split_scale_offset(graph: Graph, scale: Any, offset: float, block_ids: set[int]):
    """(w, offset + c, eqns) when the scale is ``c + w`` computed for this norm alone."""
    atom, chain = scale, []
    while True:
        producer = graph.producer(atom)
        readers = graph.users(atom)
        if producer is None or graph.is_output(atom) or any(id(r) not in block_ids for r in readers):
            return scale, offset, []
        if producer.primitive.name == "convert_element_type" and is_float(producer.invars[0].aval):
            chain.append(producer)
            block_ids.add(id(producer))
            atom = producer.invars[0]
            continue
        break
    if producer.primitive.name != "add":
        return scale, offset, []
    a, b = producer.invars
    constant, other = (a, b) if literal_value(a) is not None else (b, a)
    if literal_value(constant) is None or not isinstance(other, jx.Var):
        return scale, offset, []
    block_ids.add(id(producer))
    return other, offset + literal_value(constant), chain + [producer]


def _reject(anchor: jx.JaxprEqn, why: str) -> None:
    reject(NAME, anchor, why, serves=NAMES)


def match_norm(graph: Graph, anchor: jx.JaxprEqn, options: FuseOptions) -> MatchResult | None:
    v = _anchor_input(anchor)
    if v is None or not isinstance(v, jx.Var):
        return None
    reductions = _reductions_behind(graph, v)
    if not reductions:
        _reject(anchor, "no row reduction (reduce_sum) feeds this root")
        return None
    axes = {tuple(int(a) for a in red.params["axes"]) for red in reductions}
    if len(axes) != 1 or len(next(iter(axes))) != 1:
        in_rank = len(reductions[0].invars[0].aval.shape)
        return MatchResult(misses=[MissedFusion(
            "layer_norm" if len(reductions) > 1 else "rms_norm",
            MissReason.NORMALIZED_AXIS,
            user_source_line(anchor),
            "jfuse's norms normalize one axis; reshape the normalized axes into one (or leave "
            "this norm to XLA)",
            f"normalizes over axes {' and '.join(map(str, sorted(axes)))} of a rank-{in_rank} "
            "array",
        )])
    ((axis,),) = axes
    roots = {id(_reduced_base(graph, red.invars[0], axis)):
             _reduced_base(graph, red.invars[0], axis) for red in reductions}
    if len(roots) != 1:
        _reject(anchor, f"the reductions behind it reduce {len(roots)} different arrays")
        return None
    (root,) = roots.values()
    if not isinstance(root, jx.Var) or not is_float(root.aval) or not root.aval.shape:
        return None
    if root.aval.ndim != reductions[0].invars[0].aval.ndim:
        _reject(anchor, "the reduced array and the normalized one differ in rank")
        return None
    region = _Region(graph, root, axis)
    if id(anchor) not in {id(e) for e in region.eqns}:
        traced = _traced_scalar(graph, v, region)
        if traced is not None:
            return MatchResult(misses=[MissedFusion(
                "layer_norm" if len(reductions) > 1 else "rms_norm",
                MissReason.TRACED_CONSTANT, user_source_line(anchor),
                "jfuse's norm takes eps as a number known at trace time, and this one arrives as "
                "a traced value (a model passed whole into the jitted function carries eps as an "
                "array leaf): pass only the parameters and close over the rest "
                "(pz.unbind_params, eqx.partition), or leave this norm to XLA",
                f"eps (or another scalar of the block) is the traced {traced.aval.str_short()}")])
        _reject(anchor, f"the statistic is not computed from {root.aval.str_short()} and "
               "per-row reductions alone")
        return None
    eps_candidates = sorted({c for c in itertools.chain(
        (literal_value(a) for e in region.eqns for a in e.invars if isinstance(a, jx.Literal)),
        region.constants.values()) if c is not None and 0.0 < c < 0.1} | {0.0})
    rng = np.random.default_rng(0)
    full = tuple(root.aval.shape)
    reduction_ids = {id(r) for r in reductions}
    hidden_by_autodiff = False
    for candidate in reversed(region.eqns):
        out = candidate.outvars[0]
        if not output_layouts(full, tuple(out.aval.shape)):
            continue
        eqns = region.ancestors(out)
        ids = {id(e) for e in eqns}
        if id(anchor) not in ids or not reduction_ids <= ids:
            continue
        aliases = _root_aliases(graph, root, eqns)
        private = all(graph.read_only_within(e.outvars[0], eqns)
                      for e in eqns if e.outvars[0] is not out and e.outvars[0] not in aliases)
        if not private:
            _reject(anchor, f"an intermediate before {out.aval.str_short()} is read "
                   "outside the block")
            hidden_by_autodiff = hidden_by_autodiff or _read_by_autodiff(graph, eqns, out, aliases)
            continue
        found = _identify(region, eqns, out, eps_candidates, rng)
        if found is None:
            _reject(anchor, f"candidate output {out.aval.str_short()} at "
                   f"{user_source_line(candidate)} does not compute an RMS/Layer norm of "
                   f"{root.aval.str_short()} for any scale/bias/offset and eps in "
                   f"{eps_candidates}")
        if found is not None:
            # A convert of h that other code reads too stays in the graph; the fused op's XLA
            # replay recomputes it.
            absorbed = [e for e in eqns if e.outvars[0] not in aliases
                        or graph.read_only_within(e.outvars[0], eqns)]
            return MatchResult(site=_site(graph, anchor, root, axis, absorbed, out, found,
                                          options))
    if hidden_by_autodiff:
        return MatchResult(misses=[MissedFusion(
            "rms_norm" if len(reductions) == 1 else "layer_norm", MissReason.INTERMEDIATE_ESCAPES,
            user_source_line(anchor), AUTODIFF_HINT,
            f"the norm of {root.aval.str_short()} has intermediates read by the backward pass")])
    _reject(anchor, f"no output computed from {root.aval.str_short()}, its row statistics "
           "and hidden-dim parameters alone matches a norm (is a different array normalized "
           "than the one reduced?)")
    return None


def _traced_scalar(graph: Graph, v: Any, region: _Region) -> jx.Var | None:
    """A float scalar input of the jaxpr that is traced (not a constant) and that the statistic
    ``v`` reads: a norm whose eps the op cannot take as a number."""
    stack, seen = [v], set()
    while stack and len(seen) < _MAX_REGION:
        var = stack.pop()
        if not isinstance(var, jx.Var) or var in seen or var in region.members:
            continue
        seen.add(var)
        producer = graph.producer(var)
        if producer is None:
            if var.aval.size == 1 and is_float(var.aval) and var not in region.constants:
                return var
            continue
        if producer.primitive.name in _REGION_OPS and producer.primitive.name != "reduce_sum":
            stack.extend(producer.invars)
    return None


def _read_by_autodiff(graph: Graph, eqns, out, aliases) -> bool:
    return any(graph.hidden_by_autodiff(reader)
               for e in eqns if e.outvars[0] is not out and e.outvars[0] not in aliases
               for reader in graph.readers_outside(e.outvars[0], eqns))


@dataclasses.dataclass(frozen=True)
class _Layout:
    """How the op's layout (normalized axis last) relates to the block's: ``h`` normalizes its
    ``axis``, and the block's output is that norm, in ``h``'s layout, transposed by ``perm``.
    Transposes are exact, so moving the axes changes no value."""

    axis: int
    rank: int
    perm: tuple[int, ...]

    @property
    def identity(self) -> bool:
        return self.axis == self.rank - 1 and self.perm == tuple(range(self.rank))

    def _op_axes(self) -> list[int]:
        return [i for i in range(self.rank) if i != self.axis] + [self.axis]

    def h_to_op(self, h):
        return h if self.identity else jnp.moveaxis(h, self.axis, -1)

    def h_from_op(self, h):
        return h if self.identity else jnp.moveaxis(h, -1, self.axis)

    def out_from_op(self, y):
        order = self._op_axes()
        return y if self.identity else jnp.transpose(y, [order.index(p) for p in self.perm])

    def out_to_op(self, out):
        order = self._op_axes()
        forward = [order.index(p) for p in self.perm]
        return out if self.identity else jnp.transpose(out, list(np.argsort(forward)))

    def op_shape(self, shape) -> tuple[int, ...]:
        return tuple(shape[i] for i in self._op_axes())


def _site(graph, anchor, root, axis, eqns, out, found, options) -> Site:
    subtract_mean, eps, scale, offset, bias, perm = found
    layout = _Layout(axis, root.aval.ndim, tuple(perm))
    block_ids = {id(e) for e in eqns}
    residual_add = None
    producer = graph.producer(root)
    if producer is not None and producer.primitive.name == "add":
        a, b = producer.invars
        if all(isinstance(o, jx.Var) and tuple(o.aval.shape) == tuple(root.aval.shape)
               and o.aval.dtype == root.aval.dtype for o in (a, b)):
            residual_add = producer
    param_eqns: list[jx.JaxprEqn] = []
    sources = {}
    for name, atom in (("scale", scale), ("bias", bias)):
        if atom is not None:
            source, chain = _param_chain(graph, atom, block_ids)
            param_eqns += chain
            if name == "scale":  # Gemma's (1 + w): fuse the offset rather than compute 1 + w apart
                source, offset, offset_eqns = _split_scale_offset(graph, source, offset, block_ids)
                param_eqns += offset_eqns
                if offset_eqns:
                    source, chain = _param_chain(graph, source, block_ids)
                    param_eqns += chain
            sources[name] = source
    all_eqns = sorted({id(e): e for e in eqns + param_eqns + (
        [residual_add] if residual_add is not None else [])}.values(), key=graph.position)
    if residual_add is not None:
        x, residual = residual_add.invars
        inputs = [x, residual]
        h_escapes = not graph.read_only_within(root, all_eqns)
        outputs = [out, root] if h_escapes else [out]
    else:
        x, residual = root, None
        inputs = [root]
        outputs = [out]
    scale_src, bias_src = sources.get("scale"), sources.get("bias")
    inputs += [a for a in (scale_src, bias_src) if a is not None]
    block_replay = replay_block(all_eqns, inputs, [out, root], graph)
    has_residual = residual_add is not None
    # The same equations from the sum on: what the derivative replays at the h it keeps.
    replay_from_sum = (replay_block([e for e in all_eqns if e is not residual_add],
                                    [root] + inputs[2:], [out, root], graph)
                       if has_residual else block_replay)
    out_dtype = out.aval.dtype

    def emit(*values):
        values = list(values)
        x_val = values.pop(0)
        r_val = values.pop(0) if has_residual else None
        s_val = values.pop(0) if scale_src is not None else None
        b_val = values.pop(0) if bias_src is not None else None

        def replay(x_, r_, s_, b_):  # the op's layout in and out, the user's equations inside
            # (r_ None with a residual block: x_ is the sum already, as the derivative passes h)
            args = [layout.h_from_op(x_)] + ([layout.h_from_op(r_)] if r_ is not None else [])
            args += [a for a in (s_, b_) if a is not None]
            y, h = (block_replay if r_ is not None or not has_residual else replay_from_sum)(*args)
            return layout.out_to_op(y), layout.h_to_op(h)

        result = fused_norm(layout.h_to_op(x_val),
                            None if r_val is None else layout.h_to_op(r_val), s_val, b_val,
                            subtract_mean=subtract_mean, eps=eps, scale_offset=offset,
                            out_dtype=out_dtype, implementation=options.implementation,
                            replay=replay)
        if not has_residual:
            return [layout.out_from_op(result)]
        y, h = result
        y = layout.out_from_op(y)
        return [y, layout.h_from_op(h)] if len(outputs) == 2 else [y]

    base = "layer_norm" if subtract_mean else "rms_norm"
    name = ("add_" + base) if has_residual else base
    op_aval = root.aval.update(shape=layout.op_shape(root.aval.shape))
    hidden = op_aval.shape[-1]
    rows = int(np.prod(op_aval.shape[:-1], dtype=np.int64))
    parts = [f"eps={eps:.3g}"]
    if scale is not None:
        parts.append("scale" + (" (1 + w)" if offset else ""))
    if bias is not None:
        parts.append("bias")
    if has_residual:
        parts.append("sum also returned" if len(outputs) == 2 else "sum not needed")
    if not layout.identity:
        parts.append(f"axis {axis} of {root.aval.str_short()} moved last")
    dtype = root.aval.dtype
    detail = (f"{rows}x{hidden} {np.dtype(dtype).name}->{np.dtype(out_dtype).name}, "
              + ", ".join(parts))
    refusals = norm_refusals(op_aval, subtract_mean=subtract_mean, has_residual=has_residual,
                             eps=eps, scale_offset=offset, out_dtype=out_dtype,
                             implementation=options.implementation)
    # Unfused in training XLA writes the f32 statistics and re-reads the rows for them (one extra
    # read of the (rows, hidden) input); with the residual add, the sum is written and read back.
    itemsize = np.dtype(root.aval.dtype).itemsize
    saved = rows * hidden * itemsize * (3 if has_residual else 1)
    return Site(name, all_eqns, inputs, outputs, emit, user_source_line(anchor), detail, saved,
                graph, refusals)


# Priority 30: norms share no equation with the matmul patterns.
PATTERN = Pattern(NAME, frozenset({"rsqrt", "sqrt", "pow"}), match_norm, NAMES, priority=30)
