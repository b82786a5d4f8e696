"""Recognize an elementwise function of one value by what it computes, not how it is spelled.

Activations reach a jaxpr in many spellings: ``jax.nn.silu`` (an inlined jit), ``x *
sigmoid(x)``, ``x / (1 + exp(-x))``; GELU as JAX writes it, as PyTorch users write it, with bf16
constants; upcasts to f32 around any of them. Instead of a template per spelling, this module
collects the region of elementwise equations that depends on one value ``v`` and nothing else
(literals aside), and evaluates candidate exits of that region in float64 on probe points spread
over [-12, 12] (with :mod:`jfuse.core.probe`, the evaluator the norm pass shares). A candidate is the activation whose float64 reference it matches within the
rounding of the narrowest dtype the region computes in.

ReLU is the one activation whose derivative convention at 0 differs between spellings, so it is
recognized by structure only: ``jax.nn.relu`` (custom_jvp, derivative 0 at 0), ``where(x > 0, x,
0)`` (0 at 0) and ``max(x, 0)`` (0.5 at 0, JAX's tie rule) each map to the activation with the
same derivative.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax.numpy as jnp
import numpy as np

from jfuse._jax import jaxpr as jx
from jfuse._jax import compat
from jfuse._jax.source import is_jax_nn_function
from jfuse.core import probe
from jfuse.core.probe import erf, sigmoid
from jfuse.graph import Graph, literal_value

# float64 references of the smooth activations (see jfuse.core.activations for the kernels').
SMOOTH_REFERENCES: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "silu": lambda x: x * sigmoid(x),
    "sigmoid": sigmoid,
    "tanh": np.tanh,
    "gelu": lambda x: 0.5 * x * (1.0 + erf(x / math.sqrt(2.0))),
    "gelu_tanh": lambda x: 0.5
    * x
    * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3))),
}

_PROBE = np.concatenate([np.linspace(-12.0, 12.0, 193), [-0.3, 0.7, 1.9, -2.6]])

def _is_relu_custom_jvp(eqn: jx.JaxprEqn) -> bool:
    """``jax.nn.relu`` itself: its custom_jvp (derivative 0 at 0) around max(x, 0)."""
    if eqn.primitive.name != compat.CUSTOM_JVP_PRIMITIVE:
        return False
    if not is_jax_nn_function(eqn, "relu"):
        return False
    body, _ = jx.open_and_consts(eqn.params["call_jaxpr"])
    while len(body.eqns) == 1 and compat.is_call(body.eqns[0]):
        body, _ = jx.open_and_consts(body.eqns[0].params["jaxpr"])
    return (
        len(body.eqns) == 1
        and body.eqns[0].primitive.name == "max"
        and literal_value(body.eqns[0].invars[1]) == 0.0
    )


def _is_float(aval) -> bool:
    return jnp.issubdtype(aval.dtype, jnp.floating)


def _region_member(eqn: jx.JaxprEqn, shape: tuple) -> bool:
    name = eqn.primitive.name
    if eqn.effects or len(eqn.outvars) != 1 or tuple(eqn.outvars[0].aval.shape) != shape:
        return False
    if name == "convert_element_type":
        return _is_float(eqn.invars[0].aval) and _is_float(eqn.outvars[0].aval)
    if name in probe.ELEMENTWISE:
        return True
    return _is_relu_custom_jvp(eqn)


@dataclasses.dataclass
class UnaryFunction:
    """A recognized activation: ``output = activation(v)`` computed by ``eqns``."""

    activation: str
    output: jx.Var
    eqns: list[jx.JaxprEqn]


class _Region:
    """Equations reachable from ``v`` that read only ``v``, each other and constants."""

    def __init__(self, graph: Graph, v: jx.Var, max_eqns: int):
        self.graph = graph
        self.v = v
        self.eqns: list[jx.JaxprEqn] = []
        self.constants: dict[jx.Var, float] = {}  # scalar broadcasts feeding the region
        self.constant_eqns: dict[jx.Var, jx.JaxprEqn] = {}
        members: set[jx.Var] = {v}
        frontier = [v]
        seen: set[int] = set()
        while frontier and len(self.eqns) < max_eqns:
            var = frontier.pop()
            for user in graph.users(var):
                if id(user) in seen or not _region_member(user, tuple(v.aval.shape)):
                    continue
                if all(self._operand_ok(a, members) for a in user.invars):
                    seen.add(id(user))
                    self.eqns.append(user)
                    members.add(user.outvars[0])
                    frontier.append(user.outvars[0])
        self.eqns.sort(key=graph.position)

    def _operand_ok(self, atom: Any, members: set) -> bool:
        if isinstance(atom, jx.Literal):
            return literal_value(atom) is not None
        if atom in members:
            return True
        producer = self.graph.producer(atom)
        if (
            producer is not None
            and producer.primitive.name == "broadcast_in_dim"
            and literal_value(producer.invars[0]) is not None
        ):
            self.constants[atom] = literal_value(producer.invars[0])
            self.constant_eqns[atom] = producer
            return True
        return False

    def scalar(self, atom: Any) -> float | None:
        """The value of a scalar literal or of a broadcast scalar constant, else None."""
        if isinstance(atom, jx.Literal):
            return literal_value(atom)
        return self.constants.get(atom)

    def ancestors(self, out: jx.Var) -> list[jx.JaxprEqn]:
        return self.graph.ancestors_within(out, self.eqns)

    def evaluate(self, eqns: list[jx.JaxprEqn], x: np.ndarray) -> np.ndarray | None:
        return probe.probe(eqns, {self.v: x}, self.constants, _relu_value)


def _relu_value(eqn: jx.JaxprEqn, args: list) -> np.ndarray | None:
    """``jax.nn.relu``'s custom_jvp, which the probe's table does not know, in float64."""
    return np.maximum(args[0], 0.0) if _is_relu_custom_jvp(eqn) else None


def _rounding_tolerance(eqns: list[jx.JaxprEqn], v: jx.Var) -> float:
    """Relative tolerance: a few ulps of the narrowest float dtype the region computes in."""
    eps = np.finfo(np.float64).eps
    for aval in [v.aval] + [e.outvars[0].aval for e in eqns]:
        try:
            eps = max(eps, float(jnp.finfo(aval.dtype).eps))
        except (TypeError, ValueError):
            pass
    # f32 regions: 1e-5 separates gelu from gelu_tanh (they differ by ~1e-3); bf16: 0.05.
    return max(1e-9, 8.0 * eps) if eps < 1e-6 else 6.0 * eps


def _relu_by_structure(region: "_Region", eqns: list[jx.JaxprEqn], v: jx.Var) -> str | None:
    """Which ReLU (by derivative convention) a block is, if it is exactly one known spelling."""
    names = [e.primitive.name for e in eqns]
    if names == ["custom_jvp_call"] and _is_relu_custom_jvp(eqns[0]):
        return "relu"
    if names == ["max"]:
        a, b = eqns[0].invars
        other = b if a is v else a
        if (a is v or b is v) and region.scalar(other) == 0.0:
            return "relu_max"
    if len(eqns) == 2 and names == ["gt", "select_n"]:
        gt, sel = eqns
        if gt.invars[0] is v and region.scalar(gt.invars[1]) == 0.0 and sel.invars[0] is gt.outvars[0]:
            # where(v > 0, v, 0) binds select_n(pred, 0, v): the derivative at 0 is 0.
            if sel.invars[2] is v and region.scalar(sel.invars[1]) == 0.0:
                return "relu"
    return None


_AFFINE = {"add", "sub", "mul", "div", "neg", "convert_element_type", "copy", "copy_p"}


def unrecognized_activation(graph: Graph, v: jx.Var, max_eqns: int = 48) -> str | None:
    """When ``v`` feeds a nonlinear elementwise block that is no known activation, its primitives.

    Affine steps alone (scaling, shifting, casting) are not an activation and return None.
    """
    if not _is_float(v.aval):
        return None
    names = {e.primitive.name for e in _Region(graph, v, max_eqns).eqns}
    for user in graph.users(v):  # primitives the probe cannot evaluate (sin, softplus's log1p...)
        if (len(user.outvars) == 1 and user.outvars[0].aval.shape == v.aval.shape
                and not jx.jaxpr_params(user)
                and all(a is v or isinstance(a, jx.Literal) for a in user.invars)):
            names.add(user.primitive.name)
    return ", ".join(sorted(names - _AFFINE)) or None


def activation_hidden_by_shared_intermediates(graph: Graph, v: jx.Var, max_eqns: int = 48):
    """(activation, readers) when a known activation follows ``v`` but some of its intermediates
    are read elsewhere (typically by the backward of a gradient taken before jfuse saw it)."""
    if not _is_float(v.aval):
        return None
    region = _Region(graph, v, max_eqns)
    for candidate in reversed(region.eqns):
        eqns = region.ancestors(candidate.outvars[0])
        activation = _identify(region, eqns, v)
        if activation is not None:
            readers = [r for e in eqns[:-1] for r in graph.readers_outside(e.outvars[0], eqns)]
            return activation, readers
    return None


def match_activation(graph: Graph, v: jx.Var, max_eqns: int = 48) -> UnaryFunction | None:
    """The largest block downstream of ``v`` that computes a known activation of ``v``.

    The block's intermediates must be read only inside the block; its output may be read
    anywhere. Returns None if no such block computes a supported activation.
    """
    if not _is_float(v.aval):
        return None
    region = _Region(graph, v, max_eqns)
    if not region.eqns:
        return None
    for candidate in reversed(region.eqns):
        out = candidate.outvars[0]
        eqns = region.ancestors(out)
        internal = [e.outvars[0] for e in eqns if e.outvars[0] is not out]
        if not all(graph.read_only_within(var, eqns) for var in internal):
            continue
        activation = _identify(region, eqns, v)
        if activation is not None:
            constant_eqns = [
                region.constant_eqns[a]
                for e in eqns
                for a in e.invars
                if isinstance(a, jx.Var)
                and a in region.constant_eqns
                and graph.read_only_within(a, eqns)
            ]
            unique = {id(e): e for e in eqns + constant_eqns}
            return UnaryFunction(activation, out, sorted(unique.values(), key=graph.position))
    return None


def _identify(region: _Region, eqns: list[jx.JaxprEqn], v: jx.Var) -> str | None:
    relu = _relu_by_structure(region, eqns, v)
    if relu is not None:
        return relu
    names = {e.primitive.name for e in eqns}
    if names & {"max", "min", "select_n", "custom_jvp_call", "sign", "abs"}:
        return None  # piecewise: only the exact ReLU spellings above are trusted
    got = region.evaluate(eqns, _PROBE)
    if got is None or not np.all(np.isfinite(got)):
        return None
    tol = _rounding_tolerance(eqns, v)
    best, best_err = None, math.inf
    for name, ref in SMOOTH_REFERENCES.items():
        want = ref(_PROBE)
        err = float(np.max(np.abs(got - want) / (1.0 + np.abs(want))))
        if err < best_err:
            best, best_err = name, err
    if best_err > tol:
        return None
    # bf16 rounding can blur gelu and gelu_tanh: let the spelling decide between them.
    if best in ("gelu", "gelu_tanh") and tol > 1e-4:
        if "tanh" in names:
            best = "gelu_tanh"
        elif names & {"erf", "erfc"}:
            best = "gelu"
    return best
