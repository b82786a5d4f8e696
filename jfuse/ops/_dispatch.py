"""Choosing an implementation for a fused op: XLA, a Pallas kernel, or a kernel in interpret mode.

The tokamax model, simplified: each op has an XLA reference and per-platform Pallas kernels. A
kernel that cannot serve its inputs raises ``NotImplementedError`` with the reason at trace time;
with ``implementation=None`` the op then uses the XLA reference instead. ``None`` picks per
platform at lowering time through ``lax.platform_dependent``, so one traced program lowers to the
TPU kernel for TPU, the Triton kernel for CUDA and XLA elsewhere.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any, Callable, Hashable

import jax
from jax import lax

from jfuse.config import IMPLEMENTATIONS
from jfuse._jax import jaxpr as jx
from jfuse.core import targets
from jfuse.ops import _partitionable

Impl = Callable[[], object]


def check_implementation(implementation: str | None) -> None:
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"implementation={implementation!r} is not supported; expected one of {IMPLEMENTATIONS}."
        )


def _or_reference(kernel: Impl, reference: Impl) -> Impl:
    # Silent on purpose: this branch is traced on every platform (a CPU run traces the TPU branch
    # too), so a warning here would be noise. The fusion report names the refusal instead.
    def run():
        try:
            return kernel()
        except NotImplementedError:
            return reference()

    return run


@dataclasses.dataclass(frozen=True)
class OpCall:
    """One fused-op call, as functions of its operands (a tuple that may hold None).

    ``reference`` is the XLA implementation at these shapes (inside a rewrite it replays the
    user's equations); ``local_reference`` is the XLA implementation for any shapes (what one
    shard runs when its kernel refuses); ``kernel(backend, interpret)`` returns the Pallas one.
    ``roles`` name each operand for the sharding rules (see :mod:`jfuse.core.markers`).
    """

    pattern: str
    operands: tuple
    roles: tuple
    contracts_features: bool
    reference: Callable[..., Any]
    local_reference: Callable[..., Any]
    kernel: Callable[[str, bool], Callable[..., Any]]
    layout_rule: Callable[..., Any] | None = None  # see jfuse.core.markers.PartitionableCall


def dispatch(implementation: str | None, call: OpCall):
    """Run the implementation ``implementation`` names (see module docstring).

    On a multi-device mesh a kernel cannot be partitioned by XLA. While jfuse traces, the call
    becomes a marker the partition pass turns into per-shard kernels; elsewhere (a fused op
    called inside the user's own ``jax.jit`` on a mesh) the XLA implementation runs, unless
    ``implementation="pallas"`` forces the kernels.
    """
    check_implementation(implementation)
    operands = call.operands
    if implementation == "xla":
        return call.reference(*operands)
    mesh = _partitionable.mesh_of(jax.tree_util.tree_leaves(operands))
    if mesh is not None:
        if _partitionable.partitioning_active():
            return _marker(implementation, call)
        if implementation is None:
            return call.reference(*operands)
    if implementation == "interpret":  # plain XLA ops: XLA partitions it like any other
        return call.kernel("tpu", True)(*operands)

    def kernel(backend: str) -> Impl:
        return lambda: call.kernel(backend, False)(*operands)

    def reference():
        return call.reference(*operands)

    if implementation == "pallas":
        # A refusal on the platform this program runs on is an error the caller asked to see.
        # Both branches are traced on every platform, so the other one falls back quietly (a TPU
        # kernel refusing f16 must not stop the GPU's).
        backend = jax.default_backend()
        tpu = kernel("tpu") if backend == "tpu" else _or_reference(kernel("tpu"), reference)
        gpu = (kernel("triton") if backend == "gpu"
               else _or_reference(kernel("triton"), reference))
    else:
        tpu = _or_reference(kernel("tpu"), reference)
        gpu = _or_reference(kernel("triton"), reference)
    # Only the kernels of the platforms this program may be lowered for (see jfuse.core.targets).
    branches = {name: branch for name, branch in (("tpu", tpu), ("cuda", gpu))
                if targets.wanted(name)}
    if not branches:
        return reference()
    return lax.platform_dependent(**branches, default=reference)


def _marker(implementation: str | None, call: OpCall):
    """The call as a marker for the partition pass; its body is safe under any sharding."""
    leaves, in_tree = jax.tree_util.tree_flatten(call.operands)
    roles = tuple(role for operand, role in zip(call.operands, call.roles) if operand is not None)
    out_tree: dict[str, Any] = {}  # every implementation returns the same structure

    def flat(fn: Callable[..., Any]) -> Callable[..., list]:
        def run(*flat_operands):
            outs = fn(*jax.tree_util.tree_unflatten(in_tree, flat_operands))
            flat_outs, out_tree["tree"] = jax.tree_util.tree_flatten(outs)
            return flat_outs

        return run

    body = flat(call.reference)  # what runs if the pass declines: XLA partitions it
    entry = _partitionable.PartitionableCall(
        pattern=call.pattern,
        roles=roles,
        operand_avals=tuple(jax.typeof(leaf) for leaf in leaves),
        contracts_features=call.contracts_features,
        reference=body,
        local_reference=flat(call.local_reference),
        kernel=lambda backend, interpret: flat(call.kernel(backend, interpret)),
        implementation=implementation,
        layout_rule=call.layout_rule,
    )
    outs = _partitionable.emit_marker(entry, body, leaves)
    entry.output_avals.extend(jax.typeof(out) for out in outs)
    return jax.tree_util.tree_unflatten(out_tree["tree"], outs)


# Kernel traces by (op config, operand types). Tracing a Pallas kernel is the dominant cost of a
# rewrite (every site traces its TPU and GPU kernels, even on CPU, so the program can be lowered
# for either); the layers of a model repeat the same few configurations. A cached trace is
# re-emitted by evaluating its jaxpr, inline, so each site still lowers to its own kernel call.
_TRACES: collections.OrderedDict[Any, Any] = collections.OrderedDict()
_MAX_TRACES = 512


def cached_trace(key: Hashable, fn: Callable, *operands):
    """``fn(*operands)``, tracing ``fn`` once per ``key`` and operand types."""
    leaves, treedef = jax.tree_util.tree_flatten(operands)
    # The context's abstract mesh is part of the key: kernel lowerings read the device it names.
    context = str(jax.sharding.get_abstract_mesh())
    full_key = (key, context, treedef, tuple(jax.typeof(leaf) for leaf in leaves))
    entry = _TRACES.get(full_key)
    if entry is None:
        closed, out_shape = jax.make_jaxpr(lambda *a: fn(*a), return_shape=True)(*operands)
        entry = (closed, jax.tree_util.tree_structure(out_shape))
        _TRACES[full_key] = entry
        while len(_TRACES) > _MAX_TRACES:
            _TRACES.popitem(last=False)
    else:
        _TRACES.move_to_end(full_key)
    closed, out_tree = entry
    outs = jx.eval_jaxpr(closed.jaxpr, closed.consts, *leaves)
    return jax.tree_util.tree_unflatten(out_tree, outs)
