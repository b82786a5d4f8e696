"""Measuring a function under ``jax.jit`` and under ``jfuse.jit`` in one process, fairly.

Used by ``python -m jfuse.demo`` and the scripts in ``benchmarks/`` (``python benchmarks/run.py``
runs them all). Step times are medians over interleaved repeats (jax.jit, jfuse, jfuse, jax.jit,
...) so that drift in the machine's speed hits both sides alike; memory is XLA's compiled temp
allocation (``memory_analysis().temp_size_in_bytes``), which is deterministic. Results are
reported as jfuse / jax.jit ratios, never as absolute claims.

Also here, for the per-op benchmarks: which implementation a compiled program really runs (the
Pallas kernel calls in its lowered text, :func:`kernel_calls`), and the peak memory bandwidth and
matmul throughput of known chips (:func:`chip_peak`), to put achieved GB/s and TFLOP/s against
the chip's roofline (:func:`roofline_seconds`).
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import os
import pathlib
import platform
import re
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

import jfuse
from jfuse.core.kernel_calls import KERNEL_CALL_TARGETS, kernel_calls  # noqa: F401 (re-exported)


@dataclasses.dataclass
class Comparison:
    """jax.jit vs jfuse.jit on one function and one set of arguments."""

    name: str
    jax_temp_bytes: int
    jfuse_temp_bytes: int
    jax_step_s: float
    jfuse_step_s: float
    jax_compile_s: float
    jfuse_compile_s: float
    report: Any
    # The Pallas kernel calls in jfuse's lowered program by kind, as :func:`kernel_calls` counts
    # them ({} where every fused op runs its XLA implementation, as on CPU).
    jfuse_kernel_calls: dict[str, int] = dataclasses.field(default_factory=dict)

    @property
    def memory_ratio(self) -> float:
        return self.jfuse_temp_bytes / max(self.jax_temp_bytes, 1)

    @property
    def time_ratio(self) -> float:
        return self.jfuse_step_s / self.jax_step_s

    def row(self) -> dict[str, Any]:
        return {
            "case": self.name,
            "jax_temp_MiB": round(self.jax_temp_bytes / 2**20, 3),
            "jfuse_temp_MiB": round(self.jfuse_temp_bytes / 2**20, 3),
            "temp_ratio": round(self.memory_ratio, 3),
            "jax_step_ms": round(self.jax_step_s * 1e3, 3),
            "jfuse_step_ms": round(self.jfuse_step_s * 1e3, 3),
            "time_ratio": round(self.time_ratio, 3),
            "jax_compile_s": round(self.jax_compile_s, 2),
            "jfuse_compile_s": round(self.jfuse_compile_s, 2),
            "fused": dict(self.report.fused) if self.report is not None else {},
        }


def machine_description() -> str:
    device = jax.devices()[0]
    return (
        f"{platform.processor() or platform.machine()}, {jax.device_count()}x {device.platform} "
        f"({device.device_kind}), jax {jax.__version__}, jfuse {jfuse.__version__}, "
        f"python {platform.python_version()}"
    )


def machine_info() -> dict[str, str]:
    """What a benchmark result depends on: host, accelerator, library versions, date (UTC)."""
    import jaxlib

    device = jax.devices()[0]
    return {
        "host": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": str(os.cpu_count()),
        "backend": jax.default_backend(),
        "device_kind": device.device_kind,
        "device_count": str(jax.device_count()),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "numpy": np.__version__,
        "jfuse": jfuse.__version__,
        "date_utc": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M"),
    }


def _block(tree):
    return jax.block_until_ready(tree)


def pass_of(fn: Callable, mode: str) -> Callable:
    """``fn`` for one benchmark pass: ``"fwd"`` is ``fn`` itself; ``"fwd+bwd"`` takes
    ``(args, cotangent)`` and returns the outputs and ``jax.vjp``'s gradients of every argument,
    as a layer runs in a training step (a random cotangent, so XLA cannot fold a constant one
    into the backward)."""
    if mode == "fwd":
        return fn
    if mode != "fwd+bwd":
        raise ValueError(f"mode={mode!r}; expected 'fwd' or 'fwd+bwd'")

    def forward_backward(args, cotangent):
        out, pullback = jax.vjp(fn, *args)
        return out, pullback(cotangent)

    return forward_backward


def timed_compile(jitted, *args) -> tuple[Any, float, str]:
    """``jitted.lower(*args).compile()``: the compiled function, the seconds taken (trace, lower,
    compile) and the lowered StableHLO text (for :func:`kernel_calls`)."""
    start = time.perf_counter()
    lowered = jitted.lower(*args)
    compiled = lowered.compile()
    seconds = time.perf_counter() - start
    return compiled, seconds, lowered.as_text()


def temp_bytes(compiled) -> int | None:
    """XLA's temp allocation of a compiled function (None where the backend does not say)."""
    analysis = compiled.memory_analysis()
    return None if analysis is None else int(analysis.temp_size_in_bytes)


def interleaved_medians(
    calls: dict[str, Callable[[], Any]],
    *,
    repeats: int,
    warmup: int = 2,
    min_sample_s: float = 0.0,
) -> dict[str, float]:
    """Median seconds per call of each zero-argument function, over interleaved samples.

    The functions take turns, in alternating order (a, b, b, a, ...), so a change in the
    machine's speed during the run hits all alike. A sample is one call, or, where one call is
    shorter than ``min_sample_s`` (small kernels on a GPU, where per-call dispatch would
    dominate), as many back-to-back calls as fill it, waiting for the last one only; the
    sample's time is then divided by the count. That relies on a device running one program
    after another in order (a GPU stream, a TPU), so leave ``min_sample_s`` at 0 on CPU.
    """
    labels = list(calls)
    per_sample: dict[str, int] = {}
    for label in labels:
        start = time.perf_counter()
        for _ in range(max(warmup, 1)):
            _block(calls[label]())
        one = (time.perf_counter() - start) / max(warmup, 1)
        batch = int(min_sample_s / max(one, 1e-7)) + 1
        per_sample[label] = 1 if one >= min_sample_s else min(1000, batch)
    samples: dict[str, list[float]] = {label: [] for label in labels}
    for i in range(repeats):
        for label in labels if i % 2 == 0 else labels[::-1]:
            n, call = per_sample[label], calls[label]
            start = time.perf_counter()
            for _ in range(n - 1):
                call()  # not kept: n outputs alive at once could fill the device
            _block(call())
            samples[label].append((time.perf_counter() - start) / n)
    return {label: statistics.median(samples[label]) for label in labels}


def compare(
    name: str,
    fn: Callable,
    *args,
    repeats: int = 20,
    warmup: int = 2,
    jit_kwargs: dict | None = None,
    **jfuse_kwargs,
) -> Comparison:
    """Compile ``fn`` both ways, then time interleaved calls; arguments are reused every call."""
    jit_kwargs = jit_kwargs or {}
    baseline = jax.jit(fn, **jit_kwargs)
    fused = jfuse.jit(fn, **jit_kwargs, **jfuse_kwargs)

    jax_compiled, jax_compile_s, _ = timed_compile(baseline, *args)
    jfuse_compiled, jfuse_compile_s, jfuse_text = timed_compile(fused, *args)
    medians = interleaved_medians(
        {"jax": lambda: jax_compiled(*args), "jfuse": lambda: jfuse_compiled(*args)},
        repeats=repeats,
        warmup=warmup,
    )
    return Comparison(
        name=name,
        jax_temp_bytes=temp_bytes(jax_compiled) or 0,
        jfuse_temp_bytes=temp_bytes(jfuse_compiled) or 0,
        jax_step_s=medians["jax"],
        jfuse_step_s=medians["jfuse"],
        jax_compile_s=jax_compile_s,
        jfuse_compile_s=jfuse_compile_s,
        report=fused.report,
        jfuse_kernel_calls=kernel_calls(jfuse_text),
    )


def implementation_label(calls: dict[str, int]) -> str:
    """``"xla"`` for no kernel calls, else ``"pallas-triton x3"``-style (kinds joined by ``+``)."""
    if not calls:
        return "xla"
    return "+".join(f"{kind} x{n}" for kind, n in sorted(calls.items()))


@dataclasses.dataclass(frozen=True)
class ChipPeak:
    """A chip's peak memory bandwidth and dense matmul throughput, from its vendor's spec sheet."""

    chip: str
    hbm_gb_s: float  # 1e9 bytes per second
    matmul_tflops: dict[str, float]  # dense (no sparsity), by input dtype, at default precision
    source: str


def _tflops(bf16: float, f32: float) -> dict[str, float]:
    return {"bfloat16": bf16, "float16": bf16, "float32": f32}


# Peaks per chip (one JAX device), from the vendors' spec sheets. NVIDIA quotes tensor-core
# numbers with 2:4 sparsity; these are the dense halves. "float32" is the peak at JAX's default
# matmul precision, which runs f32 matmuls on TF32 tensor cores on Ampere/Hopper and as one bf16
# pass on TPU (the kernels here do likewise), so it is an upper bound for full-f32 work. Matched
# in order against ``device.device_kind``, first match wins.
CHIP_PEAKS: tuple[tuple[str, ChipPeak], ...] = (
    # https://cloud.google.com/tpu/docs/v6e: 918 bf16 TFLOP/s, 1640 GB/s HBM per chip
    (r"^TPU v6( lite|e)", ChipPeak("TPU v6e", 1640, _tflops(918, 918),
                                   "cloud.google.com/tpu/docs/v6e")),
    # https://cloud.google.com/tpu/docs/v5e: 197 bf16 TFLOP/s, 819 GB/s HBM per chip
    (r"^TPU v5( lite|e)", ChipPeak("TPU v5e", 819, _tflops(197, 197),
                                   "cloud.google.com/tpu/docs/v5e")),
    # https://cloud.google.com/tpu/docs/v5p: 459 bf16 TFLOP/s, 2765 GB/s HBM per chip
    (r"^TPU v5p?$", ChipPeak("TPU v5p", 2765, _tflops(459, 459),
                             "cloud.google.com/tpu/docs/v5p")),
    # https://cloud.google.com/tpu/docs/v4: 275 bf16 TFLOP/s, 1200 GB/s HBM per chip
    (r"^TPU v4$", ChipPeak("TPU v4", 1200, _tflops(275, 275), "cloud.google.com/tpu/docs/v4")),
    # NVIDIA H200 datasheet (nvidia.com/en-us/data-center/h200): SXM 4.8 TB/s, BF16 1979
    # sparse -> 989 dense, TF32 989 sparse -> 494 dense; NVL 4.8 TB/s, BF16 1671 -> 835, TF32 835 -> 418
    (r"H200.*NVL", ChipPeak("H200 NVL", 4800, _tflops(835, 418), "NVIDIA H200 datasheet")),
    (r"H200", ChipPeak("H200 SXM", 4800, _tflops(989, 494), "NVIDIA H200 datasheet")),
    # NVIDIA H100 datasheet (resources.nvidia.com, "H100 Tensor Core GPU Datasheet"):
    # SXM 3.35 TB/s, BF16 989, TF32 494; PCIe 2.0 TB/s, BF16 756, TF32 378; NVL 3.9 TB/s,
    # BF16 835, TF32 418 (dense)
    (r"H100.*PCIe", ChipPeak("H100 PCIe", 2000, _tflops(756, 378), "NVIDIA H100 datasheet")),
    (r"H100.*NVL", ChipPeak("H100 NVL", 3900, _tflops(835, 418), "NVIDIA H100 datasheet")),
    (r"H100", ChipPeak("H100 SXM", 3350, _tflops(989, 494), "NVIDIA H100 datasheet")),
    # NVIDIA A100 datasheet (nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf): BF16 312,
    # TF32 156 (dense); HBM 1555 GB/s (40GB), 1935 GB/s (80GB PCIe), 2039 GB/s (80GB SXM)
    (r"A100.*40GB", ChipPeak("A100 40GB", 1555, _tflops(312, 156), "NVIDIA A100 datasheet")),
    (r"A100.*80GB.*PCIe", ChipPeak("A100 80GB PCIe", 1935, _tflops(312, 156),
                                   "NVIDIA A100 datasheet")),
    (r"A100", ChipPeak("A100 80GB SXM", 2039, _tflops(312, 156), "NVIDIA A100 datasheet")),
)


def chip_peak(device_kind: str | None = None) -> ChipPeak | None:
    """The peak numbers for ``device_kind`` (default: the first device's), or None if unknown
    (any CPU, an unlisted accelerator)."""
    if device_kind is None:
        device = jax.devices()[0]
        if device.platform == "cpu":
            return None
        device_kind = device.device_kind
    for pattern, peak in CHIP_PEAKS:
        if re.search(pattern, device_kind, flags=re.IGNORECASE):
            return peak
    return None


def roofline_seconds(flops: float, bytes_moved: float, dtype: str, peak: ChipPeak) -> float:
    """The least time the chip needs: the larger of compute at peak and traffic at peak bandwidth.

    ``flops`` counts matmul work only (elementwise work runs on other units and is left out).
    """
    compute = flops / (peak.matmul_tflops.get(dtype, peak.matmul_tflops["float32"]) * 1e12)
    return max(compute, bytes_moved / (peak.hbm_gb_s * 1e9))


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """A GitHub markdown table of ``Comparison.row()`` dicts."""
    if not rows:
        return ""
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for row in rows:
        lines.append("| " + " | ".join(str(row[k]) for k in keys) + " |")
    return "\n".join(lines)


def write_results(rows: list[dict[str, Any]], out_dir: pathlib.Path, stem: str, machine: str,
                  note: str = "") -> str:
    """Write ``<stem>.csv`` and ``<stem>.md`` (with the machine line) and return the markdown."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / f"{stem}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    text = f"Machine: {machine}\n\n{markdown_table(rows)}\n" + (f"\n{note}\n" if note else "")
    (out_dir / f"{stem}.md").write_text(text)
    return text
