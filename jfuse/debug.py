"""``JFUSE_DEBUG=<pattern>[,<pattern>...]`` (or ``all``): why each candidate of a pattern failed.

Passes call :func:`reject` at every point where a candidate stops being one; with the switch set,
each rejection prints one line to stderr with the anchor's source line, so a user can see step by
step why a block they expected to fuse did not. Off by default and free when off.
"""

from __future__ import annotations

import os
import sys

from jfuse import _jax_compat as jc


def _wanted(pattern: str) -> bool:
    value = os.environ.get("JFUSE_DEBUG", "")
    if not value:
        return False
    names = {v.strip() for v in value.split(",")}
    # The norm pass serves rms_norm, layer_norm and their add_ variants: any of them asks for it.
    return "all" in names or any(name and name.endswith(pattern) for name in names)


def enabled(pattern: str) -> bool:
    """True when ``JFUSE_DEBUG`` asks about ``pattern``."""
    return _wanted(pattern)


def reject(pattern: str, anchor: jc.JaxprEqn, why: str) -> None:
    """Print why the candidate of ``pattern`` anchored at ``anchor`` is not a site."""
    if _wanted(pattern):
        print(f"jfuse debug [{pattern}] {anchor.primitive.name} at {jc.user_source_line(anchor)}: "
              f"{why}", file=sys.stderr)
