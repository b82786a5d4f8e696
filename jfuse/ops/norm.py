"""``rms_norm`` and ``layer_norm``, optionally with the residual add fused in front.

The forward kernel normalizes whole rows in f32 and also writes the per-row statistics (rstd, and
the mean for LayerNorm). The derivative is a ``jax.custom_jvp`` in plain primitives computed from
``(h, statistics, scale)`` alone, inside ``jax.checkpoint`` so that ``grad`` saves exactly those
and never the normalized activations. Inside a rewrite, a platform that runs the XLA
implementation (the user's own equations, replayed) differentiates those equations instead (their
JVP, under the same checkpoint): its forward may compute the statistics its own way (Flax's
one-pass ``E[x²] - E[x]²`` clamped at 0), and the gradient must be the derivative of the values the
forward computed, as jax.jit's is. With ``residual`` the op returns ``(normed, x + residual)``,
the pre-norm transformer's two outputs, from one pass over memory.

Example::

    y = jfuse.ops.rms_norm(x, w, eps=1e-6)                      # Llama
    y = jfuse.ops.rms_norm(x, w, scale_offset=1.0)              # Gemma's (1 + w)
    y, h = jfuse.ops.layer_norm(x, g, b, residual=attn_out)     # pre-norm block
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jfuse.ops import _partitionable
from jfuse.ops._autodiff import as_forward_runs, recompute_in_backward, runs_xla_everywhere
from jfuse.ops._dispatch import check_implementation
from jfuse.ops._op import Benchmark, FusedOp, OpSpec, apply, as_vector, is_zero
from jfuse.pallas import norm as kernels

__all__ = ["layer_norm", "rms_norm"]

Array = jax.Array


@dataclasses.dataclass(frozen=True, eq=False, kw_only=True)
class NormSpec(OpSpec):
    """Everything about one norm call that is not an array. The replay is the user's own
    equations, ``(x, residual, scale, bias) -> (y, h)``."""

    subtract_mean: bool  # LayerNorm; RMSNorm otherwise
    eps: float
    scale_offset: float
    has_residual: bool
    out_dtype: Any


def _statistics(h32, spec: NormSpec):
    """(mean or None, rstd) of each row, keepdims, in f32."""
    mean = jnp.mean(h32, axis=-1, keepdims=True) if spec.subtract_mean else None
    centered = h32 - mean if mean is not None else h32
    var = jnp.mean(centered * centered, axis=-1, keepdims=True)
    return mean, lax.rsqrt(var + jnp.float32(spec.eps))


def _affine(n, scale, bias, spec: NormSpec, hidden: int):
    if scale is not None:
        n = n * (as_vector(scale, hidden).astype(jnp.float32) + jnp.float32(spec.scale_offset))
    if bias is not None:
        n = n + as_vector(bias, hidden).astype(jnp.float32)
    return n


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
        dy = dy + n * as_vector(dscale, hidden).astype(jnp.float32)
    if dbias is not None:
        dy = dy + as_vector(dbias, hidden).astype(jnp.float32)
    return dy.astype(out_dtype), dmean, drstd


def _kernel_tangents(h, mean, rstd, scale, bias, dh, dscale, dbias, spec: NormSpec, out_dtype):
    """The derivative of the kernel's forward (and of the generic XLA implementation): from the
    f32 statistics it wrote."""
    del bias  # the derivative does not read it
    return _tangents(h, mean, rstd, scale, dh, dscale, dbias, spec, out_dtype)


def _replay_jvp(h, mean, rstd, scale, bias, dh, dscale, dbias, spec: NormSpec, out_dtype):
    """``(y, dy, dmean, drstd)``: the user's own equations (``spec.replay``) at ``h`` and their
    derivative, what the XLA forward computed, statistics included, differentiated as jax.jit
    would.

    The replay is given ``h`` as the sum it already is (no residual), so only ``h`` (not ``x``
    and ``residual``) is kept for the backward, as the kernel's derivative keeps it. The
    statistics' tangents are the derivative of the op's ``(mean, rstd)`` outputs (two-pass, as
    the reference computes them); nothing on this path reads them.
    """
    _, dmean, drstd = _tangents(h, mean, rstd, scale, dh, dscale, dbias, spec, out_dtype)
    primals = {"h": h, "scale": scale, "bias": bias}
    tangents = {"h": dh, "scale": dscale, "bias": dbias}
    live = [k for k in primals if primals[k] is not None and tangents[k] is not None]

    def y_of(*values):
        args = {**primals, **dict(zip(live, values))}
        return spec.replay(args["h"], None, args["scale"], args["bias"])[0]

    if not live:
        return y_of(), jnp.zeros(h.shape, out_dtype), dmean, drstd
    y, dy = jax.jvp(y_of, tuple(primals[k] for k in live),
                    tuple(tangents[k].astype(primals[k].dtype) for k in live))
    return y, dy.astype(out_dtype), dmean, drstd


def _replay_tangents(h, mean, rstd, scale, bias, dh, dscale, dbias, spec: NormSpec, out_dtype):
    """The derivative of the user's own equations at ``h`` (:func:`_replay_jvp`), without the
    output: for a program where some platform's forward runs the kernel instead."""
    return _replay_jvp(h, mean, rstd, scale, bias, dh, dscale, dbias, spec, out_dtype)[1:]


class Norm(FusedOp):
    """RMSNorm / LayerNorm over the last axis, with the residual add in front when given.

    Operands ``(x, residual, scale, bias)``; full outputs ``(y, h, mean, rstd)`` with ``h`` the
    normalized sum (``x`` without a residual) and f32 per-row statistics (``mean`` None for RMS).
    """

    name = "norm"
    contracts_features = False

    def pattern(self, spec: NormSpec) -> str:
        base = "layer_norm" if spec.subtract_mean else "rms_norm"
        return ("add_" + base) if spec.has_residual else base

    def reference(self, spec: NormSpec, operands, full):
        """(y, h, mean, rstd) in XLA: f32 statistics, one cast at the end."""
        x, residual, scale, bias = operands
        # The sum is rounded to x's dtype before it is normalized, as the unfused `x + residual`
        # is (and as the kernels do); the backward recomputes from that same rounded h.
        h = x + residual if spec.has_residual else x
        h32 = h.astype(jnp.float32)
        mean, rstd = _statistics(h32, spec)
        if spec.replay is not None:
            y, h = spec.replay(x, residual, scale, bias)
            return y, h, mean, rstd
        n = (h32 - mean if mean is not None else h32) * rstd
        y = _affine(n, scale, bias, spec, x.shape[-1]).astype(spec.out_dtype)
        return y, h, mean, rstd

    def kernel(self, spec: NormSpec, operands, backend, interpret, full):
        x, residual, scale, bias = operands
        lead, hidden = x.shape[:-1], x.shape[-1]
        rows = int(np.prod(lead, dtype=np.int64))
        run = kernels.norm_tpu if backend == "tpu" else kernels.norm_triton
        outs = list(run(
            jnp.reshape(x, (rows, hidden)),
            as_vector(scale, hidden),
            as_vector(bias, hidden),
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

    def unsupported_reason(self, spec: NormSpec, platform, avals):
        x = avals[0]
        rows, hidden = int(np.prod(x.shape[:-1], dtype=np.int64)), x.shape[-1]
        refuse = (kernels.tpu_unsupported_reason if platform == "tpu"
                  else kernels.triton_unsupported_reason)
        return refuse(rows, hidden, x.dtype)

    def outputs(self, spec: NormSpec, full_outputs):
        y, h = full_outputs[:2]
        return (y, h) if spec.has_residual else y

    @staticmethod
    def _sum_tangent(spec: NormSpec, tangents):
        """(dh, dscale, dbias): the tangent of ``h = x + residual`` and the parameters'."""
        dx, dresidual, dscale, dbias = (None if is_zero(t) else t for t in tangents)
        if dx is None and dresidual is None:
            dh = None
        elif dresidual is None or not spec.has_residual:
            dh = dx
        else:
            dh = dresidual if dx is None else dx + dresidual
        return dh, dscale, dbias

    @staticmethod
    def _recompute_rows(derivative, h):
        """``derivative`` under jax.checkpoint: the per-row statistics it computes from h (the
        user's own, on the replay path) are saved, a few bytes per row; the rows themselves are
        recomputed."""
        hidden = h.shape[-1]
        rows = h.size // hidden if hidden > 1 else 0
        return recompute_in_backward(derivative, save_at_most=rows)

    def tangents(self, spec: NormSpec, operands, tangents, full_outputs):
        dh, dscale, dbias = self._sum_tangent(spec, tangents)
        y, h, mean, rstd = full_outputs
        kernel = functools.partial(_kernel_tangents, spec=spec, out_dtype=y.dtype)
        derivative = kernel
        if spec.replay is not None:  # differentiate what each platform's forward computed
            replay = functools.partial(_replay_tangents, spec=spec, out_dtype=y.dtype)
            derivative = as_forward_runs(self, spec, operands, kernel, replay)
        dy, dmean, drstd = self._recompute_rows(derivative, h)(
            h, mean, rstd, operands[2], operands[3], dh, dscale, dbias)
        dh_out = jnp.zeros(h.shape, h.dtype) if dh is None else dh.astype(h.dtype)
        return dy, dh_out, dmean, drstd

    def primal_and_tangents(self, spec: NormSpec, operands, tangents):
        """Where every platform's forward is the user's own equations (a CPU program), the
        output comes from the same evaluation as its derivative (:func:`_replay_jvp`): the
        forward computes the row statistics once, not once for the output and again for what
        the derivative keeps. Same values: the same equations, on the same sum. Not on a mesh,
        where the forward is the partition pass's to lay out per shard."""
        if (spec.replay is None or not runs_xla_everywhere(self, spec, operands)
                or _partitionable.mesh_of(jax.tree_util.tree_leaves(tuple(operands)))
                is not None):
            return None
        x, residual, scale, bias = operands
        h = x + residual if spec.has_residual else x
        mean, rstd = _statistics(h.astype(jnp.float32), spec)
        dh, dscale, dbias = self._sum_tangent(spec, tangents)
        derivative = functools.partial(_replay_jvp, spec=spec, out_dtype=spec.out_dtype)
        y, dy, dmean, drstd = self._recompute_rows(derivative, h)(
            h, mean, rstd, scale, bias, dh, dscale, dbias)
        dh_out = jnp.zeros(h.shape, h.dtype) if dh is None else dh.astype(h.dtype)
        return (y, h, mean, rstd), (dy, dh_out, dmean, drstd)

    def roles(self, spec: NormSpec, operands):
        return (_partitionable.X, _partitionable.RESIDUAL, _partitionable.FEATURE_VECTOR,
                _partitionable.FEATURE_VECTOR)


NORM = Norm()


def _spec(*, subtract_mean: bool, eps: float, scale_offset: float = 0.0, has_residual: bool,
          out_dtype, implementation=None, replay=None) -> NormSpec:
    return NormSpec(subtract_mean=subtract_mean, eps=float(eps), scale_offset=float(scale_offset),
                    has_residual=has_residual, out_dtype=np.dtype(out_dtype),
                    implementation=implementation, replay=replay)


def fused_norm(x, residual, scale, bias, *, subtract_mean: bool, eps: float,
               scale_offset: float = 0.0, out_dtype=None, implementation=None, replay=None):
    """The op as the rewrite calls it (no argument checks)."""
    spec = _spec(subtract_mean=subtract_mean, eps=eps, scale_offset=scale_offset,
                 has_residual=residual is not None,
                 out_dtype=out_dtype if out_dtype is not None else x.dtype,
                 implementation=implementation, replay=replay)
    return apply(NORM, spec, x, residual, scale, bias)


def norm_refusals(x_aval, *, subtract_mean: bool, has_residual: bool, out_dtype=None,
                  **spec_fields) -> dict[str, str]:
    """Per lowering platform, why its kernel will not run a norm over ``x_aval`` (see
    :meth:`FusedOp.refusals`): what the fusion report says, from the rule dispatch applies."""
    spec = _spec(subtract_mean=subtract_mean, has_residual=has_residual,
                 out_dtype=out_dtype if out_dtype is not None else x_aval.dtype, **spec_fields)
    return NORM.refusals(spec, [x_aval, x_aval if has_residual else None, None, None])


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


def _benchmark(name: str, subtract_mean: bool, residual: bool) -> Benchmark:
    public = layer_norm if subtract_mean else rms_norm

    def inputs(shape, dtype, normal):
        _, hidden = shape
        args = [normal(shape)] + ([normal(shape)] if residual else [])
        args.append(1 + normal((hidden,), 0.1))  # scale
        if subtract_mean:
            args.append(normal((hidden,), 0.1))  # bias
        return tuple(args)

    def call(implementation, _variant):
        def run(x, *rest):
            r, params = (rest[0], rest[1:]) if residual else (None, rest)
            return public(x, *params, residual=r, implementation=implementation)

        return run

    return Benchmark(name=name, dims="(rows, H)", inputs=inputs, call=call, sizes={
        "quick": (((64, 128), None),),
        "cpu": (((4096, 1024), None),),
        "accelerator": (((16384, 8192), None),),
        "device": (((16384, 4096), None),),
    })


# Beside the op, what benchmarks/ops.py times: each of its four patterns, memory-bound.
BENCHMARKS = tuple(_benchmark(("add_" if residual else "") + base, base == "layer_norm", residual)
                   for base in ("rms_norm", "layer_norm") for residual in (False, True))
