"""Block-shape, VMEM and masking rules shared by jfuse's Pallas kernel modules (``linear``,
``glu``, ``norm``).

* TPU (Mosaic): the (sublane, 128-lane) tiling rule that legal blocks follow, the VMEM budget
  that default blocks stay within (and the scoped-VMEM limit a larger block asks for), and the
  block-size choosers: balanced defaults, checked caller-forced blocks, the K block that needs
  no padding beyond lane alignment, and the three blocks of a matmul kernel.
* Triton: power-of-two block choice, default K slices, and the edge masks, masked loads and
  masked stores that let a kernel over whole-array refs handle ragged edges without padding.

The per-op defaults (how large a block may get) stay in each kernel module; the rules that a
block of any op must follow are here. Nothing here knows about jaxprs or about a particular op.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental.pallas import triton as pltriton

from jfuse.pallas._common import cdiv, is_power_of_2, next_power_of_2, round_up

Array = jax.Array

# ----------------------------------------------------------------------------------------------
# TPU (Mosaic)
# ----------------------------------------------------------------------------------------------

TPU_LANES = 128
# VMEM one grid step of a default-sized block may hold: under Mosaic's default scoped limit on
# every chip (16 MiB per core on v4 and v5e), so default blocks never raise that limit. Only
# caller-forced blocks over the budget do (see tpu_vmem_limit_bytes).
TPU_VMEM_BUDGET = 12 * 2**20


def tpu_sublanes(dtype: Any) -> int:
    """Rows of one (sublane, 128-lane) VMEM tile of ``dtype``: the row alignment of a block."""
    # Packed 16-bit dtypes fill a (16, 128) tile; 32-bit ones an (8, 128) tile.
    return 8 * (4 // jnp.dtype(dtype).itemsize)


def tpu_vmem_limit_bytes(vmem: int) -> int | None:
    """The ``vmem_limit_bytes`` for a kernel whose grid step holds ``vmem`` bytes: None (keep
    Mosaic's default) within :data:`TPU_VMEM_BUDGET`, else the need plus 25% headroom."""
    return None if vmem <= TPU_VMEM_BUDGET else int(vmem * 1.25)


def tpu_balanced_block(dim: int, max_block: int, align: int) -> int:
    """The whole dim if it fits, else equal-ish blocks (multiples of ``align``) <= max_block.

    Balancing avoids a mostly-empty last block (M=600 gets 2 x 304, not 512 + 88).
    """
    if dim <= max_block:
        return dim
    return round_up(cdiv(dim, cdiv(dim, max_block)), align)


def tpu_forced_block(name: str, dim: int, block: int, align: int) -> int:
    """A caller-chosen block: clipped to the dim, and checked against Mosaic's tiling rule."""
    if block >= dim:
        return dim
    if block <= 0 or block % align:
        raise ValueError(
            f"{name}={block} must be a multiple of {align} or cover the whole dimension ({dim})."
        )
    return block


def tpu_default_block_k(k: int, max_block: int) -> int:
    """bk = K when it fits; else the largest multiple of 128 <= max that divides K rounded up
    to 128, so K needs no more zero padding than lane alignment already forces."""
    if k <= max_block:
        return k
    k_aligned = round_up(k, TPU_LANES)
    for bk in range(max_block - max_block % TPU_LANES, 0, -TPU_LANES):
        if k_aligned % bk == 0:
            return bk
    return TPU_LANES  # unreachable: 128 divides k_aligned


def tpu_matmul_blocks(
    m: int,
    k: int,
    n: int,
    dtype: Any,
    out_dtype: Any,
    block_m: int | None,
    block_n: int | None,
    block_k: int | None,
    *,
    max_m: int,
    max_n: int,
    max_k: int,
) -> tuple[int, int, int]:
    """``(bm, bn, bk)`` of a Mosaic matmul kernel over ``(M, K) @ (K, N)``.

    A block given by the caller is checked and clipped (:func:`tpu_forced_block`); a missing one
    is balanced up to ``max_m``/``max_n`` (:func:`tpu_balanced_block`) or, for K, chosen by
    :func:`tpu_default_block_k` up to ``max_k``. bm is a row count of both the input and the
    output, so it aligns to the larger sublane tile of the two; bn and bk align to 128 lanes.
    """
    sublanes = max(tpu_sublanes(dtype), tpu_sublanes(out_dtype))
    if block_m is None:
        bm = tpu_balanced_block(m, max_m, sublanes)
    else:
        bm = tpu_forced_block("block_m", m, block_m, sublanes)
    if block_n is None:
        bn = tpu_balanced_block(n, max_n, TPU_LANES)
    else:
        bn = tpu_forced_block("block_n", n, block_n, TPU_LANES)
    if block_k is None:
        bk = tpu_default_block_k(k, max_k)
    else:
        bk = tpu_forced_block("block_k", k, block_k, TPU_LANES)
    return bm, bn, bk


def tpu_pad_k(
    x: Array, weights: tuple[Array, ...], bk: int, weights_transposed: bool
) -> tuple[Array, tuple[Array, ...], int]:
    """Zero-pads the contraction dim K of ``x (M, K)`` and of each weight (``(K, N)``, or
    ``(N, K)`` when transposed) to a whole number of ``bk`` blocks; returns them and the padded K.

    K is summed over, so a partial edge block there would add garbage; M and N edge blocks only
    hold rows/columns that are never written, so they need no padding.
    """
    k = x.shape[1]
    k_padded = round_up(k, bk)
    if k_padded != k:
        k_pad = (0, k_padded - k)
        x = jnp.pad(x, ((0, 0), k_pad))
        w_pad = ((0, 0), k_pad) if weights_transposed else (k_pad, (0, 0))
        weights = tuple(jnp.pad(w, w_pad) for w in weights)
    return x, weights, k_padded


# ----------------------------------------------------------------------------------------------
# GPU (Triton)
# ----------------------------------------------------------------------------------------------

TRITON_MIN_BLOCK = 16  # tl.dot needs every dimension >= 16
# Default K slice of the Triton matmul kernels, by operand itemsize: with their output tiles
# (128 x 128 for linear, 128 x 64 twice for glu) three pipeline stages of the operand tiles fit
# in 96 KiB of shared memory.
TRITON_BLOCK_K_BY_ITEMSIZE = {4: 32, 2: 64}


def triton_block(name: str, dim: int, block: int | None, max_block: int) -> int:
    """A Triton matmul block: the caller's (a power of two >= 16, else ValueError), or the
    smallest power of two covering ``dim``, clamped to ``[TRITON_MIN_BLOCK, max_block]``."""
    if block is None:
        return max(TRITON_MIN_BLOCK, min(max_block, next_power_of_2(dim)))
    if not is_power_of_2(block) or block < TRITON_MIN_BLOCK:
        raise ValueError(f"{name}={block} must be a power of two >= {TRITON_MIN_BLOCK} (Triton).")
    return block


def triton_matmul_blocks(
    m: int,
    k: int,
    n: int,
    dtype: Any,
    block_m: int | None,
    block_n: int | None,
    block_k: int | None,
    *,
    max_m: int,
    max_n: int,
) -> tuple[int, int, int]:
    """``(bm, bn, bk)`` of a Triton matmul kernel over ``(M, K) @ (K, N)`` operands of
    ``dtype``: each :func:`triton_block`, defaulting to at most ``max_m`` x ``max_n`` output
    tiles and K slices of :data:`TRITON_BLOCK_K_BY_ITEMSIZE`."""
    bm = triton_block("block_m", m, block_m, max_m)
    bn = triton_block("block_n", n, block_n, max_n)
    bk = triton_block("block_k", k, block_k, TRITON_BLOCK_K_BY_ITEMSIZE[jnp.dtype(dtype).itemsize])
    return bm, bn, bk


def edge_mask(start: Array, size: int, dim: int) -> Array | None:
    """Which of indices ``start .. start+size-1`` lie inside ``dim``; None when ``size``
    divides ``dim`` (no block is ragged, so accesses need no mask)."""
    return None if dim % size == 0 else start + jnp.arange(size) < dim


def outer_and(rows: Array | None, cols: Array | None) -> Array | None:
    """A 2-D mask from optional 1-D row and column masks (broadcast by the load/store)."""
    if rows is None and cols is None:
        return None
    if rows is None:
        return cols[None, :]
    if cols is None:
        return rows[:, None]
    return rows[:, None] & cols[None, :]


def masked_load(ref, mask: Array | None) -> Array:
    """``ref``'s block with masked-off elements read as 0: never out of bounds, and adding
    nothing to a dot, a sum or a sum of squares."""
    return pltriton.load(ref) if mask is None else pltriton.load(ref, mask=mask, other=0)


def masked_store(ref, value: Array, mask: Array | None) -> None:
    """Writes ``value`` to ``ref``'s block, skipping masked-off elements."""
    if mask is None:
        pltriton.store(ref, value)
    else:
        pltriton.store(ref, value, mask=mask)

