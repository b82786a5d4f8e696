"""On a runtime with several devices (8 CPU host devices, in a subprocess so the rest of the suite
keeps one), jfuse must not break a sharded program: kernels are not partitioned yet, so the fused
ops use XLA there, say so in the report, and answers match jax.jit."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent('''
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    import jfuse

    assert jax.device_count() == 8
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "model"))
    rng = np.random.default_rng(0)
    x = jax.device_put(jnp.asarray(rng.standard_normal((32, 64)), jnp.float32),
                       NamedSharding(mesh, P("data", None)))
    wg, wu = (jax.device_put(jnp.asarray(rng.standard_normal((64, 128)) / 8, jnp.float32),
                             NamedSharding(mesh, P(None, "model"))) for _ in range(2))
    s = jnp.ones(64)

    def step(x, wg, wu, s):
        def loss(wg, wu):
            h = x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6) * s
            return jnp.mean((jax.nn.silu(h @ wg) * (h @ wu)) ** 2)
        return jax.value_and_grad(loss, argnums=(0, 1))(wg, wu)

    fused = jfuse.jit(step)
    got = fused(x, wg, wu, s)
    want = jax.jit(step)(x, wg, wu, s)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
    for a, b in zip(got[1], want[1]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    report = fused.report
    assert report.fused == {"rms_norm": 1, "glu": 1}, report
    assert all("8 devices" in site.detail for site in report.sites), report
    # Lowered for TPU under the mesh: no Mosaic kernel that XLA would have to partition.
    text = fused.trace(x, wg, wu, s).lower(lowering_platforms=("tpu",)).as_text()
    assert "tpu_custom_call" not in text
    print("OK")
''')


def test_sharded_program_runs_and_matches_on_8_devices():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu")
    done = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0 and "OK" in done.stdout, done.stdout + done.stderr
