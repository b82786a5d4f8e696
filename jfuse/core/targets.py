"""The platforms a program is being traced for, when jfuse knows them.

A fused op picks its kernel per platform at lowering time (``lax.platform_dependent``), so one
traced program lowers for CPU, TPU or GPU: ``jax.jit(f).trace(x).lower(lowering_platforms=
("tpu",))`` from a CPU works. The price is that every trace traces every platform's kernel,
even on a machine that has none of them (0.27M Python calls, ~0.5 s per compile of a
Llama-style step, fixed, measured in ``benchmarks/rewrite_cost.py``'s README section).

A call ``jfuse.jit(f)(x)`` (or ``.lower(x)``, ``.eval_shape(x)``) with concrete arguments can
only run where those arguments live: the default backend's platform, or the devices an argument
is committed to. There jfuse traces with :func:`lowering_for` those platforms, and the fused ops
trace only their kernels (an XLA-only platform: no ``platform_dependent`` at all). ``.trace()``,
``jfuse.fuse``, a call under another transformation (tracer arguments) and a call with arguments
spread over several devices (a mesh) keep every platform.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Iterable, Iterator

import jax

from jfuse._jax import jaxpr as jx

# The lowering platform names (``lax.platform_dependent``'s keywords) of each JAX backend.
_BACKEND_PLATFORMS = {"cpu": ("cpu",), "gpu": ("cuda", "rocm"), "cuda": ("cuda",),
                      "rocm": ("rocm",), "tpu": ("tpu",)}

_targets: contextvars.ContextVar[frozenset[str] | None] = contextvars.ContextVar(
    "jfuse_lowering_targets", default=None)


@contextlib.contextmanager
def lowering_for(platforms: Iterable[str] | None) -> Iterator[None]:
    """Within the block, the program traced will be lowered only for ``platforms`` (lowering
    names: "cpu", "cuda", "rocm", "tpu"); None: any platform."""
    token = _targets.set(None if platforms is None else frozenset(platforms))
    try:
        yield
    finally:
        _targets.reset(token)


def wanted(platform: str) -> bool:
    """Whether the program being traced may be lowered for ``platform``."""
    targets = _targets.get()
    return targets is None or platform in targets


def platforms_of_call(leaves: Iterable[object]) -> frozenset[str] | None:
    """The platforms a call with these argument leaves runs on, or None when that cannot be known
    here (a tracer: the call is inside another trace, whose lowering may be for any platform)."""
    backends = {jax.default_backend()}
    for leaf in leaves:
        if isinstance(leaf, jx.Tracer):
            return None
        if isinstance(leaf, jax.Array):  # uncommitted arrays are on the default backend too
            try:
                devices = leaf.devices()
            except Exception:  # noqa: BLE001 (a deleted or odd array: keep every platform)
                return None
            if len(devices) > 1:
                # On a mesh the partition pass lays each kernel out per shard, and inside a
                # scan the kernels' derivatives are what keep their markers whole (XLA's own
                # derivative would let scan prune a marker's outputs): every platform, as the
                # multi-device tests check it.
                return None
            backends |= {device.platform for device in devices}
    platforms: set[str] = set()
    for backend in backends:
        if backend not in _BACKEND_PLATFORMS:
            return None  # a plugin backend jfuse does not know: keep every platform
        platforms |= set(_BACKEND_PLATFORMS[backend])
    return frozenset(platforms)
