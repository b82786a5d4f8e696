"""The attention memory table: a Llama-style training step at growing sequence length.

Run: ``python benchmarks/long_context_step.py [--lengths 512,1024,2048,4096] [--repeats 3]``;
with ``--vocab 32768 --lengths 1024 --name lm_step`` it is the language-model step of the LM
head's loss (the logits ``(T, vocab)`` f32 then dominate).
The model (``models.llama_rope_loss``: token embedding, RMSNorm, causal multi-head attention with
RoPE, SwiGLU, tied LM head) is written as users write it; jfuse.jit finds its attention, norms and
GLUs. Dense attention keeps ``(batch, heads, T, T)`` scores and probabilities per layer for the
backward, so jax.jit's compiled temp memory grows with T²; under jfuse it should grow with T.
Writes ``benchmarks/results/long_context_step.{csv,md}``: compiled temp memory and median step
time, jfuse/jax.jit ratios, with the machine recorded.
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


def cases(lengths, dtype, layers: int, d_model: int, d_ff: int, vocab: int):
    params = models.init_llama(jax.random.key(0), n_layers=layers, d_model=d_model, d_ff=d_ff,
                               vocab=vocab, dtype=dtype)
    for t in lengths:
        tokens = jax.random.randint(jax.random.key(t), (1, t + 1), 0, vocab)
        name = (f"Llama-style {layers} layers d={d_model}, T={t}, vocab {vocab}, "
                f"{jnp.dtype(dtype).name}")
        yield name, models.sgd_step(models.llama_rope_loss), (params, tokens)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="512,1024,2048,4096")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=512,
                        help="LM head size (32768 / 131072: the LM-head loss measurement)")
    parser.add_argument("--name", default="long_context_step", help="results file name")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=pathlib.Path,
                        default=pathlib.Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    machine = machine_description()
    print(f"machine: {machine}", flush=True)
    lengths = [int(t) for t in args.lengths.split(",")]
    rows = []
    for name, step, step_args in cases(lengths, jnp.dtype(args.dtype), args.layers, 256, 683,
                                       args.vocab):
        print(f"{name} ...", flush=True)
        result = compare(name, step, *step_args, repeats=args.repeats, warmup=1)
        rows.append(result.row())
        print(f"      temp {result.jax_temp_bytes / 2**20:.1f} -> "
              f"{result.jfuse_temp_bytes / 2**20:.1f} MiB (ratio {result.memory_ratio:.3f}), "
              f"time ratio {result.time_ratio:.3f}, fused {result.report.fused}", flush=True)
    print("\n" + write_results(rows, args.out, args.name, machine))
    return 0


if __name__ == "__main__":
    sys.exit(main())
