"""Shared vocabulary below every layer of jfuse.

What the passes, the ops, the kernels and the rewriter all need to name, and nothing else:
activations, jfuse's own markers in a jaxpr (derivative regions, sharding markers), the float64
probe evaluator. Modules here import nothing from ``jfuse.api``, ``rewrite``, ``passes``, ``ops``
or ``pallas``: dependencies point one way, api -> rewrite -> passes -> ops -> pallas -> core ->
``jfuse._jax`` (the JAX seam, which imports nothing from jfuse).
"""
