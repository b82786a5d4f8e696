"""Every private or drifting JAX internal jfuse touches, behind one seam split by job.

- :mod:`~jfuse._jax.compat`: what differs between the JAX releases jfuse supports (0.10 to 0.12):
  primitive names that were renamed, params whose layout changed, features only newer JAX has.
- :mod:`~jfuse._jax.jaxpr`: reading, editing and interpreting jaxprs (the core types, bodies held
  in params, inlining calls, merging equations, and the one evaluator every jfuse walk uses).
- :mod:`~jfuse._jax.source`: source locations (the user's line of an equation, re-binding under
  an equation's own source info).
- :mod:`~jfuse._jax.cudnn`: cuDNN's fused flash attention (the private function behind
  ``jax.nn.dot_product_attention(implementation="cudnn")``, which returns an f32 log-sum-exp),
  the installed cuDNN version and JAX's own checks of what cuDNN serves.

Nothing outside this package imports ``jax._src`` or names a private JAX class, so a JAX change
touches this package and nothing else. It imports nothing from the rest of jfuse.
"""
