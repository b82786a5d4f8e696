"""Choosing an implementation for a fused op: XLA, a Pallas kernel, or a kernel in interpret mode.

The tokamax model, simplified: each op has an XLA reference and per-platform Pallas kernels. A
kernel that cannot serve its inputs raises ``NotImplementedError`` with the reason at trace time;
with ``implementation=None`` the op then uses the XLA reference instead. ``None`` picks per
platform at lowering time through ``lax.platform_dependent``, so one traced program lowers to the
TPU kernel for TPU, the Triton kernel for CUDA and XLA elsewhere.
"""

from __future__ import annotations

from typing import Callable

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
    name: str,
):
    """Run the implementation ``implementation`` names (see module docstring)."""
    check_implementation(implementation)
    if implementation == "xla":
        return reference()
    if implementation == "interpret":
        return interpret_kernel()
    if implementation == "pallas":
        tpu, gpu = tpu_kernel, gpu_kernel  # a refusal is an error the caller asked to see
    else:
        tpu = _or_reference(tpu_kernel, reference)
        gpu = _or_reference(gpu_kernel, reference)
    return lax.platform_dependent(tpu=tpu, cuda=gpu, default=reference)
