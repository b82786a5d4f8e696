"""A tangent in plain JAX whose transpose, the backward pass, may run a kernel.

jfuse differentiates a fused op through its ``tangents`` rule, plain JAX that JAX transposes into
the backward pass, so derivatives of any order work. Where a maintained kernel library ships a
backward kernel (cuDNN's and the Pallas flash attention kernels), that kernel is much faster than
the transposed XLA tangent (on an H200, attention's forward+backward took 13.5 ms with jfuse's
XLA derivative against 2.5 ms with cuDNN's own backward). :func:`kernel_transposed` gives a
tangent both: it *evaluates* the plain-JAX tangent (forward mode, ``jax.jvp``, and anything that
evaluates tangents), and its *transpose* (reverse mode: ``jax.grad``, ``jax.vjp``) runs the
backward the caller gives: a kernel's VJP, per lowering platform, or a backward written out in
plain JAX, which XLA compiles smaller than JAX's transpose of a checkpointed tangent (attention's
blockwise backward: 40 fewer kernels in an 8-layer step on jax 0.12).

It is two primitives (so it lives with jfuse's other uses of JAX's internals: ``ad``, ``batching``
and ``mlir`` rules), each the other's transpose, in the spirit of JAX's own ``linear_call``,
which cannot serve here: its JVP asserts that its residual arguments are not differentiated (a
Hessian-vector product through a fused op differentiates them), and it has no batching rule.

* ``jfuse_kernel_transposed_tangent``: ``tangent(residuals, linear)``; its transpose is
* ``jfuse_kernel_transposed_backward``: ``backward(residuals, cotangent)``, the kernel, whose
  transpose is the tangent again.

Derivatives *through* either one (in the residuals: second order) are the plain-JAX tangent's and
its plain-JAX transpose's own, so a kernel is never differentiated, as everywhere in jfuse. Under
``vmap`` both are vmapped as functions. An output cotangent that is not symbolically zero where
the kernel cannot take one (``kernel_outputs``) sends the whole backward to the plain-JAX
transpose.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.interpreters import ad, batching, mlir

from jax.extend.core import Primitive

__all__ = ["kernel_transposed"]


class _Pair:
    """The functions behind one call, on flat lists of arrays. Compared by identity (primitive
    parameters must be hashable; each call has its own)."""

    def __init__(self, tangent: Callable, backward: Callable, n_res: int,
                 lin_avals: Sequence[Any], out_avals: Sequence[Any],
                 kernel_outputs: Sequence[bool]):
        self.tangent = tangent  # (res list, lin list) -> out list, plain JAX, linear in lin
        self.backward = backward  # (res list, ct list) -> lin-ct list, may run a kernel
        self.n_res = n_res
        self.lin_avals = tuple(lin_avals)
        self.out_avals = tuple(out_avals)
        self.kernel_outputs = tuple(kernel_outputs)  # outputs whose cotangent the kernel reads

    def transpose_xla(self, res, cts):
        """The plain-JAX transpose of :attr:`tangent` (a VJP at zero: it is linear)."""
        zeros = [jnp.zeros(a.shape, a.dtype) for a in self.lin_avals]
        _, vjp = jax.vjp(lambda *lin: tuple(self.tangent(list(res), list(lin))), *zeros)
        return list(vjp(tuple(cts)))

    def batched(self, res_axes: Sequence[int | None], size: int) -> "_Pair":
        """This pair vmapped: residuals along ``res_axes``, linear inputs and outputs along 0."""
        res_axes = list(res_axes)

        def tangent(res, lin):
            return jax.vmap(lambda r, l: self.tangent(r, l), in_axes=(res_axes, 0))(res, lin)

        def backward(res, cts):
            return jax.vmap(lambda r, c: self.backward(r, c), in_axes=(res_axes, 0))(res, cts)

        def batch(avals):
            return [jax.ShapeDtypeStruct((size, *a.shape), a.dtype) for a in avals]

        return _Pair(tangent, backward, self.n_res, batch(self.lin_avals), batch(self.out_avals),
                     self.kernel_outputs)


tangent_p = Primitive("jfuse_kernel_transposed_tangent")
tangent_p.multiple_results = True
backward_p = Primitive("jfuse_kernel_transposed_backward")
backward_p.multiple_results = True


def _split(args, pair: _Pair):
    return list(args[:pair.n_res]), list(args[pair.n_res:])


def _avals(structs):
    return [jax.core.ShapedArray(s.shape, s.dtype) for s in structs]  # noqa: jax.core keeps it


def _instantiate(tangents, avals):
    return [jnp.zeros(a.shape, a.dtype) if type(t) is ad.Zero else t
            for t, a in zip(tangents, avals)]


def _any_nonzero(tangents) -> bool:
    return any(type(t) is not ad.Zero for t in tangents)


def _jvp_in_residuals(fn, res, d_res):
    """The tangent of ``fn(res)`` (a list of arrays) along ``d_res``, over the residuals that
    carry one: integer and boolean residuals (a mask, segment ids) have none to give."""
    moving = [i for i, (r, t) in enumerate(zip(res, d_res))
              if type(t) is not ad.Zero and jnp.issubdtype(jnp.result_type(r), jnp.inexact)]

    def of_moving(*values):
        full = list(res)
        for i, value in zip(moving, values):
            full[i] = value
        return tuple(fn(full))

    _, tangent = jax.jvp(of_moving, tuple(res[i] for i in moving),
                         tuple(d_res[i] for i in moving))
    return tangent


def _define(primitive, run, in_avals, out_avals, plain):
    """``primitive`` evaluates ``run(pair)(residuals, x)`` (eagerly and when lowered), linear in
    ``x`` (of ``in_avals(pair)``), with outputs of ``out_avals(pair)``. Its JVP: in ``x`` the
    primitive itself; in the residuals (second order) the plain-JAX ``plain(pair)``'s own."""
    primitive.def_impl(lambda *args, pair: run(pair)(*_split(args, pair)))
    primitive.def_abstract_eval(lambda *args, pair: _avals(out_avals(pair)))
    mlir.register_lowering(primitive, mlir.lower_fun(
        lambda *args, pair: run(pair)(*_split(args, pair)), multiple_results=True))

    def jvp(primals, tangents, *, pair):
        res, x = _split(primals, pair)
        d_res, d_x = _split(tangents, pair)
        out = primitive.bind(*res, *x, pair=pair)
        d_out = [jnp.zeros(a.shape, a.dtype) for a in out_avals(pair)]
        if _any_nonzero(d_x):
            d_out = primitive.bind(*res, *_instantiate(d_x, in_avals(pair)), pair=pair)
        if _any_nonzero(d_res):
            by_res = _jvp_in_residuals(lambda r: plain(pair)(r, x), res, d_res)
            d_out = [a + b for a, b in zip(d_out, by_res)]
        return out, d_out

    ad.primitive_jvps[primitive] = jvp


# --- the tangent: evaluated as plain JAX, transposed to the backward -----------------------------

_define(tangent_p, run=lambda pair: pair.tangent, in_avals=lambda pair: pair.lin_avals,
        out_avals=lambda pair: pair.out_avals, plain=lambda pair: pair.tangent)


def _tangent_transpose(cts, *args, pair):
    res, lin = _split(args, pair)
    assert not any(ad.is_undefined_primal(r) for r in res)
    if not _any_nonzero(cts):
        return [None] * len(args)
    if any(type(ct) is not ad.Zero and not reads
           for ct, reads in zip(cts, pair.kernel_outputs)):
        d_lin = pair.transpose_xla(res, _instantiate(cts, pair.out_avals))
    else:
        d_lin = backward_p.bind(*res, *_instantiate(cts, pair.out_avals), pair=pair)
    return [None] * len(res) + list(d_lin)


ad.primitive_transposes[tangent_p] = _tangent_transpose


# --- the backward: runs the caller's (kernel) backward, transposed to the tangent ---------------

# Differentiated in the residuals, it is the plain-JAX transpose's own derivative: never the
# kernel's.
_define(backward_p, run=lambda pair: pair.backward, in_avals=lambda pair: pair.out_avals,
        out_avals=lambda pair: pair.lin_avals, plain=lambda pair: pair.transpose_xla)


def _backward_transpose(cts, *args, pair):
    res, _ = _split(args, pair)
    if not _any_nonzero(cts):
        return [None] * len(args)
    d_cts = tangent_p.bind(*res, *_instantiate(cts, pair.lin_avals), pair=pair)
    return [None] * len(res) + list(d_cts)


ad.primitive_transposes[backward_p] = _backward_transpose


# --- vmap: both vmapped as functions -------------------------------------------------------------

def _batcher(primitive):
    def rule(args, dims, *, pair):
        size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
        res, rest = _split(args, pair)
        res_dims, rest_dims = _split(dims, pair)
        res = [r if d is None else jnp.moveaxis(r, d, 0)
               for r, d in zip(res, res_dims)]
        rest = [batching.bdim_at_front(a, d, size) for a, d in zip(rest, rest_dims)]
        res_axes = [None if d is None else 0 for d in res_dims]
        outs = primitive.bind(*res, *rest, pair=pair.batched(res_axes, size))
        return outs, [0] * len(outs)

    return rule


batching.primitive_batchers[tangent_p] = _batcher(tangent_p)
batching.primitive_batchers[backward_p] = _batcher(backward_p)


def kernel_transposed(tangent: Callable, backward: Callable | dict[str, Callable],
                      residuals: Any, linear: Any, out_like: Any,
                      kernel_outputs: Any = None, default: Callable | None = None) -> Any:
    """``tangent(residuals, linear)``, whose transpose runs ``backward``.

    ``tangent`` is plain JAX and linear in ``linear`` (a pytree of arrays); ``out_like`` is its
    output's structure (a pytree of ``jax.ShapeDtypeStruct``). ``backward(residuals, cotangent)``
    must equal the transpose of ``tangent`` in ``linear``, with ``linear``'s structure; it is
    what ``jax.grad`` runs, and it is never differentiated (derivatives in the residuals use
    ``tangent``'s). A dict ``{platform: backward}`` picks one per lowering platform
    (``lax.platform_dependent``); any other platform runs ``default`` (same signature), or
    ``tangent``'s plain-JAX transpose without one. ``kernel_outputs`` (a pytree of bools like ``out_like``, default all True)
    marks the outputs whose cotangent ``backward`` reads; a backward pass that sends a cotangent
    to any other output uses ``tangent``'s plain-JAX transpose instead.
    """
    res_flat, res_tree = jax.tree_util.tree_flatten(residuals)
    lin_flat, lin_tree = jax.tree_util.tree_flatten(linear)
    out_flat_like, out_tree = jax.tree_util.tree_flatten(out_like)
    reads = ([True] * len(out_flat_like) if kernel_outputs is None
             else jax.tree_util.tree_leaves(kernel_outputs))

    def flat_tangent(res, lin):
        out = tangent(jax.tree_util.tree_unflatten(res_tree, res),
                      jax.tree_util.tree_unflatten(lin_tree, lin))
        return jax.tree_util.tree_leaves(out)

    def flat(fn):
        def run(res, cts):
            d_lin = fn(jax.tree_util.tree_unflatten(res_tree, res),
                       jax.tree_util.tree_unflatten(out_tree, cts))
            return jax.tree_util.tree_leaves(d_lin)

        return run

    if callable(backward):
        flat_backward = flat(backward)
    else:  # per lowering platform; the others run the plain-JAX transpose
        branches = {platform: flat(fn) for platform, fn in backward.items()}
        otherwise = None if default is None else flat(default)

        def flat_backward(res, cts):
            return lax.platform_dependent(res, cts, default=otherwise or pair.transpose_xla,
                                          **branches)

    pair = _Pair(flat_tangent, lambda res, cts: flat_backward(res, cts), len(res_flat),
                 [jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)) for x in lin_flat],
                 [jax.ShapeDtypeStruct(s.shape, s.dtype) for s in out_flat_like], reads)
    outs = tangent_p.bind(*res_flat, *lin_flat, pair=pair)
    return jax.tree_util.tree_unflatten(out_tree, outs)
