"""The rewrite: canonicalize, match, and re-trace a jaxpr with fused ops in place of blocks.

:class:`Rewriter` runs the pipeline on one jaxpr and, through the equations that carry jaxprs
(``scan``, ``while`` bodies, ``cond`` branches, ``checkpoint``/remat regions, nested ``jit``), on
every level below it, folding what it did into one :class:`~jfuse.report.FusionReport`.

The rewritten jaxpr is produced by evaluating the canonical one under ``jax.make_jaxpr``: untouched
equations are re-bound as they are (effects keep their order), absorbed equations are skipped, and
each site's fused op is called where its inputs first exist. ``custom_vjp`` regions stay opaque
(their Python fwd/bwd must see the body they were written for); the report lists what would have
fused inside them. A site whose fused op fails while being traced is evaluated unfused instead,
with the reason in the report.

The re-trace is the shared evaluator (:func:`jfuse._jax.jaxpr.evaluate`) with one rule: skip what
a site absorbed, bind rewritten bodies, and emit each site's call where its inputs first exist.
The rewriter knows jfuse's own markers (:mod:`jfuse.core.markers`) only to leave them whole; it
knows the ops only through the sites the passes hand it.
"""

from __future__ import annotations

import dataclasses

from typing import Any, Sequence

from jfuse._jax import compat
from jfuse._jax import jaxpr as jx
from jfuse._jax.source import equation_context, user_source_line
from jfuse.config import FuseOptions, raise_internal_errors
from jfuse.core.markers import is_jfuse_region
from jfuse.core.user_warning import warn_user
from jfuse.graph import Graph, canonicalize
from jfuse.passes import PATTERN_GROUPS, PIPELINE  # noqa: F401  (PATTERN_GROUPS: for the api)
from jfuse.passes.base import Plan, Site, plan_rewrites
from jfuse.report import FusionReport, MissedFusion, MissReason
from jfuse.shared_calls import SharedCalls

# Primitives whose jaxpr params are rewritten recursively. Their bodies keep the same inputs and
# outputs, so swapping the body leaves every other param valid.
_NESTED = (compat.CONTROL_FLOW_PRIMITIVES | compat.REMAT_PRIMITIVES | compat.CALL_PRIMITIVES
           | {"closed_call"})


def _is_platform_switch(eqn: jx.JaxprEqn, graph: Graph) -> bool:
    """A ``cond`` on the platform index: a fused op's per-platform implementations (or a user's
    ``lax.platform_dependent``), whose branches are kernels and references, not model code."""
    if eqn.primitive.name != "cond":
        return False
    producer = graph.producer(eqn.invars[0])
    return producer is not None and compat.is_platform_index(producer)


class Rewriter:
    """Rewrites jaxprs with the passes in ``PIPELINE`` under ``options``."""

    def __init__(self, options: FuseOptions):
        self.options = options
        self.report = FusionReport()
        self._shared = SharedCalls()

    def rewrite(
        self, jaxpr: jx.Jaxpr, consts: Sequence[Any], *, consts_as_inputs: bool = False
    ) -> jx.ClosedJaxpr:
        """The rewritten jaxpr: same inputs (consts first if ``consts_as_inputs``) and outputs."""
        return self._rewrite(jaxpr, consts, consts_as_inputs)[0]

    def _rewrite(self, jaxpr: jx.Jaxpr, consts: Sequence[Any], consts_as_inputs: bool = False
                 ) -> tuple[jx.ClosedJaxpr, bool]:
        """(the rewritten jaxpr, whether anything in it or below it was fused)."""
        canonical = canonicalize(jaxpr, consts, consts_as_inputs=consts_as_inputs)
        # The passes may read the constants' values (a mask built from a numpy array).
        graph = Graph.of(canonical, consts_as_inputs=consts if consts_as_inputs else ())
        plan = plan_rewrites(graph, PIPELINE, self.options)
        self.report.missed.extend(plan.misses)
        # Bodies first: a program whose bodies and own equations hold nothing to fuse (the
        # backward half of a training step, usually) is returned without being traced again.
        nested_params = {
            pos: params for pos, eqn in enumerate(graph.eqns)
            if pos not in plan.absorbed and self._has_nested(eqn)
            and (params := self._nested_params(eqn, graph)) is not None
        }
        if not plan.sites and not nested_params:
            return canonical, False
        avals = [v.aval for v in canonical.jaxpr.invars]
        rewritten = jx.make_closed_jaxpr(
            lambda *args: self._evaluate(
                canonical.jaxpr, canonical.consts, args, plan, nested_params),
            avals,
        )
        return rewritten, True

    # --- evaluation ---------------------------------------------------------------------------

    def _evaluate(self, jaxpr: jx.Jaxpr, consts, args, plan: Plan, nested_params: dict) -> list:
        def rewritten(position: int, eqn: jx.JaxprEqn, env: jx.Env):
            if position in plan.absorbed:
                return ()  # the site's fused call computes what this equation's block did
            params = nested_params.get(position)
            return None if params is None else jx.bind(eqn, env.read_all(eqn.invars), params)

        def emit_sites(position: int, env: jx.Env) -> None:
            for site in plan.emit_before.get(position, ()):
                self._emit(site, env)

        return jx.evaluate(jaxpr, consts, args, rewritten, emit_sites)

    def _emit(self, site: Site, env: jx.Env) -> None:
        values = env.read_all(site.inputs)
        try:
            with equation_context(site.absorbed[0]):
                shared = self._shared.function_for(site, values)
                outs = list(site.emit(*values) if shared is None else shared(*values))
            self.report.sites.append(site.to_report(self.options.implementation))
        except Exception as error:  # a kernel or op that cannot serve: run the block unfused
            self._fall_back(error, f"{site.pattern} at {site.where}: the fused op failed while "
                                   f"tracing ({type(error).__name__}: {error}); this block runs "
                                   "unfused")
            self.report.missed.append(_unfused_site(site, error))
            outs = list(site.replay()(*values))
        env.write(site.outputs, outs)

    def _fall_back(self, error: Exception, message: str) -> None:
        """Something failed while rewriting: warn, and note in the report what runs unfused."""
        if raise_internal_errors():
            raise error
        warn_user("jfuse: " + message)
        self.report.fallbacks.append(message)

    # --- nested jaxprs ------------------------------------------------------------------------

    @staticmethod
    def _has_nested(eqn: jx.JaxprEqn) -> bool:
        return eqn.primitive.name in _NESTED or compat.is_custom_vjp(eqn)

    def _nested_params(self, eqn: jx.JaxprEqn, graph: Graph) -> dict | None:
        """``eqn``'s bind params with its bodies rewritten, or None if no body changed."""
        name = eqn.primitive.name
        if compat.is_custom_vjp(eqn):
            self._report_opaque(eqn)
            return None
        if name not in _NESTED or _is_platform_switch(eqn, graph) or is_jfuse_region(eqn):
            return None
        params = compat.bind_params(eqn)
        changed = False
        for key, value in jx.jaxpr_params(eqn):
            if key not in params or key == "cond_jaxpr":
                continue
            first_site = len(self.report.sites)
            try:
                if isinstance(value, tuple):
                    bodies = [self._rewrite_body(v) for v in value]
                    if any(body is not None for body in bodies):
                        params[key] = tuple(original if body is None else body
                                            for original, body in zip(value, bodies))
                        changed = True
                elif (body := self._rewrite_body(value)) is not None:
                    params[key] = body
                    changed = True
            except Exception as error:
                self._fall_back(error, f"{name} body at {user_source_line(eqn)} was left unfused "
                                       f"({type(error).__name__}: {error})")
                params[key] = value
            if name == "scan":  # the body's sites run once per iteration
                self._repeat_sites(first_site, int(eqn.params.get("length", 1)))
        return params if changed else None

    def _repeat_sites(self, first: int, iterations: int) -> None:
        """Mark the sites from ``first`` on as running ``iterations`` times per call."""
        sites = self.report.sites
        sites[first:] = [dataclasses.replace(site, iterations=site.iterations * iterations)
                         for site in sites[first:]]

    def _rewrite_body(self, body):
        """The rewritten body, or None when nothing in it fused (or it gained constants)."""
        open_jaxpr, consts = jx.open_and_consts(body)
        new, changed = self._rewrite(open_jaxpr, consts)
        if not changed:
            return None
        if isinstance(body, jx.ClosedJaxpr):
            return new
        if new.consts:
            return None  # an open body cannot take constants: keep the original
        return new.jaxpr

    def _report_opaque(self, eqn: jx.JaxprEqn) -> None:
        """List what would fuse inside a custom_vjp region, as misses: the region stays as is.

        The region's forward is searched as the rewriter would search it, through the bodies it
        holds (a ``custom_vmap`` as tokamax's ops have, a ``custom_jvp``, a nested ``jit``, a
        loop), so no block in it goes unnamed."""
        body = jx.call_body(eqn)
        if body is None:
            return
        try:
            sites = _sites_inside(_with_literal_operands(body, eqn.invars), self.options, depth=0)
        except Exception:  # reporting must never break the program
            return
        name = _function_name(body)
        region = (f"custom_vjp {name!r}" if name else "a custom_vjp") + (
            f" called at {user_source_line(eqn)}")
        for site in sites:
            self.report.missed.append(_opaque_miss(site, region))


# How deep the search for blocks inside an opaque region goes through the bodies it holds.
_OPAQUE_SEARCH_DEPTH = 6


def _sites_inside(body, options: FuseOptions, depth: int) -> list[Site]:
    """The sites the passes would fuse in ``body`` and in the bodies its equations hold."""
    open_jaxpr, consts = jx.open_and_consts(body)
    graph = Graph.of(canonicalize(open_jaxpr, consts))
    plan = plan_rewrites(graph, PIPELINE, options)
    sites = list(plan.sites)
    if depth >= _OPAQUE_SEARCH_DEPTH:
        return sites
    for position, eqn in enumerate(graph.eqns):
        if position in plan.absorbed or is_jfuse_region(eqn) or _is_platform_switch(eqn, graph):
            continue
        for _, value in jx.jaxpr_params(eqn):
            for inner in value if isinstance(value, tuple) else (value,):
                sites += _sites_inside(inner, options, depth + 1)
    return sites


def _with_literal_operands(body, operands):
    """``body`` with the operands the call passes as literals (an ``eps`` argument) made its
    constants, as inlining it would: the passes read constants such as eps from literals."""
    open_jaxpr, consts = jx.open_and_consts(body)
    if len(open_jaxpr.invars) != len(operands) or not any(
            isinstance(a, jx.Literal) for a in operands):
        return body
    free = [v.aval for v, a in zip(open_jaxpr.invars, operands) if not isinstance(a, jx.Literal)]

    def run(*args):
        remaining = iter(args)
        values = [a.val if isinstance(a, jx.Literal) else next(remaining) for a in operands]
        return jx.eval_jaxpr(open_jaxpr, consts, *values)

    return jx.make_closed_jaxpr(run, free)


def _function_name(body) -> str | None:
    """The name of the Python function a body was traced from, where the jaxpr records it."""
    open_jaxpr, _ = jx.open_and_consts(body)
    return getattr(getattr(open_jaxpr, "debug_info", None), "func_name", None) or None


def _opaque_miss(site: Site, region: str) -> MissedFusion:
    """The miss a block inside a custom_vjp region becomes: what to call instead."""
    op = site.pattern.removeprefix("add_")  # add_rms_norm is jfuse.ops.rms_norm with a residual
    return MissedFusion(
        site.pattern,
        MissReason.OPAQUE_CUSTOM_VJP,
        site.where,
        "jfuse leaves custom_vjp regions alone because their backward is user-defined; call "
        f"jfuse.ops.{op} inside it, or drop the custom_vjp",
        f"{site.detail}, inside {region}",
    )


def _unfused_site(site: Site, error: Exception) -> MissedFusion:
    """The miss a site becomes when its fused op failed while tracing: a kernel that refused the
    block (``implementation="pallas"`` asks to see refusals) or an internal error."""
    if isinstance(error, NotImplementedError):
        return MissedFusion(site.pattern, MissReason.NO_KERNEL, site.where,
                            "the kernel of the platform this runs on cannot serve this block; "
                            "implementation=None runs XLA there and keeps the block fused",
                            detail=str(error))
    return MissedFusion(site.pattern, MissReason.INTERNAL_ERROR, site.where,
                        "a jfuse bug: the block runs unfused with the same answer; please report "
                        "it with this report (JFUSE_RAISE=1 shows the traceback)",
                        detail=f"{type(error).__name__}: {error}")
