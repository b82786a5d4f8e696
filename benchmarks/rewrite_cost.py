"""What jfuse adds to compile time, and how it grows with model depth.

Run: ``python benchmarks/rewrite_cost.py``. For an unrolled Llama-style training step with 8 and
32 layers: jax.jit's trace+lower+compile time, jfuse.jit's, the difference (jfuse's tracing,
matching and rewriting), and the growth of that difference from 8 to 32 layers (linear would be
4x). Medians over repeats, each on a fresh function so no cache is reused. Wall-clock and this
process's CPU time (every thread, XLA's included) are both recorded: on a shared machine the wall
clock also measures the other jobs, the CPU time much less so. The kernels XLA compiled (the
fusions of each compiled program) are counted too: they do not swing. Writes
``benchmarks/results/rewrite_cost.{csv,md}``.
"""

from __future__ import annotations

import argparse
import pathlib
import re
import statistics
import sys
import time

import jax

sys.path.insert(0, str(pathlib.Path(__file__).parent))

import models  # noqa: E402
import jfuse  # noqa: E402
from jfuse.benchmarking import machine_description, write_results  # noqa: E402


def _compile_seconds(make_jitted, args) -> tuple[float, float, int]:
    """(wall-clock, CPU) seconds of one trace + lower + compile, and how many kernels XLA
    compiled (the fusions of the program's entry computation: deterministic, unlike the
    seconds, and what XLA's compile time on a CPU grows with)."""
    start, start_cpu = time.perf_counter(), time.process_time()
    compiled = make_jitted().lower(*args).compile()
    wall, cpu = time.perf_counter() - start, time.process_time() - start_cpu
    text = compiled.as_text()
    entry = text[text.find("\nENTRY"):]
    return wall, cpu, len(re.findall(r"= \S+ fusion\(", entry.split("\n}\n")[0]))


def measure(n_layers: int, repeats: int) -> dict:
    params = models.init_llama(jax.random.key(0), n_layers=n_layers, d_model=128, d_ff=256)
    tokens = jax.random.randint(jax.random.key(1), (2, 65), 0, 512)
    args = (params, tokens)
    # A fresh step function each time: neither jax's nor jfuse's caches carry over.
    fresh = lambda: models.sgd_step(models.llama_loss)
    jax_times, jfuse_times = [], []
    for _ in range(repeats):
        jax_times.append(_compile_seconds(lambda: jax.jit(fresh()), args))
        jfuse_times.append(_compile_seconds(lambda: jfuse.jit(fresh()), args))
    report = jfuse.explain(fresh())(*args)
    median = lambda times, i: statistics.median(t[i] for t in times)
    jax_s, jfuse_s = median(jax_times, 0), median(jfuse_times, 0)
    jax_cpu, jfuse_cpu = median(jax_times, 1), median(jfuse_times, 1)
    return {
        "layers": n_layers,
        "jax_trace_lower_compile_s": round(jax_s, 3),
        "jfuse_trace_lower_compile_s": round(jfuse_s, 3),
        "jfuse_extra_s": round(jfuse_s - jax_s, 3),
        "extra_over_jax": round((jfuse_s - jax_s) / jax_s, 3),
        "jax_cpu_s": round(jax_cpu, 3),
        "jfuse_cpu_s": round(jfuse_cpu, 3),
        "extra_over_jax_cpu": round((jfuse_cpu - jax_cpu) / jax_cpu, 3),
        "jax_kernels": jax_times[-1][2],
        "jfuse_kernels": jfuse_times[-1][2],
        "fused_sites": sum(report.fused.values()),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    machine = machine_description()
    print(f"machine: {machine}", flush=True)
    rows = []
    for n in (8, 32):
        print(f"{n} layers ...", flush=True)
        rows.append(measure(n, args.repeats))
        print(f"      {rows[-1]}", flush=True)
    growth = rows[1]["jfuse_extra_s"] / max(rows[0]["jfuse_extra_s"], 1e-9)
    note = f"Growth of jfuse's extra time, 8 -> 32 layers: {growth:.2f}x"
    print("\n" + write_results(rows, args.out, "rewrite_cost", machine, note))
    return 0


if __name__ == "__main__":
    sys.exit(main())
