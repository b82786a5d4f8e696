"""``rms_norm`` and ``layer_norm``, optionally with the residual add fused in front.

The forward kernel normalizes whole rows in f32 and also writes the per-row statistics (rstd, and
the mean for LayerNorm). The derivative is a ``jax.custom_jvp`` in plain primitives computed from
``(h, statistics, scale)`` alone, inside ``jax.checkpoint`` so that ``grad`` saves exactly those
and never the normalized activations. With ``residual`` the op returns ``(normed, x + residual)``,
the pre-norm transformer's two outputs, from one pass over memory.

Example::

    y = jfuse.ops.rms_norm(x, w, eps=1e-6)                      # Llama
    y = jfuse.ops.rms_norm(x, w, scale_offset=1.0)              # Gemma's (1 + w)
    y, h = jfuse.ops.layer_norm(x, g, b, residual=attn_out)     # pre-norm block
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.custom_derivatives import SymbolicZero

from jfuse.ops._autodiff import recompute_in_backward
from jfuse.ops import _partitionable
from jfuse.ops._dispatch import OpCall, cached_trace, check_implementation, dispatch

Array = jax.Array


@dataclasses.dataclass(frozen=True, eq=False)
class NormSpec:
    """Everything about one norm call that is not an array."""

    subtract_mean: bool  # LayerNorm; RMSNorm otherwise
    eps: float
    scale_offset: float
    has_residual: bool
    out_dtype: Any
    implementation: str | None = None
    # The user's own equations, (x, residual, scale, bias) -> (y, h), for the XLA implementation
    # inside a rewrite: on CPU the fused program then computes exactly the unfused values.
    replay: Callable[..., tuple] | None = None


def _vector(v, hidden: int):
    if v is None:
        return None
    return jnp.broadcast_to(jnp.reshape(v, (-1,)), (hidden,)) if v.size == 1 else jnp.reshape(
        v, (hidden,))


def _statistics(h32, spec: NormSpec):
    """(mean or None, rstd) of each row, keepdims, in f32."""
    mean = jnp.mean(h32, axis=-1, keepdims=True) if spec.subtract_mean else None
    centered = h32 - mean if mean is not None else h32
    var = jnp.mean(centered * centered, axis=-1, keepdims=True)
    return mean, lax.rsqrt(var + jnp.float32(spec.eps))


def _affine(n, scale, bias, spec: NormSpec, hidden: int):
    if scale is not None:
        n = n * (_vector(scale, hidden).astype(jnp.float32) + jnp.float32(spec.scale_offset))
    if bias is not None:
        n = n + _vector(bias, hidden).astype(jnp.float32)
    return n


def _reference(x, residual, scale, bias, spec: NormSpec):
    """(y, h, mean, rstd) in XLA: f32 statistics, one cast at the end."""
    # The sum is rounded to x's dtype before it is normalized, as the unfused `x + residual` is
    # (and as the kernels do); the backward recomputes from that same rounded h.
    h = x + residual if spec.has_residual else x
    h32 = h.astype(jnp.float32)
    mean, rstd = _statistics(h32, spec)
    if spec.replay is not None:
        y, h = spec.replay(x, residual, scale, bias)
        return y, h, mean, rstd
    n = (h32 - mean if mean is not None else h32) * rstd
    y = _affine(n, scale, bias, spec, x.shape[-1]).astype(spec.out_dtype)
    return y, h, mean, rstd


def _kernel(x, residual, scale, bias, spec: NormSpec, backend: str, interpret: bool):
    from jfuse.pallas import norm as kernels

    lead, hidden = x.shape[:-1], x.shape[-1]
    rows = int(np.prod(lead, dtype=np.int64))
    run = kernels.norm_tpu if backend == "tpu" else kernels.norm_triton

    def call(x, residual, scale, bias):
        outs = list(run(
            jnp.reshape(x, (rows, hidden)),
            _vector(scale, hidden),
            _vector(bias, hidden),
            None if residual is None else jnp.reshape(residual, (rows, hidden)),
            subtract_mean=spec.subtract_mean,
            eps=spec.eps,
            scale_offset=spec.scale_offset,
            out_dtype=spec.out_dtype,
            interpret=interpret,
        ))
        y = jnp.reshape(outs.pop(0), x.shape)
        h = jnp.reshape(outs.pop(0), x.shape) if spec.has_residual else x
        mean = jnp.reshape(outs.pop(0), lead + (1,)) if spec.subtract_mean else None
        rstd = jnp.reshape(outs.pop(0), lead + (1,))
        return y, h, mean, rstd

    key = ("norm", backend, interpret, spec.subtract_mean, spec.eps, spec.scale_offset,
           spec.has_residual, str(spec.out_dtype))
    return cached_trace(key, call, x, residual, scale, bias)


def _forward(x, residual, scale, bias, spec: NormSpec):
    def kernel(backend: str, interpret: bool):
        return functools.partial(_kernel, spec=spec, backend=backend, interpret=interpret)

    base = "layer_norm" if spec.subtract_mean else "rms_norm"
    return dispatch(spec.implementation, OpCall(
        pattern=("add_" + base) if spec.has_residual else base,
        operands=(x, residual, scale, bias),
        roles=(_partitionable.X, _partitionable.RESIDUAL, _partitionable.FEATURE_VECTOR,
               _partitionable.FEATURE_VECTOR),
        contracts_features=False,
        reference=functools.partial(_reference, spec=spec),
        # The replay is written for the global shapes; one shard runs the generic reference.
        local_reference=functools.partial(_reference, spec=dataclasses.replace(spec, replay=None)),
        kernel=kernel,
    ))


def _zero(t) -> bool:
    return t is None or isinstance(t, SymbolicZero)


def _tangents(h, mean, rstd, scale, dh, dscale, dbias, spec: NormSpec, out_dtype):
    """(dy, dmean, drstd) from (h, statistics, scale) and the input tangents, all in f32.

    Run under ``jax.checkpoint``: the normalized rows are recomputed here in the backward
    instead of being saved by the forward.
    """
    hidden = h.shape[-1]
    h32 = h.astype(jnp.float32)
    centered = h32 - mean if mean is not None else h32
    n = centered * rstd
    dy = jnp.zeros(h.shape, jnp.float32)
    dmean = None if mean is None else jnp.zeros(mean.shape, jnp.float32)
    drstd = jnp.zeros(rstd.shape, jnp.float32)
    if dh is not None:
        dh32 = dh.astype(jnp.float32)
        if mean is not None:
            dmean = jnp.mean(dh32, axis=-1, keepdims=True)
            dh32 = dh32 - dmean
        drstd = -(rstd**3) * jnp.mean(centered * dh32, axis=-1, keepdims=True)
        dn = dh32 * rstd + centered * drstd
        dy = _affine(dn, scale, None, spec, hidden)
    if dscale is not None:
        dy = dy + n * _vector(dscale, hidden).astype(jnp.float32)
    if dbias is not None:
        dy = dy + _vector(dbias, hidden).astype(jnp.float32)
    return dy.astype(out_dtype), dmean, drstd


def _jvp(spec: NormSpec, primals, tangents):
    x, residual, scale, bias = primals
    dx, dresidual, dscale, dbias = (None if _zero(t) else t for t in tangents)
    y, h, mean, rstd = _norm_with_statistics(x, residual, scale, bias, spec)
    if dx is None and dresidual is None:
        dh = None
    elif dresidual is None or not spec.has_residual:
        dh = dx if dx is not None else None
    else:
        dh = dresidual if dx is None else dx + dresidual
    dy, dmean, drstd = recompute_in_backward(
        functools.partial(_tangents, spec=spec, out_dtype=y.dtype)
    )(h, mean, rstd, scale, dh, dscale, dbias)
    dh_out = jnp.zeros(h.shape, h.dtype) if dh is None else dh.astype(h.dtype)
    return (y, h, mean, rstd), (dy, dh_out, dmean, drstd)


# `_norm` writes no statistics when nothing differentiates it; its JVP calls
# `_norm_with_statistics`, itself a custom_jvp, so higher derivatives never touch a kernel.
@functools.partial(jax.custom_jvp, nondiff_argnums=(4,))
def _norm_with_statistics(x, residual, scale, bias, spec: NormSpec):
    return _forward(x, residual, scale, bias, spec)


_norm_with_statistics.defjvp(_jvp, symbolic_zeros=True)


@functools.partial(jax.custom_jvp, nondiff_argnums=(4,))
def _norm(x, residual, scale, bias, spec: NormSpec):
    y, h, _, _ = _forward(x, residual, scale, bias, spec)
    return (y, h) if spec.has_residual else y


def _norm_jvp(spec, primals, tangents):
    (y, h, _, _), (dy, dh, _, _) = _jvp(spec, primals, tangents)
    return ((y, h), (dy, dh)) if spec.has_residual else (y, dy)


_norm.defjvp(_norm_jvp, symbolic_zeros=True)


def fused_norm(x, residual, scale, bias, *, subtract_mean: bool, eps: float,
               scale_offset: float = 0.0, out_dtype=None, implementation=None, replay=None):
    """The op as the rewrite calls it (no argument checks)."""
    spec = NormSpec(
        subtract_mean=subtract_mean,
        eps=float(eps),
        scale_offset=float(scale_offset),
        has_residual=residual is not None,
        out_dtype=np.dtype(out_dtype if out_dtype is not None else x.dtype),
        implementation=implementation,
        replay=replay,
    )
    return _norm(x, residual, scale, bias, spec)


def _check(op: str, name: str, a, shape=None) -> Array:
    a = jnp.asarray(a)
    if not jnp.issubdtype(a.dtype, jnp.floating):
        raise TypeError(f"jfuse.ops.{op}: {name} must be a floating array, got dtype {a.dtype}.")
    if shape is not None and a.shape != shape:
        raise ValueError(f"jfuse.ops.{op}: {name} must have shape {shape}, got {a.shape}.")
    return a


def _public(op, x, scale, bias, residual, eps, scale_offset, implementation, subtract_mean):
    check_implementation(implementation)
    x = _check(op, "x", x)
    if x.ndim < 1:
        raise ValueError(f"jfuse.ops.{op}: x must have at least 1 dimension, got shape {x.shape}.")
    if not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"jfuse.ops.{op}: eps must be a non-negative number, got {eps!r}.")
    hidden = x.shape[-1]
    scale = None if scale is None else _check(op, "scale", scale, (hidden,))
    bias = None if bias is None else _check(op, "bias", bias, (hidden,))
    residual = None if residual is None else _check(op, "residual", residual, x.shape)
    if residual is not None and residual.dtype != x.dtype:
        raise TypeError(
            f"jfuse.ops.{op}: residual must have x's dtype {x.dtype}, got {residual.dtype}.")
    return fused_norm(x, residual, scale, bias, subtract_mean=subtract_mean, eps=eps,
                      scale_offset=scale_offset, implementation=implementation)


def rms_norm(
    x: Array,
    scale: Array | None = None,
    *,
    eps: float = 1e-6,
    scale_offset: float = 0.0,
    residual: Array | None = None,
    implementation: str | None = None,
):
    """RMSNorm over the last axis: ``x * rsqrt(mean(x²) + eps) * (scale + scale_offset)``.

    Args:
      x: ``(..., H)``, floating. Statistics are computed in f32 for any input dtype.
      scale: optional ``(H,)``. ``scale_offset=1.0`` gives Gemma's ``(1 + w)``.
      residual: optional, x's shape and dtype. Then ``h = x + residual`` is normalized and the
        result is ``(normed, h)``.
      implementation: as for :func:`jfuse.ops.linear`.

    Example::

        >>> jfuse.ops.rms_norm(jnp.ones((2, 8)), jnp.ones(8)).shape
        (2, 8)
    """
    return _public("rms_norm", x, scale, None, residual, eps, scale_offset, implementation, False)


def layer_norm(
    x: Array,
    scale: Array | None = None,
    bias: Array | None = None,
    *,
    eps: float = 1e-5,
    residual: Array | None = None,
    implementation: str | None = None,
):
    """LayerNorm over the last axis: ``(x - mean) * rsqrt(var + eps) * scale + bias``.

    Arguments as for :func:`rms_norm`; ``bias`` is an optional ``(H,)`` offset. With ``residual``
    the result is ``(normed, x + residual)``.

    Example::

        >>> jfuse.ops.layer_norm(jnp.ones((2, 8)), jnp.ones(8), jnp.zeros(8)).shape
        (2, 8)
    """
    return _public("layer_norm", x, scale, bias, residual, eps, 0.0, implementation, True)
