"""Flash attention kernels: JAX's maintained kernels, called for what they serve.

jfuse writes no attention kernel of its own: JAX maintains flash kernels for both backends, and
this module adapts jfuse's call to them and says what each cannot serve.

* **TPU**: splash attention (``jax.experimental.pallas.ops.tpu.splash_attention``), per example
  and vmapped over the batch. Its masks are static objects built here from the call's structure
  (causal, local window), so masked blocks are skipped; grouped-query attention is native. It
  has no scale argument (q is scaled first, as tokamax does) and no bias.
* **GPU, first choice**: cuDNN's flash attention, the function behind
  ``jax.nn.dot_product_attention(implementation="cudnn")`` (through :mod:`jfuse._jax.cudnn`,
  because jax.nn casts the log-sum-exp to the output dtype). f16/bf16, head dims cuDNN takes
  (multiples of 8 up to 128, 256 on Hopper), causal (top-left, jfuse's convention) or unmasked,
  a left window with causal, native grouped-query attention, either layout read as it is. It
  traces only where the installed jaxlib has cuDNN, so on a CPU-only machine GPU lowering uses
  the Triton kernel.
* **GPU, otherwise**: the Pallas Triton flash kernel
  (``jax.experimental.pallas.ops.gpu.attention.mha``): causal masks only, equal head counts
  (grouped K/V heads are repeated for it), sequence lengths that are whole blocks; f32 too.

Each returns each query's log-sum-exp (f32) where asked (``with_lse``), which jfuse's XLA
derivative uses to recompute the probabilities block by block. Where a kernel serves the forward,
``jax.grad`` runs that kernel's own backward (its VJP, from a forward without the log-sum-exp,
the form each library differentiates; see :mod:`jfuse._jax.kernel_transpose`). None of them takes a bias, a dense mask,
segment ids or key lengths here (see :func:`_common_reason`).

Shapes here: q ``(B, N, T, H)``, k and v ``(B, K, S, H)``; outputs ``(out (B, N, T, Hv),
lse (B, N, T) f32)``. :func:`flash_cudnn` also reads and writes ``(B, T, N, H)`` when told
(``layout="BTNH"``), so the op passes the user's layout through without transposes.
"""

from __future__ import annotations

import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from jfuse._jax import cudnn
from jfuse.pallas._common import TRITON_DTYPES

# Splash blocks are whole 128-lane tiles; the largest of these that divides a sequence is used.
TPU_BLOCKS = (512, 256, 128)
TRITON_BLOCK = 128  # the Triton kernel's largest q and k blocks (min'd with the sequence)
# What the forward's q block and two pipeline stages of K and V blocks may take of a GPU's
# shared memory (an H100/H200 block has 227 KiB). Measured on an H200: f32 at head dim 128 with
# 128-blocks asked for 256 KiB and failed to launch (RESOURCE_EXHAUSTED).
TRITON_SHARED_BYTES = 200 * 1024


def triton_block(length: int, head_dim: int, dtype) -> int:
    """The Triton kernel's q or k block for a sequence of ``length``: the largest power of two
    up to :data:`TRITON_BLOCK` whose q block and two stages of K and V blocks fit
    :data:`TRITON_SHARED_BYTES` (f32 at head dim 128: 64), and no longer than the sequence."""
    block = TRITON_BLOCK
    while block > 16 and 5 * block * head_dim * np.dtype(dtype).itemsize > TRITON_SHARED_BYTES:
        block //= 2
    return min(block, length)
CUDNN_DTYPES = (jnp.float16, jnp.bfloat16)  # cuDNN's flash attention refuses f32 (fp8 unused)
CUDNN_SLIDING_WINDOW_VERSION = 90200  # cuDNN frontend: no sliding window before 9.2.0
# cuDNN's SDPA "requires SM80 (Ampere) or newer" (docs.nvidia.com/deeplearning/cudnn/frontend,
# operations/Attention): an older GPU runs the Triton kernel instead.
CUDNN_MIN_CAPABILITY = "8.0"


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
    if is_causal and s != t:
        # Measured on an H200 (2026-11-28): f32, T=1024, S=512, 0.074 from float64 where
        # jax.jit was 0.00048 off; jfuse's causal mask is top-left, the kernel's is not.
        return ("the Triton flash kernel's causal mask is not top-left when S != T (it "
                "mismatched float64 on an H200)")
    block_q, block_k = triton_block(t, h, dtype), triton_block(s, h, dtype)
    if t % block_q or s % block_k:
        return f"sequence lengths T={t}, S={s} are not whole {max(block_q, block_k)}-blocks"
    if v_shape[3] != h:
        return "the value head dim differs from the query's"
    return None


def _cudnn_mask(is_causal: bool, window) -> tuple[bool, int | None] | str:
    """jfuse's causal flag and window as cuDNN's (causal, sliding_window_length), or why not.

    cuDNN's window is ``sliding_window_length = w``: keys ``i - w < j <= i``, and its frontend
    accepts it only together with the (top-left) causal mask. So a window serves when its right
    side is closed at the query, by ``is_causal`` or a right bound of 0; its left bound ``l``
    (keys ``j >= i - l``) is ``w = l + 1``, and an open left side is plain causal."""
    if window is None:
        return is_causal, None
    left, right = window
    if not (is_causal or right == 0):
        return "cuDNN's local window ends at the query: it needs is_causal or a right bound of 0"
    return True, None if left is None else left + 1


def cudnn_unsupported_reason(q_shape, k_shape, v_shape, dtype, *, is_causal, window, soft_cap,
                             has_bias, has_mask, has_segments, has_lengths) -> str | None:
    """Why cuDNN's flash attention cannot serve this call, or None.

    The checks that need no GPU come first, so their reasons are the same on every machine; then
    whether this machine's jaxlib has cuDNN at all (the entry point cannot be traced without it);
    then JAX's own checks, for anything they refuse that jfuse did not foresee."""
    # cuDNN takes a bias, and JAX turns a boolean mask into one (a materialized (T, S) array
    # of large negatives): neither is verified to give jfuse's answer (its f32 scores, a fully
    # masked row averaging V), so neither is passed on.
    if has_bias:
        return "jfuse passes no additive bias to cuDNN (not verified against its f32 scores)"
    if has_mask:
        return ("jfuse passes no dense mask to cuDNN (JAX would make it a (T, S) bias; a fully "
                "masked row would differ)")
    reason = _common_reason(False, False, has_segments, has_lengths)
    if reason:
        return reason
    if soft_cap is not None:
        return "cuDNN flash attention has no logit soft-cap"
    if np.dtype(dtype) not in [np.dtype(d) for d in CUDNN_DTYPES]:
        return f"cuDNN flash attention takes float16 or bfloat16, not {np.dtype(dtype).name}"
    mask = _cudnn_mask(is_causal, window)
    if isinstance(mask, str):
        return mask
    _, _, t, h = q_shape
    s = k_shape[2]
    if window is not None and t > s:
        return "a local window with more queries than keys can leave a query with no key"
    if v_shape[3] != h:
        # cuDNN takes it from 9.10 on Hopper (JAX: "mla"); not exercised here yet.
        return "the value head dim differs from the query's"
    hopper = cudnn.gpu_at_least("9.0")
    limit = 256 if hopper else 128
    if h % 8 or h > limit:
        where = "" if hopper else " (256 on Hopper or newer)"
        return f"head dim {h}: cuDNN takes multiples of 8 up to {limit}{where}"
    version = cudnn.version()
    if version is None:
        return "cuDNN is not available on this machine"
    if cudnn.gpu_below(CUDNN_MIN_CAPABILITY):
        # Caught here rather than by a failed compile, which would run the whole program on XLA
        # instead of the Triton kernel.
        return (f"cuDNN flash attention needs compute capability {CUDNN_MIN_CAPABILITY} (Ampere) "
                "or newer")
    if mask[1] is not None and version < CUDNN_SLIDING_WINDOW_VERSION:
        return f"cuDNN {version} has no sliding window (9.2 or newer)"
    refused = cudnn.refusal(q_shape, k_shape, v_shape, dtype, cudnn_version=version)
    return None if refused is None else f"cuDNN refuses it: {refused}"


def _tpu_block(n: int) -> int:
    return next(b for b in TPU_BLOCKS if n % b == 0)


def flash_tpu(q, k, v, *, scale: float, is_causal: bool, window, soft_cap, mask_value: float,
              interpret: bool = False, with_lse: bool = True):
    """(out, lse) by splash attention; see the module docstring for shapes. ``with_lse=False``
    returns (out, None) from the kernel without residuals, the one splash can differentiate."""
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
        masks.MultiHeadMask([head] * n), block_sizes=blocks, save_residuals=with_lse,
        mask_value=finite, attn_logits_soft_cap=soft_cap, head_shards=1, q_seq_shards=1,
        interpret=interpret)
    scaled = (q.astype(jnp.float32) * jnp.float32(scale)).astype(q.dtype)
    if not with_lse:
        return jax.vmap(kernel)(scaled, k, v), None
    out, (lse,) = jax.vmap(kernel)(scaled, k, v)
    return out, lse.astype(jnp.float32)


def flash_triton(q, k, v, *, scale: float, is_causal: bool, interpret: bool = False,
                 with_lse: bool = True, **_):
    """(out, lse) by the Pallas Triton flash kernel; see the module docstring for shapes.
    ``with_lse=False`` returns (out, None) from the call without residuals, the one the kernel
    can differentiate (its backward kernels)."""
    with warnings.catch_warnings():
        # jax >= 0.12 deprecates the Triton ops in favour of tokamax (an optional dependency).
        warnings.simplefilter("ignore", DeprecationWarning)
        from jax.experimental.pallas.ops.gpu import attention as triton_attention

    n, kv_heads = q.shape[1], k.shape[1]
    if n != kv_heads:  # the kernel indexes K/V by the query head
        k, v = (jnp.repeat(a, n // kv_heads, axis=1) for a in (k, v))
    q, k, v = (jnp.swapaxes(a, 1, 2) for a in (q, k, v))  # (B, T, N, H)
    t, s, h = q.shape[1], k.shape[1], q.shape[3]
    blocks = triton_attention.BlockSizes(
        block_q=triton_block(t, h, q.dtype), block_k=triton_block(s, h, q.dtype), block_q_dkv=32,
        block_kv_dkv=32, block_q_dq=32, block_kv_dq=32)
    outs = triton_attention.mha(q, k, v, None, sm_scale=scale, causal=is_causal,
                                block_sizes=blocks, interpret=interpret,
                                return_residuals=with_lse)
    if not with_lse:
        return jnp.swapaxes(outs, 1, 2), None
    out, lse2 = outs
    # The kernel works in base 2 (exp2 of scores·log2 e): its log-sum-exp is in bits.
    return jnp.swapaxes(out, 1, 2), lse2 * jnp.float32(math.log(2.0))


def flash_cudnn(q, k, v, *, scale: float, is_causal: bool, window=None, soft_cap=None,
                mask_value: float | None = None, layout: str = "BNTH", interpret: bool = False,
                with_lse: bool = True, **_):
    """(out, lse) by cuDNN's flash attention; see the module docstring for shapes. ``layout``
    is q, k, v's and the output's: "BNTH" (as :func:`flash_triton`) or "BTNH".

    ``mask_value`` is not passed on: cuDNN masks with its own large negative value, and that is
    the same answer as any other, because every query this is asked to serve attends at least
    one key (a causal row ``i`` always has key 0; a window is refused where a row could be empty;
    dense masks, segments and key lengths, which can empty a row, are refused), so the masked
    scores only have to vanish under exp."""
    del mask_value
    if interpret:
        raise NotImplementedError("cuDNN has no interpret mode")
    bnth = [a.shape if layout == "BNTH" else (a.shape[0], a.shape[2], a.shape[1], a.shape[3])
            for a in (q, k, v)]
    reason = cudnn_unsupported_reason(
        *bnth, q.dtype, is_causal=is_causal, window=window, soft_cap=soft_cap, has_bias=False,
        has_mask=False, has_segments=False, has_lengths=False)
    if reason is None and not (k.dtype == v.dtype == q.dtype):
        reason = f"q, k and v have different dtypes ({q.dtype}, {k.dtype}, {v.dtype})"
    if reason:
        raise NotImplementedError(reason)
    causal, sliding_window = _cudnn_mask(is_causal, window)
    out, lse = cudnn.attention(q, k, v, scale=scale, causal=causal, layout=layout,
                               sliding_window_length=sliding_window, with_lse=with_lse)
    if not with_lse:
        return out, None
    return out, lse.astype(jnp.float32)  # f32 already: cuDNN's softmax statistics
