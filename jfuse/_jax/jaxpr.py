"""Reading, editing and interpreting jaxprs: the core types and the one evaluator jfuse walks with.

Every jfuse pass over a jaxpr that re-binds its equations (canonicalization, the rewrite, the
XLA replay of a fused block, the partition pass) is :func:`evaluate` with a *rule*: a function
asked about each equation first, which either computes the equation's outputs itself (a fused
call, an inlined body, a merged duplicate, a per-shard kernel) or lets the evaluator re-bind it as
it is. The evaluator owns the environment and the re-binding under each equation's source info;
the rules own what is special. In the spirit of Equinox's jaxpr tools: one small evaluator, the
cases in small rules, version drift in :mod:`jfuse._jax.compat`.

The editing helpers (:func:`inline_call_equations`, :func:`merge_equations`,
:func:`consts_as_invars`) change a jaxpr without re-tracing it, which costs a fraction of a trace.
This module knows nothing about jfuse's patterns, ops or markers: callers pass predicates.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

import jax
import numpy as np
from jax.extend import core as jex_core

from jfuse._jax import compat
from jfuse._jax.source import equation_context

ClosedJaxpr = jex_core.ClosedJaxpr
Jaxpr = jex_core.Jaxpr
JaxprEqn = jex_core.JaxprEqn
Literal = jex_core.Literal
Var = jex_core.Var
DropVar = jex_core.DropVar
Tracer = jax.core.Tracer


# --- reading ---------------------------------------------------------------------------------

def jaxpr_params(eqn: JaxprEqn) -> list[tuple[str, Any]]:
    """(name, value) of every param of ``eqn`` that holds a jaxpr or a tuple of jaxprs."""
    found = []
    for name, value in eqn.params.items():
        if isinstance(value, (ClosedJaxpr, Jaxpr)):
            found.append((name, value))
        elif isinstance(value, tuple) and value and all(
            isinstance(v, (ClosedJaxpr, Jaxpr)) for v in value
        ):
            found.append((name, value))
    return found


def open_and_consts(jaxpr: ClosedJaxpr | Jaxpr) -> tuple[Jaxpr, list[Any]]:
    """Split a jaxpr param into its open jaxpr and its constants."""
    if isinstance(jaxpr, ClosedJaxpr):
        return jaxpr.jaxpr, list(jaxpr.consts)
    return jaxpr, []


def literal_value(atom: Any) -> float | None:
    """The Python value of a scalar literal, else None."""
    if isinstance(atom, Literal):
        value = np.asarray(atom.val)
        if value.size == 1:
            return float(value.reshape(()))
    return None


def call_body(eqn: JaxprEqn) -> ClosedJaxpr | Jaxpr | None:
    """The body of a call-like equation (``jit``, ``closed_call``, remat, custom_jvp/vjp)."""
    key = compat.CALL_BODY_PARAMS.get(eqn.primitive.name)
    return None if key is None else eqn.params.get(key)


def make_closed_jaxpr(fn, avals) -> ClosedJaxpr:
    """Trace ``fn`` on abstract values (weak types kept) to a closed jaxpr."""
    return jax.make_jaxpr(fn)(*avals)


def eval_jaxpr(jaxpr: Jaxpr, consts: Sequence[Any], *args) -> list:
    """``jaxpr`` evaluated on ``consts`` and ``args`` by JAX's own evaluator, under whatever
    transformation is active: how a finished rewrite or a cached kernel trace is run (no rule to
    apply, so JAX's evaluator rather than :func:`evaluate`)."""
    return jax.core.eval_jaxpr(jaxpr, consts, *args)


# --- interpreting ----------------------------------------------------------------------------

class Env:
    """The values of a jaxpr's variables during one evaluation."""

    __slots__ = ("values",)

    def __init__(self):
        self.values: dict[Var, Any] = {}

    def __contains__(self, atom: Any) -> bool:
        return isinstance(atom, Literal) or atom in self.values

    def read(self, atom: Any) -> Any:
        return atom.val if isinstance(atom, Literal) else self.values[atom]

    def read_all(self, atoms: Iterable[Any]) -> list:
        return [self.read(a) for a in atoms]

    def write(self, variables: Iterable[Any], values: Iterable[Any]) -> None:
        for var, value in zip(variables, values):
            if not isinstance(var, DropVar):
                self.values[var] = value


# rule(position, eqn, env) -> the equation's outputs; None to re-bind it as it is; () to leave
# its outputs unset (an equation whose result something else provides, e.g. a fused call).
Rule = Callable[[int, JaxprEqn, Env], "Sequence[Any] | None"]
# between(position, env): runs before each equation and once after the last.
Between = Callable[[int, Env], None]


def bind(eqn: JaxprEqn, invals: Sequence[Any], params: dict | None = None) -> list:
    """``eqn``'s primitive bound on ``invals`` under the equation's own source info (so the user's
    line survives a re-trace); always a list of outputs. ``params`` replace its bind params."""
    with equation_context(eqn):
        return bind_here(eqn, invals, params)


def bind_here(eqn: JaxprEqn, invals: Sequence[Any], params: dict | None = None) -> list:
    """As :func:`bind`, under the caller's context (one that already entered the equation's)."""
    outs = eqn.primitive.bind(*invals, **(compat.bind_params(eqn) if params is None else params))
    return list(outs) if eqn.primitive.multiple_results else [outs]


def run_equations(eqns: Sequence[JaxprEqn], env: Env, rule: Rule | None = None,
                  between: Between | None = None) -> Env:
    """Evaluate ``eqns`` in order into ``env`` (see :func:`evaluate`)."""
    for position, eqn in enumerate(eqns):
        if between is not None:
            between(position, env)
        outs = None if rule is None else rule(position, eqn, env)
        if outs is None:
            outs = bind(eqn, env.read_all(eqn.invars))
        env.write(eqn.outvars, outs)
    if between is not None:
        between(len(eqns), env)
    return env


def evaluate(jaxpr: Jaxpr, consts: Sequence[Any], args: Sequence[Any], rule: Rule | None = None,
             between: Between | None = None) -> list:
    """The outputs of ``jaxpr`` on ``consts`` and ``args``, re-binding equation after equation.

    ``rule`` is asked about each equation first (see :data:`Rule`); ``between`` runs before each
    equation and after the last, where a caller adds values that belong between two equations.
    Under ``jax.make_jaxpr`` this re-traces the jaxpr with the rule's changes.
    """
    env = Env()
    env.write(jaxpr.constvars, consts)
    env.write(jaxpr.invars, args)
    run_equations(jaxpr.eqns, env, rule, between)
    return env.read_all(jaxpr.outvars)


# --- editing ---------------------------------------------------------------------------------

def _renamed(atom: Any, substitution: dict) -> Any:
    return atom if isinstance(atom, Literal) else substitution.get(atom, atom)


def _with_renamed_operands(eqn: JaxprEqn, substitution: dict) -> JaxprEqn:
    if any(not isinstance(a, Literal) and a in substitution for a in eqn.invars):
        return eqn.replace(invars=[_renamed(a, substitution) for a in eqn.invars])
    return eqn


def inline_call_equations(jaxpr: Jaxpr, should_inline, *, into_bodies: bool = True,
                          _memo: dict | None = None) -> Jaxpr:
    """``jaxpr`` with every ``jit`` equation ``should_inline(eqn)`` accepts replaced by its body
    (calls inside an inlined body included), and with ``into_bodies`` also inside the bodies of
    scans, conds, remat regions and other equations that hold jaxprs.

    Edits the jaxpr instead of re-tracing it: fresh variables for each inlined copy, the call's
    name stack in front of each inlined equation's. A call whose body has constants is kept.
    Returns ``jaxpr`` itself when nothing was inlined. A body that several equations hold (the
    same jaxpr object: a shared fused call's branches, a layer's scan body) is edited once.
    """
    if _memo is None:
        _memo = {}
    substitution: dict[Var, Any] = {}
    changed = False
    eqns: list[JaxprEqn] = []
    for eqn in jaxpr.eqns:
        if into_bodies:
            eqn = _with_inlined_bodies(eqn, should_inline, _memo)
        body = eqn.params.get("jaxpr") if compat.is_call(eqn) else None
        inner = body.jaxpr if isinstance(body, ClosedJaxpr) else body
        if (body is None or not should_inline(eqn) or inner.constvars
                or (isinstance(body, ClosedJaxpr) and body.consts)):
            eqns.append(_with_renamed_operands(eqn, substitution))
            continue
        changed = True
        if not into_bodies:  # calls inside the body are inlined too (with bodies, above)
            inner = inline_call_equations(inner, should_inline, into_bodies=False, _memo=_memo)
        renamed: dict[Var, Any] = dict(
            zip(inner.invars, (_renamed(a, substitution) for a in eqn.invars)))
        for inner_eqn in inner.eqns:
            outvars = [v if isinstance(v, DropVar) else Var(v.aval) for v in inner_eqn.outvars]
            eqns.append(inner_eqn.replace(
                invars=[_renamed(a, renamed) for a in inner_eqn.invars],
                outvars=outvars,
                source_info=inner_eqn.source_info.replace(
                    name_stack=eqn.source_info.name_stack + inner_eqn.source_info.name_stack),
            ))
            renamed.update(zip(inner_eqn.outvars, outvars))
        for outer, result in zip(eqn.outvars, inner.outvars):
            if not isinstance(outer, DropVar):
                substitution[outer] = result if isinstance(result, Literal) else renamed[result]
    if not changed and all(e is o for e, o in zip(eqns, jaxpr.eqns)):
        return jaxpr
    return jaxpr.replace(eqns=eqns, outvars=[_renamed(a, substitution) for a in jaxpr.outvars])


def consts_as_invars(jaxpr: Jaxpr) -> Jaxpr:
    """``jaxpr`` with its constvars turned into leading invars (named ``const0``, ...)."""
    info = jaxpr.debug_info
    names = getattr(info, "arg_names", None)
    if names is not None:
        info = info._replace(
            arg_names=tuple(f"const{i}" for i in range(len(jaxpr.constvars))) + tuple(names))
    return jaxpr.replace(constvars=[], invars=[*jaxpr.constvars, *jaxpr.invars], debug_info=info)


def merge_equations(jaxpr: Jaxpr, key) -> Jaxpr:
    """``jaxpr`` with each equation whose ``key(eqn)`` (not None) equals an earlier one's
    dropped and its results read from the earlier one's (common-subexpression elimination).

    ``key`` sees the equation with its operands already renamed, so chains of duplicates merge.
    Returns ``jaxpr`` itself when nothing merged.
    """
    substitution: dict[Var, Any] = {}
    seen: dict[Any, JaxprEqn] = {}
    eqns: list[JaxprEqn] = []
    for eqn in jaxpr.eqns:
        eqn = _with_renamed_operands(eqn, substitution)
        k = key(eqn)
        earlier = seen.get(k) if k is not None else None
        if earlier is not None and all(not isinstance(v, DropVar) for v in earlier.outvars):
            for var, result in zip(eqn.outvars, earlier.outvars):
                if not isinstance(var, DropVar):
                    substitution[var] = result
            continue
        if k is not None:
            seen[k] = eqn
        eqns.append(eqn)
    if len(eqns) == len(jaxpr.eqns) and all(e is o for e, o in zip(eqns, jaxpr.eqns)):
        return jaxpr
    return jaxpr.replace(
        eqns=eqns, outvars=[_renamed(a, substitution) for a in jaxpr.outvars])


def replace_literals(jaxpr: Jaxpr, fold: Callable[[JaxprEqn], "Literal | None"]) -> Jaxpr:
    """``jaxpr`` with each single-output equation ``fold`` turns into a literal dropped, and its
    readers reading that literal. Returns ``jaxpr`` itself when nothing was folded."""
    folded: dict[Var, Literal] = {}
    eqns = []
    for eqn in jaxpr.eqns:
        eqn = _with_renamed_operands(eqn, folded)
        literal = fold(eqn) if len(eqn.outvars) == 1 else None
        if literal is not None and not isinstance(eqn.outvars[0], DropVar):
            folded[eqn.outvars[0]] = literal
            continue
        eqns.append(eqn)
    if not folded:
        return jaxpr
    return jaxpr.replace(eqns=eqns, outvars=[_renamed(a, folded) for a in jaxpr.outvars])


def _with_inlined_bodies(eqn: JaxprEqn, should_inline, memo: dict) -> JaxprEqn:
    """``eqn`` with calls inlined inside its bodies. ``memo`` maps a body already edited in this
    walk (by identity: it holds the body, so the id is not reused) to its edited form."""
    params = {}
    for name, value in jaxpr_params(eqn):
        bodies = value if isinstance(value, tuple) else (value,)
        new = []
        for body in bodies:
            open_jaxpr, consts = open_and_consts(body)
            hit = memo.get(id(open_jaxpr))
            if hit is None:
                hit = memo[id(open_jaxpr)] = (open_jaxpr, inline_call_equations(
                    open_jaxpr, should_inline, into_bodies=True, _memo=memo))
            inlined = hit[1]
            new.append(body if inlined is open_jaxpr else (
                ClosedJaxpr(inlined, consts) if isinstance(body, ClosedJaxpr) else inlined))
        if any(n is not b for n, b in zip(new, bodies)):
            params[name] = tuple(new) if isinstance(value, tuple) else new[0]
    return eqn.replace(params={**eqn.params, **params}) if params else eqn
