"""Options shared by ``jfuse.jit``, ``jfuse.fuse`` and ``jfuse.explain``, and their env switches."""

from __future__ import annotations

import dataclasses
import os
from typing import Iterable

IMPLEMENTATIONS = (None, "xla", "pallas", "interpret")


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no", "off")


def raise_internal_errors() -> bool:
    """``JFUSE_RAISE=1``: re-raise jfuse's internal errors instead of falling back (for debugging)."""
    return _env_flag("JFUSE_RAISE")


@dataclasses.dataclass(frozen=True)
class FuseOptions:
    """How to fuse: which patterns, which kernel implementation, whether to print the report,
    whether a miss is an error.

    ``patterns=None`` enables every registered pattern minus those named in ``JFUSE_DISABLE``
    (comma separated). ``report=None`` defers to ``JFUSE_REPORT=1``, ``strict=None`` to
    ``JFUSE_STRICT=1``.
    """

    patterns: frozenset[str] | None = None
    implementation: str | None = None
    report: bool | None = None
    strict: bool | None = None

    @staticmethod
    def create(
        patterns: Iterable[str] | None = None,
        implementation: str | None = None,
        report: bool | None = None,
        strict: bool | None = None,
    ) -> "FuseOptions":
        from jfuse.passes import PATTERN_NAMES

        if implementation not in IMPLEMENTATIONS:
            raise ValueError(
                f"implementation={implementation!r} is not supported; expected one of "
                f"{IMPLEMENTATIONS}."
            )
        if patterns is not None:
            if isinstance(patterns, str):
                raise TypeError("patterns= takes a collection of pattern names, not a string.")
            patterns = frozenset(patterns)
            unknown = sorted(patterns - set(PATTERN_NAMES))
            if unknown:
                raise ValueError(
                    f"patterns= names unknown pattern(s) {unknown}; known: {list(PATTERN_NAMES)}."
                )
        return FuseOptions(patterns, implementation, report, strict)

    def enabled(self, pattern: str) -> bool:
        if self.patterns is not None:
            return pattern in self.patterns
        disabled = {p.strip() for p in os.environ.get("JFUSE_DISABLE", "").split(",")}
        return pattern not in disabled

    def should_print_report(self) -> bool:
        return self.report if self.report is not None else _env_flag("JFUSE_REPORT")

    def is_strict(self) -> bool:
        return self.strict if self.strict is not None else _env_flag("JFUSE_STRICT")
