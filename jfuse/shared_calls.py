"""One traced function per distinct fused block: the layers of a model share their fused calls.

A 32-layer model has 97 fused sites but only a handful of distinct ones: the same equations on
the same shapes, layer after layer. Emitting each site inline makes JAX trace every fused op, its
three per-platform implementations and, under ``grad``, its JVP and transpose, once per site;
that was most of what jfuse added to compile time. Instead, the rewriter emits each site as a call
of a ``jax.jit``-wrapped function shared by every site with the same :func:`block_signature`, so
JAX's own caches trace, linearize and transpose it once, as they do for a layer function the user
wraps in ``jax.jit``. The finished program is then handed to XLA with the calls inlined
(:func:`inline_fused_calls`), so XLA compiles the same program as without sharing.

Two sites share a function only when their blocks are the same equations (primitives, params,
literals) wired the same way to the same input types, which fixes everything the pass derived
from them. Sites whose operands lie on a multi-device mesh are not shared: each of those leaves a
marker for the partition pass (:mod:`jfuse.sharding.partition`).

The calls' name, and how to recognise one, are shared vocabulary (:mod:`jfuse.core.markers`):
the canonicalization and the rewriter leave them whole. This module knows sites (what a pass
hands the rewriter), not the passes or the ops.
"""

from __future__ import annotations

from typing import Any, Callable, Hashable

import jax
import numpy as np

from jfuse._jax import jaxpr as jx
from jfuse._jax.compat import inlined_at_lowering, jit_inlined_at_lowering
from jfuse.core.markers import fused_call_name, is_fused_call, mesh_of

# How far back a block's read of a value it neither computes nor receives is followed (the
# replay recomputes such values, e.g. a broadcast constant shared with other code).
_MAX_DEPTH = 8


class _Unshareable(Exception):
    """The block depends on something the signature cannot capture."""


def _frozen_param(value: Any) -> Hashable:
    if isinstance(value, (tuple, list)):
        return tuple(_frozen_param(v) for v in value)
    if isinstance(value, np.ndarray):
        return ("array", value.dtype.str, value.shape, value.tobytes())
    try:
        hash(value)
    except TypeError:
        raise _Unshareable from None
    return value


def _literal_token(atom: Any) -> Hashable:
    value = np.asarray(atom.val)
    return ("literal", str(atom.aval), value.dtype.str, value.shape, value.tobytes())


def _scalar_constant(graph: Any, atom: Any) -> Hashable | None:
    """A token for a single-element constant of the jaxpr read by the block (penzai's eps): the
    replay uses its trace-time value, so two blocks share a function only when it is equal."""
    if graph is None or not isinstance(atom, jx.Var) or atom.aval.size != 1:
        return None
    value = graph.constant(atom)
    if value is None:
        return None
    value = np.asarray(value)
    return ("constant", str(atom.aval), value.dtype.str, value.tobytes())


def block_signature(site: Any) -> Hashable | None:
    """A key equal for two sites exactly when their blocks compute the same thing the same way
    from inputs of the same types; None when the block cannot be described (then it is emitted
    on its own)."""
    tokens: dict[Any, Hashable] = {}
    for index, atom in enumerate(site.inputs):
        if isinstance(atom, jx.Var):
            tokens.setdefault(atom, ("input", index))
    graph = site.graph

    def token(atom: Any, depth: int) -> Hashable:
        if isinstance(atom, jx.Literal):
            return _literal_token(atom)
        if atom in tokens:
            return tokens[atom]
        constant = _scalar_constant(graph, atom)
        if constant is not None:  # baked into the block by its replay: part of the signature
            return constant
        producer = graph.producer(atom) if graph is not None else None
        if producer is None or depth > _MAX_DEPTH or producer.effects:
            raise _Unshareable
        return ("outside", equation(producer, depth + 1), producer.outvars.index(atom))

    def equation(eqn: Any, depth: int) -> Hashable:
        if eqn.effects:
            raise _Unshareable
        params = tuple(sorted((k, _frozen_param(v)) for k, v in eqn.params.items()))
        return (eqn.primitive, params, tuple(token(a, depth) for a in eqn.invars))

    try:
        body = []
        for position, eqn in enumerate(site.absorbed):
            body.append(equation(eqn, 0))
            for index, var in enumerate(eqn.outvars):
                tokens[var] = ("equation", position, index)
        outputs = tuple(tokens[var] for var in site.outputs)
    except (_Unshareable, KeyError):
        return None
    # A literal operand (a bias of 1.0) is part of the block: it is baked into the function.
    inputs = tuple(_literal_token(atom) if isinstance(atom, jx.Literal) else atom.aval
                   for atom in site.inputs)
    return (site.pattern, tuple(body), outputs, inputs)


class SharedCalls:
    """The shared functions of one rewrite, by block signature."""

    def __init__(self):
        self._functions: dict[Hashable, Callable[..., Any]] = {}

    def function_for(self, site: Any, values: list) -> Callable[..., Any] | None:
        """A jitted function computing ``site``'s outputs from ``values``, or None to emit the
        site inline (no signature, or operands on a multi-device mesh)."""
        if mesh_of(values) is not None:
            return None
        signature = block_signature(site)
        if signature is None:
            return None
        # Kernel lowerings read the abstract mesh in context (the device generation).
        key = (signature, str(jax.sharding.get_abstract_mesh()))
        function = self._functions.get(key)
        if function is None:
            function = self._functions[key] = _shared_function(site)
        return function


def _shared_function(site: Any) -> Callable[..., Any]:
    """``site.emit`` as a jitted function of the site's variable operands; its literal operands
    (equal for every site with the same signature) are constants inside."""
    emit = site.emit
    literals = {i: atom.val for i, atom in enumerate(site.inputs) if isinstance(atom, jx.Literal)}
    n_operands = len(site.inputs)

    def fused_call(*variables):
        remaining = iter(variables)
        operands = [literals[i] if i in literals else next(remaining) for i in range(n_operands)]
        return tuple(emit(*operands))

    fused_call.__name__ = fused_call.__qualname__ = fused_call_name(site.pattern)
    jitted = jit_inlined_at_lowering(fused_call) or jax.jit(fused_call)

    def call(*operands):
        return jitted(*[value for i, value in enumerate(operands) if i not in literals])

    return call


def inline_fused_calls(closed: jx.ClosedJaxpr) -> jx.ClosedJaxpr:
    """The finished program as XLA should see it: every shared call replaced by its body.

    The shared functions have done their job once the program is traced (JAX traced,
    linearized and transposed each once). Left as calls, they would change the instruction
    order XLA starts from, and with it the memory peak its scheduler finds: a bf16 training step
    measured 25% more temp memory on jax 0.12, although XLA inlines the calls itself. On JAX
    that can inline a ``jit`` while lowering it (>= 0.12), the calls are marked so when they
    are created and stay here (each body is then lowered once); on older JAX they are inlined
    into the jaxpr here.
    """
    inlined = jx.inline_call_equations(
        closed.jaxpr, lambda eqn: is_fused_call(eqn) and not inlined_at_lowering(eqn))
    return closed if inlined is closed.jaxpr else jx.ClosedJaxpr(inlined, closed.consts)
