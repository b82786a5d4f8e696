"""``linear_cross_entropy``: a language model's head and loss without the (tokens, vocab) logits.

The logits ``z = h·W (+ b)`` of an LM head, f32 and kept for the backward with their softmax, are
the largest buffers of a small model's training step. Every cross-entropy variant is an
elementwise function of three per-token *logit statistics*, so the fused op computes only those:

* ``lse = logsumexp(z)``, ``z_label = z[label]`` and (for label smoothing) ``z_mean = mean(z)``,
  all f32 (f64 for f64 inputs), with ``z`` optionally soft-capped (``cap·tanh(z / cap)``);
* **forward** (every platform): a ``lax.scan`` over vocabulary blocks holding one ``(T, block)``
  block of logits at a time, with an online log-sum-exp. A ragged last block is computed at its own
  size, so no padded column ever enters the log-sum-exp;
* **derivative**: a ``jax.custom_jvp`` whose tangent is itself a scan over vocabulary blocks that
  recomputes each block's logits inside ``jax.checkpoint`` and accumulates, with
  ``dz = dh·W + h·dW (+ db)`` and ``p = exp(z - lse)``: ``d lse = Σ p·dz``,
  ``d z_label = dz[label]``, ``d z_mean = mean(dz)``. ``grad`` transposes it block by block, so
  the backward holds one block of logits too; ``dh`` is accumulated across blocks in f32 and each
  block of ``dW`` is one matmul over all tokens. jvp, vmap and higher derivatives keep working.

The loss (``nll = lse - z_label``, z-loss ``λ·lse²``, smoothing ``(1-ε)·nll + ε·(lse - z_mean)``,
ignored tokens and reductions) is plain JAX on O(tokens) vectors outside the op.

Label semantics follow the code being matched (``label_mode``): ``"take"`` is
``jnp.take_along_axis``'s (and so optax's integer-label loss): a label in ``[0, V)`` picks its
logit, one in ``[-V, 0)`` wraps to ``label + V``, anything else gives NaN; ``"one_hot"`` is a
contraction with ``jax.nn.one_hot(label, V)``: an out-of-range label picks 0.

The chunked XLA version runs on every platform, and the fusion report says so per platform. A
Pallas kernel would fuse each block's matmul with its log-sum-exp, but the block matmul does 2K
flops per logit it writes, so it is compute-bound and XLA already hands it to the vendor's GEMM
(cuBLAS, the MXU): fusing saves only the block's logits round trip through memory. A kernel goes
in when a device run (``benchmarks.device_check``) measures one faster than this version.

Example::

    loss = jfuse.ops.linear_cross_entropy(h, w, labels, reduction="mean", ignore_index=-100)
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.custom_derivatives import linear_call

from jfuse._jax import compat
from jfuse.ops import _partitionable
from jfuse.ops._autodiff import recompute_in_backward
from jfuse.ops._dispatch import OpCall, check_implementation, dispatch
from jfuse.ops._op import Benchmark, FusedOp, OpSpec, apply, is_zero
from jfuse.sharding.rules import Layout
from jfuse.sharding.vocabulary_rule import operand_spec, vocabulary_split

__all__ = ["linear_cross_entropy"]

Array = jax.Array

# Vocabulary columns per block: the logits held at once are (T, BLOCK_V) f32. On a 2-core CPU
# at T=1024, K=256, V=32k, value_and_grad took 0.79x (512), 0.66-0.76x (1024, two sweeps), 0.74x
# (2048) and 0.84x (4096) of the dense loss's time, with 4, 8, 16, 32 MiB of temp memory.
BLOCK_V = 1024
LABEL_MODES = ("take", "one_hot")
REDUCTIONS = ("none", "mean", "sum")
NO_KERNEL = "chunked over the vocabulary; no Pallas kernel is measured faster"


@dataclasses.dataclass(frozen=True, eq=False, kw_only=True)
class LinearCrossEntropySpec(OpSpec):
    """Everything about one call that is not an array: ``W`` as ``(V, K)`` (tied embeddings,
    ``h·Eᵀ``) when ``transpose_w``, the soft cap, the label semantics, and whether ``z_mean`` is
    wanted."""

    transpose_w: bool = False
    soft_cap: float | None = None
    label_mode: str = "take"
    with_mean: bool = False
    block_v: int = BLOCK_V


OPERANDS = ("h", "w", "labels", "bias")


@dataclasses.dataclass
class _Problem:
    h: Any  # (T, K)
    w: Any  # (K, V) or (V, K): this call's vocabulary (one shard's slice on a split vocabulary)
    labels: Any  # (T,) int32, as indices into this call's columns (out of range: none matches)
    valid: Any  # (T,) bool: the label picks a column of the whole vocabulary
    bias: Any  # (V,) or None
    vocab: int  # this call's columns
    vocab_total: int  # the whole vocabulary's (z_mean divides by it)
    block: int
    acc: Any  # the accumulation scalar type: f32 (f64 for f64 inputs)

    @property
    def blocks(self) -> tuple[int, int]:
        """(whole blocks, ragged columns): the whole blocks are scanned, the ragged remainder is
        one more step at its own static size (so nothing is padded)."""
        return self.vocab // self.block, self.vocab % self.block


def _problem(spec: LinearCrossEntropySpec, operands, vocab_total: int | None = None,
             vocab_start: Any = 0) -> _Problem:
    """The call's arrays and sizes. On a shard of a split vocabulary, ``vocab_total`` is the whole
    vocabulary and ``vocab_start`` the shard's first column: labels are read (wrapped, checked)
    against the whole vocabulary, then shifted to the shard's columns."""
    h, w, labels, bias = operands
    vocab = w.shape[0] if spec.transpose_w else w.shape[1]
    vocab_total = vocab if vocab_total is None else vocab_total
    labels = labels.astype(jnp.int32)
    if spec.label_mode == "take":
        labels = jnp.where(labels < 0, labels + vocab_total, labels)
    valid = (labels >= 0) & (labels < vocab_total)
    # An invalid label must match no column of any shard (a shifted -1 could match one).
    labels = jnp.where(valid, labels - vocab_start, -1)
    acc = np.dtype(jnp.promote_types(jnp.float32, jnp.promote_types(h.dtype, w.dtype))).type
    return _Problem(h=h, w=w, labels=labels, valid=valid, bias=bias, vocab=vocab,
                    vocab_total=vocab_total, block=min(spec.block_v, vocab), acc=acc)


def _slice(a, start, size, axis):
    """``size`` entries of ``a`` along ``axis`` from ``start``: static for a static start (the
    first block), and no slice at all when that block is the whole axis."""
    if isinstance(start, int):
        if start == 0 and size == a.shape[axis]:
            return a
        return lax.slice_in_dim(a, start, start + size, axis=axis)
    return lax.dynamic_slice_in_dim(a, start, size, axis=axis)


def _w_block(spec, w, start, size):
    return _slice(w, start, size, axis=0 if spec.transpose_w else 1)


def _whole_w_blocks(spec, w, whole, block):
    """The first ``whole`` blocks of W's vocabulary, stacked first: (whole, block, K) for a
    (V, K) W, (whole, K, block) for a (K, V) one (what :func:`_w_block` slices one at a time)."""
    if spec.transpose_w:
        return jnp.reshape(w[:whole * block], (whole, block) + w.shape[1:])
    k = w.shape[0]
    return jnp.moveaxis(jnp.reshape(w[:, :whole * block], (k, whole, block)), 1, 0)


def _matmul(spec, a, wj, acc):
    """(T, K) · a block of W, in f32 (the inputs' common dtype, f32 accumulation)."""
    dtype = jnp.promote_types(a.dtype, wj.dtype)
    dims = (((1,), (1 if spec.transpose_w else 0,)), ((), ()))
    return lax.dot_general(a.astype(dtype), wj.astype(dtype), dims, preferred_element_type=acc)


def _logits(spec, p: _Problem, start, size):
    """(raw, z): one block's logits before and after the soft cap, (T, size) f32."""
    raw = _matmul(spec, p.h, _w_block(spec, p.w, start, size), p.acc)
    if p.bias is not None:
        raw = raw + _slice(p.bias, start, size, axis=0).astype(p.acc)[None, :]
    z = raw
    if spec.soft_cap is not None:
        cap = p.acc(spec.soft_cap)
        z = jnp.tanh(raw / cap) * cap
    return raw, z


def _is_label(p: _Problem, start, size):
    columns = lax.broadcasted_iota(jnp.int32, (1, size), 1)
    if not (isinstance(start, int) and start == 0):
        columns = start + columns
    return columns == p.labels[:, None]


def _partial_statistics(spec: LinearCrossEntropySpec, p: _Problem):
    """(log-sum-exp, Σ z[label], Σ z) over this call's columns: an online log-sum-exp over
    vocabulary blocks."""
    t = p.h.shape[0]

    def step(carry, start, size):
        m, s, zl, zsum = carry
        _, z = _logits(spec, p, start, size)
        m_new = jnp.maximum(m, jnp.max(z, axis=-1))
        # Columns all -inf so far (a masked slice, maybe a whole shard's): shift by 0, so the
        # sum stays 0 and the log-sum-exp -inf (as jax.nn.logsumexp), not NaN.
        shift = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        s = s * jnp.exp(m - shift) + jnp.sum(jnp.exp(z - shift[:, None]), axis=-1)
        zl = zl + jnp.sum(jnp.where(_is_label(p, start, size), z, 0.0), axis=-1)
        if spec.with_mean:
            zsum = zsum + jnp.sum(z, axis=-1)
        return m_new, s, zl, zsum

    zeros = jnp.zeros((t,), p.acc)
    carry = (jnp.full((t,), -jnp.inf, p.acc), zeros, zeros, zeros)
    whole, ragged = p.blocks
    if whole == 1:  # a one-step loop gains nothing and costs compile time: the block, static
        carry = step(carry, 0, p.block)
    elif whole:
        carry, _ = lax.scan(lambda c, j: (step(c, j * p.block, p.block), None), carry,
                            jnp.arange(whole, dtype=jnp.int32))
    if ragged:
        carry = step(carry, whole * p.block, ragged)
    m, s, zl, zsum = carry
    return m + jnp.log(s), zl, zsum


def _finish(spec: LinearCrossEntropySpec, p: _Problem, lse, zl, zsum):
    """The op's outputs from the whole vocabulary's statistics."""
    if spec.label_mode == "take":  # take_along_axis fills an out-of-range gather with NaN
        zl = jnp.where(p.valid, zl, jnp.nan)
    return lse, zl, (zsum / p.acc(p.vocab_total) if spec.with_mean else None)


def _forward_xla(spec: LinearCrossEntropySpec, operands):
    """(lse, z_label, z_mean or None) over the whole vocabulary."""
    p = _problem(spec, operands)
    return _finish(spec, p, *_partial_statistics(spec, p))


def _tangent_xla(spec: LinearCrossEntropySpec, operands, tangents, lse, vocab_total=None,
                 vocab_start=0):
    """(d lse, d z_label, d z_mean or None): one checkpointed scan over vocabulary blocks. On a
    shard of a split vocabulary (see :func:`_problem`), each is this shard's part of the sum."""
    p = _problem(spec, operands, vocab_total, vocab_start)
    dh, dw, db = tangents
    # dh enters every block: its cotangent is summed across blocks, in f32 (not in h's dtype).
    dh = None if dh is None else dh.astype(p.acc)
    t = p.h.shape[0]

    def block(start, size, dw_j, db_j):
        raw, z = _logits(spec, p, start, size)
        dz = jnp.zeros(z.shape, p.acc)
        if dh is not None:
            dz = dz + _matmul(spec, dh, _w_block(spec, p.w, start, size), p.acc)
        if dw_j is not None:
            dz = dz + _matmul(spec, p.h, dw_j, p.acc)
        if db_j is not None:
            dz = dz + db_j.astype(p.acc)[None, :]
        if spec.soft_cap is not None:
            th = jnp.tanh(raw / p.acc(spec.soft_cap))
            dz = dz * (1.0 - th * th)
        probs = jnp.exp(z - lse[:, None])
        dlse = jnp.sum(probs * dz, axis=-1)
        dzl = jnp.sum(jnp.where(_is_label(p, start, size), dz, 0.0), axis=-1)
        dzsum = jnp.sum(dz, axis=-1) if spec.with_mean else jnp.zeros_like(dlse)
        return dlse, dzl, dzsum

    def add(carry, parts):
        return tuple(c + d for c, d in zip(carry, parts))

    zeros = jnp.zeros((t,), p.acc)
    carry = (zeros, zeros, zeros)
    whole, ragged = p.blocks
    if whole == 1:  # one whole block: no loop (as in the forward), its slices static
        first_block = recompute_in_backward(lambda dw_j, db_j: block(0, p.block, dw_j, db_j))
        carry = add(carry, first_block(
            None if dw is None else _w_block(spec, dw, 0, p.block),
            None if db is None else _slice(db, 0, p.block, axis=0)))
    elif whole:
        # dW's and db's blocks enter the scan as its per-step inputs: sliced inside the body,
        # the transposed scan would add a full-size (K, V) update at every step.
        xs = {"j": jnp.arange(whole, dtype=jnp.int32),
              "dw": None if dw is None else _whole_w_blocks(spec, dw, whole, p.block),
              "db": None if db is None else jnp.reshape(db[:whole * p.block], (whole, p.block))}
        whole_block = recompute_in_backward(
            lambda x: block(x["j"] * p.block, p.block, x["dw"], x["db"]))
        carry, _ = lax.scan(lambda c, x: (add(c, whole_block(x)), None), carry, xs)
    if ragged:
        start = whole * p.block
        ragged_block = recompute_in_backward(lambda start: block(
            start, ragged, None if dw is None else _w_block(spec, dw, start, ragged),
            None if db is None else _slice(db, start, ragged, axis=0)))
        carry = add(carry, ragged_block(jnp.int32(start)))
    dlse, dzl, dzsum = carry
    return dlse, dzl, (dzsum / p.acc(p.vocab_total) if spec.with_mean else None)


# --- on a mesh ----------------------------------------------------------------------------------
# The op has no kernel, but XLA cannot partition its blockwise scans well over a split vocabulary
# (it gathers W and every device reduces the whole vocabulary). So while jfuse lays a program out
# (jfuse.sharding.partition), the forward and the backward each leave a marker, and the layout
# rule (jfuse.sharding.vocabulary_rule) runs them per shard with the exact combine below. The
# backward is its own marker because the partition pass sees the program after autodiff: the
# tangent is a ``linear_call`` whose transpose is that marker.

_BACKWARD_OUTPUTS = ("dh", "dw", "db")
_COTANGENTS = ("ct_lse", "ct_z_label", "ct_z_mean")


def _psum(x, axes):
    return lax.psum(x, axes) if axes and x is not None else x


def _shard_start(split, local_vocab):
    """This shard's first vocabulary column (0 when the vocabulary is whole)."""
    if not split.vocabulary:
        return 0
    return lax.axis_index(split.vocabulary) * local_vocab


def _local_vocab(spec, w):
    return w.shape[0] if spec.transpose_w else w.shape[1]


def _per_shard_forward(spec, split, names):
    """One shard's forward: its vocabulary slice's statistics, combined across the slices."""

    def run(*shards):
        ops = dict(zip(names, shards))
        operands = (ops["h"], ops["w"], ops["labels"], ops.get("bias"))
        p = _problem(spec, operands, split.vocab_size,
                     _shard_start(split, _local_vocab(spec, ops["w"])))
        lse, zl, zsum = _partial_statistics(spec, p)
        axes = split.vocabulary
        if axes:
            m = lax.pmax(lse, axes)
            m = jnp.where(jnp.isfinite(m), m, 0.0)  # every slice -inf: the sum below is 0
            lse = m + jnp.log(lax.psum(jnp.exp(lse - m), axes))
            zl, zsum = lax.psum(zl, axes), lax.psum(zsum, axes)
        return tuple(out for out in _finish(spec, p, lse, zl, zsum) if out is not None)

    return run


def _backward(spec, operands, lse, cotangents, present, split=None):
    """Cotangents of the ``present`` differentiated operands (of ``("dh", "dw", "db")``) from
    those of ``(lse, z_label, z_mean)``: the transpose of :func:`_tangent_xla`. On a shard
    (``split``), that of its vocabulary slice, summed across the shards."""
    h, w, _, bias = operands
    vocab_total = None if split is None else split.vocab_size
    start = 0 if split is None else _shard_start(split, _local_vocab(spec, w))
    acc = jnp.promote_types(jnp.float32, jnp.promote_types(h.dtype, w.dtype))
    # Summed across blocks and shards: in f32, cast to the operands' dtypes once at the end.
    dtypes = {"dh": h.dtype, "dw": w.dtype, "db": None if bias is None else bias.dtype}
    avals = {"dh": jax.ShapeDtypeStruct(h.shape, acc), "dw": jax.ShapeDtypeStruct(w.shape, acc),
             "db": None if bias is None else jax.ShapeDtypeStruct(bias.shape, acc)}

    def tangent(lin):
        return _tangent_xla(spec, operands, tuple(lin.get(k) for k in _BACKWARD_OUTPUTS), lse,
                            vocab_total, start)

    lin_avals = {k: avals[k] for k in present}
    cts = tuple(cotangents)
    (grads,) = jax.linear_transpose(tangent, lin_avals)(cts)
    if split is not None:
        grads = {k: _psum(g, split.vocabulary if k == "dh" else split.tokens)
                 for k, g in grads.items()}
    return {k: g.astype(dtypes[k]) for k, g in grads.items()}


def _per_shard_backward(spec, split, names, present):
    def run(*shards):
        ops = dict(zip(names, shards))
        operands = (ops["h"], ops["w"], ops["labels"], ops.get("bias"))
        cts = tuple(ops.get(name) for name in _COTANGENTS)
        grads = _backward(spec, operands, ops["lse"], cts, present, split)
        return tuple(grads[k] for k in present)

    return run


def _layout(spec, call, specs, out_avals, mesh, present=None):
    """The forward's (``present`` None) or the backward's layout rule (see the mesh section)."""
    names = [role.split("/")[0] for role in call.roles]
    split = vocabulary_split(names, specs, call.operand_avals, mesh, spec.transpose_w)
    if isinstance(split, str):
        return split
    in_specs = tuple(operand_spec(name, len(aval.shape), split, spec.transpose_w)
                     for name, aval in zip(names, call.operand_avals))
    if present is None:
        out_specs = tuple((split.tokens,) for _ in out_avals)
        per_shard = _per_shard_forward(spec, split, names)
    else:
        out_specs = tuple(operand_spec(k, len(a.shape), split, spec.transpose_w)
                          for k, a in zip(present, out_avals))
        per_shard = _per_shard_backward(spec, split, names, present)
    return Layout(in_specs, out_specs, split.describe(backward=present is not None),
                  per_shard=per_shard)


def _no_kernel(backend, interpret):
    raise NotImplementedError(NO_KERNEL)


def _laid_out_on_a_mesh(spec, operands, tangents) -> bool:
    """Whether this call's derivative must leave its own marker: while jfuse lays a program out
    on a mesh (as the forward does), unless vmapped (``linear_call`` cannot be batched: the
    derivative then runs XLA's partitioned ops, still exact)."""
    return (spec.implementation != "xla"
            and _partitionable.partitioning_active()
            and _partitionable.mesh_of(jax.tree_util.tree_leaves(operands)) is not None
            and not compat.is_batched((operands, tangents)))


def _tangent_on_a_mesh(spec, operands, tangents, lse):
    """The tangent as a ``linear_call`` whose transpose (what ``grad`` runs) is a marker the
    partition pass lays out per shard."""
    h, w, labels, bias = operands
    lin = {k: t for k, t in zip(_BACKWARD_OUTPUTS, tangents) if t is not None}
    present = tuple(lin)
    res = (h, w, labels, bias, lse)

    def tangent(res, lin):
        h, w, labels, bias, lse = res
        return _tangent_xla(spec, (h, w, labels, bias),
                            tuple(lin.get(k) for k in _BACKWARD_OUTPUTS), lse)

    def transpose(res, cts):
        h, w, labels, bias, lse = res
        flat = (h, w, labels, bias, lse) + tuple(cts)
        names = ("h", "w", "labels", "bias", "lse") + _COTANGENTS

        def global_backward(*ops):
            ops = dict(zip(names, ops))
            grads = _backward(spec, (ops["h"], ops["w"], ops["labels"], ops["bias"]),
                              ops["lse"], tuple(ops[n] for n in _COTANGENTS), present)
            return {k: grads[k] for k in present}

        with jax.numpy_rank_promotion("allow"):  # traced when grad transposes, not in _internal
            return dispatch(spec.implementation, OpCall(
                pattern=LinearCrossEntropy.name,
                operands=flat,
                roles=tuple(f"{n}/linear_cross_entropy" for n in names),
                contracts_features=True,
                reference=global_backward,
                local_reference=global_backward,
                kernel=_no_kernel,
                layout_rule=functools.partial(_layout, spec, present=present),
            ))

    return linear_call(tangent, transpose, res, lin)


class LinearCrossEntropy(FusedOp):
    """Per-token logit statistics of ``h·W (+ b)``. Operands as :data:`OPERANDS` (h ``(T, K)``,
    labels ``(T,)``); full outputs ``(lse, z_label, z_mean or None)``, each ``(T,)`` f32."""

    name = "linear_cross_entropy"

    def reference(self, spec: LinearCrossEntropySpec, operands, full):
        # The chunked version is the XLA implementation even inside a rewrite: replaying the
        # user's equations would build the logits this op exists to avoid.
        return _forward_xla(spec, operands)

    def outputs(self, spec, full_outputs):
        return tuple(full_outputs)

    def tangents(self, spec: LinearCrossEntropySpec, operands, tangents, full_outputs):
        dh, dw, _, db = (None if is_zero(t) else t for t in tangents)
        lse, zl, zm = full_outputs
        if dh is None and dw is None and db is None:
            zero = jnp.zeros(lse.shape, lse.dtype)
            return zero, zero, (zero if zm is not None else None)
        if _laid_out_on_a_mesh(spec, operands, (dh, dw, db)):
            return _tangent_on_a_mesh(spec, operands, (dh, dw, db), lse)
        return _tangent_xla(spec, operands, (dh, dw, db), lse)

    def kernel(self, spec, inputs, backend, interpret, full):
        raise NotImplementedError(NO_KERNEL)

    def unsupported_reason(self, spec, platform, avals):
        return NO_KERNEL

    def roles(self, spec, operands):
        return tuple(f"{name}/linear_cross_entropy" for name in OPERANDS)

    def layout_rule_for(self, spec):
        return functools.partial(_layout, spec)


LINEAR_CROSS_ENTROPY = LinearCrossEntropy()


def logit_statistics(h, w, labels, bias=None, *, implementation=None, **spec_fields):
    """The op as the rewrite calls it (no argument checks): ``(lse, z_label, z_mean or None)``
    per token of ``h`` ``(T, K)``, spec fields as keywords."""
    spec = LinearCrossEntropySpec(implementation=implementation, **spec_fields)
    return apply(LINEAR_CROSS_ENTROPY, spec, h, w, labels, bias)


def linear_cross_entropy_refusals(h_aval, w_aval, labels_aval, bias_aval=None,
                                  **spec_fields) -> dict[str, str]:
    """Per lowering platform, why its kernel will not run this call (for the fusion report)."""
    spec = LinearCrossEntropySpec(**spec_fields)
    return LINEAR_CROSS_ENTROPY.refusals(spec, [h_aval, w_aval, labels_aval, bias_aval])


# --- the public op -----------------------------------------------------------------------------

def _fail(kind, message):
    raise kind(f"jfuse.ops.linear_cross_entropy: {message}")


def _number(name, value, low=0.0, high=None):
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= low or (
            high is not None and not value <= high):
        bounds = f"in [{low}, {high}]" if high is not None else f">= {low}"
        _fail(ValueError, f"{name} must be a number {bounds}, got {value!r}.")
    return float(value)


def linear_cross_entropy(
    h: Array,
    w: Array,
    labels: Array,
    *,
    bias: Array | None = None,
    transpose_w: bool = False,
    logits_soft_cap: float | None = None,
    reduction: str = "none",
    ignore_index: int | None = None,
    z_loss: float = 0.0,
    label_smoothing: float = 0.0,
    implementation: str | None = None,
) -> Array:
    """Cross-entropy of the logits ``h·W (+ bias)`` against integer labels, without ever holding
    the ``(tokens, vocab)`` logits, in forward or backward; differentiable to any order.

    Per token, with ``z`` the logits (soft-capped to ``cap·tanh(z / cap)`` if asked) and
    ``lse = logsumexp(z)``: ``loss = (1 - ε)·(lse - z[label]) + ε·(lse - mean(z)) + λ·lse²``.
    Statistics are computed in f32 for any input dtype (f64 for f64); the loss is f32 (f64).

    Args:
      h: ``(..., K)`` hidden states, floating.
      w: ``(K, V)``, or ``(V, K)`` with ``transpose_w=True`` (a tied embedding table: ``h·Eᵀ``).
      labels: integer, ``h.shape[:-1]``. As ``optax.softmax_cross_entropy_with_integer_labels``
        (``jnp.take_along_axis``): a label in ``[-V, 0)`` reads column ``label + V``, one outside
        ``[-V, V)`` gives NaN, unless it equals ``ignore_index``.
      bias: optional ``(V,)``, added to the logits before the soft cap.
      transpose_w: ``w`` is ``(V, K)``.
      logits_soft_cap: Gemma 2's ``final_logit_softcap``: ``z ← cap·tanh(z / cap)``.
      reduction: ``"none"`` (per-token losses, ``h.shape[:-1]``), ``"sum"`` or ``"mean"`` (over
        the tokens not ignored).
      ignore_index: tokens with this label contribute 0 to the loss and its gradient (e.g. -100).
      z_loss: ``λ``, the weight of PaLM's ``lse²`` term (e.g. 1e-4).
      label_smoothing: ``ε`` in ``[0, 1]``: the target is ``(1 - ε)·one_hot + ε / V``.
      implementation: as for :func:`jfuse.ops.linear` (no kernel yet: XLA runs everywhere).

    Example::

        >>> h, w = jnp.ones((2, 8, 16)), jnp.ones((16, 100))
        >>> labels = jnp.zeros((2, 8), jnp.int32)
        >>> jfuse.ops.linear_cross_entropy(h, w, labels, reduction="mean").shape
        ()
    """
    check_implementation(implementation)
    h, w, labels = jnp.asarray(h), jnp.asarray(w), jnp.asarray(labels)
    for name, a in (("h", h), ("w", w)):
        if not jnp.issubdtype(a.dtype, jnp.floating):
            _fail(TypeError, f"{name} must be a floating array, got dtype {a.dtype}.")
    if h.ndim < 1:
        _fail(ValueError, f"h must be (..., K), got shape {h.shape}.")
    if w.ndim != 2:
        _fail(ValueError, f"w must be 2-D ((K, V), or (V, K) with transpose_w=True), got shape "
                          f"{w.shape}.")
    k = h.shape[-1]
    vocab, w_k = (w.shape if transpose_w else w.shape[::-1])
    if w_k != k:
        layout = "(V, K)" if transpose_w else "(K, V)"
        _fail(ValueError, f"w must be {layout} with K = h.shape[-1] = {k}, got shape {w.shape}"
                          + ("" if transpose_w else " (pass transpose_w=True for a (V, K) table)")
                          + ".")
    if not jnp.issubdtype(labels.dtype, jnp.integer) or labels.shape != h.shape[:-1]:
        _fail(ValueError, f"labels must be an integer array of shape h.shape[:-1] = "
                          f"{h.shape[:-1]}, got {labels.dtype}{list(labels.shape)}.")
    if bias is not None:
        bias = jnp.asarray(bias)
        if not jnp.issubdtype(bias.dtype, jnp.floating) or bias.shape != (vocab,):
            _fail(ValueError, f"bias must be a floating array of shape ({vocab},), got "
                              f"{bias.dtype}{list(bias.shape)}.")
    if reduction not in REDUCTIONS:
        _fail(ValueError, f"reduction must be one of {REDUCTIONS}, got {reduction!r}.")
    if logits_soft_cap is not None:
        logits_soft_cap = _number("logits_soft_cap", logits_soft_cap)
        if logits_soft_cap == 0:
            _fail(ValueError, "logits_soft_cap must be positive, got 0.")
    z_loss = _number("z_loss", z_loss)
    label_smoothing = _number("label_smoothing", label_smoothing, 0.0, 1.0)
    if ignore_index is not None and not isinstance(ignore_index, (int, np.integer)):
        _fail(TypeError, f"ignore_index must be an int or None, got {ignore_index!r}.")

    batch = h.shape[:-1]
    labels = labels.reshape(-1)
    ignored = None
    if ignore_index is not None:
        ignored = labels == ignore_index
        labels = jnp.where(ignored, 0, labels)  # no NaN to mask: its loss is replaced below
    lse, z_label, z_mean = logit_statistics(
        h.reshape(-1, k), w, labels, bias, implementation=implementation,
        transpose_w=bool(transpose_w), soft_cap=logits_soft_cap, label_mode="take",
        with_mean=label_smoothing > 0, block_v=BLOCK_V)
    loss = lse - z_label
    if label_smoothing > 0:
        loss = (1.0 - label_smoothing) * loss + label_smoothing * (lse - z_mean)
    if z_loss:
        loss = loss + z_loss * lse * lse
    if ignored is not None:
        loss = jnp.where(ignored, 0.0, loss)
    if reduction == "sum":
        return jnp.sum(loss)
    if reduction == "mean":
        count = loss.size if ignored is None else jnp.sum(~ignored)
        return jnp.sum(loss) / count
    return loss.reshape(batch)


def _benchmark() -> Benchmark:
    def inputs(shape, dtype, normal):
        t, k, v = shape
        return normal((t, k)), normal((k, v), k ** -0.5)

    def call(implementation, variant):
        def run(h, w):
            t, v = h.shape[0], w.shape[1]
            labels = (jnp.arange(t, dtype=jnp.int32) * 7919) % v
            return linear_cross_entropy(h, w, labels, implementation=implementation)

        return run

    return Benchmark(
        name="linear_cross_entropy", dims="(T, K, V)", inputs=inputs, call=call,
        has_kernel=False,  # its GPU memory and time against dense logits: benchmarks/lm_head_loss
        flops=lambda shape, variant: 2.0 * shape[0] * shape[1] * shape[2],
        sizes={
            "quick": (((64, 32, 1000), None),),
            "cpu": (((1024, 256, 32768), None),),
            "accelerator": (((8192, 2048, 131072), None),),
            "device": (((8192, 2048, 131072), None), ((4096, 4096, 151936), None)),
        })


BENCHMARKS = (_benchmark(),)
