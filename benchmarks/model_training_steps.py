"""Training steps of small models, jax.jit vs jfuse.jit, on this machine.

Run: ``python benchmarks/model_training_steps.py [--repeats 20]``. Cases: a SwiGLU MLP stack and
a pre-norm Llama-style decoder (RMSNorm, plain attention, SwiGLU), in f32 and bf16. Writes
``benchmarks/results/model_training_steps.{csv,md}``: compiled temp memory, median step time of
interleaved runs and compile time, as jfuse/jax.jit ratios, with the machine recorded.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, str(pathlib.Path(__file__).parent))

import models

from jfuse.benchmarking import compare, machine_description, write_results


def cases():
    for dtype in (jnp.float32, jnp.bfloat16):
        name = jnp.dtype(dtype).name
        layers = models.init_swiglu_mlp(jax.random.key(0), dtype=dtype)
        x = jax.random.normal(jax.random.key(1), (1024, 512)).astype(dtype)
        y = jax.random.normal(jax.random.key(2), (1024, 512))
        yield (f"SwiGLU MLP 4x(512->1376), 1024 tokens, {name}",
               models.sgd_step(models.swiglu_mlp_loss), (layers, (x, y)))
        params = models.init_llama(jax.random.key(3), dtype=dtype)
        tokens = jax.random.randint(jax.random.key(4), (4, 257), 0, 512)
        yield (f"Llama-style 4 layers d=256, 4x256 tokens, {name}",
               models.sgd_step(models.llama_loss), (params, tokens))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    machine = machine_description()
    print(f"machine: {machine}", flush=True)
    rows = []
    all_cases = list(cases())
    for i, (name, step, step_args) in enumerate(all_cases, 1):
        print(f"[{i}/{len(all_cases)}] {name} ...", flush=True)
        result = compare(name, step, *step_args, repeats=args.repeats)
        rows.append(result.row())
        print(f"      temp ratio {result.memory_ratio:.3f}, time ratio {result.time_ratio:.3f}, "
              f"fused {result.report.fused}", flush=True)
    print("\n" + write_results(rows, args.out, "model_training_steps", machine))
    return 0


if __name__ == "__main__":
    sys.exit(main())
