"""Sharded training steps on 8 CPU host devices, run by ``test_multi_device.py`` in a subprocess
(``--xla_force_host_platform_device_count=8`` must be set before JAX starts, and the rest of the
suite keeps one device). Prints one JSON object per case; the test asserts on them.

Usage: python tests/multi_device_cases.py CASE   (CASE: one of CASES, or "all")
"""

from __future__ import annotations

import json
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import jfuse

B, S, D, F, HEADS, LAYERS = 8, 16, 256, 512, 4, 2
COLLECTIVE = re.compile(r"\b(all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)"
                        r"(?:-start)?\(")


def rms_norm(x, w, eps=1e-6):
    return x * lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps) * w


def layer(x, p):
    b, s, d = x.shape
    h = rms_norm(x, p["attn_norm"])
    split = lambda t: t.reshape(b, s, HEADS, d // HEADS)  # noqa: E731
    q, k, v = split(h @ p["wq"]), split(h @ p["wk"]), split(h @ p["wv"])
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(d // HEADS)
    probs = jax.nn.softmax(jnp.where(jnp.tril(jnp.ones((s, s), bool)), scores, -1e9), axis=-1)
    x = x + jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, s, d) @ p["wo"]
    h = rms_norm(x, p["mlp_norm"])
    return x + (jax.nn.silu(h @ p["w_gate"]) * (h @ p["w_up"])) @ p["w_down"]


def loss_unrolled(params, x, y):
    for p in params:
        x = layer(x, p)
    return jnp.mean((x - y) ** 2)


def loss_scanned(params, x, y):
    x, _ = lax.scan(lambda x, p: (layer(x, p), None), x, params)
    return jnp.mean((x - y) ** 2)


def train_step(loss):
    def step(params, x, y):
        value, grads = jax.value_and_grad(loss)(params, x, y)
        return value, jax.tree.map(lambda p, g: p - 0.1 * g, params, grads)

    return step


def init(rng):
    def dense(fan_in, fan_out):
        return jnp.asarray(rng.standard_normal((fan_in, fan_out)) / np.sqrt(fan_in), jnp.float32)

    return [{"attn_norm": jnp.ones(D), "wq": dense(D, D), "wk": dense(D, D), "wv": dense(D, D),
             "wo": dense(D, D), "mlp_norm": jnp.ones(D), "w_gate": dense(D, F),
             "w_up": dense(D, F), "w_down": dense(F, D)} for _ in range(LAYERS)]


# Per case: mesh shape and axes, the activations' spec, and each weight's spec.
REPLICATED = {}
FSDP_TP = {"wq": P("data", "model"), "wk": P("data", "model"), "wv": P("data", "model"),
           "w_gate": P("data", "model"), "w_up": P("data", "model"),
           "wo": P("model", "data"), "w_down": P("model", "data"),
           "attn_norm": P("data"), "mlp_norm": P("data")}
CASES = {
    "data_parallel": ((8,), ("data",), P("data"), REPLICATED, False),
    "fsdp_tensor_parallel": ((4, 2), ("data", "model"), P("data"), FSDP_TP, False),
    "sequence_sharded": ((2, 4), ("data", "seq"), P("data", "seq"), REPLICATED, False),
    "scan_fsdp_tensor_parallel": ((4, 2), ("data", "model"), P("data"), FSDP_TP, True),
}


def place(params, mesh, weight_specs, scanned):
    def put(name, value):
        spec = weight_specs.get(name, P())
        if scanned:
            spec = P(None, *spec)
        return jax.device_put(value, NamedSharding(mesh, spec))

    if scanned:
        stacked = jax.tree.map(lambda *ls: jnp.stack(ls), *params)
        return {name: put(name, value) for name, value in stacked.items()}
    return [{name: put(name, value) for name, value in p.items()} for p in params]


def collectives(compiled) -> int:
    return len(COLLECTIVE.findall(compiled.as_text()))


def max_error(got, want) -> float:
    return max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)) / (1 + np.abs(np.asarray(b)))))
               for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)))


def run_case(name: str) -> dict:
    shape, axes, act_spec, weight_specs, scanned = CASES[name]
    mesh = Mesh(np.array(jax.devices()).reshape(shape), axes)
    rng = np.random.default_rng(0)
    params = place(init(rng), mesh, weight_specs, scanned)
    x, y = (jax.device_put(jnp.asarray(rng.standard_normal((B, S, D)), jnp.float32),
                           NamedSharding(mesh, act_spec)) for _ in range(2))
    step = train_step(loss_scanned if scanned else loss_unrolled)
    reference = jax.jit(step)
    want = reference(params, x, y)
    result = {"case": name}

    fused = jfuse.jit(step)  # default implementation: XLA on this CPU, kernels on TPU/GPU
    result["error_default"] = max_error(fused(params, x, y), want)
    report = fused.report
    result["fused"] = report.fused
    result["sharding"] = [[c.pattern, c.partitioned, c.detail] for c in report.sharding]
    result["collectives_jit"] = collectives(reference.lower(params, x, y).compile())
    result["collectives_default"] = collectives(fused.lower(params, x, y).compile())
    text = fused.trace(params, x, y).lower(lowering_platforms=("tpu",)).as_text()
    result["tpu_kernels"] = text.count("tpu_custom_call")
    if name == "sequence_sharded":  # where attention is declined (see the test)
        # Everything but attention fused: what the other ops cost in collectives on their own.
        others = jfuse.jit(step, patterns=("linear", "glu", "norm"))
        result["collectives_without_attention"] = collectives(
            others.lower(params, x, y).compile())

    # The same program with the kernels run per shard in interpret mode: this is where the
    # shard_map layouts are exercised on this CPU (numbers and collectives).
    interpreted = jfuse.jit(step, implementation="interpret")
    result["error_interpret"] = max_error(interpreted(params, x, y), want)
    result["collectives_interpret"] = collectives(interpreted.lower(params, x, y).compile())
    return result


def run_declined() -> dict:
    """Layouts a kernel cannot take whole rows of: declined with a reason, answers unchanged."""
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "model"))
    rng = np.random.default_rng(1)
    x = jax.device_put(jnp.asarray(rng.standard_normal((32, 256)), jnp.float32),
                       NamedSharding(mesh, P("data", "model")))  # K / hidden split over 'model'
    w = jax.device_put(jnp.asarray(rng.standard_normal((256, 128)) / 16, jnp.float32),
                       NamedSharding(mesh, P("model", None)))
    b = jnp.zeros(128)

    def step(x, w, b):
        def loss(x, w, b):
            h = jax.nn.gelu(x @ w + b)  # a row-parallel linear
            n = x * lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6)  # a norm over split H
            return jnp.sum(h ** 2) + jnp.sum(n ** 3)

        return jax.value_and_grad(loss, argnums=(0, 1, 2))(x, w, b)

    fused = jfuse.jit(step)
    got = fused(x, w, b)
    text = fused.trace(x, w, b).lower(lowering_platforms=("tpu",)).as_text()
    return {"case": "declined", "fused": fused.report.fused,
            "error_default": max_error(got, jax.jit(step)(x, w, b)),
            "sharding": [[c.pattern, c.partitioned, c.detail] for c in fused.report.sharding],
            "tpu_kernels": text.count("tpu_custom_call")}


def run_attention() -> dict:
    """Attention with batch and heads split: per shard, no collectives beyond jax.jit's; a
    sequence-split K/V: declined with the reason, answer unchanged."""
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "model"))
    rng = np.random.default_rng(2)
    b, t, n, k, h = 4, 128, 4, 2, 16

    def put(shape, spec):
        return jax.device_put(jnp.asarray(rng.standard_normal(shape), jnp.float32),
                              NamedSharding(mesh, spec))

    def step(q, kk, v):
        loss = lambda q, kk, v: jnp.sum(jfuse.ops.attention(q, kk, v, is_causal=True) ** 2)
        return jax.value_and_grad(loss, argnums=(0, 1, 2))(q, kk, v)

    split = P("data", None, "model", None)
    args = (put((b, t, n, h), split), put((b, t, k, h), split), put((b, t, k, h), split))
    want = jax.jit(step)(*args)
    result = {"case": "attention"}
    for implementation in (None, "interpret"):
        fused = jfuse.jit(step, implementation=implementation)
        suffix = "default" if implementation is None else "interpret"
        result[f"error_{suffix}"] = max_error(fused(*args), want)
        result[f"collectives_{suffix}"] = collectives(fused.lower(*args).compile())
    result["collectives_jit"] = collectives(jax.jit(step).lower(*args).compile())
    result["sharding"] = [[c.pattern, c.partitioned, c.detail] for c in fused.report.sharding]
    text = jfuse.jit(step).trace(*args).lower(lowering_platforms=("tpu",)).as_text()
    result["tpu_kernels"] = text.count("tpu_custom_call")

    seq_split = P(None, "model", None, None)  # keys and values split along the sequence
    declined_args = (args[0], put((b, t, k, h), seq_split), put((b, t, k, h), seq_split))
    fused = jfuse.jit(step)
    result["declined_error"] = max_error(fused(*declined_args), jax.jit(step)(*declined_args))
    result["declined_sharding"] = [[c.pattern, c.partitioned, c.detail]
                                   for c in fused.report.sharding]
    return result


def run_lm_head() -> dict:
    """The LM head's loss (rms_norm -> h @ W -> optax cross-entropy, ignored tokens masked) in a
    training step: W split over the vocabulary (tensor parallel) and tokens over 'data'; tokens
    only; and h split on K (declined). Each against jax.jit: answers, report, collectives."""
    import optax

    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "model"))
    rng = np.random.default_rng(3)
    tokens, d, vocab = 64, 64, 1000  # a ragged last vocabulary block per shard (500 = 256 + 244)

    def put(value, spec):
        return jax.device_put(jnp.asarray(value), NamedSharding(mesh, spec))

    def loss(params, x, y):
        h = rms_norm(x, params["norm"])  # a final norm, then the head
        nll = optax.softmax_cross_entropy_with_integer_labels(h @ params["head"], y)
        mask = y != -100
        return jnp.sum(jnp.where(mask, nll, 0.0)) / jnp.maximum(jnp.sum(mask), 1)

    step = train_step(loss)
    labels = rng.integers(-vocab, vocab, tokens).astype(np.int32)  # negative labels wrap (optax)
    labels[::7] = -100
    result = {"case": "lm_head"}
    for name, x_spec, head_spec in (("vocab", P("data", None), P(None, "model")),
                                    ("tokens", P("data", None), P()),
                                    ("declined", P(None, "model"), P(None, "model"))):
        params = {"norm": put(1 + rng.standard_normal(d) / 4, P()),
                  "head": put(rng.standard_normal((d, vocab)) / 8, head_spec)}
        params = jax.tree.map(lambda a: a.astype(jnp.float32), params)
        x = put(rng.standard_normal((tokens, d)).astype(np.float32), x_spec)
        y = put(labels, P("data"))
        fused = jfuse.jit(step, patterns=("linear_cross_entropy",))
        result[f"{name}_error"] = max_error(fused(params, x, y), jax.jit(step)(params, x, y))
        result[f"{name}_fused"] = fused.report.fused
        result[f"{name}_sharding"] = [[c.pattern, c.partitioned, c.detail]
                                      for c in fused.report.sharding]
        result[f"{name}_collectives"] = COLLECTIVE.findall(
            fused.lower(params, x, y).compile().as_text())
        result[f"{name}_collectives_jit"] = COLLECTIVE.findall(
            jax.jit(step).lower(params, x, y).compile().as_text())
    return result


def main(which: str) -> None:
    assert jax.device_count() == 8, jax.devices()
    names = list(CASES) + ["declined", "attention", "lm_head"] if which == "all" else [which]
    special = {"declined": run_declined, "attention": run_attention, "lm_head": run_lm_head}
    for name in names:
        result = special[name]() if name in special else run_case(name)
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "all")
