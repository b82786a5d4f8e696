"""Choosing an implementation for a fused op: XLA, a Pallas kernel, or a kernel in interpret mode.

The tokamax model, simplified: each op has an XLA reference and per-platform Pallas kernels. A
kernel that cannot serve its inputs raises ``NotImplementedError`` with the reason at trace time;
with ``implementation=None`` the op then uses the XLA reference instead. ``None`` picks per
platform at lowering time through ``lax.platform_dependent``, so one traced program lowers to the
TPU kernel for TPU, the Triton kernel for CUDA and XLA elsewhere.
"""

from __future__ import annotations

import collections
from typing import Any, Callable, Hashable

import jax
from jax import lax

from jfuse.config import IMPLEMENTATIONS

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


def dispatch(
    implementation: str | None,
    *,
    reference: Impl,
    tpu_kernel: Impl,
    gpu_kernel: Impl,
    interpret_kernel: Impl,
):
    """Run the implementation ``implementation`` names (see module docstring)."""
    check_implementation(implementation)
    if implementation == "xla":
        return reference()
    if implementation == "interpret":
        return interpret_kernel()
    if implementation == "pallas":
        tpu, gpu = tpu_kernel, gpu_kernel  # a refusal is an error the caller asked to see
    elif multi_device_reason() is not None:
        return reference()
    else:
        tpu = _or_reference(tpu_kernel, reference)
        gpu = _or_reference(gpu_kernel, reference)
    return lax.platform_dependent(tpu=tpu, cuda=gpu, default=reference)


def multi_device_reason() -> str | None:
    """Why kernels are not used by default here: they are not partitioned yet.

    XLA cannot partition a Pallas kernel ("Mosaic kernels cannot be automatically partitioned"),
    so under a mesh a kernel would break the program. Until the fused ops partition themselves,
    ``implementation=None`` uses XLA when the runtime has more than one device (the fused op and
    its lean backward still apply). ``implementation="pallas"`` forces the kernels.
    """
    count = jax.device_count()
    if count > 1:
        return f"{count} devices: the fused kernels are not partitioned under a mesh yet"
    return None


# Kernel traces by (op config, operand types). Tracing a Pallas kernel is the dominant cost of a
# rewrite (every site traces its TPU and GPU kernels, even on CPU, so the program can be lowered
# for either); the layers of a model repeat the same few configurations. A cached trace is
# re-emitted with eval_jaxpr, inline, so each site still lowers to its own kernel call.
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
    outs = jax.core.eval_jaxpr(closed.jaxpr, closed.consts, *leaves)
    return jax.tree_util.tree_unflatten(out_tree, outs)
