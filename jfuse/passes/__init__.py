"""The pattern passes, in the order they claim equations (earlier wins on overlap).

Adding a pattern: write ``passes/<name>.py`` exposing ``PATTERN`` and add it to ``PIPELINE``.
"""

from __future__ import annotations

from jfuse.passes import linear

PIPELINE = (linear.PATTERN,)
PATTERN_NAMES = tuple(p.name for p in PIPELINE)
