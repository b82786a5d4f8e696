"""A block with two near-misses, to show what the fusion report says about them.

Run: ``python examples/near_misses.py``.
"""

import jax
import jax.numpy as jnp

import jfuse


def block(params, x):
    h = jnp.sin(x @ params["w1"] + params["b1"])   # sin: not an activation jfuse fuses
    z = h @ params["w2"] + params["b2"]
    return jax.nn.gelu(z), z                       # z is also returned: gelu cannot join


if __name__ == "__main__":
    params = {"w1": jnp.ones((64, 64)), "b1": jnp.zeros(64),
              "w2": jnp.ones((64, 64)), "b2": jnp.zeros(64)}
    print(jfuse.explain(block)(params, jnp.ones((32, 64))))
