"""Flash attention kernels: JAX's maintained Pallas kernels, called for what they serve.

jfuse writes no attention kernel of its own: JAX maintains flash kernels for both backends, and
this module adapts jfuse's call to them and says what they cannot serve.

* **TPU**: splash attention (``jax.experimental.pallas.ops.tpu.splash_attention``), per example
  and vmapped over the batch. Its masks are static objects built here from the call's structure
  (causal, local window), so masked blocks are skipped; grouped-query attention is native. It
  has no scale argument (q is scaled first, as tokamax does) and no bias.
* **GPU**: the Pallas Triton flash kernel (``jax.experimental.pallas.ops.gpu.attention.mha``).
  It takes causal masks only, equal head counts (grouped K/V heads are repeated for it) and
  sequence lengths that are whole blocks.

Both return each query's log-sum-exp (f32), which jfuse's derivative uses to recompute the
probabilities block by block. cuDNN (``jax.nn.dot_product_attention(implementation="cudnn")``) is
not used yet: jax.nn casts its log-sum-exp to the output dtype (bf16), too coarse for that
derivative, and it can only be traced on a machine with a GPU.

Shapes here: q ``(B, N, T, H)``, k and v ``(B, K, S, H)``; outputs ``(out (B, N, T, Hv),
lse (B, N, T) f32)``.
"""

from __future__ import annotations

import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from jfuse.pallas._common import TRITON_DTYPES

# Splash blocks are whole 128-lane tiles; the largest of these that divides a sequence is used.
TPU_BLOCKS = (512, 256, 128)
TRITON_BLOCK = 128  # the Triton kernel's default q and k blocks (min'd with the sequence)


def _common_reason(has_bias, has_mask, has_segments, has_lengths):
    """What neither flash kernel serves (the dense inputs and the masks that can empty a row)."""
    if has_bias:
        return "the flash kernel takes no additive bias"
    if has_mask:
        return "the flash kernel takes no dense mask (only causal or local-window structure)"
    if has_segments:
        return "segment ids: a query whose segment has no keys would differ from dense attention"
    if has_lengths:
        return "per-example key lengths: a query with no valid key would differ from dense code"
    return None


def tpu_unsupported_reason(q_shape, k_shape, v_shape, dtype, *, is_causal, window, soft_cap,
                           has_bias, has_mask, has_segments, has_lengths) -> str | None:
    """Why splash attention cannot serve this call, or None."""
    reason = _common_reason(has_bias, has_mask, has_segments, has_lengths)
    if reason:
        return reason
    if np.dtype(dtype) not in (np.dtype(jnp.float32), np.dtype(jnp.bfloat16)):
        return f"splash attention takes f32 or bf16, not {np.dtype(dtype).name}"
    _, _, t, h = q_shape
    s = k_shape[2]
    if t % 128 or s % 128:
        return f"sequence lengths T={t}, S={s} are not multiples of 128 (splash's lane tile)"
    if window is not None and t > s:
        return "a local window with more queries than keys can leave a query with no key"
    if v_shape[3] != h:
        return "the value head dim differs from the query's"
    return None


def triton_unsupported_reason(q_shape, k_shape, v_shape, dtype, *, is_causal, window, soft_cap,
                              has_bias, has_mask, has_segments, has_lengths) -> str | None:
    """Why the Pallas Triton flash kernel cannot serve this call, or None."""
    reason = _common_reason(has_bias, has_mask, has_segments, has_lengths)
    if reason:
        return reason
    if window is not None:
        return "the Triton flash kernel has no local window"
    if soft_cap is not None:
        return "the Triton flash kernel has no logit soft-cap"
    if np.dtype(dtype) not in [np.dtype(d) for d in TRITON_DTYPES]:
        return f"the Triton flash kernel does not take {np.dtype(dtype).name}"
    _, _, t, h = q_shape
    s = k_shape[2]
    if t % min(TRITON_BLOCK, t) or s % min(TRITON_BLOCK, s):
        return f"sequence lengths T={t}, S={s} are not whole {TRITON_BLOCK}-blocks"
    if v_shape[3] != h:
        return "the value head dim differs from the query's"
    return None


def _tpu_block(n: int) -> int:
    return next(b for b in TPU_BLOCKS if n % b == 0)


def flash_tpu(q, k, v, *, scale: float, is_causal: bool, window, soft_cap, mask_value: float,
              interpret: bool = False):
    """(out, lse) by splash attention; see the module docstring for shapes."""
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_kernel as splash,
        splash_attention_mask as masks,
    )

    _, n, t, _ = q.shape
    s = k.shape[2]
    if window is not None:
        left, right = window
        head = masks.LocalMask((t, s), window_size=(left, 0 if is_causal else right), offset=0)
    elif is_causal:
        head = masks.CausalMask((t, s))
    else:
        head = masks.FullMask((t, s))
    bq, bkv = _tpu_block(t), _tpu_block(s)
    blocks = splash.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv, block_q_dkv=bq,
                               block_kv_dkv=bkv, block_kv_dkv_compute=bkv, block_q_dq=bq,
                               block_kv_dq=bkv)
    # Every query attends at least one key (the reasons above refuse the rest), so the masked
    # value only has to vanish under exp: a finite one serves a user's -inf too.
    finite = mask_value if math.isfinite(mask_value) else splash.DEFAULT_MASK_VALUE
    kernel = splash.make_splash_mha(
        masks.MultiHeadMask([head] * n), block_sizes=blocks, save_residuals=True,
        mask_value=finite, attn_logits_soft_cap=soft_cap, head_shards=1, q_seq_shards=1,
        interpret=interpret)
    scaled = (q.astype(jnp.float32) * jnp.float32(scale)).astype(q.dtype)
    out, (lse,) = jax.vmap(kernel)(scaled, k, v)
    return out, lse.astype(jnp.float32)


def flash_triton(q, k, v, *, scale: float, is_causal: bool, interpret: bool = False, **_):
    """(out, lse) by the Pallas Triton flash kernel; see the module docstring for shapes."""
    with warnings.catch_warnings():
        # jax >= 0.12 deprecates the Triton ops in favour of tokamax (an optional dependency).
        warnings.simplefilter("ignore", DeprecationWarning)
        from jax.experimental.pallas.ops.gpu import attention as triton_attention

    n, kv_heads = q.shape[1], k.shape[1]
    if n != kv_heads:  # the kernel indexes K/V by the query head
        k, v = (jnp.repeat(a, n // kv_heads, axis=1) for a in (k, v))
    q, k, v = (jnp.swapaxes(a, 1, 2) for a in (q, k, v))  # (B, T, N, H)
    t, s = q.shape[1], k.shape[1]
    blocks = triton_attention.BlockSizes(
        block_q=min(TRITON_BLOCK, t), block_k=min(TRITON_BLOCK, s), block_q_dkv=32,
        block_kv_dkv=32, block_q_dq=32, block_kv_dq=32)
    out, lse2 = triton_attention.mha(q, k, v, None, sm_scale=scale, causal=is_causal,
                                     block_sizes=blocks, interpret=interpret,
                                     return_residuals=True)
    # The kernel works in base 2 (exp2 of scores·log2 e): its log-sum-exp is in bits.
    return jnp.swapaxes(out, 1, 2), lse2 * jnp.float32(math.log(2.0))
