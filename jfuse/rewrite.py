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
"""

from __future__ import annotations

import warnings
from typing import Any, Sequence

from jfuse import _jax_compat as jc
from jfuse.config import FuseOptions, raise_internal_errors
from jfuse.graph import Graph, canonicalize
from jfuse.ops._autodiff import is_derivative_region
from jfuse.ops._partitionable import marker_id
from jfuse.passes import PIPELINE
from jfuse.passes.base import Plan, Site, plan_rewrites
from jfuse.report import FusionReport, MissedFusion, MissReason
from jfuse.shared_calls import SharedCalls, is_fused_call

# Primitives whose jaxpr params are rewritten recursively. Their bodies keep the same inputs and
# outputs, so swapping the body leaves every other param valid.
_NESTED = {"scan", "while", "cond", "checkpoint", "remat", "remat2", "jit", "pjit", "closed_call"}
_OPAQUE_CUSTOM_VJP = {"custom_vjp_call", "custom_vjp_call_jaxpr"}


def _is_platform_switch(eqn: jc.JaxprEqn, graph: Graph) -> bool:
    """A ``cond`` on ``platform_index``: a fused op's per-platform implementations (or a user's
    ``lax.platform_dependent``), whose branches are kernels and references, not model code."""
    if eqn.primitive.name != "cond":
        return False
    producer = graph.producer(eqn.invars[0])
    return producer is not None and producer.primitive.name == "platform_index"


class Rewriter:
    """Rewrites jaxprs with the passes in ``PIPELINE`` under ``options``."""

    def __init__(self, options: FuseOptions):
        self.options = options
        self.report = FusionReport()
        self._shared = SharedCalls()

    def rewrite(
        self, jaxpr: jc.Jaxpr, consts: Sequence[Any], *, consts_as_inputs: bool = False
    ) -> jc.ClosedJaxpr:
        """The rewritten jaxpr: same inputs (consts first if ``consts_as_inputs``) and outputs."""
        return self._rewrite(jaxpr, consts, consts_as_inputs)[0]

    def _rewrite(self, jaxpr: jc.Jaxpr, consts: Sequence[Any], consts_as_inputs: bool = False
                 ) -> tuple[jc.ClosedJaxpr, bool]:
        """(the rewritten jaxpr, whether anything in it or below it was fused)."""
        canonical = canonicalize(jaxpr, consts, consts_as_inputs=consts_as_inputs)
        graph = Graph(canonical.jaxpr)
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
        rewritten = jc.make_closed_jaxpr(
            lambda *args: self._evaluate(
                canonical.jaxpr, canonical.consts, args, plan, nested_params),
            avals,
        )
        return rewritten, True

    # --- evaluation ---------------------------------------------------------------------------

    def _evaluate(self, jaxpr: jc.Jaxpr, consts, args, plan: Plan, nested_params: dict) -> list:
        env: dict[jc.Var, Any] = {}

        def read(atom):
            return atom.val if isinstance(atom, jc.Literal) else env[atom]

        env.update(zip(jaxpr.constvars, consts))
        env.update(zip(jaxpr.invars, args))
        for pos, eqn in enumerate(jaxpr.eqns):
            for site in plan.emit_before.get(pos, ()):
                self._emit(site, read, env)
            if pos in plan.absorbed:
                continue
            params = nested_params.get(pos) or jc.bind_params(eqn)
            with jc.equation_context(eqn):
                outs = eqn.primitive.bind(*[read(a) for a in eqn.invars], **params)
            if not eqn.primitive.multiple_results:
                outs = [outs]
            env.update(zip(eqn.outvars, outs))
        for site in plan.emit_before.get(len(jaxpr.eqns), ()):
            self._emit(site, read, env)
        return [read(v) for v in jaxpr.outvars]

    def _emit(self, site: Site, read, env) -> None:
        values = [read(a) for a in site.inputs]
        try:
            with jc.equation_context(site.absorbed[0]):
                shared = self._shared.function_for(site, values)
                outs = list(site.emit(*values) if shared is None else shared(*values))
            self.report.sites.append(site.to_report(self.options.implementation))
        except Exception as error:  # a kernel or op that cannot serve: run the block unfused
            if raise_internal_errors():
                raise
            message = (
                f"{site.pattern} at {site.where}: the fused op failed while tracing "
                f"({type(error).__name__}: {error}); this block runs unfused"
            )
            warnings.warn("jfuse: " + message, RuntimeWarning, stacklevel=2)
            self.report.fallbacks.append(message)
            outs = list(site.replay()(*values))
        env.update(zip(site.outputs, outs))

    # --- nested jaxprs ------------------------------------------------------------------------

    @staticmethod
    def _has_nested(eqn: jc.JaxprEqn) -> bool:
        return eqn.primitive.name in _NESTED or eqn.primitive.name in _OPAQUE_CUSTOM_VJP

    def _nested_params(self, eqn: jc.JaxprEqn, graph: Graph) -> dict | None:
        """``eqn``'s bind params with its bodies rewritten, or None if no body changed."""
        name = eqn.primitive.name
        if name in _OPAQUE_CUSTOM_VJP:
            self._report_opaque(eqn)
            return None
        if (name not in _NESTED or _is_platform_switch(eqn, graph) or is_derivative_region(eqn)
                or marker_id(eqn) is not None or is_fused_call(eqn)):
            return None
        params = jc.bind_params(eqn)
        changed = False
        for key, value in jc.jaxpr_params(eqn):
            if key not in params or key == "cond_jaxpr":
                continue
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
                if raise_internal_errors():
                    raise
                message = (
                    f"{name} body at {jc.user_source_line(eqn)} was left unfused "
                    f"({type(error).__name__}: {error})"
                )
                warnings.warn("jfuse: " + message, RuntimeWarning, stacklevel=2)
                self.report.fallbacks.append(message)
                params[key] = value
        return params if changed else None

    def _rewrite_body(self, body):
        """The rewritten body, or None when nothing in it fused (or it gained constants)."""
        open_jaxpr, consts = jc.open_and_consts(body)
        new, changed = self._rewrite(open_jaxpr, consts)
        if not changed:
            return None
        if isinstance(body, jc.ClosedJaxpr):
            return new
        if new.consts:
            return None  # an open body cannot take constants: keep the original
        return new.jaxpr

    def _report_opaque(self, eqn: jc.JaxprEqn) -> None:
        """List what would fuse inside a custom_vjp region, as misses: the region stays as is."""
        body = eqn.params.get("call_jaxpr") or eqn.params.get("fun_jaxpr")
        if body is None:
            return
        try:
            open_jaxpr, consts = jc.open_and_consts(body)
            graph = Graph(canonicalize(open_jaxpr, consts).jaxpr)
            plan = plan_rewrites(graph, PIPELINE, self.options)
        except Exception:  # reporting must never break the program
            return
        for site in plan.sites:
            self.report.missed.append(
                MissedFusion(
                    site.pattern,
                    MissReason.OPAQUE_CUSTOM_VJP,
                    site.where,
                    "jfuse does not rewrite inside jax.custom_vjp (its fwd/bwd are written for "
                    "the body as it is); call the fused op from jfuse.ops inside your custom_vjp, "
                    "or fuse the function before wrapping it",
                    site.detail,
                )
            )
