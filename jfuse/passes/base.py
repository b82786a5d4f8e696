"""What a pattern pass returns, and the driver that runs the passes over one jaxpr.

A pass is a :class:`Pattern`: a name, the primitives a match can start from, and a ``match``
function that inspects the graph around one anchor equation. It answers with a :class:`Site`
(a block to replace and how to compute it) and/or :class:`MissedFusion` entries, or ``None`` when
the anchor is not the start of anything it knows. The driver resolves overlaps (earlier patterns in
the pipeline win), places each fused call where its inputs exist, and never absorbs an equation
with side effects. :func:`replay_block` is a site's block as the user wrote it, re-bound by the
shared evaluator (:func:`jfuse._jax.jaxpr.run_equations`).

Passes know the graph, the report's vocabulary and the ops they call; this module knows neither
a particular pattern nor how the rewriter re-traces the program.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import numpy as np

from jfuse._jax import jaxpr as jx
from jfuse.config import FuseOptions
from jfuse.core import probe
from jfuse.graph import Graph, literal_value
from jfuse.report import KERNEL_PLATFORMS, FusedSite, MissedFusion, MissReason


# The hint for a block whose intermediates are read by autodiff-generated equations.
AUTODIFF_HINT = (
    "the reader is the backward of a gradient taken before jfuse saw this function (e.g. "
    "jfuse.jit(jax.grad(loss))); differentiate inside the function jfuse wraps, or use "
    "jax.grad(jfuse.fuse(loss)), so jfuse rewrites the forward first"
)


@dataclasses.dataclass
class Site:
    """A block of equations to replace by one call of a fused op.

    ``emit(*values of inputs)`` returns the values of ``outputs``; the absorbed equations are not
    evaluated. Every output must be defined by an absorbed equation.
    """

    pattern: str
    absorbed: list[jx.JaxprEqn]
    inputs: list[Any]
    outputs: list[jx.Var]
    emit: Callable[..., Sequence[Any]]
    where: str
    detail: str

    # Bytes of intermediates the unfused block writes to memory and reads back (e.g. the matmul
    # output before its epilogue); each pass estimates it from the avals.
    bytes_saved: int = 0
    graph: Graph | None = None
    # Per lowering platform ("tpu", "cuda"), why its kernel will not serve this block (the op then
    # runs XLA there), as the op's ``refusals`` says (the rule its dispatch applies).
    kernel_refusals: dict[str, str] = dataclasses.field(default_factory=dict)
    # Per lowering platform, which kernel serves, where the op picks one of several there (the
    # op's ``kernel_names``); absent for ops with one kernel per platform.
    kernel_names: dict[str, str] = dataclasses.field(default_factory=dict)

    def replay(self) -> Callable[..., tuple]:
        """The block as the user wrote it: what runs if the fused op fails."""
        return replay_block(self.absorbed, self.inputs, self.outputs, self.graph)

    def to_report(self, implementation: str | None = None) -> FusedSite:
        """The report's entry, with what each platform runs under ``implementation``."""
        platforms, reasons, kernels = {}, {}, {}
        for platform in KERNEL_PLATFORMS:
            reason = self.kernel_refusals.get(platform)
            if implementation == "xla":
                platforms[platform], reasons[platform] = "xla", "implementation='xla'"
            elif implementation == "interpret":
                platforms[platform] = "interpret"
            elif reason:  # (under "pallas", only on a platform other than the one it runs on)
                platforms[platform], reasons[platform] = "xla", reason
            else:
                platforms[platform] = "kernel"
                if platform in self.kernel_names:
                    kernels[platform] = self.kernel_names[platform]
        return FusedSite(self.pattern, self.where, self.detail, self.bytes_saved, platforms,
                         reasons, kernels=kernels)


@dataclasses.dataclass
class MatchResult:
    site: Site | None = None
    misses: list[MissedFusion] = dataclasses.field(default_factory=list)


MatchFn = Callable[[Graph, jx.JaxprEqn, FuseOptions], "MatchResult | None"]


@dataclasses.dataclass(frozen=True)
class Pattern:
    """A pattern pass: ``match`` is tried on every equation whose primitive is in ``anchors``.

    ``names`` are the pattern names its sites may carry (one pass can produce several, like
    ``rms_norm`` and ``add_rms_norm``); by default just ``name``. ``name`` is the pass's own
    name; where it differs from its sites' (``norm``) it is a group name a user can rely on:
    ``patterns=``, ``JFUSE_DISABLE`` and ``JFUSE_DEBUG`` take it for all of ``names``.
    """

    name: str
    anchors: frozenset[str]
    match: MatchFn
    names: tuple[str, ...] = ()
    # Where the pass runs in the pipeline: lower first, and an earlier pass wins an equation two
    # passes claim (a GLU's gate, matmul + activation, must go to the GLU, not to linear).
    priority: int = 100

    @property
    def site_names(self) -> tuple[str, ...]:
        return self.names or (self.name,)


@dataclasses.dataclass
class Plan:
    """The sites chosen for one jaxpr, indexed for the rewriting interpreter."""

    emit_before: dict[int, list[Site]]  # position -> sites to emit before that equation
    absorbed: set[int]  # positions of equations a site replaces
    sites: list[Site]
    misses: list[MissedFusion]


def _emission_position(graph: Graph, site: Site) -> int | None:
    """The earliest position at which all inputs exist, if every outside reader comes later."""
    absorbed_ids = {id(e) for e in site.absorbed}
    position = 0
    for atom in site.inputs:
        producer = graph.producer(atom)
        if producer is not None:
            if id(producer) in absorbed_ids:
                return None  # an input computed inside the block: malformed site
            position = max(position, graph.position(producer) + 1)
    for var in site.outputs:
        for reader in graph.readers_outside(var, site.absorbed):
            if graph.position(reader) < position:
                return None
    return position


def plan_rewrites(graph: Graph, patterns: Sequence[Pattern], options: FuseOptions) -> Plan:
    """Run every pattern over ``graph`` and choose non-overlapping sites."""
    claimed: set[int] = set()
    sites: list[Site] = []
    misses: list[MissedFusion] = []
    emit_before: dict[int, list[Site]] = {}
    for pattern in patterns:
        for eqn in graph.eqns:
            if eqn.primitive.name not in pattern.anchors or graph.position(eqn) in claimed:
                continue
            result = pattern.match(graph, eqn, options)
            if result is None:
                continue
            misses.extend(result.misses)
            site = result.site
            if site is None:
                continue
            positions = {graph.position(e) for e in site.absorbed}
            if positions & claimed or any(e.effects for e in site.absorbed):
                continue
            at = _emission_position(graph, site)
            if at is None:
                continue
            if not options.enabled(site.pattern, group=pattern.name):
                misses.append(
                    MissedFusion(
                        site.pattern,
                        MissReason.PATTERN_DISABLED,
                        site.where,
                        f"'{site.pattern}' is turned off by patterns= or JFUSE_DISABLE; enable it "
                        "to fuse this block.",
                        site.detail,
                    )
                )
                continue
            claimed |= positions
            sites.append(site)
            emit_before.setdefault(at, []).append(site)
    sites.sort(key=lambda s: min(graph.position(e) for e in s.absorbed))
    return Plan(emit_before, claimed, sites, misses)


def small_constant(graph: Graph | None, atom: Any) -> np.ndarray | None:
    """The trace-time value of a single-element constant of the jaxpr (not a literal: a scalar
    array captured by the user's function), in its own dtype; None for anything else."""
    if graph is None or not isinstance(atom, jx.Var) or atom.aval.size != 1:
        return None
    value = graph.constant(atom)
    return None if value is None else np.asarray(value, atom.aval.dtype)


def scalar_value(graph: Graph, atom: Any, depth: int = 8) -> float | None:
    """The value of a scalar computed from literals and scalar constants alone, else None.

    Folds what libraries emit around a block's constants: ``1/sqrt(d)`` in the model's dtype,
    ``jnp.var``'s ``n - ddof`` and its ``where(n > 0, ..., nan)``, a broadcast masking constant,
    a scalar array captured at trace time (penzai's ``eps`` and ``masked_out_value``). Each step
    is rounded to its own dtype, as the user's program computes it.
    """
    value = literal_value(atom)
    if value is not None or depth == 0 or not isinstance(atom, jx.Var):
        return value
    # The same scalars (a norm's eps, attention's scale) are asked about by several candidates.
    memo = graph.memo("scalar_value")
    key = (atom, depth)
    if key not in memo:
        memo[key] = _folded_scalar(graph, atom, depth)
    return memo[key]


def _folded_scalar(graph: Graph, atom: jx.Var, depth: int) -> float | None:
    constant = small_constant(graph, atom)
    if constant is not None:
        return float(constant.reshape(())) if np.issubdtype(constant.dtype, np.number) else None
    producer = graph.producer(atom)
    if producer is None or producer.effects or len(producer.outvars) != 1:
        return None
    args = [scalar_value(graph, a, depth - 1) for a in producer.invars]
    if not args or any(a is None for a in args):
        return None
    name = producer.primitive.name
    with np.errstate(all="ignore"):
        if name in probe.SHAPE or name in ("convert_element_type", "copy", "copy_p"):
            out = args[0]
        elif name == "select_n":
            out = args[1 + int(args[0])]
        elif name in probe.UNARY and len(args) == 1:
            out = probe.UNARY[name](np.float64(args[0]))
        elif name in probe.BINARY and len(args) == 2:
            out = probe.BINARY[name](np.float64(args[0]), np.float64(args[1]))
        else:
            return None
    try:
        return float(np.asarray(out).astype(np.dtype(producer.outvars[0].aval.dtype)))
    except (TypeError, ValueError):
        return None


def replay_block(
    eqns: Sequence[jx.JaxprEqn],
    inputs: Sequence[Any],
    outputs: Sequence[jx.Var],
    graph: Graph | None = None,
) -> Callable[..., tuple]:
    """A function evaluating ``eqns`` exactly as the user's program did, inputs to outputs.

    Fused ops use it as their XLA implementation inside a rewrite, so on a backend without a
    kernel the fused program computes the same values, equation for equation. A constant the
    block reads but does not compute (a broadcast literal shared with other code) is recomputed
    from its own equations in ``graph``.
    """
    eqns = list(eqns)
    inputs = list(inputs)

    def recompute(atom, env: jx.Env, depth: int) -> None:
        # A value the block reads but left in the graph (a constant, or a convert of an input
        # that other code reads too): recompute it here from its own equation.
        if atom in env:
            return
        constant = small_constant(graph, atom)
        if constant is not None:
            # A scalar the jaxpr holds as a constant (penzai's eps): its trace-time value.
            env.write([atom], [constant])
            return
        producer = graph.producer(atom) if graph is not None else None
        if producer is None or producer.effects or jx.jaxpr_params(producer) or depth > 8:
            raise KeyError(f"{atom} is read by the block but is not one of its inputs")
        for operand in producer.invars:
            recompute(operand, env, depth + 1)
        env.write(producer.outvars, jx.bind(producer, env.read_all(producer.invars)))

    def with_recomputed_operands(_, eqn: jx.JaxprEqn, env: jx.Env) -> None:
        for atom in eqn.invars:
            recompute(atom, env, 0)
        return None  # then bound as it is

    def replay(*values):
        env = jx.Env()
        env.write([a for a in inputs if isinstance(a, jx.Var)],
                  [v for a, v in zip(inputs, values) if isinstance(a, jx.Var)])
        jx.run_equations(eqns, env, with_recomputed_operands)
        return tuple(env.read(v) for v in outputs)

    return replay
