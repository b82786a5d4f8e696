"""The pattern passes, in the order they claim equations (earlier wins on overlap).

Adding a pattern: write ``passes/<name>.py`` exposing ``PATTERN`` and add it to ``PIPELINE``.
"""

from __future__ import annotations

from jfuse.passes import glu, linear, norm

PIPELINE = (glu.PATTERN, linear.PATTERN, norm.PATTERN)
# The report keys, one per kind of site.
PATTERN_NAMES = tuple(name for pattern in PIPELINE for name in pattern.site_names)
# Every name ``patterns=``, ``JFUSE_DISABLE`` and ``JFUSE_DEBUG`` accept, and the report keys it
# stands for: each pattern name alone, and each pass's name for all the patterns it serves.
PATTERN_GROUPS: dict[str, tuple[str, ...]] = {
    **{name: (name,) for name in PATTERN_NAMES},
    **{pattern.name: pattern.site_names for pattern in PIPELINE},
}
