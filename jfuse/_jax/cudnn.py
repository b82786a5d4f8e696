"""cuDNN's fused flash attention, through the private JAX module behind ``jax.nn``'s.

``jax.nn.dot_product_attention(implementation="cudnn")`` returns the log-sum-exp residual cast to
the output dtype (bf16), too coarse for jfuse's derivative, which recomputes the probabilities
from it. The function it wraps, ``jax._src.cudnn.fused_attention_stablehlo.dot_product_attention``,
returns it as cuDNN computes it: the natural-log log-sum-exp of the scaled, masked scores, f32,
``(B, N, T)`` in either layout. This module is the one place jfuse touches that private module.

Checked against jax 0.10.0 and 0.12.0.1 (the releases jfuse supports): the keyword arguments used
here (``scale``, ``mask_type``, ``qkv_layout``, ``sliding_window_length``, ``return_residual``)
and the checks' positional arguments are the same in both. 0.12 inserts a positional
``score_mod_args`` after ``fp8_params`` and adds ``score_mod`` (flex attention) and an
``is_score_mod`` flag on ``check_is_flash_attention`` with a default, so calling by keyword and
leaving them out serves both releases without a branch.

Tracing the entry point asks the installed jaxlib for its cuDNN version (``check_cudnn_version``);
without a CUDA jaxlib it raises, which is why :func:`version` returns None on a CPU-only machine.
"""

from __future__ import annotations

from typing import Any

import jax


def _module():
    from jax._src.cudnn import fused_attention_stablehlo  # private: no public entry returns f32 lse

    return fused_attention_stablehlo


def version() -> int | None:
    """The cuDNN version the installed jaxlib was built against (e.g. 91000 for 9.10), or None
    where there is none (no CUDA jaxlib on this machine)."""
    try:
        return int(_module().check_cudnn_version())
    except Exception:  # noqa: BLE001 (RuntimeError today; any failure means "no cuDNN")
        return None


def gpu_at_least(capability: str) -> bool:
    """Whether this machine's default backend is a CUDA GPU of compute capability >= ``capability``
    ("9.0": Hopper). False elsewhere, as JAX's own checks answer (on a CPU-only machine lowering
    for "cuda", JAX's cuDNN rules see no GPU and apply the pre-Hopper limits)."""
    try:
        return bool(_module().check_compute_capability(capability))
    except Exception:  # noqa: BLE001 (no GPU backend to ask)
        return False


def gpu_below(capability: str) -> bool:
    """Whether this machine's default backend is a CUDA GPU of compute capability below
    ``capability``. False where there is no CUDA GPU to ask (a CPU lowering for "cuda" cannot
    know the GPU it will run on, and assumes a current one)."""
    try:
        on_cuda = "cuda" in _module().xla_bridge.get_backend().platform_version
    except Exception:  # noqa: BLE001 (no backend to ask)
        return False
    return on_cuda and not gpu_at_least(capability)


def refusal(q_shape, k_shape, v_shape, dtype, *, cudnn_version: int) -> str | None:
    """What JAX's own checks say against this call (``check_layout`` and
    ``check_is_flash_attention``, on shapes only, layout BNTH), or None. jfuse checks the
    conditions it knows first, with its own words; this catches the rest (compute capability
    10.3 with an old cuDNN, limits a later JAX adds)."""
    fa = _module()
    q, k, v = (jax.ShapeDtypeStruct(s, dtype) for s in (q_shape, k_shape, v_shape))
    try:
        fa.check_layout(q, k, v, None, None, None, None, None, None, None,
                        fa.AttentionLayout.BNTH)
        fa.check_is_flash_attention(q, k, v, fa.AttentionLayout.BNTH.value, cudnn_version,
                                    False, True)
    except (NotImplementedError, ValueError) as error:
        return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return None


def attention(q, k, v, *, scale: float, causal: bool, layout: str,
              sliding_window_length: int | None, with_lse: bool = True) -> tuple[Any, Any]:
    """cuDNN flash attention: ``(out, lse)``. ``q`` is ``(B, T, N, H)`` (layout "BTNH") or
    ``(B, N, T, H)`` ("BNTH"), ``k``/``v`` likewise with K heads (N % K == 0: grouped-query
    attention is native); ``out`` has q's layout and dtype, ``lse`` is f32 ``(B, N, T)``.

    ``causal`` is cuDNN's top-left causal mask (key ``j <= i``, ``jnp.tril`` of a ``(T, S)``
    array, as XLA's cuDNN graph sets it with ``set_causal_mask``); ``sliding_window_length=w``
    keeps keys ``i - w < j <= i`` and needs ``causal``. ``with_lse=False`` gives ``(out, None)``
    (cuDNN's inference graph; differentiated, its training graph and backward)."""
    fa = _module()
    mask_type = fa.MaskType.CAUSAL if causal else fa.MaskType.NO_MASK
    outs = fa.dot_product_attention(
        q, k, v, scale=scale, mask_type=mask_type, qkv_layout=layout,
        sliding_window_length=sliding_window_length, return_residual=with_lse)
    return outs if with_lse else (outs, None)
