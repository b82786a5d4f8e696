"""Each fused op, its default implementation against its XLA reference, forward and backward.

A case is one public op of :mod:`jfuse.ops` (``linear`` with an activation, ``glu``, ``rms_norm``,
``layer_norm``, each norm also with a residual) at one shape and dtype, in one of two passes:

* ``fwd``: the op alone under ``jax.jit``;
* ``fwd+bwd``: ``jax.vjp`` of the op with a fixed random cotangent, returning the output and the
  gradients of every input, as a layer runs in a training step. (A plain ``jax.grad`` of the
  output's sum would make the cotangent a constant of ones that XLA can fold into the backward.)

Each is compiled with ``implementation=None`` (Pallas on TPU and GPU, XLA on CPU) and with
``implementation="xla"``, and the two are timed interleaved in one process. The program that
was compiled says which implementation really ran (its Pallas kernel calls, or none), so a
kernel that declined a shape shows up as ``xla``. Flops (matmul work only) and bytes (every
input, output, cotangent and gradient moved once: the least traffic any implementation needs)
are counted from the shapes, giving achieved TFLOP/s or GB/s and, on a chip whose peaks
:func:`jfuse.benchmarking.chip_peak` knows, the fraction of its roofline.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jfuse import ops
from jfuse.benchmarking import (
    ChipPeak,
    implementation_label,
    interleaved_medians,
    kernel_calls,
    roofline_seconds,
    temp_bytes,
    timed_compile,
)

MODES = ("fwd", "fwd+bwd")
MATMUL_OPS = ("linear", "glu")
NORM_OPS = ("rms_norm", "add_rms_norm", "layer_norm", "add_layer_norm")
_SHORT_DTYPE = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}


@dataclasses.dataclass(frozen=True)
class OpCase:
    """One op at one shape, dtype and pass. ``shape`` is ``(M, K, N)`` for ``linear``/``glu``
    (x is ``(M, K)``, each weight ``(K, N)``), ``(M, H)`` for the norms."""

    op: str
    shape: tuple[int, ...]
    dtype: str
    mode: str
    activation: str | None = None  # linear's epilogue (with a bias) or glu's gate

    @property
    def name(self) -> str:
        variant = f" {self.activation}" if self.activation else ""
        dims = "x".join(map(str, self.shape))
        return f"{self.op}{variant} {dims} {_SHORT_DTYPE.get(self.dtype, self.dtype)} {self.mode}"

    @property
    def bound(self) -> str:
        """What limits the op on a chip: ``compute`` for the matmuls, ``memory`` for norms."""
        return "compute" if self.op in MATMUL_OPS else "memory"

    def inputs(self, seed: int = 0) -> tuple[jax.Array, ...]:
        """The op's arguments: unit-scale activations, fan-in-scaled weights, O(1) scales."""
        keys = iter(jax.random.split(jax.random.key(seed), 4))
        dtype = jnp.dtype(self.dtype)

        def normal(shape, scale=1.0):
            return (jax.random.normal(next(keys), shape) * scale).astype(dtype)

        if self.op in MATMUL_OPS:
            m, k, n = self.shape
            x, w1, w2 = normal((m, k)), normal((k, n), 1 / np.sqrt(k)), normal((k, n), 1 / np.sqrt(k))
            return (x, w1, jnp.zeros(n, dtype) + 0.01) if self.op == "linear" else (x, w1, w2)
        m, h = self.shape
        args = [normal((m, h))]
        if self.op.startswith("add_"):
            args.append(normal((m, h)))
        args.append(1 + normal((h,), 0.1))  # scale
        if self.op.endswith("layer_norm"):
            args.append(normal((h,), 0.1))  # bias
        return tuple(args)

    def op_fn(self, implementation: str | None) -> Callable[..., Any]:
        """The public op with ``implementation``, as a function of :meth:`inputs`."""
        act, impl = self.activation, implementation
        if self.op == "linear":
            return lambda x, w, b: ops.linear(x, w, b, activation=act, implementation=impl)
        if self.op == "glu":
            return lambda x, wg, wu: ops.glu(x, wg, wu, activation=act, implementation=impl)
        if self.op == "rms_norm":
            return lambda x, s: ops.rms_norm(x, s, implementation=impl)
        if self.op == "add_rms_norm":
            return lambda x, r, s: ops.rms_norm(x, s, residual=r, implementation=impl)
        if self.op == "layer_norm":
            return lambda x, s, b: ops.layer_norm(x, s, b, implementation=impl)
        if self.op == "add_layer_norm":
            return lambda x, r, s, b: ops.layer_norm(x, s, b, residual=r, implementation=impl)
        raise ValueError(f"unknown op {self.op!r}; expected one of {MATMUL_OPS + NORM_OPS}")

    def arguments(self) -> tuple:
        """What :meth:`program` takes: the op's inputs, and for ``fwd+bwd`` a random cotangent."""
        args = self.inputs()
        if self.mode == "fwd":
            return args
        leaves, treedef = jax.tree.flatten(jax.eval_shape(self.op_fn("xla"), *args))
        keys = jax.random.split(jax.random.key(1), len(leaves))
        cotangent = treedef.unflatten([
            jax.random.normal(k, s.shape).astype(s.dtype) for k, s in zip(keys, leaves)
        ])
        return args, cotangent

    def program(self, implementation: str | None) -> Callable[..., Any]:
        """The function to jit for this pass, taking :meth:`arguments`."""
        f = self.op_fn(implementation)
        if self.mode == "fwd":
            return f

        def forward_backward(args, cotangent):
            out, pullback = jax.vjp(f, *args)
            return out, pullback(cotangent)

        return forward_backward

    def flops(self) -> float:
        """Matmul flops: 2MKN per product forward, three times that with the backward (dx, dw)."""
        if self.op not in MATMUL_OPS:
            return 0.0
        m, k, n = self.shape
        products = 1 if self.op == "linear" else 2
        return 2.0 * m * k * n * products * (1 if self.mode == "fwd" else 3)

    def bytes_moved(self) -> float:
        """Inputs read and outputs written once; with the backward, also the cotangents read
        and the gradients (one per input) written once."""
        args = jax.eval_shape(self.inputs)  # shapes only: nothing allocated
        outs = jax.eval_shape(self.op_fn("xla"), *args)
        size = lambda tree: sum(a.size * jnp.dtype(a.dtype).itemsize for a in jax.tree.leaves(tree))
        fwd = size(args) + size(outs)
        return float(fwd if self.mode == "fwd" else fwd + size(outs) + size(args))


def cases(preset: str) -> list[OpCase]:
    """The op cases of a preset: ``quick`` (tiny, for tests), ``cpu``, ``accelerator`` or
    ``device`` (what the device check times)."""
    if preset == "quick":
        matmul, glu_shapes, norm, dtypes = (64, 32, 64), [(64, 32, 96)], (64, 128), ("float32",)
    elif preset == "cpu":
        matmul, glu_shapes, norm, dtypes = (1024, 512, 2048), [(1024, 512, 1376)], (4096, 1024), ("float32",)
    elif preset == "device":
        # The device check (benchmarks/device_check.py): bf16 first, the shapes users run (tokens
        # 8k-16k, hidden 4k), the GLU at K = 384, 1024 and 4096 to place its GPU threshold
        # (the check forces the kernel past it), the linear at an MLP's up-projection.
        matmul = (8192, 4096, 4096)
        glu_shapes = [(8192, 384, 1536), (8192, 1024, 4096), (8192, 4096, 11008)]
        norm, dtypes = (16384, 4096), ("bfloat16", "float32")
        return [OpCase(op, shape, dtype, mode, activation)
                for dtype in dtypes
                for op, shape, activation in [("linear", matmul, "gelu_tanh"),
                                              *[("glu", s, "silu") for s in glu_shapes],
                                              *[(op, norm, None) for op in NORM_OPS]]
                for mode in MODES]
    elif preset == "accelerator":
        # Large enough that a call takes ~0.1-2 ms on an H100/v5e; the GLU also at K=384, under
        # the GPU profitability threshold (jfuse.pallas.glu.GPU_MAX_PROFITABLE_K), where the
        # Triton kernel runs; at K=4096 the GPU runs XLA and the ``ran`` column says so.
        matmul, glu_shapes, norm = (8192, 4096, 4096), [(8192, 4096, 11008), (16384, 384, 1536)], (16384, 8192)
        dtypes = ("float32", "bfloat16")
    else:
        raise ValueError(f"unknown preset {preset!r}; expected quick, cpu, accelerator or device")
    out = []
    for dtype in dtypes:
        shapes: list[tuple[str, tuple[int, ...], str | None]] = [
            ("linear", matmul, "gelu_tanh"),
            ("linear", matmul, "silu"),
            *[("glu", s, "silu") for s in glu_shapes],
            *[(op, norm, None) for op in NORM_OPS],
        ]
        for op, shape, activation in shapes:
            for mode in MODES:
                out.append(OpCase(op, shape, dtype, mode, activation))
    return out


def _program_text(compiled) -> str:
    """A compiled program's HLO without its source metadata (which differs between two traces
    of the same computation)."""
    text = compiled.as_text().split("\nFileNames")[0]
    text = re.sub(r"^HloModule.*$", "", text, flags=re.MULTILINE)
    return re.sub(r", metadata=\{[^}]*\}", "", text)


def _max_relative_difference(a, b) -> float:
    """max |a - b| / max |b| over all leaves, in f32 (0 when both run the same XLA program)."""
    worst = 0.0
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        x, y = np.asarray(x, np.float32), np.asarray(y, np.float32)
        worst = max(worst, float(np.max(np.abs(x - y)) / max(np.max(np.abs(y)), 1e-30)))
    return worst


def measure(case: OpCase, *, repeats: int, warmup: int, min_sample_s: float = 0.0,
            peak: ChipPeak | None = None, implementation: str | None = None) -> dict[str, Any]:
    """Compile both implementations, check they agree, time them interleaved; one CSV row.

    ``implementation`` is the fused side's (default None, what users get; the device check
    passes ``"pallas"`` to time each kernel even where the op would pick XLA)."""
    args = case.arguments()
    ref, ref_compile_s, _ = timed_compile(jax.jit(case.program("xla")), *args)
    fused, fused_compile_s, fused_text = timed_compile(jax.jit(case.program(implementation)),
                                                       *args)
    rel_diff = _max_relative_difference(fused(*args), ref(*args))
    medians = interleaved_medians(
        {"ref": lambda: ref(*args), "fused": lambda: fused(*args)},
        repeats=repeats, warmup=warmup, min_sample_s=min_sample_s,
    )
    flops, nbytes = case.flops(), case.bytes_moved()
    ref_s, fused_s = medians["ref"], medians["fused"]
    ref_temp, fused_temp = temp_bytes(ref), temp_bytes(fused)
    row: dict[str, Any] = {
        "section": "ops",
        "case": case.name,
        "op": case.op,
        "mode": case.mode,
        "dtype": case.dtype,
        "shape": "x".join(map(str, case.shape)),
        "backend": jax.default_backend(),
        "ref": "implementation='xla'",
        "fused": f"implementation={implementation!r}",
        # What the compiled program runs: its kernel calls ("xla" for none); interpret-mode
        # kernels are plain XLA ops, so they are named as such.
        "fused_impl": ("interpret" if implementation == "interpret"
                       else implementation_label(kernel_calls(fused_text))),
        "ref_ms": ref_s * 1e3,
        "fused_ms": fused_s * 1e3,
        "time_ratio": fused_s / ref_s,
        "ref_temp_MiB": None if ref_temp is None else ref_temp / 2**20,
        "fused_temp_MiB": None if fused_temp is None else fused_temp / 2**20,
        "temp_ratio": None if not ref_temp or fused_temp is None else fused_temp / ref_temp,
        "ref_compile_s": ref_compile_s,
        "fused_compile_s": fused_compile_s,
        "bound": case.bound,
        "flops": flops,
        "bytes": nbytes,
        "ref_tflops": flops / ref_s / 1e12 if flops else None,
        "fused_tflops": flops / fused_s / 1e12 if flops else None,
        "ref_gb_s": nbytes / ref_s / 1e9,
        "fused_gb_s": nbytes / fused_s / 1e9,
        "rel_diff": rel_diff,
        # Both sides compiled to the same program (as on CPU): the time ratio is noise.
        "same_program": _program_text(ref) == _program_text(fused),
        "repeats": repeats,
    }
    if peak is not None:
        floor = roofline_seconds(flops, nbytes, case.dtype, peak)
        row.update(roofline_ms=floor * 1e3, ref_roofline_frac=floor / ref_s,
                   fused_roofline_frac=floor / fused_s, chip=peak.chip)
    return row

