"""Models' training steps under ``jfuse.jit`` against ``jax.jit``.

A step is ``value_and_grad`` of the loss and an SGD update (:func:`models.sgd_step`), as users
write it. Cases: an MLP with GELU layers (the ``linear`` pattern), a SwiGLU MLP stack (``glu``),
a pre-norm Llama-style decoder with its layers unrolled and the same decoder as a ``lax.scan``
over stacked layers (norms, residual adds and GLUs, inside the scan body for the latter).
Measured with :func:`jfuse.benchmarking.compare`: compiled temp memory, median step time of
interleaved runs, compile time (trace + lower + compile), and which kernels jfuse's program calls.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from benchmarks import models
from jfuse.benchmarking import compare, implementation_label

_SHORT_DTYPE = {"float32": "f32", "bfloat16": "bf16"}


@dataclasses.dataclass(frozen=True)
class StepCase:
    """One model's training step: ``build()`` returns ``(step, args)``."""

    name: str
    dtype: str
    build: Callable[[], tuple[Callable[..., Any], tuple]]


def _mlp(sizes: list[int], tokens: int, dtype) -> Callable:
    def build():
        layers = models.init_mlp(jax.random.key(0), sizes, dtype)
        x = jax.random.normal(jax.random.key(1), (tokens, sizes[0])).astype(dtype)
        y = jax.random.normal(jax.random.key(2), (tokens, sizes[-1]))
        return models.sgd_step(models.gelu_mlp_loss), (layers, (x, y))

    return build


def _swiglu(n_layers: int, d_model: int, d_ff: int, tokens: int, dtype) -> Callable:
    def build():
        layers = models.init_swiglu_mlp(jax.random.key(0), n_layers, d_model, d_ff, dtype)
        x = jax.random.normal(jax.random.key(1), (tokens, d_model)).astype(dtype)
        y = jax.random.normal(jax.random.key(2), (tokens, d_model))
        return models.sgd_step(models.swiglu_mlp_loss), (layers, (x, y))

    return build


def _llama(scan: bool, n_layers: int, d_model: int, d_ff: int, vocab: int, batch: int, seq: int,
           dtype) -> Callable:
    def build():
        params = models.init_llama(jax.random.key(3), n_layers, d_model, d_ff, vocab, dtype)
        tokens = jax.random.randint(jax.random.key(4), (batch, seq + 1), 0, vocab)
        if scan:
            return models.sgd_step(models.llama_scan_loss), (models.stack_layers(params), tokens)
        return models.sgd_step(models.llama_loss), (params, tokens)

    return build


# Per preset: (gelu MLP widths, tokens), (SwiGLU layers, d_model, d_ff, tokens),
# (Llama layers, d_model, d_ff, vocab, batch, seq), dtypes.
_SIZES = {
    "quick": (([64, 128, 64], 64), (2, 64, 176, 64), (2, 64, 176, 128, 2, 32), ("float32",)),
    "cpu": (([512, 2048, 512, 2048, 512], 1024), (4, 512, 1376, 1024), (4, 256, 683, 512, 4, 256),
            ("float32", "bfloat16")),
    "accelerator": (([2048, 8192, 2048, 8192, 2048], 8192), (4, 2048, 5632, 8192),
                    (8, 1024, 2816, 32000, 8, 1024), ("float32", "bfloat16")),
}


def cases(preset: str) -> list[StepCase]:
    """The training-step cases of a preset: ``quick`` (tiny, for tests), ``cpu`` or
    ``accelerator``. bf16 cases follow the f32 ones; the GELU MLP runs in f32 only."""
    if preset not in _SIZES:
        raise ValueError(f"unknown preset {preset!r}; expected one of {sorted(_SIZES)}")
    (mlp_sizes, mlp_tokens), swiglu, llama, dtypes = _SIZES[preset]
    n_layers, d_model, _, _, batch, seq = llama
    out = []
    for dtype_name in dtypes:
        dtype, short = jnp.dtype(dtype_name), _SHORT_DTYPE[dtype_name]
        if dtype_name == "float32":
            out.append(StepCase(
                f"MLP gelu {'->'.join(map(str, mlp_sizes))}, {mlp_tokens} tokens, {short}",
                dtype_name, _mlp(mlp_sizes, mlp_tokens, dtype)))
        out.append(StepCase(
            f"SwiGLU MLP {swiglu[0]}x({swiglu[1]}->{swiglu[2]}), {swiglu[3]} tokens, {short}",
            dtype_name, _swiglu(*swiglu, dtype)))
        for scan in (False, True):
            kind = "scan over" if scan else "unrolled"
            out.append(StepCase(
                f"Llama-style {kind} {n_layers} layers d={d_model}, {batch}x{seq} tokens, {short}",
                dtype_name, _llama(scan, *llama, dtype)))
    return out


def _lowering_platform() -> str:
    """The name ``lower(lowering_platforms=...)`` uses for this backend ("cuda" for a GPU)."""
    backend = jax.default_backend()
    return "cuda" if backend == "gpu" else backend


def measure(case: StepCase, *, repeats: int, warmup: int) -> dict[str, Any]:
    """One CSV row: ``compare`` of the case's step under jax.jit and jfuse.jit."""
    step, args = case.build()
    result = compare(case.name, step, *args, repeats=repeats, warmup=warmup)
    report = result.report
    return {
        "section": "models",
        "case": case.name,
        "mode": "train step",
        "dtype": case.dtype,
        "backend": jax.default_backend(),
        "ref": "jax.jit",
        "fused": "jfuse.jit",
        "fused_impl": implementation_label(result.jfuse_kernel_calls),
        "ref_ms": result.jax_step_s * 1e3,
        "fused_ms": result.jfuse_step_s * 1e3,
        "time_ratio": result.time_ratio,
        "ref_temp_MiB": result.jax_temp_bytes / 2**20,
        "fused_temp_MiB": result.jfuse_temp_bytes / 2**20,
        "temp_ratio": result.memory_ratio,
        "ref_compile_s": result.jax_compile_s,
        "fused_compile_s": result.jfuse_compile_s,
        "fused_sites": ", ".join(f"{k}={v}" for k, v in report.fused.items()),
        # What really runs: kernel calls in the compiled step against the fused sites, and the
        # sites the report says run XLA on this platform (a kernel declined them).
        "kernels": sum(result.jfuse_kernel_calls.values()),
        "sites": len(report.sites),
        "sites_on_xla": sum(not site.runs_kernel_on(_lowering_platform())
                            for site in report.sites),
        "fallbacks": len(report.fallbacks),
        "repeats": repeats,
    }
