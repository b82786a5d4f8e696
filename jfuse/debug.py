"""``JFUSE_DEBUG=<pattern>[,<pattern>...]`` (or ``all``): why each candidate of a pattern failed.

Passes call :func:`reject` at every point where a candidate stops being one; with the switch set,
each rejection prints one line to stderr with the anchor's source line, so a user can see step by
step why a block they expected to fuse did not. Off by default and free when off.
"""

from __future__ import annotations

import os
import sys
from typing import Iterable

from jfuse._jax import jaxpr as jx
from jfuse._jax.source import user_source_line


def _wanted(pattern: str, serves: Iterable[str]) -> bool:
    value = os.environ.get("JFUSE_DEBUG", "")
    if not value:
        return False
    names = {v.strip() for v in value.split(",")}
    # A pass that serves several patterns (norm: rms_norm, layer_norm, ...) answers to each.
    return "all" in names or pattern in names or bool(names & set(serves))


def enabled(pattern: str, serves: Iterable[str] = ()) -> bool:
    """True when ``JFUSE_DEBUG`` asks about the pass ``pattern`` (or a pattern it ``serves``)."""
    return _wanted(pattern, serves)


def reject(pattern: str, anchor: jx.JaxprEqn, why: str, serves: Iterable[str] = ()) -> None:
    """Print why the candidate of the pass ``pattern`` (serving the patterns ``serves``)
    anchored at ``anchor`` is not a site."""
    if _wanted(pattern, serves):
        print(f"jfuse debug [{pattern}] {anchor.primitive.name} at {user_source_line(anchor)}: "
              f"{why}", file=sys.stderr)
