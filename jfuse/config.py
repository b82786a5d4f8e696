"""Options shared by ``jfuse.jit``, ``jfuse.fuse`` and ``jfuse.explain``, and their env switches.

This module does not know which patterns exist: the caller (:func:`jfuse.fuse`) hands
:meth:`FuseOptions.create` the names the passes declare, so the options sit below the passes.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Iterable, Mapping

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
    (comma separated). A pass's name stands for every pattern it serves (``norm``: ``rms_norm``,
    ``layer_norm``, ``add_rms_norm``, ``add_layer_norm``), in ``patterns=`` and in
    ``JFUSE_DISABLE`` alike. ``report=None`` defers to ``JFUSE_REPORT=1``, ``strict=None`` to
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
        *,
        known_patterns: Mapping[str, Iterable[str]] | None = None,
    ) -> "FuseOptions":
        """Checked options. ``known_patterns`` maps every name ``patterns=`` accepts to the
        pattern names (report keys) it turns on; without it the names are not checked."""
        if implementation not in IMPLEMENTATIONS:
            raise ValueError(
                f"implementation={implementation!r} is not supported; expected one of "
                f"{IMPLEMENTATIONS}."
            )
        if patterns is not None:
            if isinstance(patterns, str):
                raise TypeError("patterns= takes a collection of pattern names, not a string.")
            patterns = frozenset(patterns)
            if known_patterns is not None:
                unknown = sorted(patterns - set(known_patterns))
                if unknown:
                    raise ValueError(
                        f"patterns= names unknown pattern(s) {unknown}; known: "
                        f"{list(known_patterns)}."
                    )
        return FuseOptions(patterns, implementation, report, strict)

    def enabled(self, pattern: str, group: str | None = None) -> bool:
        """Whether sites named ``pattern`` may fuse; ``group`` is the name of the pass that found
        them, which turns them on or off as a whole."""
        names = {pattern} if group is None else {pattern, group}
        if self.patterns is not None:
            return bool(names & self.patterns)
        disabled = {p.strip() for p in os.environ.get("JFUSE_DISABLE", "").split(",")}
        return not names & disabled

    def should_print_report(self) -> bool:
        return self.report if self.report is not None else _env_flag("JFUSE_REPORT")

    def is_strict(self) -> bool:
        return self.strict if self.strict is not None else _env_flag("JFUSE_STRICT")
