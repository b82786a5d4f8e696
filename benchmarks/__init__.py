"""jfuse's benchmarks: ``python benchmarks/run.py [--quick] [--out DIR]`` runs them all.

``ops`` times each fused op's default implementation against its XLA reference; ``steps`` times
models' training steps under ``jfuse.jit`` against ``jax.jit``; ``models`` holds the models.
``rewrite_cost.py`` (jfuse's compile-time overhead by depth) runs on its own.
"""
