"""The pattern passes, found in this package and run in order of their ``priority``.

Adding a pattern: write ``passes/<name>.py`` exposing ``PATTERN`` (a :class:`~jfuse.passes.base.Pattern`
with its priority); nothing here changes. Modules whose name starts with ``_`` and ``base`` are
helpers, not passes.
"""

from __future__ import annotations

import importlib
import pkgutil

_HELPERS = {"base"}


def _discover() -> tuple:
    patterns = []
    for info in pkgutil.iter_modules(__path__):
        if info.name.startswith("_") or info.name in _HELPERS:
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        if not hasattr(module, "PATTERN"):
            raise ImportError(f"jfuse.passes.{info.name} defines no PATTERN; a pass module must "
                              "expose one (or be named with a leading underscore)")
        patterns.append(module.PATTERN)
    return tuple(sorted(patterns, key=lambda pattern: (pattern.priority, pattern.name)))


PIPELINE = _discover()
# The report keys, one per kind of site.
PATTERN_NAMES = tuple(name for pattern in PIPELINE for name in pattern.site_names)
# Every name ``patterns=``, ``JFUSE_DISABLE`` and ``JFUSE_DEBUG`` accept, and the report keys it
# stands for: each pattern name alone, and each pass's name for all the patterns it serves.
PATTERN_GROUPS: dict[str, tuple[str, ...]] = {
    **{name: (name,) for name in PATTERN_NAMES},
    **{pattern.name: pattern.site_names for pattern in PIPELINE},
}
