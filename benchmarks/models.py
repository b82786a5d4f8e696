"""Small models written plainly, as users write them, for benchmarks and model-level tests."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


def init_llama(key, n_layers=4, d_model=256, d_ff=683, vocab=512, dtype=jnp.float32):
    """Parameters of a pre-norm Llama-style decoder (RMSNorm, attention, SwiGLU MLP)."""

    def dense(k, fan_in, fan_out):
        return (jax.random.normal(k, (fan_in, fan_out)) / np.sqrt(fan_in)).astype(dtype)

    keys = jax.random.split(key, n_layers + 1)
    layers = []
    for k in keys[:-1]:
        kq, kk, kv, ko, kg, ku, kd = jax.random.split(k, 7)
        layers.append({
            "attn_norm": jnp.ones(d_model, dtype),
            "wq": dense(kq, d_model, d_model), "wk": dense(kk, d_model, d_model),
            "wv": dense(kv, d_model, d_model), "wo": dense(ko, d_model, d_model),
            "mlp_norm": jnp.ones(d_model, dtype),
            "w_gate": dense(kg, d_model, d_ff), "w_up": dense(ku, d_model, d_ff),
            "w_down": dense(kd, d_ff, d_model),
        })
    embed = (jax.random.normal(keys[-1], (vocab, d_model)) * 0.02).astype(dtype)
    return {"layers": layers, "final_norm": jnp.ones(d_model, dtype), "embed": embed}


def rms_norm(x, w, eps=1e-6):
    x32 = x.astype(jnp.float32)
    n = x32 * lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return n.astype(x.dtype) * w


def attention(x, p, n_heads, *, rotate=None, mask_value=-1e9):
    """Causal multi-head attention as hand-written Llama/GPT code has it (``rotate``: RoPE)."""
    b, s, d = x.shape
    split = lambda t: t.reshape(b, s, n_heads, d // n_heads)
    q, k, v = split(x @ p["wq"]), split(x @ p["wk"]), split(x @ p["wv"])
    if rotate is not None:
        q, k = rotate(q), rotate(k)
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(d // n_heads)
    mask = jnp.tril(jnp.ones((s, s), bool))
    scores = jnp.where(mask, scores.astype(jnp.float32), mask_value)
    probs = jax.nn.softmax(scores, axis=-1).astype(x.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, s, d) @ p["wo"]


def swiglu(x, p):
    return (jax.nn.silu(x @ p["w_gate"]) * (x @ p["w_up"])) @ p["w_down"]


N_HEADS = 4


def _lm_loss(params, tokens, attend):
    x = params["embed"][tokens[:, :-1]]
    for p in params["layers"]:
        x = x + attend(rms_norm(x, p["attn_norm"]), p, N_HEADS)
        x = x + swiglu(rms_norm(x, p["mlp_norm"]), p)
    logits = rms_norm(x, params["final_norm"]) @ params["embed"].T
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))


def llama_loss(params, tokens):
    """A Llama-style language model without positions: token embedding, RMSNorm, causal
    attention (mask value -1e9), SwiGLU, tied LM head and next-token cross-entropy."""
    return _lm_loss(params, tokens, attention)


def sgd_step(loss):
    """A training step: value_and_grad of ``loss`` and an SGD update (what users jit)."""

    def step(params, batch):
        value, grads = jax.value_and_grad(loss)(params, batch)
        new = jax.tree.map(lambda p, g: p - 1e-2 * g, params, grads)
        return value, new

    return step


def rope(x, base=10000.0):
    """Rotary position embedding of ``(b, t, heads, d)`` (Llama's, half-split form)."""
    t, d = x.shape[1], x.shape[-1]
    freqs = base ** (-jnp.arange(0, d, 2, dtype=jnp.float32) / d)
    angles = jnp.arange(t, dtype=jnp.float32)[:, None] * freqs[None, :]  # (t, d/2)
    cos, sin = jnp.cos(angles)[None, :, None], jnp.sin(angles)[None, :, None]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def rope_attention(x, p, n_heads):
    """Causal multi-head attention with RoPE and a ``finfo.min`` mask, as Llama code writes it."""
    return attention(x, p, n_heads, rotate=rope, mask_value=jnp.finfo(jnp.float32).min)


def llama_rope_loss(params, tokens):
    """:func:`llama_loss` with RoPE in the attention (the long-context benchmark's model)."""
    return _lm_loss(params, tokens, rope_attention)


def init_swiglu_mlp(key, n_layers=4, d_model=512, d_ff=1376, dtype=jnp.float32):
    keys = jax.random.split(key, n_layers)
    layers = []
    for k in keys:
        kg, ku, kd = jax.random.split(k, 3)
        layers.append({
            "w_gate": (jax.random.normal(kg, (d_model, d_ff)) / np.sqrt(d_model)).astype(dtype),
            "w_up": (jax.random.normal(ku, (d_model, d_ff)) / np.sqrt(d_model)).astype(dtype),
            "w_down": (jax.random.normal(kd, (d_ff, d_model)) / np.sqrt(d_ff)).astype(dtype),
        })
    return layers


def swiglu_mlp_loss(layers, batch):
    x, y = batch
    for p in layers:
        x = x + swiglu(x, p)
    return jnp.mean((x.astype(jnp.float32) - y) ** 2)


def stack_layers(params):
    """``init_llama``'s parameters with the per-layer dicts stacked on a leading axis."""
    return {**params, "layers": jax.tree.map(lambda *xs: jnp.stack(xs), *params["layers"])}


def llama_scan_loss(params, tokens):
    """``llama_loss`` with the layers run by ``lax.scan`` over stacked parameters (see
    ``stack_layers``), as large models are written: one layer traced and compiled, not n."""

    def layer(x, p):
        x = x + attention(rms_norm(x, p["attn_norm"]), p, N_HEADS)
        x = x + swiglu(rms_norm(x, p["mlp_norm"]), p)
        return x, None

    x = params["embed"][tokens[:, :-1]]
    x, _ = lax.scan(layer, x, params["layers"])
    logits = rms_norm(x, params["final_norm"]) @ params["embed"].T
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))


def init_mlp(key, sizes, dtype=jnp.float32):
    """``(w, b)`` per layer of a plain MLP with widths ``sizes`` (d_in, hidden..., d_out)."""
    keys = jax.random.split(key, len(sizes) - 1)
    return [
        ((jax.random.normal(k, (a, b)) / np.sqrt(a)).astype(dtype), jnp.zeros(b, dtype))
        for k, a, b in zip(keys, sizes[:-1], sizes[1:])
    ]


def gelu_mlp_loss(layers, batch):
    """An MLP with GELU hidden layers (matmul + bias + activation: the ``linear`` pattern)."""
    x, y = batch
    for w, b in layers[:-1]:
        x = jax.nn.gelu(x @ w + b)
    w, b = layers[-1]
    return jnp.mean(((x @ w + b).astype(jnp.float32) - y) ** 2)
