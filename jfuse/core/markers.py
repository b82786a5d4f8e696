"""jfuse's own markers in a jaxpr: what the ops leave behind and the engine recognises.

The fused ops leave three kinds of marks in the programs they are traced into, and the rewriter,
the canonicalization, the shared calls and the partition pass must recognise them without
knowing the ops:

- **derivative regions**: the ``checkpoint`` around a fused op's tangent rule, carrying a
  :class:`DerivativePolicy` as its policy. The rewriter never rewrites inside one
  (:func:`is_derivative_region`).
- **partition markers**: a nested ``jit`` named ``jfuse_partitionable_<id>`` that a fused op on a
  multi-device mesh emits while jfuse traces (:func:`partition_context`); its body is the op's XLA
  implementation, and :class:`PartitionableCall` (registered under the id) says how to run the op
  per shard, with a *role* per operand for the sharding rules. The partition pass replaces it
  (:func:`marker_id`, :func:`registered_call`).
- **shared fused calls**: a nested ``jit`` named ``jfuse_fused_<pattern>``, one function per
  distinct fused block (:func:`is_fused_call`).

This module holds the names, the recognisers and the registry; :mod:`jfuse.ops` produces the
marks, :mod:`jfuse.shared_calls` the shared calls. It imports nothing from jfuse above
:mod:`jfuse._jax`.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import threading
from typing import Any, Callable, Sequence

import jax

from jfuse._jax import compat

# --- derivative regions ----------------------------------------------------------------------


# Primitives whose output is no larger than their largest input (elementwise math, casts,
# reshapes), and reductions: what a derivative's small values (a norm's per-row statistics) are
# computed with.
_SIZE_PRESERVING = frozenset({
    "add", "sub", "mul", "div", "neg", "max", "min", "pow", "integer_pow", "square", "sqrt",
    "rsqrt", "exp", "exp2", "log", "log1p", "tanh", "logistic", "abs", "sign", "select_n",
    "convert_element_type", "reduce_precision", "copy", "copy_p", "reshape", "squeeze",
    "expand_dims", "stop_gradient",
})
_REDUCTIONS = frozenset({"reduce_sum", "reduce_max", "reduce_min"})


def _output_size(primitive: Any, avals: Sequence[Any], params: dict) -> int | None:
    """How many elements ``primitive``'s output has at most, or None where that is not known
    from its inputs alone."""
    name = getattr(primitive, "name", "")
    sizes = [int(getattr(a, "size", 1)) for a in avals]
    if name in _SIZE_PRESERVING:
        return max(sizes, default=1)
    if name in _REDUCTIONS and avals:
        reduced = 1
        for axis in params.get("axes", ()):
            reduced *= avals[0].shape[axis]
        return sizes[0] // max(reduced, 1)
    return None


class DerivativePolicy:
    """The checkpoint policy of a fused op's tangent; the policy object itself marks the region
    as jfuse's own (:func:`is_derivative_region`).

    By default nothing inside is saved (as ``nothing_saveable``): the backward recomputes the
    region from its inputs. With ``save_at_most=n``, values of at most ``n`` elements are saved
    instead of recomputed: a norm's per-row statistics, which the backward would otherwise
    recompute with a reduction over its whole input (more work, and more for XLA to compile per
    layer), for a few bytes per row.
    """

    def __init__(self, save_at_most: int = 0):
        self.save_at_most = int(save_at_most)

    def __call__(self, primitive, *avals, **params) -> bool:
        if self.save_at_most <= 0:
            return False
        size = _output_size(primitive, avals, params)
        return size is not None and size <= self.save_at_most

    def __eq__(self, other: Any) -> bool:
        return isinstance(other, DerivativePolicy) and other.save_at_most == self.save_at_most

    def __hash__(self) -> int:
        return hash((DerivativePolicy, self.save_at_most))

    def __repr__(self) -> str:
        return f"jfuse_derivative(save_at_most={self.save_at_most})"


def is_derivative_region(eqn: Any) -> bool:
    """True for the ``checkpoint`` equation of a fused op's tangent rule."""
    return isinstance(eqn.params.get("policy"), DerivativePolicy)


# --- shared fused calls ----------------------------------------------------------------------

# The name of the shared functions' ``jit`` equations; the rewriter and the canonicalization
# leave them whole (they are already fused).
FUSED_CALL_PREFIX = "jfuse_fused_"


def fused_call_name(pattern: str) -> str:
    return f"{FUSED_CALL_PREFIX}{pattern}"


def is_fused_call(eqn: Any) -> bool:
    """True for a shared fused call (a ``jit`` named ``jfuse_fused_<pattern>``), also after
    autodiff has renamed it (``jvp(...)``, ``transpose(...)``)."""
    return compat.is_call(eqn) and FUSED_CALL_PREFIX in str(eqn.params.get("name", ""))


# --- partition markers -----------------------------------------------------------------------

MARKER_PREFIX = "jfuse_partitionable_"

# Operand roles the partition rules understand (see jfuse.sharding.rules).
X = "x"  # activations (..., K) or (..., H): leading dims are rows, the last is contracted/normalized
RESIDUAL = "residual"  # added to x before a norm: laid out like x
WEIGHT_KN = "weight_kn"  # (K, N)
WEIGHT_NK = "weight_nk"  # (N, K)
FUSED_WEIGHT = "fused_weight"  # a weight the op slices (GLU's (K, 2N), (K, 2, N)): not split on N
FUSED_WEIGHT_NK = "fused_weight_nk"  # the same with K last (torch-style (2N, K))
BIAS = "bias"  # an output-features vector (N,), maybe as (1, N) or a scalar
FUSED_BIAS = "fused_bias"  # a bias the op slices
FEATURE_VECTOR = "feature_vector"  # a norm's scale or bias over H: replicated
# The roles the shared rows x features layout rule (jfuse.sharding.rules.plan) understands.
ROWS_AND_FEATURES_ROLES = frozenset(
    {X, RESIDUAL, WEIGHT_KN, WEIGHT_NK, FUSED_WEIGHT, FUSED_WEIGHT_NK, BIAS, FUSED_BIAS,
     FEATURE_VECTOR})


@dataclasses.dataclass(frozen=True, eq=False)
class PartitionableCall:
    """How to run one fused-op call per shard. Operands and outputs are flat lists of arrays."""

    pattern: str  # the report's name for it: "linear", "glu", "add_rms_norm", ...
    roles: tuple[str, ...]  # one per flat operand
    operand_avals: tuple[Any, ...]
    contracts_features: bool  # True for matmuls (linear, glu), False for norms
    reference: Callable[..., list]  # the global XLA implementation (replays the user's equations)
    local_reference: Callable[..., list]  # the XLA implementation for any shape, for one shard
    kernel: Callable[[str, bool], Callable[..., list]]  # (backend, interpret) -> flat function
    implementation: str | None
    output_avals: list = dataclasses.field(default_factory=list)  # filled once traced
    # The op's own layout rule, ``(call, operand specs, output avals, mesh) -> Layout | reason``;
    # None: the rows x features rule (jfuse.sharding.rules.plan) that linear, glu and the norms
    # share. An op whose operands play other roles (per-head Q/K/V, labels) declares its own.
    layout_rule: Callable[..., Any] | None = None


class _Depth(threading.local):
    value = 0


_depth = _Depth()
_ids = itertools.count()
# Every marker's call, by id. Global rather than per trace because a fused function's cached
# rewrite can be evaluated again inside a later trace; bounded, oldest first out (a marker whose
# entry is gone simply stays XLA).
_CALLS: collections.OrderedDict[int, PartitionableCall] = collections.OrderedDict()
_MAX_CALLS = 1 << 16


class partition_context:
    """While active (jfuse tracing a function), fused ops on a mesh emit markers."""

    def __enter__(self) -> None:
        _depth.value += 1

    def __exit__(self, *exc) -> None:
        _depth.value -= 1


def partitioning_active() -> bool:
    return _depth.value > 0


def register_call(call: PartitionableCall) -> str:
    """Register ``call``; returns the name its marker's function must carry."""
    uid = next(_ids)
    _CALLS[uid] = call
    while len(_CALLS) > _MAX_CALLS:
        _CALLS.popitem(last=False)
    return f"{MARKER_PREFIX}{uid}"


def registered_call(uid: int) -> PartitionableCall | None:
    return _CALLS.get(uid)


def marker_id(eqn: Any) -> int | None:
    """The id of a marker equation, or None for any other equation."""
    if not compat.is_call(eqn):
        return None
    name = str(eqn.params.get("name", ""))
    if not name.startswith(MARKER_PREFIX):
        return None
    try:
        return int(name[len(MARKER_PREFIX):])
    except ValueError:
        return None


def is_jfuse_region(eqn: Any) -> bool:
    """True for any of jfuse's own marks (a derivative region, a partition marker, a shared fused
    call): regions the rewriter and the canonicalization leave whole."""
    return is_derivative_region(eqn) or marker_id(eqn) is not None or is_fused_call(eqn)


def mesh_of(operands: Sequence[Any]):
    """The multi-device mesh the operands live on, or None for a single-device program: whether
    a fused op's call needs a partition marker (and must not be shared).

    Read from the operands' abstract values (jax.jit puts the mesh of the inputs' shardings
    there). Axes that are all manual (inside the user's own ``shard_map``) count as one device:
    a kernel there already runs per shard.
    """
    for operand in operands:
        sharding = getattr(jax.typeof(operand), "sharding", None)
        mesh = getattr(sharding, "mesh", None)
        if mesh is None or getattr(mesh, "empty", True) or mesh.size <= 1:
            continue
        types = getattr(mesh, "axis_types", ())
        if types and all("Manual" in str(t) for t in types):
            continue
        return mesh
    return None
