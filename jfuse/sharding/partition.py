"""The partition pass: each fused op's marker becomes its kernels inside a ``shard_map``.

Runs on the rewritten program of a function whose inputs' shardings jfuse knows (``jfuse.jit``
reads them from the arguments and ``in_shardings``). It re-traces the program with the shared
evaluator (:func:`jfuse._jax.jaxpr.evaluate`), following each value's layout with
:mod:`~jfuse.sharding.propagate`, and at each marker left by a fused op
(:mod:`jfuse.core.markers`) asks :mod:`~jfuse.sharding.rules` for a layout. With one, the
marker is replaced by::

    platform_dependent(tpu=shard_map(TPU kernel), cuda=shard_map(Triton kernel), default=XLA)

so every device runs the kernel on its own shard, and CPU runs exactly the unfused equations.
Without one, the marker (the op's XLA implementation) stays and the report says why. Markers
inside nested jaxprs (a ``custom_jvp`` primal, a scan over layers, a remat region) are handled by
rewriting those bodies with their operands' layouts.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
from jax import lax

from jfuse._jax import compat
from jfuse._jax import jaxpr as jx
from jfuse._jax.source import equation_context, user_source_line
from jfuse.core import targets
from jfuse.core.markers import PartitionableCall, marker_id, registered_call
from jfuse.sharding import propagate as prop
from jfuse.sharding.rules import Layout, plan
from jfuse.sharding.specs import MaybeSpec, to_partition_spec


def _shapes(avals) -> list:
    return [tuple(a.shape) for a in avals]


@dataclasses.dataclass(frozen=True)
class ShardedCall:
    """What the pass did with one fused-op call on a mesh."""

    pattern: str
    where: str
    partitioned: bool
    detail: str  # the layout, or the reason it runs XLA's partitioned ops

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Left as they are even when they hold a marker: a custom_vjp's fwd/bwd are written for its body,
# and a while's cond computes no fused op's output.
_KEPT_PARAMS = {"cond_jaxpr"}


class Partitioner:
    """Replaces the markers of one program; ``notes`` says what happened to each."""

    def __init__(self, mesh: Any, unknown_inputs_reason: str | None = None):
        self.mesh = mesh
        # Set when the inputs' layouts are not known at all: every marker is declined with it.
        self.unknown_inputs_reason = unknown_inputs_reason
        self.notes: list[ShardedCall] = []
        self._holds_marker: dict[int, bool] = {}

    def run(self, closed: jx.ClosedJaxpr, in_specs: Sequence[MaybeSpec]) -> jx.ClosedJaxpr:
        if not self.holds_marker(closed.jaxpr):
            return closed
        avals = [v.aval for v in closed.jaxpr.invars]
        return jx.make_closed_jaxpr(
            lambda *args: self._evaluate(closed.jaxpr, closed.consts, args, in_specs), avals)

    def holds_marker(self, jaxpr: jx.Jaxpr) -> bool:
        key = id(jaxpr)
        if key not in self._holds_marker:
            self._holds_marker[key] = any(
                marker_id(eqn) is not None
                or any(self._value_holds_marker(value) for _, value in jx.jaxpr_params(eqn))
                for eqn in jaxpr.eqns)
        return self._holds_marker[key]

    def _value_holds_marker(self, value) -> bool:
        """Whether a jaxpr param (a body, or a tuple of branches) holds a marker."""
        bodies = value if isinstance(value, tuple) else (value,)
        return any(self.holds_marker(jx.open_and_consts(b)[0]) for b in bodies)

    # --- evaluation ---------------------------------------------------------------------------

    def _evaluate(self, jaxpr: jx.Jaxpr, consts, args, in_specs) -> list:
        specs: dict = {v: prop.replicated(len(v.aval.shape)) for v in jaxpr.constvars}
        specs.update(zip(jaxpr.invars, in_specs))

        def partitioned(_, eqn: jx.JaxprEqn, env: jx.Env) -> list:
            values = env.read_all(eqn.invars)
            operand_specs = [prop.atom_spec(a, specs) for a in eqn.invars]
            with equation_context(eqn):
                if marker_id(eqn) is not None:
                    outs, out_specs = self._marker(eqn, values, operand_specs)
                else:
                    outs = jx.bind_here(eqn, values, self._params(eqn, operand_specs))
                    out_specs = prop.output_specs(eqn, operand_specs)
            specs.update(zip(eqn.outvars, out_specs))
            return outs

        return jx.evaluate(jaxpr, consts, args, partitioned)

    def _params(self, eqn: jx.JaxprEqn, operand_specs) -> dict:
        """``eqn``'s bind params, with the bodies that hold markers partitioned."""
        name = eqn.primitive.name
        inputs = {} if compat.is_custom_vjp(eqn) else prop.body_input_specs(eqn, operand_specs)
        replaced = {}
        for key, body_specs in inputs.items():
            value = eqn.params[key]
            if key in _KEPT_PARAMS or not self._value_holds_marker(value):
                continue
            if key == "branches":
                replaced[key] = tuple(self._body(b, body_specs) for b in value)
            else:
                replaced[key] = self._body(value, body_specs)
        callee = replaced.get("callee")
        if name == "linear_call" and callee is not None and callee.consts:
            # linear_call evaluates its callee's open jaxpr only: constants would be dropped
            del replaced["callee"]
        if replaced and name == compat.CUSTOM_JVP_PRIMITIVE:
            # its bind params are functions built from call_jaxpr
            return eqn.primitive.get_bind_params({**eqn.params, **replaced})
        return {**compat.bind_params(eqn), **replaced}

    def _body(self, body, in_specs):
        new = self.run(body if isinstance(body, jx.ClosedJaxpr) else
                       jx.ClosedJaxpr(body, ()), in_specs)
        if isinstance(body, jx.ClosedJaxpr):
            return new
        if new.consts:  # an open-jaxpr param cannot take constants: keep the markers (XLA)
            return body
        return new.jaxpr

    # --- one marker ---------------------------------------------------------------------------

    def _marker(self, eqn: jx.JaxprEqn, values, operand_specs) -> tuple[list, list]:
        call = registered_call(marker_id(eqn))
        out_avals = [v.aval for v in eqn.outvars]
        if not eqn.outvars:  # a copy JAX pruned to nothing (scan's partial eval leaves these)
            return jx.bind_here(eqn, values), []
        where = user_source_line(eqn)
        if call is None:
            layout: Layout | str = "its per-shard plan is no longer cached"
        elif self.unknown_inputs_reason:
            layout = self.unknown_inputs_reason
        elif (_shapes(call.operand_avals) != _shapes(v.aval for v in eqn.invars)
              or _shapes(call.output_avals) != _shapes(out_avals)):
            layout = ("it was batched (vmap) or pruned after tracing: "
                      f"{[a.str_short() for a in call.operand_avals]} -> "
                      f"{[v.aval.str_short() for v in eqn.invars]}")
        else:
            layout = (call.layout_rule or plan)(call, operand_specs, out_avals, self.mesh)
        if isinstance(layout, str):
            self.notes.append(ShardedCall(call.pattern if call else "fused op", where, False,
                                          layout))
            return jx.bind_here(eqn, values), prop.output_specs(eqn, operand_specs)
        self.notes.append(ShardedCall(call.pattern, where, True, layout.description))
        return list(self._partitioned(call, layout, values)), list(layout.out_specs)

    def _partitioned(self, call: PartitionableCall, layout: Layout, values) -> list:
        in_specs = tuple(to_partition_spec(s) for s in layout.in_specs)
        out_specs = tuple(to_partition_spec(s) for s in layout.out_specs)

        def sharded(backend: str, interpret: bool, fall_back: bool):
            def local(*shards):
                try:
                    return tuple(call.kernel(backend, interpret)(*shards))
                except NotImplementedError:
                    if not fall_back:
                        raise
                    return tuple(call.local_reference(*shards))

            mapped = jax.shard_map(local, mesh=self.mesh, in_specs=in_specs,
                                   out_specs=out_specs, check_vma=False)
            return lambda: list(mapped(*values))

        if layout.per_shard is not None:  # plain JAX with its own collectives: every platform
            return list(jax.shard_map(layout.per_shard, mesh=self.mesh, in_specs=in_specs,
                                      out_specs=out_specs, check_vma=False)(*values))
        if call.implementation == "interpret":
            return sharded("tpu", True, False)()
        fall_back = call.implementation is None
        # Only the platforms this program may be lowered for (see jfuse.core.targets).
        branches = {name: sharded(backend, False, fall_back)
                    for name, backend in (("tpu", "tpu"), ("cuda", "triton"))
                    if targets.wanted(name)}
        if not branches:
            return list(call.reference(*values))
        return lax.platform_dependent(**branches, default=lambda: list(call.reference(*values)))
