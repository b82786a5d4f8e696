"""The platforms a program is being traced for, when jfuse knows them.

A fused op picks its kernel per platform at lowering time (``lax.platform_dependent``), so one
traced program lowers for CPU, TPU or GPU: ``jax.jit(f).trace(x).lower(lowering_platforms=
("tpu",))`` from a CPU works. The price is that every trace traces every platform's kernel,
even on a machine that has none of them (0.27M Python calls, ~0.5 s per compile of a
Llama-style step, fixed, measured in ``benchmarks/rewrite_cost.py``'s README section).

A call ``jfuse.jit(f)(x)`` (or ``.lower(x)``, ``.eval_shape(x)``) made outside any trace can
only run where its arguments live: the default backend's platform, or the devices an argument
is committed to. There jfuse traces with :func:`lowering_for` those platforms, and the fused ops
trace only their kernels (an XLA-only platform: no ``platform_dependent`` at all). ``.trace()``,
``jfuse.fuse`` on its own, a call inside another trace, and a call whose arguments or jit
keywords lay it out over several devices (a mesh) keep every platform. A function fused inside
such a trace (the loss ``jax.grad`` differentiates) inherits its platforms.
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


def current() -> frozenset[str] | None:
    """The platforms the program being traced may be lowered for (None: any)."""
    return _targets.get()


# jax.jit keywords that place the program themselves: the arguments no longer say where it runs.
_PLACING_KEYWORDS = ("in_shardings", "out_shardings", "device", "backend")


def platforms_of_call(leaves: Iterable[object], jit_kwargs: dict | None = None
                      ) -> frozenset[str] | None:
    """The platforms a jfuse.jit call with these argument leaves runs on, or None when that
    cannot be told here: a tracer (the call is inside another trace), an argument or jit keyword
    laid out over several devices or placed explicitly (a mesh: the partition pass lays each
    kernel out per shard, and inside a scan the kernels' derivatives keep their markers whole, so
    every platform is kept, as the multi-device tests check), or a backend jfuse does not know."""
    if any((jit_kwargs or {}).get(name) is not None for name in _PLACING_KEYWORDS):
        return None
    backends = {jax.default_backend()}
    default_device = jax.config.jax_default_device
    if default_device is not None:
        backends.add(getattr(default_device, "platform", jax.default_backend()))
    for leaf in leaves:
        if isinstance(leaf, jx.Tracer):
            return None
        sharding = getattr(leaf, "sharding", None)  # a jax.Array, or a ShapeDtypeStruct's
        if sharding is None:
            continue  # numpy or Python values: placed on the default device
        try:
            devices = sharding.device_set
        except Exception:  # noqa: BLE001 (an odd sharding: keep every platform)
            return None
        if len(devices) > 1:
            return None
        backends |= {device.platform for device in devices}
    platforms: set[str] = set()
    for backend in backends:
        if backend not in _BACKEND_PLATFORMS:
            return None  # a plugin backend jfuse does not know: keep every platform
        platforms |= set(_BACKEND_PLATFORMS[backend])
    return frozenset(platforms)
