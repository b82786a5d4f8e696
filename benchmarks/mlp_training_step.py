"""Training step (value_and_grad + SGD) of MLP stacks: jax.jit vs jfuse.jit on this machine.

Run: ``python benchmarks/mlp_training_step.py [--repeats 30]``. Writes
``benchmarks/results/mlp_training_step.{csv,md}`` with compiled temp memory and median step time
of interleaved runs in one process, as jfuse/jax.jit ratios, plus the machine it ran on.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

from jfuse.benchmarking import compare, machine_description, write_results

ACTIVATIONS = {"gelu": jax.nn.gelu, "silu": jax.nn.silu, "relu": jax.nn.relu}


def make_step(activation):
    def loss(params, x, y):
        h = x
        for w, b in params[:-1]:
            h = activation(h @ w + b)
        w, b = params[-1]
        return jnp.mean((h @ w + b - y) ** 2)

    def step(params, x, y):
        value, grads = jax.value_and_grad(loss)(params, x, y)
        return value, jax.tree.map(lambda p, g: p - 1e-3 * g, params, grads)

    return step


def make_params(key, sizes, dtype):
    keys = jax.random.split(key, len(sizes) - 1)
    return [
        (
            (jax.random.normal(k, (a, b)) / np.sqrt(a)).astype(dtype),
            jnp.zeros(b, dtype),
        )
        for k, a, b in zip(keys, sizes[:-1], sizes[1:])
    ]


CASES = [
    # name, activation, tokens, layer sizes, dtype
    ("gelu 4x(512->2048->512)", "gelu", 1024, [512, 2048, 512, 2048, 512], jnp.float32),
    ("silu 4x(256->1024->256)", "silu", 2048, [256, 1024, 256, 1024, 256], jnp.float32),
    ("relu 3x(1024)", "relu", 512, [1024, 1024, 1024, 1024], jnp.float32),
    ("gelu bf16 4x(512->2048->512)", "gelu", 1024, [512, 2048, 512, 2048, 512], jnp.bfloat16),
]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    machine = machine_description()
    print(f"machine: {machine}", flush=True)
    rows = []
    for i, (name, act, tokens, sizes, dtype) in enumerate(CASES, 1):
        print(f"[{i}/{len(CASES)}] {name} ...", flush=True)
        params = make_params(jax.random.key(i), sizes, dtype)
        x = jax.random.normal(jax.random.key(100 + i), (tokens, sizes[0])).astype(dtype)
        y = jax.random.normal(jax.random.key(200 + i), (tokens, sizes[-1])).astype(dtype)
        result = compare(name, make_step(ACTIVATIONS[act]), params, x, y, repeats=args.repeats)
        rows.append(result.row())
        print(f"      temp ratio {result.memory_ratio:.3f}, time ratio {result.time_ratio:.3f}, "
              f"fused {result.report.fused}", flush=True)
    print("\n" + write_results(rows, args.out, "mlp_training_step", machine))
    return 0


if __name__ == "__main__":
    sys.exit(main())
