"""The fusion report as a person reads it: grouped, misses first, within 100 columns.

A model of 80 layers has hundreds of fused sites but a handful of distinct ones. Sites (and
misses, and sharding notes) that say the same thing about the same source line print once with a
count (``×31``); what did not fuse comes first, because that is what a user acts on; then the
fused groups; then one row per pattern with its totals and where its kernel runs. The per-site
list stays in the report's data (``report.sites``, ``to_dict()``) and in ``verbose`` text.
"""

from __future__ import annotations

import collections
import textwrap
from typing import Any, Callable, Hashable, Iterable

WIDTH = 100
_LABEL = 22  # the column where an entry's text starts (a longer label pushes its first line)
_PLATFORM_LABELS = {"tpu": "TPU", "cuda": "GPU"}


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _wrap(text: str, first: str, indent: int = _LABEL) -> list[str]:
    """``first`` + ``text``, wrapped at :data:`WIDTH` with continuation lines under the text."""
    if len(first) < indent:
        first = first.ljust(indent)
    elif not first.endswith(" "):  # a label longer than the column: one space after it
        first += " "
    return textwrap.wrap(text, WIDTH, initial_indent=first,
                         subsequent_indent=" " * indent, break_on_hyphens=False,
                         break_long_words=False) or [first]


def _grouped(items: Iterable[Any], key: Callable[[Any], Hashable]) -> list[tuple[Any, int]]:
    """(first item, count) per distinct key, in order of first appearance."""
    groups: dict[Hashable, list] = collections.OrderedDict()
    for item in items:
        groups.setdefault(key(item), []).append(item)
    return [(members[0], len(members)) for members in groups.values()]


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _label(pattern: str, count: int) -> str:
    return f"    {pattern}" + (f" ×{count}" if count > 1 else "")


def _loop_note(iterations: int) -> str:
    return f"; once per iteration of a {iterations}-step loop" if iterations > 1 else ""


def _missed_lines(report, verbose: bool) -> list[str]:
    key = (lambda m: id(m)) if verbose else (
        lambda m: (m.pattern, m.reason, m.detail, m.where, m.hint))
    groups = _grouped(report.missed, key)
    lines = [f"  missed: {_count(len(report.missed), 'block')}"
             + (f" in {_count(len(groups), 'group')}" if len(groups) < len(report.missed) else "")]
    for miss, count in groups:
        lines += _wrap(f"{miss.reason.value}: {miss.detail}", _label(miss.pattern, count))
        lines += _wrap(f"at {miss.where}", "")
        lines += _wrap(f"hint: {miss.hint}", "")
    return lines


def _fused_lines(report, verbose: bool) -> list[str]:
    key = (lambda s: id(s)) if verbose else (
        lambda s: (s.pattern, s.detail, s.where, s.iterations, tuple(sorted(s.platforms.items())),
                   tuple(sorted(s.kernels.items()))))
    groups = _grouped(report.sites, key)
    lines = [f"  fused: {_count(len(report.sites), 'site')}"
             + (f" in {_count(len(groups), 'group')}" if len(groups) < len(report.sites) else "")]
    for site, count in groups:
        lines += _wrap(site.detail + site.platform_notes(), _label(site.pattern, count))
        lines += _wrap(f"at {site.where}{_loop_note(site.iterations)}", "")
    return lines


def _kernel_summary(sites: list) -> str:
    """``kernel on TPU 2/2, GPU 1/2`` for one pattern's sites (``XLA`` where none run it)."""
    parts = []
    for platform, label in _PLATFORM_LABELS.items():
        kernel = sum(site.platforms.get(platform) == "kernel" for site in sites)
        interpret = sum(site.platforms.get(platform) == "interpret" for site in sites)
        if interpret:
            parts.append(f"{label} interpret")
        elif kernel == len(sites):
            parts.append(f"{label} kernel")
        elif kernel == 0:
            parts.append(f"{label} XLA")
        else:
            parts.append(f"{label} kernel {kernel}/{len(sites)}")
    return ", ".join(parts)


def _totals_lines(report) -> list[str]:
    patterns = sorted({s.pattern for s in report.sites} | {m.pattern for m in report.missed})
    width = max([16] + [len(name) + 1 for name in patterns])
    lines = [f"  {'pattern':<{width}}{'fused':>6}{'missed':>8}{'saved/call':>12}  runs"]
    for name in patterns:
        sites = [s for s in report.sites if s.pattern == name]
        missed = sum(m.pattern == name for m in report.missed)
        saved = sum(s.bytes_saved * s.iterations for s in sites)
        runs = _kernel_summary(sites) if sites else ""
        lines.append(f"  {name:<{width}}{len(sites):>6}{missed:>8}{human_bytes(saved):>12}  "
                     f"{runs}")
    return lines


def _sharding_lines(report, verbose: bool) -> list[str]:
    key = (lambda c: id(c)) if verbose else (lambda c: (c.pattern, c.partitioned, c.detail, c.where))
    lines = [f"  sharding{' (mesh ' + report.mesh + ')' if report.mesh else ''}:"]
    for call, count in _grouped(report.sharding, key):
        outcome = "kernel per shard" if call.partitioned else "XLA (declined)"
        lines += _wrap(f"{outcome}: {call.detail}", _label(call.pattern, count))
        lines += _wrap(f"at {call.where}", "")
    return lines


def render(report, verbose: bool = False) -> str:
    """The report's text; ``verbose`` lists every site and miss on its own instead of grouping."""
    lines = [f"jfuse fusion report: {report.function or '<fn>'}"]
    if report.signature:
        lines += _wrap(report.signature, "  signature: ", indent=13)
    if not report.sites and not report.missed:
        lines.append("  no fusible blocks found")
    if report.missed:
        lines += _missed_lines(report, verbose)
    if report.sites:
        lines += _fused_lines(report, verbose)
    if report.sites or report.missed:
        lines += _totals_lines(report)
    if report.sharding:
        lines += _sharding_lines(report, verbose)
    for fallback in report.fallbacks:
        lines += _wrap(fallback, "  fallback: ", indent=12)
    lines += textwrap.wrap(report.summary_line(), WIDTH, initial_indent="  ",
                           subsequent_indent="    ", break_on_hyphens=False)
    return "\n".join(lines)
