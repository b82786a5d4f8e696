"""No silent misses: on real model code, every block that means one of jfuse's patterns (found by
``block_census``, which never asks the matcher) is either fused or reported in ``report.missed``.

Each model is small (one or two layers) so that tracing it costs little; ``explain`` runs nothing.
"""

from __future__ import annotations

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jfuse
from block_census import census

B, T, D, F, HEADS, VOCAB = 2, 8, 32, 48, 4, 64

# What each census kind is reported as.
KINDS = {
    "norm": ("rms_norm", "layer_norm", "add_rms_norm", "add_layer_norm"),
    "glu": ("glu",),
    "attention": ("attention",),
    "linear_cross_entropy": ("linear_cross_entropy",),
}

DEFAULT_CASES = {"test_every_block_found_by_meaning_is_fused_or_reported": 6}


def _tokens():
    return jnp.asarray(np.random.default_rng(0).integers(0, VOCAB, (B, T + 1)), jnp.int32)


def _x():
    return jnp.asarray(np.random.default_rng(1).standard_normal((B, T, D)), jnp.float32)


def _plain_llama():
    from benchmarks.models import init_llama, llama_loss
    params = init_llama(jax.random.key(0), n_layers=2, d_model=D, d_ff=F, vocab=VOCAB)
    return llama_loss, (params, _tokens())


def _penzai_llamalike():
    pz = pytest.importorskip("penzai.pz", reason="penzai is not installed (test extra)")
    optax = pytest.importorskip("optax")
    from penzai.models.transformer.variants import llamalike_common
    config = llamalike_common.LlamalikeTransformerConfig(
        num_kv_heads=2, query_head_multiplier=2, embedding_dim=D, projection_dim=8,
        mlp_hidden_dim=F, num_decoder_blocks=2, vocab_size=VOCAB, mlp_variant="swiglu",
        tie_embedder_and_logits=False)
    model = llamalike_common.build_llamalike_transformer(config, init_base_rng=jax.random.key(0))
    unbound, params = pz.unbind_params(model, freeze=True)

    def loss(params, tokens):
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        logits = pz.bind_variables(unbound, params)(
            pz.nx.wrap(inputs).tag("batch", "seq"), token_positions=pz.nx.arange("seq", T))
        logits = logits.untag("batch", "seq", "vocabulary").unwrap()
        return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

    return loss, (params, _tokens())


def _flax_linen():
    nn = pytest.importorskip("flax.linen")

    class Block(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.RMSNorm()(x)
            x = x + nn.MultiHeadDotProductAttention(num_heads=HEADS)(
                h, mask=nn.make_causal_mask(jnp.ones(x.shape[:2])))
            h = nn.LayerNorm()(x)
            return x + nn.Dense(D)(nn.silu(nn.Dense(F)(h)) * nn.Dense(F)(h))

    x = _x()
    params = Block().init(jax.random.key(0), x)
    return (lambda p, x: Block().apply(p, x)), (params, x)


def _flax_nnx():
    nnx = pytest.importorskip("flax.nnx")

    class Block(nnx.Module):
        def __init__(self, rngs):
            self.norm1, self.norm2 = nnx.RMSNorm(D, rngs=rngs), nnx.LayerNorm(D, rngs=rngs)
            self.attn = nnx.MultiHeadAttention(HEADS, D, decode=False, rngs=rngs)
            self.gate, self.up = nnx.Linear(D, F, rngs=rngs), nnx.Linear(D, F, rngs=rngs)
            self.down = nnx.Linear(F, D, rngs=rngs)

        def __call__(self, x):
            x = x + self.attn(self.norm1(x), mask=nnx.make_causal_mask(jnp.ones(x.shape[:2])))
            h = self.norm2(x)
            return x + self.down(nnx.gelu(self.gate(h)) * self.up(h))

    graphdef, state = nnx.split(Block(nnx.Rngs(0)))
    return (lambda s, x: nnx.merge(graphdef, s)(x)), (state, _x())


def _equinox():
    eqx = pytest.importorskip("equinox")
    k = jax.random.split(jax.random.key(0), 4)

    class Block(eqx.Module):
        norm: eqx.nn.LayerNorm
        attn: eqx.nn.MultiheadAttention
        gate: eqx.nn.Linear
        up: eqx.nn.Linear

        def __call__(self, x):  # x: (T, D), one sequence
            h = jax.vmap(self.norm)(x)
            mask = jnp.tril(jnp.ones((T, T), bool))
            x = x + self.attn(h, h, h, mask=mask)
            h = jax.vmap(self.norm)(x)
            return jax.vmap(lambda r: jax.nn.silu(self.gate(r)) * self.up(r))(h)

    block = Block(eqx.nn.LayerNorm(D), eqx.nn.MultiheadAttention(HEADS, D, inference=True, key=k[0]),
                  eqx.nn.Linear(D, F, key=k[1]), eqx.nn.Linear(D, F, key=k[2]))
    params, static = eqx.partition(block, eqx.is_array)
    return (lambda p, x: jax.vmap(eqx.combine(p, static))(x)), (params, _x())


def _haiku():
    hk = pytest.importorskip("haiku")

    def block(x):
        h = hk.RMSNorm(-1)(x)
        x = x + hk.MultiHeadAttention(HEADS, D // HEADS, w_init_scale=1.0)(
            h, h, h, mask=jnp.tril(jnp.ones((1, 1, T, T), bool)))
        h = hk.LayerNorm(-1, True, True)(x)
        return x + hk.Linear(D)(jax.nn.silu(hk.Linear(F)(h)) * hk.Linear(F)(h))

    model = hk.without_apply_rng(hk.transform(block))
    x = _x()
    return model.apply, (model.init(jax.random.key(0), x), x)


MODELS = {
    "plain llama": (_plain_llama, {"norm": 5, "glu": 2, "attention": 2, "linear_cross_entropy": 1}),
    "penzai llamalike": (_penzai_llamalike,
                         {"norm": 5, "glu": 2, "attention": 2, "linear_cross_entropy": 1}),
    "flax linen": (_flax_linen, {"norm": 2, "glu": 1, "attention": 1}),
    "flax nnx": (_flax_nnx, {"norm": 2, "glu": 1, "attention": 1}),
    "equinox": (_equinox, {"norm": 2, "glu": 1, "attention": 1}),
    "haiku": (_haiku, {"norm": 2, "glu": 1, "attention": 1}),
}


@pytest.mark.parametrize("model", list(MODELS))
def test_every_block_found_by_meaning_is_fused_or_reported(model):
    build, expected = MODELS[model]
    f, args = build()
    found = census(f, *args)
    # The census itself must see the model's blocks, or this test could not fail.
    assert {k: found[k] for k in expected} == expected, dict(found)
    report = jfuse.explain(f)(*args)
    accounted = collections.Counter()
    for kind, patterns in KINDS.items():
        accounted[kind] = sum(report.fused.get(p, 0) for p in patterns) + sum(
            m.pattern in patterns for m in report.missed)
    assert {k: accounted[k] for k in KINDS} == {k: found[k] for k in KINDS}, str(report)
