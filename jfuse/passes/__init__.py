"""The pattern passes, in the order they claim equations (earlier wins on overlap).

Adding a pattern: write ``passes/<name>.py`` exposing ``PATTERN`` and add it to ``PIPELINE``.
"""

from __future__ import annotations

from jfuse.passes import glu, linear, norm

PIPELINE = (glu.PATTERN, linear.PATTERN, norm.PATTERN)
PATTERN_NAMES = tuple(name for pattern in PIPELINE for name in pattern.site_names)
