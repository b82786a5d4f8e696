"""Each fused op, its default implementation against its XLA reference, forward and backward.

A case is one public op of :mod:`jfuse.ops` at one shape and dtype, as the op declares them beside
itself (``jfuse.ops.BENCHMARKS``: ``linear`` with an activation, ``glu``, ``rms_norm``,
``layer_norm``, each norm also with a residual; a new op brings its own), in one of two passes:

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
from jfuse.ops._op import Benchmark
from jfuse.benchmarking import (
    ChipPeak,
    implementation_label,
    interleaved_medians,
    kernel_calls,
    pass_of,
    roofline_seconds,
    temp_bytes,
    timed_compile,
)

MODES = ("fwd", "fwd+bwd")
_SHORT_DTYPE = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}
# The dtypes of each preset (the shapes are declared beside each op: jfuse.ops.BENCHMARKS).
PRESET_DTYPES = {
    "quick": ("float32",),
    "cpu": ("float32",),
    # Large enough that a call takes ~0.1-2 ms on an H100/v5e.
    "accelerator": ("float32", "bfloat16"),
    # The device check (benchmarks/device_check.py): bf16 first, what models run.
    "device": ("bfloat16", "float32"),
}


def _declaration(op: str) -> Benchmark:
    for benchmark in ops.BENCHMARKS:
        if benchmark.name == op:
            return benchmark
    raise ValueError(f"unknown op {op!r}; expected one of {[b.name for b in ops.BENCHMARKS]}")


@dataclasses.dataclass(frozen=True)
class OpCase:
    """One op at one shape, dtype and pass. ``shape`` is what the op's declaration says it is
    (``(M, K, N)`` for ``linear``/``glu``, x ``(M, K)`` and each weight ``(K, N)``; ``(M, H)``
    for the norms); ``activation`` is its variant (linear's epilogue, glu's gate)."""

    op: str
    shape: tuple[int, ...]
    dtype: str
    mode: str
    activation: str | None = None

    @property
    def declaration(self) -> Benchmark:
        return _declaration(self.op)

    @property
    def name(self) -> str:
        variant = f" {self.activation}" if self.activation else ""
        dims = "x".join(map(str, self.shape))
        return f"{self.op}{variant} {dims} {_SHORT_DTYPE.get(self.dtype, self.dtype)} {self.mode}"

    @property
    def bound(self) -> str:
        """What limits the op on a chip: ``compute`` for the matmuls, ``memory`` for norms."""
        return self.declaration.bound

    def inputs(self, seed: int = 0) -> tuple[jax.Array, ...]:
        """The op's arguments, as its declaration builds them (unit-scale activations,
        fan-in-scaled weights, O(1) scales)."""
        keys = iter(jax.random.split(jax.random.key(seed), 8))
        dtype = jnp.dtype(self.dtype)

        def normal(shape, scale=1.0):
            return (jax.random.normal(next(keys), shape) * scale).astype(dtype)

        return tuple(self.declaration.inputs(self.shape, dtype, normal))

    def op_fn(self, implementation: str | None) -> Callable[..., Any]:
        """The public op with ``implementation``, as a function of :meth:`inputs`."""
        return self.declaration.call(implementation, self.activation)

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
        return pass_of(self.op_fn(implementation), self.mode)

    def flops(self) -> float:
        """Matmul flops as declared for the forward; three times that with the backward
        (dx and dw besides the forward)."""
        forward = self.declaration.flops(self.shape, self.activation)
        return forward * (1 if self.mode == "fwd" else 3)

    def bytes_moved(self) -> float:
        """Inputs read and outputs written once; with the backward, also the cotangents read
        and the gradients (one per input) written once."""
        args = jax.eval_shape(self.inputs)  # shapes only: nothing allocated
        outs = jax.eval_shape(self.op_fn("xla"), *args)
        size = lambda tree: sum(a.size * jnp.dtype(a.dtype).itemsize for a in jax.tree.leaves(tree))
        fwd = size(args) + size(outs)
        return float(fwd if self.mode == "fwd" else fwd + size(outs) + size(args))


def cases(preset: str) -> list[OpCase]:
    """The op cases of a preset (``quick``: tiny, for tests; ``cpu``; ``accelerator``;
    ``device``: what the device check times): every op's declared sizes, per dtype and pass."""
    if preset not in PRESET_DTYPES:
        raise ValueError(f"unknown preset {preset!r}; expected one of {sorted(PRESET_DTYPES)}")
    return [OpCase(benchmark.name, shape, dtype, mode, variant)
            for dtype in PRESET_DTYPES[preset]
            for benchmark in ops.BENCHMARKS
            for shape, variant in benchmark.sizes[preset]
            if benchmark.times(variant, dtype)
            for mode in MODES]


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

