"""Op-independent helpers shared by jfuse's Pallas kernel modules: integer rounding for block
sizes; the refusal reasons that ``*_unsupported_reason`` are built from (dtype, empty or
too-large matmul, TPU dot precision) and the check that raises them; the f32 matmul used inside
the kernels; activation selection per backend, including an exact-GELU epilogue for Triton,
which has no ``erf``; and a filter for jax 0.12's Triton deprecation warning. Block shapes, VMEM
budgets and Triton masks live in :mod:`jfuse.pallas._tiling`.

Nothing here knows about jaxprs or about a particular op. The kernel modules import from here;
among themselves only the matmul ops (``linear``, ``glu``) import the kernel they share,
:mod:`jfuse.pallas.matmul`.
"""

from __future__ import annotations

import math
import warnings
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator

import jax
import jax.numpy as jnp
from jax import lax

from jfuse.core.activations import get_activation

Array = jax.Array

# The float dtypes the kernels accept, per backend (the same for every op today).
TPU_DTYPES = (jnp.float32, jnp.bfloat16)
TRITON_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def cdiv(a: int, b: int) -> int:
    """Ceiling division of non-negative Python ints."""
    return -(-a // b)


def round_up(a: int, multiple: int) -> int:
    """The smallest multiple of ``multiple`` that is >= ``a``."""
    return cdiv(a, multiple) * multiple


def next_power_of_2(a: int) -> int:
    """The smallest power of two >= ``a`` (1 for ``a <= 1``)."""
    return 1 if a <= 1 else 1 << (a - 1).bit_length()


def is_power_of_2(a: int) -> bool:
    return a >= 1 and a & (a - 1) == 0


# Cephes' single-precision erf/erfc coefficients (the same ones XLA's f32 erf/erfc use), Horner
# order, highest degree first. erf(x) = x P(x^2) for |x| < 1; erfc(x) = exp(-x^2)/x R(1/x^2) for
# x >= 1, with one polynomial on [1, 2) and another beyond.
_ERF_T = (
    7.853861353153693e-5, -8.010193625184903e-4, 5.188327685732524e-3,
    -2.685381193529856e-2, 1.128358514861418e-1, -3.761262582423300e-1,
    1.128379165726710e0,
)  # fmt: skip
_ERFC_P = (
    2.326819970068386e-2, -1.387039388740657e-1, 3.687424674597105e-1,
    -5.824733027278666e-1, 6.210004621745983e-1, -4.944515323274145e-1,
    3.404879937665872e-1, -2.741127028184656e-1, 5.638259427386472e-1,
)  # fmt: skip
_ERFC_R = (
    -1.047766399936249e1, 1.297719955372516e1, -7.495518717768503e0,
    2.921019019210786e0, -1.015265279202700e0, 4.218463358204948e-1,
    -2.820767439740514e-1, 5.641895067754075e-1,
)  # fmt: skip
_SQRT_HALF = math.sqrt(0.5)


def _horner(x: Array, coefficients: tuple[float, ...]) -> Array:
    acc = jnp.full_like(x, coefficients[0])
    for c in coefficients[1:]:
        acc = acc * x + c
    return acc


def one_plus_erf_f32(x: Array) -> Array:
    """``1 + erf(x)`` on f32 from mul/add/div/exp/select only, for kernels without ``erf``.

    Written as ``erfc(-x)`` for x < -1 instead of ``1 + erf(x)``, so the left tail keeps its
    relative precision (the naive sum cancels); absolute error is ~1e-7 everywhere (tested).
    """
    ax = jnp.abs(x)
    # Small |x|: the odd series; large |x|: the erfc tail. Both are evaluated, then selected;
    # clamping keeps the unused branch finite (no inf/NaN in either lane of the select).
    xs = jnp.clip(x, -1.0, 1.0)
    erf_small = xs * _horner(xs * xs, _ERF_T)
    q = 1.0 / jnp.maximum(ax, 1.0)
    tail_poly = jnp.where(ax < 2.0, _horner(q * q, _ERFC_P), _horner(q * q, _ERFC_R))
    erfc_large = jnp.exp(-ax * ax) * q * tail_poly  # erfc(|x|); exp underflows to 0 far out
    large = jnp.where(x < 0, erfc_large, 2.0 - erfc_large)
    return jnp.where(ax < 1.0, 1.0 + erf_small, large)


def gelu_exact_without_erf(z: Array) -> Array:
    """Exact (erf) GELU, ``0.5 z (1 + erf(z/sqrt 2))``, with no ``erf`` primitive (Triton)."""
    return 0.5 * z * one_plus_erf_f32(z * _SQRT_HALF)


def kernel_activation(backend: str, name: str | None) -> Callable[[Array], Array] | None:
    """The f32 epilogue function for activation ``name`` in ``backend``'s kernel (None: identity).

    On Triton exact GELU is :func:`gelu_exact_without_erf`, since Triton has no ``erf``
    lowering; every other activation, and every one on TPU, is its ``jfuse.core.activations``
    forward. Raises ValueError for an unknown name.
    """
    act = get_activation(name)
    if backend == "triton" and name == "gelu":
        return gelu_exact_without_erf  # Triton has no erf lowering
    return None if act is None else act.forward


# ----------------------------------------------------------------------------------------------
# Refusal reasons: pure Python, nothing traced
# ----------------------------------------------------------------------------------------------


def dtype_reason(backend: str, dtype: Any, allowed: tuple[Any, ...]) -> str | None:
    """Why ``backend``'s kernel refuses ``dtype`` (not in ``allowed``), or None."""
    dtype = jnp.dtype(dtype)
    if dtype not in [jnp.dtype(d) for d in allowed]:
        names = ", ".join(jnp.dtype(d).name for d in allowed)
        return f"dtype {dtype.name} is not supported by the {backend} kernel ({names} only)"
    return None


def empty_matmul_reason(m: int, k: int, n: int) -> str | None:
    """Why an ``(M, K) @ (K, N)`` problem with an empty dimension is refused, or None."""
    if min(m, k, n) <= 0:
        return f"empty matmul (M={m}, K={k}, N={n}) has nothing for a kernel to do"
    return None


def int32_offsets_reason(m: int, k: int, n: int) -> str | None:
    """Why a Triton matmul kernel, which indexes with int32 offsets, refuses an
    ``(M, K) @ (K, N)`` problem whose operands or output have 2**31 or more elements, or None."""
    if max(m * k, k * n, m * n) >= 2**31:
        return (f"operands with 2**31 or more elements (M={m}, K={k}, N={n}) would overflow "
                "the kernel's int32 offsets")
    return None


def tpu_precision_reason(precision: Any) -> str | None:
    """Mosaic's dot takes DEFAULT or HIGHEST, the same for both operands; refuse the rest
    here rather than fail at lowering."""
    parts = precision if isinstance(precision, (tuple, list)) else (precision,)
    try:
        kinds = {None if p is None else lax.Precision(p) for p in parts}
    except (TypeError, ValueError):  # e.g. a DotAlgorithmPreset
        kinds = {"unsupported"}
    if len(kinds) == 1 and kinds <= {None, lax.Precision.DEFAULT, lax.Precision.HIGHEST}:
        return None
    return f"precision={precision!r} is not supported by the TPU kernel (DEFAULT or HIGHEST only)"


def raise_if_unsupported(
    reason_fn: Callable[..., str | None],
    dims: tuple[int, ...],
    dtype: Any,
    mixed_reason: str | None,
    others: Iterable[tuple[str, Any]],
) -> None:
    """NotImplementedError (the caller's cue to fall back to XLA) with the first reason found.

    In order: ``reason_fn(*dims, dtype)`` for the main operand's dtype; ``mixed_reason`` (the
    caller's refusal of mixed operand dtypes, or None); then ``reason_fn(*dims, other)`` for
    each ``(what, other)`` in ``others`` whose dtype is not None, prefixed with ``what``.
    """
    reason = reason_fn(*dims, dtype) or mixed_reason
    for what, other_dtype in others:
        if reason is None and other_dtype is not None and (other := reason_fn(*dims, other_dtype)):
            reason = f"{what} {other}"
    if reason is not None:
        raise NotImplementedError(reason)


# ----------------------------------------------------------------------------------------------
# In-kernel matmul
# ----------------------------------------------------------------------------------------------


def contract(x: Array, w: Array, rhs_transposed: bool, precision: Any) -> Array:
    """x @ w (or x @ w.T) into f32, contracting w's dim 1 directly when it is (N, K)."""
    dims = (((1,), (1,)), ((), ())) if rhs_transposed else (((1,), (0,)), ((), ()))
    return lax.dot_general(
        x, w, dims, precision=precision, preferred_element_type=jnp.float32
    )


@contextmanager
def quiet_triton_deprecation() -> Iterator[None]:
    """Silence jax >= 0.12's "Pallas Triton backend is deprecated" warning, and nothing else.

    The warning is raised when a Triton ``pallas_call`` is *lowered*: eagerly that is inside our
    wrapper, under ``jax.jit`` it is wherever the caller lowers.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message="The Pallas Triton backend is deprecated", category=DeprecationWarning
        )
        yield
