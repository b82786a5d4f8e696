"""The LM head's loss alone: linear + cross-entropy, fused against the dense loss jax.jit runs.

Run: ``python benchmarks/lm_head_loss.py [--vocabs 32768,131072] [--dtypes float32,bfloat16]``.
The loss is written as users write it (``h @ W``, an f32 upcast of the logits,
``optax.softmax_cross_entropy_with_integer_labels``, a mean) and compiled three ways: ``jax.jit``
(the dense loss, which keeps the ``(T, V)`` logits and, with the backward, their softmax),
``jfuse.jit`` of the same function (the ``linear_cross_entropy`` pattern finds it), and the op
called directly (``jfuse.ops.linear_cross_entropy``). Each is measured forward alone and as
``value_and_grad`` in ``h`` and ``W`` (fwd+bwd): compiled temp memory and median time of
interleaved calls. Writes ``benchmarks/results/lm_head_loss.{csv,md}`` with the machine recorded.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import jax
import jax.numpy as jnp
import optax

import jfuse
from jfuse.benchmarking import interleaved_medians, machine_description, temp_bytes, write_results


def user_loss(h, w, labels):
    logits = (h @ w).astype(jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def op_loss(h, w, labels):
    return jfuse.ops.linear_cross_entropy(h, w, labels, reduction="mean")


def measure(tokens: int, hidden: int, vocab: int, dtype, mode: str, repeats: int) -> dict:
    keys = jax.random.split(jax.random.key(vocab), 3)
    h = jax.random.normal(keys[0], (tokens, hidden)).astype(dtype)
    w = (jax.random.normal(keys[1], (hidden, vocab)) * hidden ** -0.5).astype(dtype)
    labels = jax.random.randint(keys[2], (tokens,), 0, vocab)
    wrap = (lambda f: f) if mode == "fwd" else (
        lambda f: jax.value_and_grad(f, argnums=(0, 1)))
    programs = {
        "jax": jax.jit(wrap(user_loss)),
        # Differentiated inside the traced function, as training steps do (jfuse.jit of a
        # function jax already differentiated sees only the joint forward and backward).
        "jfuse": jfuse.jit(lambda h, w, labels: wrap(user_loss)(h, w, labels)),
        "op": jax.jit(wrap(op_loss)),
    }
    compiled = {name: p.lower(h, w, labels).compile() for name, p in programs.items()}
    medians = interleaved_medians(
        {name: (lambda c=c: c(h, w, labels)) for name, c in compiled.items()},
        repeats=repeats, warmup=1)
    temps = {name: temp_bytes(c) or 0 for name, c in compiled.items()}
    fused = dict(programs["jfuse"].report.fused)
    row = {"tokens": tokens, "hidden": hidden, "vocab": vocab,
           "dtype": jnp.dtype(dtype).name, "mode": mode}
    for name in programs:
        row[f"{name}_temp_MiB"] = round(temps[name] / 2**20, 2)
    for name in ("jfuse", "op"):
        row[f"{name}_temp_ratio"] = round(temps[name] / max(temps["jax"], 1), 3)
    for name in programs:
        row[f"{name}_ms"] = round(medians[name] * 1e3, 1)
    for name in ("jfuse", "op"):
        row[f"{name}_time_ratio"] = round(medians[name] / medians["jax"], 3)
    row["fused"] = fused
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocabs", default="32768,131072")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--modes", default="fwd,fwd+bwd")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=pathlib.Path,
                        default=pathlib.Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    machine = machine_description()
    print(f"machine: {machine}", flush=True)
    rows = []
    for vocab in (int(v) for v in args.vocabs.split(",")):
        for dtype in args.dtypes.split(","):
            for mode in args.modes.split(","):
                row = measure(args.tokens, args.hidden, vocab, jnp.dtype(dtype), mode,
                              args.repeats)
                rows.append(row)
                print(row, flush=True)
    note = ("jax: jax.jit of the dense loss; jfuse: jfuse.jit of the same function; op: "
            "jfuse.ops.linear_cross_entropy under jax.jit. Ratios are against jax. fwd+bwd is "
            "value_and_grad in h and W.")
    print("\n" + write_results(rows, args.out, "lm_head_loss", machine, note))
    return 0


if __name__ == "__main__":
    sys.exit(main())
