"""Measuring a function under ``jax.jit`` and under ``jfuse.jit`` in one process, fairly.

Used by ``python -m jfuse.demo`` and the scripts in ``benchmarks/``. Step times are medians over
interleaved repeats (jax.jit, jfuse, jax.jit, ...) so that drift in the machine's speed hits both
sides alike; memory is XLA's compiled temp allocation (``memory_analysis().temp_size_in_bytes``),
which is deterministic. Results are reported as jfuse / jax.jit ratios, never as absolute claims.
"""

from __future__ import annotations

import csv
import dataclasses
import pathlib
import platform
import statistics
import time
from typing import Any, Callable

import jax

import jfuse


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


def _block(tree):
    return jax.block_until_ready(tree)


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

    timings: dict[str, float] = {}
    compiled = {}
    for label, f in (("jax", baseline), ("jfuse", fused)):
        start = time.perf_counter()
        compiled[label] = f.lower(*args).compile()
        timings[label] = time.perf_counter() - start
    temp = {k: c.memory_analysis().temp_size_in_bytes for k, c in compiled.items()}

    for _ in range(warmup):
        _block(compiled["jax"](*args))
        _block(compiled["jfuse"](*args))
    samples: dict[str, list[float]] = {"jax": [], "jfuse": []}
    for _ in range(repeats):
        for label in ("jax", "jfuse"):
            start = time.perf_counter()
            _block(compiled[label](*args))
            samples[label].append(time.perf_counter() - start)
    return Comparison(
        name=name,
        jax_temp_bytes=temp["jax"],
        jfuse_temp_bytes=temp["jfuse"],
        jax_step_s=statistics.median(samples["jax"]),
        jfuse_step_s=statistics.median(samples["jfuse"]),
        jax_compile_s=timings["jax"],
        jfuse_compile_s=timings["jfuse"],
        report=fused.report,
    )


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
