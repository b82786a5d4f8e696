"""Count the blocks of a traced function that mean one of jfuse's patterns, without the matcher.

The census is deliberately cruder than the passes and independent of them: it looks for the one
equation every spelling of a pattern must have, with the structure around it that gives it that
meaning, and never asks whether the block could be fused. A test then checks that every block it
finds was either fused or reported as a miss (``tests/test_no_silent_misses.py``): a block the
census finds that is in neither is a silent miss.

- ``norm``: a ``rsqrt``, ``sqrt`` or ``pow(·, -0.5)`` of something computed from a ``reduce_sum``.
- ``glu``: a ``mul`` of two values computed from two different matmuls that read a common
  operand, one of them through a nonlinearity (the gate).
- ``attention``: a matmul reading an ``exp`` of matmul scores that is normalized like a softmax
  (a ``reduce_max`` before it or a ``reduce_sum`` of it).
- ``linear_cross_entropy``: a ``log`` of a ``reduce_sum`` of an ``exp`` of a matmul's output
  (a logsumexp over logits).

Calls (``jit``, custom_jvp/vjp, remat) are inlined so a walk crosses them; the bodies of
``scan``/``while``/``cond`` are censused on their own, as jfuse rewrites them.
"""

from __future__ import annotations

import collections
from typing import Any

import jax

from jfuse._jax import compat
from jfuse._jax import jaxpr as jx

_DEPTH = 14  # how many equations a walk back follows: a block is local
_NONLINEAR = {"logistic", "tanh", "erf", "erfc", "exp", "max", "select_n", "erf_inv"}
_STOP = {"dot_general", "reduce_sum", "reduce_max", "gather", "scatter-add", "cumsum"}


class _Eqn:
    """A flattened equation: calls inlined, vars renamed to outer ones where a body reads them."""

    def __init__(self, name: str, invars: list, outvars: list, params: dict):
        self.name, self.invars, self.outvars, self.params = name, invars, outvars, params


class _Fresh:
    """A variable of an inlined body: bodies are shared between calls (every layer's
    ``jax.nn.silu`` is the same jaxpr), so their variables are renamed per call."""


def _flatten(jaxpr: jx.Jaxpr, rename: dict, eqns: list, bodies: list, fresh=False) -> None:
    for eqn in jaxpr.eqns:
        invars = [rename.get(a, a) if isinstance(a, jx.Var) else a for a in eqn.invars]
        body = jx.call_body(eqn)
        if body is not None and eqn.primitive.name not in compat.CONTROL_FLOW_PRIMITIVES:
            inner, _ = jx.open_and_consts(body)
            if len(inner.invars) == len(invars) and len(inner.outvars) == len(eqn.outvars):
                inner_rename = dict(zip(inner.invars, invars))
                _flatten(inner, inner_rename, eqns, bodies, fresh=True)
                for out, inner_out in zip(eqn.outvars, inner.outvars):
                    rename[out] = inner_rename.get(inner_out, inner_out)
                continue
        for _, value in jx.jaxpr_params(eqn):
            for sub in value if isinstance(value, tuple) else (value,):
                bodies.append(jx.open_and_consts(sub)[0])
        outvars = list(eqn.outvars)
        if fresh:
            outvars = [rename.setdefault(v, _Fresh()) for v in outvars]
        eqns.append(_Eqn(eqn.primitive.name, invars, outvars, eqn.params))


class _Graph:
    def __init__(self, eqns: list[_Eqn]):
        self.eqns = eqns
        self.producer = {v: e for e in eqns for v in e.outvars}
        self.readers = collections.defaultdict(list)
        for e in eqns:
            for a in e.invars:
                if not isinstance(a, jx.Literal):
                    self.readers[a].append(e)

    def behind(self, var: Any, stop=_STOP) -> list[_Eqn]:
        """The equations within ``_DEPTH`` steps behind ``var``, not walking through ``stop``
        primitives (which are included but not passed)."""
        found, stack, seen = [], [(var, 0)], set()
        while stack:
            v, depth = stack.pop()
            e = self.producer.get(v) if not isinstance(v, jx.Literal) else None
            if e is None or id(e) in seen or depth > _DEPTH:
                continue
            seen.add(id(e))
            found.append(e)
            if e.name not in stop:
                stack.extend((a, depth + 1) for a in e.invars)
        return found


def _dots(eqns) -> list[_Eqn]:
    return [e for e in eqns if e.name == "dot_general"]


def _census_one(graph: _Graph) -> collections.Counter:
    counts: collections.Counter = collections.Counter()
    for e in graph.eqns:
        if e.name in ("rsqrt", "sqrt") or (
                e.name == "pow" and jx.literal_value(e.invars[1]) == -0.5):
            if any(b.name == "reduce_sum" for b in graph.behind(e.invars[0])):
                counts["norm"] += 1
        elif e.name == "mul" and not any(isinstance(a, jx.Literal) for a in e.invars):
            sides = [graph.behind(a) for a in e.invars]
            dots = [_dots(s) for s in sides]
            gated = any(b.name in _NONLINEAR for s in sides for b in s)
            if gated and any(
                    d1 is not d2 and set(map(id, d1.invars)) & set(map(id, d2.invars))
                    for d1 in dots[0] for d2 in dots[1]):
                counts["glu"] += 1
        elif e.name == "dot_general":
            for operand in e.invars:
                exps = [b for b in graph.behind(operand) if b.name == "exp"]
                if any(_softmax_like(graph, x) for x in exps):
                    counts["attention"] += 1
                    break
        elif e.name == "log":
            sums = [b for b in graph.behind(e.invars[0]) if b.name == "reduce_sum"]
            for s in sums:
                exps = [b for b in graph.behind(s.invars[0]) if b.name == "exp"]
                if any(_dots(graph.behind(x.invars[0])) for x in exps):
                    counts["linear_cross_entropy"] += 1
                    break
    return counts


def _softmax_like(graph: _Graph, exp: _Eqn) -> bool:
    before = graph.behind(exp.invars[0])
    if not _dots(before):
        return False
    if any(b.name == "reduce_max" for b in before):
        return True
    return any(r.name == "reduce_sum" for r in graph.readers[exp.outvars[0]])


def census(fn, *args) -> collections.Counter:
    """Blocks of ``fn(*args)`` by meaning: {"norm", "glu", "attention", "linear_cross_entropy"}."""
    closed = jax.make_jaxpr(fn)(*args)
    total: collections.Counter = collections.Counter()
    pending = [closed.jaxpr]
    while pending:
        eqns: list = []
        _flatten(pending.pop(), {}, eqns, pending)
        total += _census_one(_Graph(eqns))
    return total
