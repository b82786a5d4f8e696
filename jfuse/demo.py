"""``python -m jfuse.demo``: fuse a small transformer-style MLP stack and compare with jax.jit.

Builds a pre-norm residual MLP stack in plain JAX (linear + gelu up-projection, linear down-
projection, a few layers), prints jfuse's fusion report for its training step, then prints the
training step's compiled temp memory and median step time under jfuse relative to jax.jit.
On a CPU the fused ops run their XLA implementation; on TPU/GPU their Pallas kernels.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

import jfuse
from jfuse.benchmarking import compare, machine_description


def init_params(key, n_layers: int, d_model: int, d_hidden: int):
    params = []
    for layer_key in jax.random.split(key, n_layers):
        k1, k2 = jax.random.split(layer_key)
        params.append(
            {
                "norm": jnp.ones(d_model),
                "w_up": jax.random.normal(k1, (d_model, d_hidden)) / np.sqrt(d_model),
                "b_up": jnp.zeros(d_hidden),
                "w_down": jax.random.normal(k2, (d_hidden, d_model)) / np.sqrt(d_hidden),
                "b_down": jnp.zeros(d_model),
            }
        )
    return params


def rms_norm(x, scale, eps=1e-6):
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def mlp_stack(params, x):
    for layer in params:
        h = rms_norm(x, layer["norm"])
        h = jax.nn.gelu(h @ layer["w_up"] + layer["b_up"])
        x = x + h @ layer["w_down"] + layer["b_down"]
    return x


def loss(params, x, y):
    return jnp.mean((mlp_stack(params, x) - y) ** 2)


def train_step(params, x, y):
    value, grads = jax.value_and_grad(loss)(params, x, y)
    return value, jax.tree.map(lambda p, g: p - 1e-2 * g, params, grads)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--d-hidden", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)

    key = jax.random.key(0)
    params = init_params(key, args.layers, args.d_model, args.d_hidden)
    x = jax.random.normal(jax.random.key(1), (args.tokens, args.d_model))
    y = jax.random.normal(jax.random.key(2), (args.tokens, args.d_model))

    print(f"jfuse demo on {machine_description()}")
    print(f"{args.layers}-layer MLP stack, {args.tokens} tokens, d_model={args.d_model}, "
          f"d_hidden={args.d_hidden}, f32\n")
    print(jfuse.explain(train_step)(params, x, y))
    result = compare("mlp training step", train_step, params, x, y, repeats=args.repeats)

    fused_loss = jfuse.jit(train_step)(params, x, y)[0]
    plain_loss = jax.jit(train_step)(params, x, y)[0]
    print("\ntraining step, jfuse.jit vs jax.jit (ratios < 1 mean jfuse uses less):")
    print(f"  compiled temp memory: {result.jfuse_temp_bytes / 2**20:.2f} MiB vs "
          f"{result.jax_temp_bytes / 2**20:.2f} MiB  -> ratio {result.memory_ratio:.3f}")
    print(f"  median step time:     {result.jfuse_step_s * 1e3:.2f} ms vs "
          f"{result.jax_step_s * 1e3:.2f} ms  -> ratio {result.time_ratio:.3f}")
    print(f"  loss: {float(fused_loss):.6f} (jfuse) vs {float(plain_loss):.6f} (jax.jit)")
    backend = jax.default_backend()
    kernels = "Pallas kernels" if backend in ("tpu", "gpu") else "their XLA implementation"
    print(f"  backend: {backend}; the fused ops ran {kernels}")


if __name__ == "__main__":
    main()
