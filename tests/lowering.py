"""Cross-platform lowering helpers for tests: check kernels for TPU and GPU on a CPU-only machine.

``jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,))`` produces the StableHLO a TPU
or GPU would compile, without one. It is how jfuse's tests check that a Pallas kernel really
lowers (interpret mode accepts primitives such as ``erfc`` that the real backends reject) and
that a rewritten model contains the expected number of kernel calls.

* :func:`lower_for` returns that StableHLO text. It supplies the abstract device some lowering
  rules need (Mosaic asks for the TPU generation; jax >= 0.12's Triton lowering asks for a GPU)
  and silences jax 0.12's "Pallas Triton backend is deprecated" warning, which fires at
  lowering time.
* :func:`count_kernel_calls` counts the kernel custom calls in such text (Pallas, and cuDNN's
  flash attention on "cuda").

Arguments may be arrays or ``jax.ShapeDtypeStruct``s (nothing is executed). The abstract
devices are a TPU v5e ("TPU v5 lite", 1 core) and an H100 (132 SMs); both work on jax 0.10.0
and 0.12, whose ``AbstractDevice`` differ (0.12 added a ``platform`` field).

Usage::

    text = lower_for(lambda x, w: linear_tpu(x, w, activation="gelu"), x, w, platform="tpu")
    assert count_kernel_calls(text, "tpu") == 1
"""

from __future__ import annotations

import contextlib
import inspect
import warnings
from typing import Any, Callable, Iterator

import jax
from jax.sharding import AbstractDevice, AbstractMesh, use_abstract_mesh

from jfuse import benchmarking

__all__ = ["lower_for", "count_kernel_calls", "abstract_device_context", "KERNEL_CALL_TARGETS"]

# (device_kind, num_cores, AbstractDevice platform) per lowering platform.
_ABSTRACT_DEVICES = {
    "tpu": ("TPU v5 lite", 1, "tpu"),
    "cuda": ("NVIDIA H100 80GB HBM3", 132, "gpu"),
}

# Custom-call targets that are kernels, per lowering platform: Mosaic TPU; Triton and Mosaic GPU,
# and cuDNN's flash attention (the GPU attention kernel where cuDNN serves).
KERNEL_CALL_TARGETS = {
    "tpu": ("tpu_custom_call",),
    "cuda": ("__gpu$xla.gpu.triton", "mosaic_gpu_v2", "mosaic_gpu", "__cudnn$fmhaSoftmax",
             "__cudnn$fmhaSoftmaxBackward"),
    "cpu": (),
}


def _make_abstract_device(device_kind: str, num_cores: int, platform: str) -> AbstractDevice:
    # jax 0.10's AbstractDevice(device_kind, num_cores) has no `platform`; 0.12 requires it.
    if "platform" in inspect.signature(AbstractDevice).parameters:
        return AbstractDevice(device_kind=device_kind, num_cores=num_cores, platform=platform)
    return AbstractDevice(device_kind=device_kind, num_cores=num_cores)


@contextlib.contextmanager
def abstract_device_context(platform: str) -> Iterator[None]:
    """An abstract mesh of one TPU v5e ("tpu") or one H100 ("cuda"); a no-op otherwise."""
    if platform not in _ABSTRACT_DEVICES:
        yield
        return
    device = _make_abstract_device(*_ABSTRACT_DEVICES[platform])
    with use_abstract_mesh(AbstractMesh((), (), abstract_device=device)):
        yield


def lower_for(fn: Callable[..., Any], *args: Any, platform: str) -> str:
    """Lower ``jax.jit(fn)(*args)`` for ``platform`` ("tpu", "cuda" or "cpu"); StableHLO text.

    Raises whatever the lowering raises (e.g. an unimplemented primitive in a kernel).
    """
    if platform not in KERNEL_CALL_TARGETS:
        raise ValueError(f"platform={platform!r}; expected one of {sorted(KERNEL_CALL_TARGETS)}")
    with abstract_device_context(platform), warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message="The Pallas Triton backend is deprecated", category=DeprecationWarning
        )
        lowered = jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,))
        return lowered.as_text()


def count_kernel_calls(text: str, platform: str) -> int:
    """How many kernel custom calls (``tpu_custom_call`` for "tpu"; Triton, Mosaic GPU or cuDNN
    attention for "cuda") one run of the StableHLO ``text``'s public ``main`` makes.

    Kernels inside private functions count once per call of the function
    (:func:`jfuse.benchmarking.kernel_calls` does the counting).
    """
    kinds = {benchmarking.KERNEL_CALL_TARGETS[target] for target in KERNEL_CALL_TARGETS[platform]}
    return sum(n for kind, n in benchmarking.kernel_calls(text).items() if kind in kinds)
