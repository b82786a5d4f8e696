"""While jfuse traces a function, ``jax.grad``, ``jax.value_and_grad`` and ``jax.vjp`` fuse first.

Why: ``jax.grad(loss)`` called inside a function jfuse traces differentiates ``loss`` before jfuse
sees it. The jaxpr jfuse gets is then the joint forward and backward, where every forward block's
intermediates are read by the backward, so no block could be fused. While
:func:`fusing_differentiated_functions` is active, those three entry points wrap the function they
differentiate with ``fuse`` first: ``jax.grad(loss)`` becomes ``jax.grad(jfuse.fuse(loss))``, and
the fused ops carry their own derivative rules into the backward.

Semantics, exactly:

- Only ``jax.grad``, ``jax.value_and_grad`` and ``jax.vjp``, looked up as attributes of the
  ``jax`` module, are replaced; a reference taken before the trace (``from jax import grad``)
  and every other transformation (``jvp``, ``jacrev``, ``vmap``) are left alone.
- A function that is already fused (``is_fused(fun)``) is differentiated as it is.
- The replacement lasts while the context is active and is seen by every thread (the
  attributes are module-global); the context holds a re-entrant lock, so another thread's jfuse
  trace waits for it. Nested contexts (a jfuse trace inside a jfuse trace) keep the outermost
  replacement and restore the originals once, when the outermost context exits, also on error.
- Arguments and results are those of the JAX function: the wrapper only changes ``fun``.

This module knows nothing of how fusing works: the caller passes ``fuse`` and ``is_fused``.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from typing import Any, Callable, Iterator

import jax

DIFFERENTIATING = ("grad", "value_and_grad", "vjp")

_lock = threading.RLock()
_depth = 0


@contextlib.contextmanager
def fusing_differentiated_functions(
    fuse: Callable[[Callable], Callable], is_fused: Callable[[Any], bool]
) -> Iterator[None]:
    """Within the block, ``jax.grad(f)`` etc. differentiate ``fuse(f)`` (see module docstring)."""
    global _depth
    with _lock:
        if _depth:  # already inside a jfuse trace: the outer replacement is in place
            _depth += 1
            try:
                yield
            finally:
                _depth -= 1
            return
        originals = {name: getattr(jax, name) for name in DIFFERENTIATING}

        def replacement(original):
            @functools.wraps(original)
            def differentiate(fun, *args, **kwargs):
                return original(fun if is_fused(fun) else fuse(fun), *args, **kwargs)

            return differentiate

        _depth = 1
        try:
            for name, original in originals.items():
                setattr(jax, name, replacement(original))
            yield
        finally:
            for name, original in originals.items():
                setattr(jax, name, original)
            _depth = 0
