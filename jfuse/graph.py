"""A light def-use view of a jaxpr for matching, and the canonicalization that precedes it.

Matching asks three questions again and again: who produces this value, who reads it, and is it
an output. :class:`Graph` answers each in O(1) from tables built once per jaxpr, so matching stays
linear in the number of equations.

:func:`canonicalize` rewrites a jaxpr into the form the passes expect: nested ``jit`` calls
inlined (``jax.nn.silu`` is one), identical pure equations merged (LayerNorm computes ``x - mean``
twice), every equation keeping the user's source line. It edits the jaxpr (through the few
constructors in :mod:`jfuse._jax_compat`), which costs a fraction of re-tracing it; the rare
form editing cannot handle (a ``closed_call``, a call with constants) is re-traced instead.
"""

from __future__ import annotations

import functools
from typing import Any, Iterable, Sequence

import numpy as np

from jfuse import _jax_compat as jc
from jfuse.ops._partitionable import marker_id
from jfuse.shared_calls import is_fused_call

Atom = Any  # a Var or a Literal


class Graph:
    """Producers, users and positions of the variables of one (canonical) jaxpr."""

    def __init__(self, jaxpr: jc.Jaxpr):
        self.jaxpr = jaxpr
        self.eqns: list[jc.JaxprEqn] = list(jaxpr.eqns)
        self._position: dict[int, int] = {}
        self._producer: dict[jc.Var, jc.JaxprEqn] = {}
        self._users: dict[jc.Var, list[jc.JaxprEqn]] = {}
        for pos, eqn in enumerate(self.eqns):
            self._position[id(eqn)] = pos
            for var in eqn.invars:
                if isinstance(var, jc.Var):
                    self._users.setdefault(var, []).append(eqn)
            for var in eqn.outvars:
                self._producer[var] = eqn
        self._outvars = {v for v in jaxpr.outvars if isinstance(v, jc.Var)}

    @functools.cached_property
    def has_backward(self) -> bool:
        """Whether this jaxpr holds a backward pass: it was differentiated before jfuse saw it."""
        return any(jc.is_backward(e) for e in self.eqns)

    def hidden_by_autodiff(self, reader: jc.JaxprEqn) -> bool:
        """``reader`` is autodiff's work in a differentiated function (a forward value kept for
        the backward, or the backward itself)."""
        return self.has_backward and jc.generated_by_autodiff(reader)

    def position(self, eqn: jc.JaxprEqn) -> int:
        return self._position[id(eqn)]

    def producer(self, atom: Atom) -> jc.JaxprEqn | None:
        """The equation defining ``atom``; None for literals and jaxpr inputs."""
        if not isinstance(atom, jc.Var):
            return None
        return self._producer.get(atom)

    def users(self, atom: Atom) -> list[jc.JaxprEqn]:
        if not isinstance(atom, jc.Var):
            return []
        return self._users.get(atom, [])

    def is_output(self, atom: Atom) -> bool:
        return isinstance(atom, jc.Var) and atom in self._outvars

    def sole_user(self, atom: Atom) -> jc.JaxprEqn | None:
        """The only reader of ``atom``, if exactly one equation reads it once and it is no output."""
        users = self.users(atom)
        if len(users) != 1 or self.is_output(atom):
            return None
        if sum(v is atom for v in users[0].invars) != 1:
            return None
        return users[0]

    def read_only_within(self, atom: Atom, block: Iterable[jc.JaxprEqn]) -> bool:
        """True when every reader of ``atom`` is in ``block`` and it is not a jaxpr output."""
        ids = {id(e) for e in block}
        return not self.is_output(atom) and all(id(u) in ids for u in self.users(atom))

    def ancestors_within(self, out: jc.Var, eqns: Iterable[jc.JaxprEqn]) -> list[jc.JaxprEqn]:
        """The equations among ``eqns`` that ``out`` depends on, in program order."""
        by_out = {v: e for e in eqns for v in e.outvars}
        needed: dict[int, jc.JaxprEqn] = {}
        stack = [out]
        while stack:
            eqn = by_out.get(stack.pop())
            if eqn is None or id(eqn) in needed:
                continue
            needed[id(eqn)] = eqn
            stack.extend(a for a in eqn.invars if isinstance(a, jc.Var))
        return sorted(needed.values(), key=self.position)

    def readers_outside(self, atom: Atom, block: Iterable[jc.JaxprEqn]) -> list[jc.JaxprEqn]:
        ids = {id(e) for e in block}
        return [u for u in self.users(atom) if id(u) not in ids]


def literal_value(atom: Atom) -> float | None:
    """The Python value of a scalar literal, else None."""
    if isinstance(atom, jc.Literal):
        value = np.asarray(atom.val)
        if value.size == 1:
            return float(value.reshape(()))
    return None


# --- canonicalization ------------------------------------------------------------------------

def _shardings_unspecified(params: dict) -> bool:
    # A nested jit that pins shardings carries meaning of its own; only plain ones are inlined.
    for key in ("in_shardings", "out_shardings"):
        for sharding in params.get(key, ()):
            if type(sharding).__name__ not in ("UnspecifiedValue",):
                return False
    return not params.get("donated_invars") or not any(params["donated_invars"])


def _is_inlinable_call(eqn: jc.JaxprEqn) -> bool:
    name = eqn.primitive.name
    if name in ("jit", "pjit"):
        # A fused op's sharding marker must stay whole for the partition pass to find it, and
        # a shared fused call is fused already.
        return (_shardings_unspecified(eqn.params) and not eqn.effects
                and marker_id(eqn) is None and not is_fused_call(eqn))
    return name in ("closed_call", "core_call")


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
    def key(eqn: jc.JaxprEqn, invals: Sequence[Any], in_atoms: Sequence[Atom]) -> Any:
        if eqn.effects or jc.jaxpr_params(eqn) or "rng" in eqn.primitive.name:
            return None
        try:
            params = tuple(sorted((k, _freeze(v)) for k, v in eqn.params.items()))
        except TypeError:
            return None
        operands = []
        for atom, val in zip(in_atoms, invals):
            if isinstance(atom, jc.Literal):
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


def _eval_canonical(jaxpr: jc.Jaxpr, consts: Sequence[Any], args: Sequence[Any], cse) -> list:
    env: dict[jc.Var, Any] = {}

    def read(atom: Atom) -> Any:
        return atom.val if isinstance(atom, jc.Literal) else env[atom]

    for var, val in zip(jaxpr.constvars, consts):
        env[var] = val
    for var, val in zip(jaxpr.invars, args):
        env[var] = val
    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        if _is_inlinable_call(eqn):
            inner = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
            inner_jaxpr, inner_consts = jc.open_and_consts(inner)
            with jc.equation_context(eqn):  # inner equations keep the call's name stack
                outs = _eval_canonical(inner_jaxpr, inner_consts, invals, cse)
        else:
            key = cse.key(eqn, invals, eqn.invars)
            hit = cse.lookup(key)
            if hit is not None:
                outs = hit[0]
            else:
                with jc.equation_context(eqn):
                    outs = eqn.primitive.bind(*invals, **jc.bind_params(eqn))
                if not eqn.primitive.multiple_results:
                    outs = [outs]
                cse.store(key, outs, invals)
        for var, val in zip(eqn.outvars, outs):
            if not isinstance(var, jc.DropVar):
                env[var] = val
    return [read(v) for v in jaxpr.outvars]


def _equation_key(eqn: jc.JaxprEqn) -> Any:
    """What makes two pure equations interchangeable (see :class:`_CommonSubexpressions`)."""
    return _CommonSubexpressions.key(eqn, eqn.invars, eqn.invars)


def _canonical_by_editing(jaxpr: jc.Jaxpr) -> jc.Jaxpr | None:
    """The canonical form, built by editing the jaxpr; None where only a re-trace can build it
    (a ``closed_call``, or a call whose body has constants)."""
    inlined = jc.inline_call_equations(jaxpr, _is_inlinable_call, into_bodies=False)
    if any(_is_inlinable_call(eqn) for eqn in inlined.eqns):
        return None
    return jc.merge_equations(_fold_scalar_conversions(inlined), _equation_key)


def _fold_scalar_conversions(jaxpr: jc.Jaxpr) -> jc.Jaxpr:
    """``convert_element_type`` of a scalar literal becomes a literal, as it does when JAX traces
    it (``jnp.where(c, x, 0.0)`` inside ``jit`` converts its ``0.0``): the passes read constants
    as literals."""
    folded: dict[jc.Var, jc.Literal] = {}
    eqns = []
    for eqn in jaxpr.eqns:
        if any(not isinstance(a, jc.Literal) and a in folded for a in eqn.invars):
            eqn = eqn.replace(invars=[folded.get(a, a) if not isinstance(a, jc.Literal) else a
                                      for a in eqn.invars])
        if (eqn.primitive.name == "convert_element_type" and len(eqn.invars) == 1
                and isinstance(eqn.invars[0], jc.Literal) and np.ndim(eqn.invars[0].val) == 0
                and not isinstance(eqn.outvars[0], jc.DropVar)):
            out = eqn.outvars[0]
            value = np.asarray(eqn.invars[0].val).astype(eqn.params["new_dtype"])
            folded[out] = jc.Literal(value, out.aval)
            continue
        eqns.append(eqn)
    if not folded:
        return jaxpr
    return jaxpr.replace(eqns=eqns, outvars=[folded.get(a, a) if not isinstance(a, jc.Literal)
                                             else a for a in jaxpr.outvars])


def canonicalize(
    jaxpr: jc.Jaxpr, consts: Sequence[Any], *, consts_as_inputs: bool = False
) -> jc.ClosedJaxpr:
    """Inline plain nested jits and merge duplicate pure equations; same inputs and outputs.

    By default ``consts`` stay constants of the result, so the canonical jaxpr has exactly the
    invars of ``jaxpr``. With ``consts_as_inputs`` they become its leading invars instead, which
    lets the caller cache the result without holding on to the constants' values.
    """
    # Editing is several times cheaper than re-tracing, and gives the same jaxpr.
    edited = _canonical_by_editing(jaxpr)
    if edited is not None:
        if consts_as_inputs:
            return jc.ClosedJaxpr(jc.consts_as_invars(edited), [])
        return jc.ClosedJaxpr(edited, list(consts))
    avals = [v.aval for v in jaxpr.invars]
    if consts_as_inputs:
        n_consts = len(consts)

        def run_open(*args):
            cse = _CommonSubexpressions()
            return _eval_canonical(jaxpr, args[:n_consts], args[n_consts:], cse)

        return jc.make_closed_jaxpr(run_open, [v.aval for v in jaxpr.constvars] + avals)

    def run(*args):
        return _eval_canonical(jaxpr, consts, args, _CommonSubexpressions())

    return jc.make_closed_jaxpr(run, avals)
