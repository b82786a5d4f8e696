"""``attention``: softmax(Q·Kᵀ·scale + bias, masked)·V without the (T, S) scores in memory.

The scores and probabilities of dense attention, ``(batch, heads, T, S)`` per layer and kept for
the backward, are most of a transformer's live memory. This op never holds more than one key
block of them:

* **forward** (every platform's XLA path): an online softmax over key blocks (a ``lax.scan``
  carrying the running max, sum and output), which also returns the f32 log-sum-exp per query;
* **derivative**: a ``jax.custom_jvp`` whose tangent is itself a scan over key blocks that
  recomputes each block's probabilities from the log-sum-exp, inside ``jax.checkpoint``. With
  ``p = exp(s - lse)`` and ``ds`` the scores' tangent, ``dO = Σ p·ds·V − (Σ p·ds)·O + Σ p·dV``.
  ``grad`` transposes that scan block by block, so the backward is O(T) as well, and jvp, vmap
  and higher derivatives keep working (a ``custom_vjp`` would refuse forward mode);
* **kernels**: JAX's maintained flash kernels serve the forward where their conditions hold, chosen
  per call (see :meth:`Attention.unsupported_reason`): splash attention on TPU; on GPU cuDNN's
  flash attention, else the Pallas Triton flash kernel; elsewhere the blockwise XLA path runs.

The masks jfuse can classify are structure, not arrays: ``is_causal``, a ``local_window_size``,
segment ids and per-example key lengths are rebuilt per block from iotas, so a causal mask costs
nothing. Anything else is a dense boolean ``mask`` or additive ``bias`` (broadcastable to
``(B, N, T, S)``), sliced per key block. A masked score takes ``mask_value`` (the user's constant:
a row with every key masked then averages V, as dense code does; with ``-inf`` it is NaN, as
dense code gives).

Example::

    out = jfuse.ops.attention(q, k, v, is_causal=True)          # q (B, T, N, H), k/v (B, S, K, H)
    out = jfuse.ops.attention(q, k, v, key_value_seq_lengths=lengths, logits_soft_cap=50.0)
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jfuse.ops import _partitionable
from jfuse.ops._autodiff import _lowered_kernel_platforms, recompute_in_backward
from jfuse.ops._dispatch import check_implementation
from jfuse._jax.kernel_transpose import kernel_transposed
from jfuse.ops._op import KERNEL_BACKENDS, Benchmark, FusedOp, OpSpec, apply, is_zero
from jfuse.pallas import attention as kernels
from jfuse.sharding.attention_rule import attention_layout

__all__ = ["attention"]

Array = jax.Array

# jax.nn.dot_product_attention's masked value (also splash's and gemma's): finite, so a row with
# every key masked averages V instead of becoming NaN.
DEFAULT_MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
# Keys per block of the XLA path: the scores held at once are (B, N, T, BLOCK_K) f32.
BLOCK_K = 512
LAYOUTS = ("BTNH", "BNTH")


@dataclasses.dataclass(frozen=True, eq=False, kw_only=True)
class AttentionSpec(OpSpec):
    """Everything about one attention call that is not an array.

    The scores are ``s = (q·kᵀ)·scale`` in f32, then ``cap·tanh(s/cap)`` with a soft cap, then
    ``+ bias``, then ``mask_value`` where masked; the probabilities enter the PV product in
    ``probs_dtype`` (the user's: V's dtype unless the user kept them in f32).
    """

    scale: float
    layout: str = "BTNH"
    is_causal: bool = False
    window: tuple[int | None, int | None] | None = None  # keys i-left ..= i+right (None: open)
    soft_cap: float | None = None
    mask_value: float = DEFAULT_MASK_VALUE
    probs_dtype: Any = None  # None: V's dtype
    out_dtype: Any = None  # None: q's dtype
    block_k: int = BLOCK_K


# Operands, in order. Only q, k, v are required; the others are None when absent.
OPERANDS = ("query", "key", "value", "bias", "mask", "query_segment_ids", "key_segment_ids",
            "key_value_seq_lengths")


# --- the blockwise XLA implementation -----------------------------------------------------------

def _grouped(q, k, v, layout):
    """q as (B, K, G, T, H), k and v as (B, K, S, H): head n of q reads kv head n // G."""
    if layout == "BTNH":
        q, k, v = (jnp.swapaxes(a, 1, 2) for a in (q, k, v))
    b, n, t, h = q.shape
    kv_heads = k.shape[1]
    return jnp.reshape(q, (b, kv_heads, n // kv_heads, t, h)), k, v


def _ungrouped(o, layout):
    b, kv, g, t, h = o.shape
    o = jnp.reshape(o, (b, kv * g, t, h))
    return jnp.swapaxes(o, 1, 2) if layout == "BTNH" else o


def _as_grouped_bnts(a, kv_heads):
    """A (B|1, N|1, T|1, S|1) bias or mask as (B|1, K|1, G|1, T|1, S|1)."""
    if a is None:
        return None
    b, n, t, s = a.shape
    if n == 1:
        return a[:, :, None]
    return jnp.reshape(a, (b, kv_heads, n // kv_heads, t, s))


def _grouped_einsum(subscripts: str, a, b, **kwargs):
    """``jnp.einsum`` over the grouped layout, with a single query group (no GQA) contracted as
    the plain 4-D product it is: XLA lays out a 5-D product with a unit axis with extra copies
    (three more kernels per attention call on a CPU)."""
    if a.shape[2] != 1:
        return jnp.einsum(subscripts, a, b, **kwargs)
    return jnp.einsum(subscripts.replace("g", ""), a[:, :, 0], b, **kwargs)[:, :, None]


def _block_slice(a, start, size, axis=-1):
    """``size`` entries of ``a`` along ``axis`` from ``start``, or ``a`` if broadcast there.
    A static ``start`` (the one block of a short sequence) slices statically, and not at all
    when the block is the whole axis: a model has one such call per layer, and every op left out
    of them is compile time saved."""
    if a is None or a.shape[axis] == 1:
        return a
    if isinstance(start, int):
        if start == 0 and size == a.shape[axis]:
            return a
        return lax.slice_in_dim(a, start, start + size, axis=axis)
    return lax.dynamic_slice_in_dim(a, start, size, axis=axis)


@dataclasses.dataclass
class _Problem:
    """One call's operands in the grouped layout, with S padded to whole key blocks."""

    q: Any  # (B, K, G, T, H)
    k: Any  # (B, K, Sp, H)
    v: Any  # (B, K, Sp, Hv)
    bias: Any  # (B|1, K|1, G|1, T|1, Sp|1) or None
    mask: Any
    q_segments: Any  # (B, T) or None
    kv_segments: Any  # (B, Sp)
    lengths: Any  # (B,) or None
    seq_k: int  # the real S
    block: int
    acc: Any  # the accumulation dtype's scalar type: f32 (f64 for f64 inputs)

    @property
    def blocks(self) -> int:
        return self.k.shape[2] // self.block


def _problem(spec: AttentionSpec, operands) -> _Problem:
    q, k, v, bias, mask, q_seg, kv_seg, lengths = operands
    q, k, v = _grouped(q, k, v, spec.layout)
    seq_k = k.shape[2]
    block = min(spec.block_k, seq_k)
    pad = -seq_k % block

    def pad_s(a, axis):
        if a is None or pad == 0 or a.shape[axis] == 1:
            return a
        widths = [(0, 0)] * a.ndim
        widths[axis % a.ndim] = (0, pad)
        return jnp.pad(a, widths)

    kv_heads = k.shape[1]
    return _Problem(
        q=q, k=pad_s(k, 2), v=pad_s(v, 2),
        bias=pad_s(_as_grouped_bnts(bias, kv_heads), -1),
        mask=pad_s(_as_grouped_bnts(mask, kv_heads), -1),
        q_segments=q_seg, kv_segments=pad_s(kv_seg, 1), lengths=lengths,
        seq_k=seq_k, block=block,
        acc=np.dtype(jnp.promote_types(jnp.float32, q.dtype)).type)


def _keep(spec: AttentionSpec, p: _Problem, start):
    """Which (query, key) pairs of the key block at ``start`` are attended, as a boolean
    broadcastable to (B, K, G, T, block) (None: all of them); padding keys are never attended.
    Also returns the padding-only mask (keys that exist), or None where it is left out."""
    t = p.q.shape[3]
    q_pos = lax.broadcasted_iota(jnp.int32, (t, p.block), 0)
    kv_pos = lax.broadcasted_iota(jnp.int32, (t, p.block), 1)
    if not (isinstance(start, int) and start == 0):
        kv_pos = start + kv_pos
    keep = None

    def both(a, b):
        return b if a is None else a & b

    if spec.is_causal:
        keep = both(keep, kv_pos <= q_pos)
    if spec.window is not None:
        left, right = spec.window
        if left is not None:
            keep = both(keep, kv_pos >= q_pos - left)
        if right is not None:
            keep = both(keep, kv_pos <= q_pos + right)
    keep = None if keep is None else keep[None, None, None]
    if p.q_segments is not None:
        kv_seg = _block_slice(p.kv_segments, start, p.block, axis=1)
        same = p.q_segments[:, :, None] == kv_seg[:, None, :]  # (B, T, block)
        keep = both(keep, same[:, None, None])
    if p.lengths is not None:
        valid = (start + jnp.arange(p.block, dtype=jnp.int32))[None, :] < p.lengths[:, None]
        keep = both(keep, valid[:, None, None, None, :])
    if p.mask is not None:
        keep = both(keep, _block_slice(p.mask, start, p.block))
    # Every key exists when S has no padding. The always-true mask is left out only where that
    # changes no result: one block, and another mask's select in its place. Without any select
    # there (or in the scan), XLA regroups the scores' arithmetic and results move by an ulp.
    padded = p.k.shape[2] != p.seq_k
    exists = None
    if padded or p.blocks > 1 or keep is None:
        exists = (kv_pos < p.seq_k)[None, None, None]
    return keep, exists


def _scores(spec: AttentionSpec, p: _Problem, q, kj, start):
    """(t, s, keep, exists) of one key block: ``t`` the scaled products, ``s`` the scores as the
    softmax reads them (soft-capped, biased, masked, and -inf for padding keys)."""
    acc = p.acc
    t = _grouped_einsum("bkgth,bksh->bkgts", q, kj, preferred_element_type=acc)
    t = t * acc(spec.scale)
    s = t
    if spec.soft_cap is not None:
        cap = acc(spec.soft_cap)
        s = jnp.tanh(s / cap) * cap
    if p.bias is not None:
        s = s + _block_slice(p.bias, start, p.block).astype(acc)
    keep, exists = _keep(spec, p, start)
    if keep is not None:
        s = jnp.where(keep, s, acc(spec.mask_value))
    if exists is not None:
        s = jnp.where(exists, s, -jnp.inf)
    return t, s, keep, exists


def _over_blocks(body, init, blocks: int, block: int, per_block=None):
    """``body(carry, xs)`` scanned over the key blocks, ``xs`` holding the block index ``"j"``
    and each ``per_block`` entry ``(array, axis)`` cut to that block along ``axis``; returns the
    final carry.

    With one block, ``body`` runs once on the whole arrays with the static index 0: a one-step
    loop gains nothing, and its slices, its iotas offset by a traced start and the scan's
    linearization and transposition all cost compile time, once per layer of a model."""
    per_block = per_block or {}
    if blocks == 1:
        return body(init, {"j": 0, **{name: a for name, (a, _) in per_block.items()}})
    xs = {"j": jnp.arange(blocks), **{name: _split_blocks(a, axis, block)
                                      for name, (a, axis) in per_block.items()}}
    return lax.scan(lambda carry, x: (body(carry, x), None), init, xs)[0]


def _split_blocks(a, axis: int, block: int):
    """``a`` with ``axis`` split into whole blocks, the block index moved first."""
    axis = axis % a.ndim
    shape = a.shape[:axis] + (a.shape[axis] // block, block) + a.shape[axis + 1:]
    return jnp.moveaxis(jnp.reshape(a, shape), axis, 0)


def _safe(m):
    """The running max where it is finite, else 0 (a row that has seen only -inf so far)."""
    return jnp.where(jnp.isneginf(m), 0.0, m)


def _forward_xla(spec: AttentionSpec, operands):
    """(out, m, l): the online softmax over key blocks, with each query's score max ``m`` and
    sum ``l`` of ``exp(s - m)``, (B, K, G, T) in the accumulation dtype. They are kept apart
    (not as ``m + log l``) because at a masking constant near -3e38, ``m + log l`` rounds to
    ``m``: a fully masked row's probabilities would come out ``S`` times too large."""
    p = _problem(spec, operands)
    b, kv, g, t, _ = p.q.shape
    hv = p.v.shape[-1]
    probs_dtype, acc = spec.probs_dtype or p.v.dtype, p.acc
    # Across blocks, a row that has seen only -inf so far must not turn the next block's exp into
    # NaN. With one block such a row gives 0/0 = NaN either way, as dense code does, and the
    # guard would only be one more kernel to compile per layer.
    guarded = _safe if p.blocks > 1 else (lambda m: m)

    def body(carry, xs):
        start = xs["j"] * p.block
        kj = _block_slice(p.k, start, p.block, axis=2)
        vj = _block_slice(p.v, start, p.block, axis=2)
        _, s, _, _ = _scores(spec, p, p.q, kj, start)
        m_new = jnp.max(s, axis=-1)
        if carry is not None:
            m_new = jnp.maximum(carry[0], m_new)
        e = jnp.exp(s - guarded(m_new)[..., None])
        l = jnp.sum(e, axis=-1)
        o = _grouped_einsum("bkgts,bksh->bkgth", e.astype(probs_dtype), vj,
                            preferred_element_type=acc)
        if carry is not None:  # rescale what the earlier blocks summed
            m, l_before, o_before = carry
            alpha = jnp.exp(m - _safe(m_new))
            l = l_before * alpha + l
            o = o_before * alpha[..., None] + o
        return m_new, l, o

    # One block has nothing to rescale: it starts from no carry (the online softmax's first step
    # from m = -inf, l = 0, o = 0 gives the same values).
    init = None if p.blocks == 1 else (
        jnp.full((b, kv, g, t), -jnp.inf, acc), jnp.zeros((b, kv, g, t), acc),
        jnp.zeros((b, kv, g, t, hv), acc))
    m, l, o = _over_blocks(body, init, p.blocks, p.block)
    # A row with every key at -inf has l = 0: 0/0 is NaN, as the dense softmax gives.
    out = o / l[..., None]
    out_dtype = spec.out_dtype or operands[0].dtype
    return _ungrouped(out, spec.layout).astype(out_dtype), guarded(m), l


def _tangent_xla(spec: AttentionSpec, operands, tangents, out, m, l):
    """(dout, c) in plain primitives, ``c = Σ p·ds`` the tangent of each query's log-sum-exp:
    one checkpointed scan over key blocks (module docs).

    The key-side tangents (dk, dv, a bias's) enter the scan as its per-block inputs rather than
    sliced inside the body: transposed, a slice is a full-size update per step (O(S²) work for
    the keys' gradients), while a per-block input transposes to a per-block output."""
    p = _problem(spec, operands)
    q, k, v = operands[:3]
    dq, dk, dv, dbias = tangents
    # The tangents in the grouped, padded layout of their primals.
    dq = None if dq is None else _grouped(dq, k, v, spec.layout)[0]
    padded = _problem(spec, (q, k if dk is None else dk, v if dv is None else dv,
                             dbias, None, None, None, None))
    dk = None if dk is None else padded.k
    dv = None if dv is None else padded.v
    dbias = padded.bias
    per_block = {}  # the key-side tangents, each cut into key blocks along its S axis
    if dk is not None:
        per_block["dk"] = (dk, 2)
    if dv is not None:
        per_block["dv"] = (dv, 2)
    if dbias is not None and dbias.shape[-1] != 1:
        per_block["dbias"] = (dbias, -1)
    probs_dtype, acc = spec.probs_dtype or p.v.dtype, p.acc
    b, kv, g, t, _ = p.q.shape
    hv = p.v.shape[-1]

    def block(j, xs):
        start = j * p.block
        kj = _block_slice(p.k, start, p.block, axis=2)
        vj = _block_slice(p.v, start, p.block, axis=2)
        tj, s, keep, exists = _scores(spec, p, p.q, kj, start)
        probs = jnp.exp(s - m[..., None]) / l[..., None]
        ds = jnp.zeros(s.shape, acc)
        if dq is not None:
            ds = ds + _grouped_einsum("bkgth,bksh->bkgts", dq, kj, preferred_element_type=acc)
        if dk is not None:
            dkj = xs["dk"]
            ds = ds + _grouped_einsum("bkgth,bksh->bkgts", p.q, dkj,
                                      preferred_element_type=acc)
        ds = ds * acc(spec.scale)
        if spec.soft_cap is not None:
            th = jnp.tanh(tj / acc(spec.soft_cap))
            ds = ds * (1.0 - th * th)
        if dbias is not None:
            dbias_j = xs["dbias"] if "dbias" in xs else dbias
            ds = ds + dbias_j.astype(acc)
        if keep is not None:
            ds = jnp.where(keep, ds, 0.0)
        if exists is not None:
            ds = jnp.where(exists, ds, 0.0)
        pds = probs * ds
        c = jnp.sum(pds, axis=-1)
        if p.blocks == 1:
            # One block holds the whole row: the softmax's own tangent p·(ds − Σ p·ds), as dense
            # autodiff has it. Its transpose reads Σ p·dP, not dO·O: with a peaked row (one
            # valid key) the two terms cancel exactly, where dO·O, rounded through the forward,
            # left noise in dq and dk (5-10x jax.jit's error, found by the attention fuzzer).
            pds = pds - probs * c[..., None]
        a = _grouped_einsum("bkgts,bksh->bkgth", pds.astype(probs_dtype), vj,
                            preferred_element_type=acc)
        if dv is not None:
            dvj = xs["dv"]
            a = a + _grouped_einsum("bkgts,bksh->bkgth", probs.astype(probs_dtype), dvj,
                                    preferred_element_type=acc)
        return a, c

    def body(carry, xs):
        j, per_block_xs = xs["j"], {name: x for name, x in xs.items() if name != "j"}
        if isinstance(j, int):  # one block: its static index stays static inside the remat
            da, dc = recompute_in_backward(lambda x: block(j, x))(per_block_xs)
        else:
            da, dc = recompute_in_backward(block)(j, per_block_xs)
        if carry is None:
            return da, dc
        return carry[0] + da, carry[1] + dc

    init = None if p.blocks == 1 else (
        jnp.zeros((b, kv, g, t, hv), acc), jnp.zeros((b, kv, g, t), acc))
    a, c = _over_blocks(body, init, p.blocks, p.block, per_block)
    if p.blocks == 1:
        dout = a  # the row sum is in ``a`` already
    else:  # across blocks Σ p·ds is known only at the end: dO = Σ p·ds·V − (Σ p·ds)·O + Σ p·dV
        o32 = _grouped(out, operands[1], operands[2], spec.layout)[0].astype(acc)
        dout = a - c[..., None] * o32
    return _ungrouped(dout, spec.layout).astype(out.dtype), c


def _vjp_xla(spec: AttentionSpec, operands, out, m, l, dout, present):
    """The cotangents of the operands at ``present`` (indices into q, k, v, bias) from the
    output's ``dout``: the transpose of :func:`_tangent_xla`, written out the way a flash
    attention backward is (recompute each key block's probabilities from ``m`` and ``l``, then
    ``dV = Pᵀ·dO``, ``dS = P·(dO·Vᵀ − D)``, ``dQ = dS·K``, ``dK = dSᵀ·Q``), so ``jax.grad``
    runs it instead of JAX's transpose of the checkpointed tangent. ``D`` is ``Σ P·(dO·Vᵀ)``
    with one key block (dense autodiff's softmax backward, exact for a peaked row) and
    ``Σ dO·O`` across blocks."""
    p = _problem(spec, operands)
    probs_dtype, acc = spec.probs_dtype or p.v.dtype, p.acc
    q_in, k_in, v_in, bias_in = operands[:4]
    b, kv, g, t, _ = p.q.shape
    do = _grouped(dout, k_in, v_in, spec.layout)[0].astype(acc)
    want_k, want_v, want_bias = 1 in present, 2 in present, 3 in present
    row = None
    if p.blocks > 1:
        o32 = _grouped(out, k_in, v_in, spec.layout)[0].astype(acc)
        row = jnp.sum(do * o32, axis=-1)

    def block(j):
        start = j * p.block
        kj = _block_slice(p.k, start, p.block, axis=2)
        vj = _block_slice(p.v, start, p.block, axis=2)
        tj, s, keep, exists = _scores(spec, p, p.q, kj, start)
        probs = jnp.exp(s - m[..., None]) / l[..., None]
        pv = probs.astype(probs_dtype)
        dp = _grouped_einsum("bkgth,bksh->bkgts", do.astype(probs_dtype), vj,
                             preferred_element_type=acc)
        d = jnp.sum(probs * dp, axis=-1) if row is None else row
        ds = probs * (dp - d[..., None])
        if keep is not None:
            ds = jnp.where(keep, ds, 0.0)
        if exists is not None:
            ds = jnp.where(exists, ds, 0.0)
        # The bias's gradient reduced to its broadcast shape here, block by block: a (1, N, T, S)
        # bias must not cost a (B, N, T, S) buffer in the backward.
        dbias = None
        if want_bias:
            axes = tuple(i for i, n in enumerate(p.bias.shape) if n == 1 and ds.shape[i] != 1)
            dbias = jnp.sum(ds, axis=axes, keepdims=True)
        if spec.soft_cap is not None:
            th = jnp.tanh(tj / acc(spec.soft_cap))
            ds = ds * (1.0 - th * th)
        ds = ds * acc(spec.scale)
        dq = _grouped_einsum("bkgts,bksh->bkgth", ds.astype(p.q.dtype), kj,
                             preferred_element_type=acc)
        dk = (_to_keys(ds.astype(p.q.dtype), p.q, acc) if want_k else None)
        dv = (_to_keys(pv, do.astype(probs_dtype), acc) if want_v else None)
        return dq, dk, dv, dbias

    # A bias broadcast along S has one gradient for every key block: summed in the carry.
    bias_per_block = want_bias and p.bias.shape[-1] != 1
    if p.blocks == 1:
        dq, dk, dv, dbias = block(0)
    else:
        def body(carry, j):
            dq_j, dk, dv, dbias = block(j)
            dq, dbias_sum = carry
            if want_bias and not bias_per_block:
                dbias_sum, dbias = dbias_sum + dbias, None
            return (dq + dq_j, dbias_sum), (dk, dv, dbias)

        bias_init = (jnp.zeros(p.bias.shape, acc) if want_bias and not bias_per_block
                     else None)
        (dq, dbias_sum), (dk, dv, dbias) = lax.scan(
            body, (jnp.zeros(p.q.shape, acc), bias_init), jnp.arange(p.blocks))
        dk = None if dk is None else _unsplit_blocks(dk, 2)
        dv = None if dv is None else _unsplit_blocks(dv, 2)
        dbias = dbias_sum if dbias is None else _unsplit_blocks(dbias, -1)

    def key_side(a, like):  # (B, K, Sp, H) back to the caller's layout and S
        a = a[:, :, :p.seq_k]
        return (jnp.swapaxes(a, 1, 2) if spec.layout == "BTNH" else a).astype(like.dtype)

    grads = {0: _ungrouped(dq, spec.layout).astype(q_in.dtype)}
    if want_k:
        grads[1] = key_side(dk, k_in)
    if want_v:
        grads[2] = key_side(dv, v_in)
    if want_bias:  # the grouped (B|1, K|1, G|1, T|1, Sp|1) layout back to the caller's bias
        if dbias.shape[-1] != 1:
            dbias = dbias[..., :p.seq_k]
        db, dk_, dg, dt, ds_ = dbias.shape
        dbias = jnp.reshape(dbias, (db, dk_ * dg, dt, ds_))
        grads[3] = jnp.reshape(dbias, bias_in.shape).astype(bias_in.dtype)
    return [grads[i] for i in present]


def _to_keys(weights, rows, acc):
    """``Σ_g Σ_t weights[b,k,g,t,s]·rows[b,k,g,t,h]`` as (B, K, S, H): a key block's gradient.
    The group and query axes are merged first (adjacent, so a free reshape) and contracted as
    one: XLA:CPU lays a 5-D product contracting two axes out with a copy of its (G, T, S)
    operand (+20% temp memory with GQA, and likewise with a unit group axis)."""
    b, k, g, t, s = weights.shape
    return jnp.einsum("bkts,bkth->bksh", jnp.reshape(weights, (b, k, g * t, s)),
                      jnp.reshape(rows, (b, k, g * t, rows.shape[-1])),
                      preferred_element_type=acc)


def _unsplit_blocks(a, axis: int):
    """The inverse of :func:`_split_blocks`: the leading block index joined into ``axis``."""
    axis = axis % (a.ndim - 1)
    a = jnp.moveaxis(a, 0, axis)
    return jnp.reshape(a, a.shape[:axis] + (-1,) + a.shape[axis + 2:])


class Attention(FusedOp):
    """softmax(Q·Kᵀ·scale + bias, masked)·V. Operands as :data:`OPERANDS`; full outputs
    ``(out, m, l)``: each query's score max and softmax denominator, (B, K, G, T) f32."""

    name = "attention"
    # The kernels each platform tries, in order (:meth:`_choice`), their refusal rules, and the
    # names the report gives them where a platform has more than one.
    KERNELS = {"tpu": ("splash",), "cuda": ("cudnn", "triton")}
    _REFUSE = {"splash": kernels.tpu_unsupported_reason, "cudnn": kernels.cudnn_unsupported_reason,
               "triton": kernels.triton_unsupported_reason}
    KERNEL_NAMES = {"cudnn": "cuDNN flash attention", "triton": "Pallas Triton flash kernel"}

    def reference(self, spec: AttentionSpec, operands, full):
        out, m, l = _forward_xla(spec, operands)
        return (out, m, l) if full else (out, None, None)

    def tangents(self, spec: AttentionSpec, operands, tangents, full_outputs):
        d = [None if is_zero(t) else t for t in tangents[:4]]
        out, m, l = full_outputs
        zero_m = jnp.zeros(m.shape, m.dtype)  # m only stabilizes: lse = m + log l moves by l
        if all(t is None for t in d):
            return jnp.zeros(out.shape, out.dtype), zero_m, jnp.zeros(l.shape, l.dtype)
        # The tangent is evaluated as the blockwise XLA tangent (forward mode); jax.grad runs
        # its transpose: the kernel's own backward where a kernel serves the forward, else the
        # blockwise backward written out (_vjp_xla).
        present = [i for i, t in enumerate(d) if t is not None]

        def tangent(res, lin):
            d_all = [None] * 4
            for i, t in zip(present, lin):
                d_all[i] = t
            return _tangent_xla(spec, res[0], d_all, *res[1:])

        def xla_backward(res, cts):
            operands_, out_, m_, l_ = res
            return _vjp_xla(spec, operands_, out_, m_, l_, cts[0], present)

        dout, dlse = kernel_transposed(
            tangent, self._kernel_backward(spec, operands, d) or xla_backward,
            (operands, out, m, l), [d[i] for i in present],
            out_like=(jax.ShapeDtypeStruct(out.shape, out.dtype),
                      jax.ShapeDtypeStruct(l.shape, l.dtype)),
            kernel_outputs=(True, False),  # the backwards take no log-sum-exp cotangent
            default=xla_backward)
        return dout, zero_m, l * dlse

    def _kernel_backward(self, spec: AttentionSpec, operands, d):
        """The backward of the kernels that serve this call's forward, per lowering platform
        (:func:`kernel_transposed`'s ``backward``), or None where no kernel serves it (XLA's
        blockwise derivative then runs everywhere, as before). Each is the kernel library's
        own VJP of the forward (cuDNN's backward graph, the Triton and splash backward kernels);
        it takes only the query, key and value tangents (no kernel serves a bias), and not on a
        mesh (a kernel in the backward would not be partitioned; the forward's are, per shard)."""
        if d[3] is not None or _partitionable.mesh_of(jax.tree_util.tree_leaves(operands)) is not None:
            return None
        platforms = _lowered_kernel_platforms(self, spec, operands)
        if platforms is not None and not platforms:
            return None
        present = [i for i, t in enumerate(d) if t is not None]

        def vjp(backend, interpret):
            def run(res, cts):
                ops = list(res[0])

                def forward(*differentiated):
                    for i, x in zip(present, differentiated):
                        ops[i] = x
                    return self.kernel(spec, tuple(ops), backend, interpret, full=False)[0]

                _, pullback = jax.vjp(forward, *[res[0][i] for i in present])
                return list(pullback(cts[0]))

            return run

        if platforms is None:  # interpret mode: every platform runs the interpreted kernels
            avals = [None if o is None else jax.typeof(o) for o in operands]
            if self._choice(spec, "tpu", avals, interpret=True)[0] is None:
                return None  # the interpreted forward is the blockwise XLA one: its backward
            return vjp("tpu", True)
        return {p: vjp(KERNEL_BACKENDS[p], False) for p in sorted(platforms)}

    def kernel(self, spec: AttentionSpec, operands, backend, interpret, full):
        platform = "tpu" if backend == "tpu" else "cuda"
        avals = [None if o is None else jax.typeof(o) for o in operands]
        name, reasons = self._choice(spec, platform, avals, interpret)
        if name is None:
            if not interpret:  # dispatch asked unsupported_reason first: not reached
                raise NotImplementedError("; ".join(dict.fromkeys(reasons.values())))
            # Interpret mode runs no platform check before the kernel (the other ops' kernels
            # serve any shape); JAX's flash kernels do not, so a call they cannot take runs the
            # blockwise XLA version, as it would on the device.
            return self.reference(spec, operands, full)
        q, k, v = operands[:3]
        fields = dict(scale=spec.scale, is_causal=spec.is_causal, window=spec.window,
                      soft_cap=spec.soft_cap, mask_value=spec.mask_value, interpret=interpret,
                      with_lse=full)
        if name == "cudnn":  # reads either layout as it is
            out, lse = kernels.flash_cudnn(q, k, v, layout=spec.layout, **fields)
        else:
            if spec.layout == "BTNH":  # the Pallas kernels take (B, heads, T, H)
                q, k, v = (jnp.swapaxes(a, 1, 2) for a in (q, k, v))
            run = kernels.flash_tpu if name == "splash" else kernels.flash_triton
            out, lse = run(q, k, v, **fields)
            if spec.layout == "BTNH":
                out = jnp.swapaxes(out, 1, 2)
        out = out.astype(spec.out_dtype or operands[0].dtype)
        if not full:
            return out, None, None
        b, n, t = lse.shape
        kv_heads = operands[1].shape[1 if spec.layout == "BNTH" else 2]
        m = jnp.reshape(lse, (b, kv_heads, n // kv_heads, t))
        # The kernels return m + log l as one number: with l = 1 the derivative reads it as is.
        return out, m, jnp.ones(m.shape, m.dtype)

    def _choice(self, spec: AttentionSpec, platform, avals, interpret=False):
        """(the first of ``platform``'s kernels that serves the call, or None; each tried
        kernel's reason, None where it serves). GPU tries cuDNN, then Triton."""
        q, k, v, bias, mask, q_seg, _, lengths = avals
        shapes = [a.shape for a in (q, k, v)]
        if spec.layout == "BTNH":
            shapes = [(b, n, t, h) for b, t, n, h in shapes]
        reasons = {}
        for name in self.KERNELS[platform]:
            if name == "cudnn" and interpret:
                reasons[name] = "cuDNN has no interpret mode"
                continue
            reason = self._REFUSE[name](
                *shapes, q.dtype, is_causal=spec.is_causal, window=spec.window,
                soft_cap=spec.soft_cap, has_bias=bias is not None, has_mask=mask is not None,
                has_segments=q_seg is not None, has_lengths=lengths is not None)
            if reason is None and (k.dtype != q.dtype or v.dtype != q.dtype):
                reason = f"q, k and v have different dtypes ({q.dtype}, {k.dtype}, {v.dtype})"
            if reason is None:
                reason = _rounding_reason(spec, q.dtype)
            if (reason is None and name in _MASK_WITH_NEG_INF and spec.mask_value > MASKED_LIMIT
                    and (spec.is_causal or spec.window is not None)):
                reason = (f"the {self.KERNEL_NAMES[name]} masks with -inf: a masked score of "
                          f"{spec.mask_value:g} still weighs in the user's softmax")
            reasons[name] = reason
            if reason is None:
                return name, reasons
        return None, reasons

    def unsupported_reason(self, spec: AttentionSpec, platform, avals):
        name, reasons = self._choice(spec, platform, avals)
        if name is not None:
            return None
        # Every kernel refused: each one's reason, once (a bias stops them all alike).
        return "; ".join(dict.fromkeys(reasons.values()))

    def kernel_name(self, spec: AttentionSpec, platform, avals):
        name, _ = self._choice(spec, platform, avals)
        return self.KERNEL_NAMES.get(name)

    def roles(self, spec: AttentionSpec, operands):
        # Each operand's name and the layout, for the attention layout rule.
        return tuple(f"{name}/{spec.layout}" for name in OPERANDS)

    layout_rule = staticmethod(attention_layout)


def _rounding_reason(spec: AttentionSpec, kernel_dtype) -> str | None:
    """Why a kernel computing in ``kernel_dtype`` (q's: every kernel multiplies the probabilities
    by V and writes its output in it) would round what the user's program keeps wider, or None.
    Code that keeps the probabilities in f32 for the PV product (bf16 V upcast), or asks that
    product for an f32 result, gets a more exact answer from jax.jit than from a bf16 kernel."""
    kernel_dtype = np.dtype(kernel_dtype)
    for what, dtype in (("probabilities enter the PV product", spec.probs_dtype),
                        ("attention output is", spec.out_dtype)):
        if dtype is not None and np.dtype(dtype).itemsize > kernel_dtype.itemsize:
            return (f"the user's {what} in {np.dtype(dtype).name}; the kernels round it to "
                    f"{kernel_dtype.name}")
    return None


# Kernels that take no masking value (they mask with -inf) serve a user's finite one only where
# exp(mask_value - max score) is 0 in f32 for any sane scores: at most -1e4 (-1e9, -1e30,
# finfo.min, -0.7·max, -inf all are). Splash takes the user's value itself.
_MASK_WITH_NEG_INF = frozenset({"cudnn", "triton"})
MASKED_LIMIT = -1e4

ATTENTION = Attention()


def fused_attention(q, k, v, bias=None, mask=None, q_segments=None, kv_segments=None,
                    lengths=None, *, implementation=None, **spec_fields) -> Array:
    """The op as the rewrite calls it (no argument checks): spec fields as keywords."""
    spec = AttentionSpec(implementation=implementation, **spec_fields)
    return apply(ATTENTION, spec, q, k, v, bias, mask, q_segments, kv_segments, lengths)


# --- the public op -----------------------------------------------------------------------------

def _fail(kind, message):
    raise kind(f"jfuse.ops.attention: {message}")


def _check_broadcast(name, a, full, dtype_kind):
    a = jnp.asarray(a)
    if dtype_kind == "bool" and a.dtype != jnp.bool_:
        _fail(TypeError, f"{name} must be a boolean array (True: attend), got dtype {a.dtype}.")
    if dtype_kind == "float" and not jnp.issubdtype(a.dtype, jnp.floating):
        _fail(TypeError, f"{name} must be a floating array, got dtype {a.dtype}.")
    if a.ndim != 4 or any(d not in (1, f) for d, f in zip(a.shape, full)):
        _fail(ValueError, f"{name} must be 4-D and broadcastable to (B, N, T, S) = {full}, "
                          f"got shape {a.shape}.")
    return a


def attention(
    query: Array,
    key: Array,
    value: Array,
    *,
    bias: Array | None = None,
    mask: Array | None = None,
    scale: float | None = None,
    is_causal: bool = False,
    local_window_size: int | tuple[int | None, int | None] | None = None,
    query_segment_ids: Array | None = None,
    key_segment_ids: Array | None = None,
    key_value_seq_lengths: Array | None = None,
    logits_soft_cap: float | None = None,
    mask_value: float = DEFAULT_MASK_VALUE,
    layout: str = "BTNH",
    implementation: str | None = None,
) -> Array:
    """Multi-head attention with O(T) memory in forward and backward, differentiable to any order.

    Computes ``softmax(where(mask, cap·tanh(q·kᵀ·scale / cap) + bias, mask_value)) · v`` with the
    scores and the softmax in f32, never holding more than one block of keys' scores.

    Args:
      query: ``(B, T, N, H)`` (``layout="BTNH"``, as ``jax.nn.dot_product_attention``) or
        ``(B, N, T, H)`` (``layout="BNTH"``).
      key: ``(B, S, K, H)`` (or ``(B, K, S, H)``) with ``N % K == 0``: grouped-query attention
        reads kv head ``n // (N // K)`` for query head ``n``, without repeating K and V.
      value: ``(B, S, K, Hv)`` (or ``(B, K, S, Hv)``), any ``Hv``.
      bias: optional additive bias, 4-D, broadcastable to ``(B, N, T, S)`` (in that order for
        either layout).
      mask: optional boolean, broadcastable to ``(B, N, T, S)``: True where a query attends.
      scale: multiplies the scores; default ``1/sqrt(H)``.
      is_causal: query ``i`` attends keys ``j <= i`` (``jnp.tril`` of a ``(T, S)`` array).
      local_window_size: ``w`` or ``(left, right)``: query ``i`` attends keys
        ``i - left <= j <= i + right`` (None on a side: unbounded). ``w`` means ``(w, w)``.
      query_segment_ids, key_segment_ids: optional integer ``(B, T)`` and ``(B, S)``: attend
        only within equal ids (packed sequences). Give both or neither.
      key_value_seq_lengths: optional integer ``(B,)``: keys ``j >= length`` are masked (padding).
      logits_soft_cap: Gemma 2's ``cap·tanh(s / cap)`` on the scaled scores, before bias and mask.
      mask_value: what a masked score becomes (the masking constant of the code being matched).
        Finite: a row with every key masked averages V; ``-inf``: such a row is NaN.
      layout: ``"BTNH"`` or ``"BNTH"``; the output has query's layout and dtype.
      implementation: as for :func:`jfuse.ops.linear`.

    Example::

        >>> q = jnp.ones((2, 16, 4, 8)); kv = jnp.ones((2, 16, 2, 8))
        >>> jfuse.ops.attention(q, kv, kv, is_causal=True).shape
        (2, 16, 4, 8)
    """
    check_implementation(implementation)
    if layout not in LAYOUTS:
        _fail(ValueError, f"layout must be one of {LAYOUTS}, got {layout!r}.")
    arrays = []
    for name, a in (("query", query), ("key", key), ("value", value)):
        a = jnp.asarray(a)
        if a.ndim != 4:
            _fail(ValueError, f"{name} must be 4-D ({layout}), got shape {a.shape}.")
        if not jnp.issubdtype(a.dtype, jnp.floating):
            _fail(TypeError, f"{name} must be a floating array, got dtype {a.dtype}.")
        arrays.append(a)
    query, key, value = arrays
    heads_axis, seq_axis = (2, 1) if layout == "BTNH" else (1, 2)
    b, t, n, h = (query.shape[0], query.shape[seq_axis], query.shape[heads_axis], query.shape[3])
    s, kv_heads = key.shape[seq_axis], key.shape[heads_axis]
    if key.shape[0] != b or key.shape[3] != h:
        _fail(ValueError, f"key must have query's batch {b} and head dim {h}, got shape "
                          f"{key.shape}.")
    if value.shape[:3] != key.shape[:3]:
        _fail(ValueError, f"value must match key's batch, sequence and heads {key.shape[:3]}, "
                          f"got shape {value.shape}.")
    if n % kv_heads:
        _fail(ValueError, f"query's {n} heads must be a multiple of key's {kv_heads} heads.")
    if key.dtype != value.dtype:
        _fail(TypeError, f"key and value must share a dtype, got {key.dtype} and {value.dtype}.")
    full = (b, n, t, s)
    if bias is not None:
        bias = _check_broadcast("bias", bias, full, "float")
    if mask is not None:
        mask = _check_broadcast("mask", mask, full, "bool")
    if (query_segment_ids is None) != (key_segment_ids is None):
        _fail(ValueError, "give both query_segment_ids and key_segment_ids, or neither.")
    if query_segment_ids is not None:
        query_segment_ids = jnp.asarray(query_segment_ids)
        key_segment_ids = jnp.asarray(key_segment_ids)
        for name, a, shape in (("query_segment_ids", query_segment_ids, (b, t)),
                               ("key_segment_ids", key_segment_ids, (b, s))):
            if a.shape != shape or not jnp.issubdtype(a.dtype, jnp.integer):
                _fail(ValueError, f"{name} must be an integer array of shape {shape}, got "
                                  f"{a.dtype}{list(a.shape)}.")
    if key_value_seq_lengths is not None:
        key_value_seq_lengths = jnp.asarray(key_value_seq_lengths)
        if (key_value_seq_lengths.shape != (b,)
                or not jnp.issubdtype(key_value_seq_lengths.dtype, jnp.integer)):
            _fail(ValueError, f"key_value_seq_lengths must be an integer array of shape ({b},), "
                              f"got {key_value_seq_lengths.dtype}"
                              f"{list(key_value_seq_lengths.shape)}.")
        key_value_seq_lengths = key_value_seq_lengths.astype(jnp.int32)
    window = local_window_size
    if window is not None:
        window = (window, window) if isinstance(window, int) else tuple(window)
        if len(window) != 2 or any(w is not None and (not isinstance(w, int) or w < 0)
                                   for w in window):
            _fail(ValueError, "local_window_size must be a non-negative int or a pair of them "
                              f"(None for an open side), got {local_window_size!r}.")
    if scale is None:
        scale = 1.0 / math.sqrt(h)
    if not isinstance(scale, (int, float)):
        _fail(TypeError, f"scale must be a Python number, got {type(scale).__name__}.")
    if logits_soft_cap is not None and not logits_soft_cap > 0:
        _fail(ValueError, f"logits_soft_cap must be positive, got {logits_soft_cap!r}.")
    return fused_attention(
        query, key, value, bias, mask, query_segment_ids, key_segment_ids,
        key_value_seq_lengths, implementation=implementation, scale=float(scale), layout=layout,
        is_causal=bool(is_causal), window=window,
        soft_cap=None if logits_soft_cap is None else float(logits_soft_cap),
        mask_value=float(mask_value))


def _benchmark() -> Benchmark:
    """Variants: ``causal`` or None (unmasked) time the op against its own blockwise XLA
    version; ``causal vs dense`` and ``causal vs cudnn`` time it against what users run without
    jfuse: jax.nn's dense XLA attention and its cuDNN flash attention (GPU, f16/bf16 only). On a
    GPU the op's own forward is cuDNN's in f16/bf16 and Triton's in f32 (the timing row's ``ran``
    column says which), so ``causal vs cudnn`` in bf16 compares jfuse's derivative with cuDNN's
    backward."""

    def inputs(shape, dtype, normal):
        b, t, n, h = shape
        return normal((b, t, n, h)), normal((b, t, n, h)), normal((b, t, n, h))

    def call(implementation, variant):
        causal = variant is not None and variant.startswith("causal")
        baseline = variant.split(" vs ")[1] if variant and " vs " in variant else None
        if implementation == "xla" and baseline is not None:
            return lambda q, k, v: jax.nn.dot_product_attention(
                q, k, v, is_causal=causal, implementation=None if baseline == "dense" else "cudnn")

        def run(q, k, v):
            return attention(q, k, v, is_causal=causal, implementation=implementation)

        return run

    big = (4, 4096, 16, 128)
    return Benchmark(
        name="attention", dims="(B, T, N, H)", inputs=inputs, call=call,
        flops=lambda shape, variant: 4.0 * shape[0] * shape[2] * shape[1] ** 2 * shape[3],
        sizes={
            "quick": (((1, 128, 2, 32), "causal"),),
            "cpu": (((1, 2048, 4, 64), "causal"), ((1, 2048, 4, 64), "causal vs dense")),
            "accelerator": ((big, "causal"), (big, "causal vs dense")),
            "device": ((big, "causal"), (big, None), (big, "causal vs dense"),
                       (big, "causal vs cudnn")),
        },
        # cuDNN's flash attention refuses f32: that baseline would be an error row.
        variant_dtypes={"causal vs cudnn": ("bfloat16", "float16")})


BENCHMARKS = (_benchmark(),)
