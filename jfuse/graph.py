"""A light def-use view of a jaxpr for matching, and the canonicalization that precedes it.

Matching asks three questions again and again: who produces this value, who reads it, and is it
an output. :class:`Graph` answers each in O(1) from tables built once per jaxpr, so matching stays
linear in the number of equations.

:func:`canonicalize` rewrites a jaxpr into the form the passes expect: nested ``jit`` calls
inlined (``jax.nn.silu`` is one), identical pure equations merged (LayerNorm computes ``x - mean``
twice), every equation keeping the user's source line. It edits the jaxpr (through the few
helpers in :mod:`jfuse._jax.jaxpr`), which costs a fraction of re-tracing it; the rare form
editing cannot handle (a ``closed_call``, a call with constants) is re-traced instead, with the
same rules run by the shared evaluator.

It knows jfuse's own markers (:mod:`jfuse.core.markers`) only to leave them whole; it knows
nothing of the patterns, the ops or the kernels.
"""

from __future__ import annotations

import functools
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from jfuse._jax import compat
from jfuse._jax import jaxpr as jx
from jfuse._jax.jaxpr import literal_value  # noqa: F401  (passes read literals from here)
from jfuse._jax.source import equation_context, generated_by_autodiff, is_backward
from jfuse.core.markers import is_fused_call, marker_id

Atom = Any  # a Var or a Literal


class Graph:
    """Producers, users and positions of the variables of one (canonical) jaxpr, and the values
    of the variables that hold the jaxpr's constants (``consts``: var -> value), so a pass can
    read a mask built from a numpy array at trace time as the constant it is."""

    def __init__(self, jaxpr: jx.Jaxpr, consts: Mapping[jx.Var, Any] | None = None):
        self.jaxpr = jaxpr
        self._consts: dict[jx.Var, Any] = dict(consts or {})
        self.eqns: list[jx.JaxprEqn] = list(jaxpr.eqns)
        self._position: dict[int, int] = {}
        self._producer: dict[jx.Var, jx.JaxprEqn] = {}
        self._users: dict[jx.Var, list[jx.JaxprEqn]] = {}
        for pos, eqn in enumerate(self.eqns):
            self._position[id(eqn)] = pos
            for var in eqn.invars:
                if isinstance(var, jx.Var):
                    self._users.setdefault(var, []).append(eqn)
            for var in eqn.outvars:
                self._producer[var] = eqn
        self._outvars = {v for v in jaxpr.outvars if isinstance(v, jx.Var)}
        self._memos: dict[str, dict] = {}

    def memo(self, name: str) -> dict:
        """A cache, named ``name``, that lives as long as this graph: for what a pass derives
        from the graph alone and would otherwise derive again for every candidate that asks."""
        return self._memos.setdefault(name, {})

    @classmethod
    def of(cls, closed: jx.ClosedJaxpr, *, consts_as_inputs: Sequence[Any] = ()) -> "Graph":
        """The graph of a canonical jaxpr (:func:`canonicalize`) with its constants' values: the
        closed jaxpr's own, or ``consts_as_inputs``, the values of its leading invars."""
        jaxpr = closed.jaxpr
        consts = dict(zip(jaxpr.constvars, closed.consts))
        consts.update(zip(jaxpr.invars[:len(consts_as_inputs)], consts_as_inputs))
        return cls(jaxpr, consts)

    def constant(self, atom: Atom) -> np.ndarray | None:
        """The value of ``atom`` when it is a literal or one of the jaxpr's constants known at
        trace time, as a numpy array; None otherwise (a tracer of an enclosing trace, too)."""
        if isinstance(atom, jx.Literal):
            return np.asarray(atom.val)
        if not isinstance(atom, jx.Var) or atom not in self._consts:
            return None
        value = self._consts[atom]
        if isinstance(value, jx.Tracer):
            return None
        try:
            return np.asarray(value)
        except Exception:  # an array that cannot be read on the host (e.g. not addressable)
            return None

    @functools.cached_property
    def has_backward(self) -> bool:
        """Whether this jaxpr holds a backward pass: it was differentiated before jfuse saw it."""
        return any(is_backward(e) for e in self.eqns)

    def hidden_by_autodiff(self, reader: jx.JaxprEqn) -> bool:
        """``reader`` is autodiff's work in a differentiated function (a forward value kept for
        the backward, or the backward itself)."""
        return self.has_backward and generated_by_autodiff(reader)

    def position(self, eqn: jx.JaxprEqn) -> int:
        return self._position[id(eqn)]

    def producer(self, atom: Atom) -> jx.JaxprEqn | None:
        """The equation defining ``atom``; None for literals and jaxpr inputs."""
        if not isinstance(atom, jx.Var):
            return None
        return self._producer.get(atom)

    def users(self, atom: Atom) -> list[jx.JaxprEqn]:
        if not isinstance(atom, jx.Var):
            return []
        return self._users.get(atom, [])

    def is_output(self, atom: Atom) -> bool:
        return isinstance(atom, jx.Var) and atom in self._outvars

    def sole_user(self, atom: Atom) -> jx.JaxprEqn | None:
        """The only reader of ``atom``, if exactly one equation reads it once and it is no output."""
        users = self.users(atom)
        if len(users) != 1 or self.is_output(atom):
            return None
        if sum(v is atom for v in users[0].invars) != 1:
            return None
        return users[0]

    def read_only_within(self, atom: Atom, block: Iterable[jx.JaxprEqn]) -> bool:
        """True when every reader of ``atom`` is in ``block`` and it is not a jaxpr output."""
        ids = {id(e) for e in block}
        return not self.is_output(atom) and all(id(u) in ids for u in self.users(atom))

    def ancestors_within(self, out: jx.Var, eqns: Iterable[jx.JaxprEqn]) -> list[jx.JaxprEqn]:
        """The equations among ``eqns`` that ``out`` depends on, in program order."""
        by_out = {v: e for e in eqns for v in e.outvars}
        needed: dict[int, jx.JaxprEqn] = {}
        stack = [out]
        while stack:
            eqn = by_out.get(stack.pop())
            if eqn is None or id(eqn) in needed:
                continue
            needed[id(eqn)] = eqn
            stack.extend(a for a in eqn.invars if isinstance(a, jx.Var))
        return sorted(needed.values(), key=self.position)

    def readers_outside(self, atom: Atom, block: Iterable[jx.JaxprEqn]) -> list[jx.JaxprEqn]:
        ids = {id(e) for e in block}
        return [u for u in self.users(atom) if id(u) not in ids]


# --- canonicalization ------------------------------------------------------------------------

def _shardings_unspecified(params: dict) -> bool:
    # A nested jit that pins shardings carries meaning of its own; only plain ones are inlined.
    for key in ("in_shardings", "out_shardings"):
        for sharding in params.get(key, ()):
            if not compat.is_unspecified_sharding(sharding):
                return False
    return not params.get("donated_invars") or not any(params["donated_invars"])


def _is_inlinable_call(eqn: jx.JaxprEqn) -> bool:
    if compat.is_call(eqn):
        # A fused op's sharding marker must stay whole for the partition pass to find it, and
        # a shared fused call is fused already.
        return (_shardings_unspecified(eqn.params) and not eqn.effects
                and marker_id(eqn) is None and not is_fused_call(eqn))
    return eqn.primitive.name in compat.PLAIN_CALL_PRIMITIVES


def _freeze(value: Any) -> Any:
    """A hashable stand-in for a param value, or raise TypeError if there is none."""
    if isinstance(value, (tuple, list)):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, np.ndarray):
        raise TypeError("array param")
    hash(value)
    return value


class _CommonSubexpressions:
    """Remembers pure equations already bound, so identical ones are bound once."""

    def __init__(self):
        self._seen: dict[Any, Any] = {}

    @staticmethod
    def key(eqn: jx.JaxprEqn, invals: Sequence[Any], in_atoms: Sequence[Atom]) -> Any:
        if eqn.effects or jx.jaxpr_params(eqn) or "rng" in eqn.primitive.name:
            return None
        try:
            params = tuple(sorted((k, _freeze(v)) for k, v in eqn.params.items()))
        except TypeError:
            return None
        operands = []
        for atom, val in zip(in_atoms, invals):
            if isinstance(atom, jx.Literal):
                # bytes, not repr: printing a numpy scalar costs more than binding the equation
                value = np.asarray(atom.val)
                operands.append(("lit", str(atom.aval), value.dtype.str, value.tobytes()))
            else:
                operands.append(("val", id(val)))
        return (eqn.primitive, params, tuple(operands))

    def lookup(self, key: Any) -> Any:
        return None if key is None else self._seen.get(key)

    def store(self, key: Any, outs: Any, invals: Sequence[Any]) -> None:
        if key is not None:
            # Keep the operands alive with the entry: the key holds their ids.
            self._seen[key] = (outs, tuple(invals))


def _eval_canonical(jaxpr: jx.Jaxpr, consts: Sequence[Any], args: Sequence[Any], cse) -> list:
    """Re-trace ``jaxpr`` in canonical form: the evaluator with a rule that inlines plain calls
    (recursively, sharing ``cse``) and binds each pure equation once."""

    def canonical(_, eqn: jx.JaxprEqn, env: jx.Env) -> list:
        invals = env.read_all(eqn.invars)
        if _is_inlinable_call(eqn):
            inner_jaxpr, inner_consts = jx.open_and_consts(jx.call_body(eqn))
            with equation_context(eqn):  # inner equations keep the call's name stack
                return _eval_canonical(inner_jaxpr, inner_consts, invals, cse)
        key = cse.key(eqn, invals, eqn.invars)
        hit = cse.lookup(key)
        if hit is not None:
            return hit[0]
        outs = jx.bind(eqn, invals)
        cse.store(key, outs, invals)
        return outs

    return jx.evaluate(jaxpr, consts, args, canonical)


def _equation_key(eqn: jx.JaxprEqn) -> Any:
    """What makes two pure equations interchangeable (see :class:`_CommonSubexpressions`)."""
    return _CommonSubexpressions.key(eqn, eqn.invars, eqn.invars)


def _canonical_by_editing(jaxpr: jx.Jaxpr) -> jx.Jaxpr | None:
    """The canonical form, built by editing the jaxpr; None where only a re-trace can build it
    (a ``closed_call``, or a call whose body has constants)."""
    inlined = jx.inline_call_equations(jaxpr, _is_inlinable_call, into_bodies=False)
    if any(_is_inlinable_call(eqn) for eqn in inlined.eqns):
        return None
    return jx.merge_equations(jx.replace_literals(inlined, _folded_scalar_conversion),
                              _equation_key)


def _folded_scalar_conversion(eqn: jx.JaxprEqn) -> jx.Literal | None:
    """``convert_element_type`` of a scalar literal becomes a literal, as it does when JAX traces
    it (``jnp.where(c, x, 0.0)`` inside ``jit`` converts its ``0.0``): the passes read constants
    as literals."""
    if (eqn.primitive.name == "convert_element_type" and len(eqn.invars) == 1
            and isinstance(eqn.invars[0], jx.Literal) and np.ndim(eqn.invars[0].val) == 0):
        out = eqn.outvars[0]
        return jx.Literal(np.asarray(eqn.invars[0].val).astype(eqn.params["new_dtype"]), out.aval)
    return None


def canonicalize(
    jaxpr: jx.Jaxpr, consts: Sequence[Any], *, consts_as_inputs: bool = False
) -> jx.ClosedJaxpr:
    """Inline plain nested jits and merge duplicate pure equations; same inputs and outputs.

    By default ``consts`` stay constants of the result, so the canonical jaxpr has exactly the
    invars of ``jaxpr``. With ``consts_as_inputs`` they become its leading invars instead, which
    lets the caller cache the result without holding on to the constants' values.
    """
    # Editing is several times cheaper than re-tracing, and gives the same jaxpr.
    edited = _canonical_by_editing(jaxpr)
    if edited is not None:
        if consts_as_inputs:
            return jx.ClosedJaxpr(jx.consts_as_invars(edited), [])
        return jx.ClosedJaxpr(edited, list(consts))
    avals = [v.aval for v in jaxpr.invars]
    if consts_as_inputs:
        n_consts = len(consts)

        def run_open(*args):
            cse = _CommonSubexpressions()
            return _eval_canonical(jaxpr, args[:n_consts], args[n_consts:], cse)

        return jx.make_closed_jaxpr(run_open, [v.aval for v in jaxpr.constvars] + avals)

    def run(*args):
        return _eval_canonical(jaxpr, consts, args, _CommonSubexpressions())

    return jx.make_closed_jaxpr(run, avals)
