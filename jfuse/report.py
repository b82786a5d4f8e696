"""What jfuse did to one compiled function: the fused sites, the near-misses and why.

A :class:`FusionReport` is produced for every traced signature. ``str(report)`` is the table a
person reads; ``report.to_dict()`` is the same content for JSON; ``report.summary_line()`` is one
line for logs. Misses carry a :class:`MissReason` (a stable enum), the user's source line and a
hint that says what to change.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any

from jfuse.report_text import human_bytes, render


class MissReason(str, enum.Enum):
    """Why a block that looked like a pattern was left unfused."""

    INTERMEDIATE_ESCAPES = "intermediate read elsewhere"
    UNSUPPORTED_ACTIVATION = "unsupported activation"
    BIAS_SHAPE = "bias shape"
    NORMALIZED_AXIS = "normalized axis"
    TRACED_CONSTANT = "a constant of the block is traced"  # e.g. a norm's eps passed as an array
    OPAQUE_CUSTOM_VJP = "inside an opaque custom_vjp"
    PATTERN_DISABLED = "pattern disabled"
    NO_KERNEL = "no kernel for this backend"  # under implementation="pallas"
    DIFFERENT_INPUTS = "operands read different inputs"
    INTERNAL_ERROR = "internal error"  # the fused op failed while tracing; the block runs unfused

    # --- attention (jfuse/passes/attention.py) ---
    PROBABILITIES_ESCAPE = "attention probabilities read elsewhere"
    DROPOUT = "dropout on the attention probabilities"
    PROBABILITIES_TRANSFORMED = "probabilities changed between softmax and PV"
    SOFTMAX_AXIS = "softmax over another axis"
    SCORE_FUNCTION = "scores the attention op cannot express"
    ATTENTION_LAYOUT = "attention layout the op cannot take"
    NORMALIZED_AFTER_PV = "softmax normalized after the PV product"

    # --- linear_cross_entropy (jfuse/passes/cross_entropy.py) ---
    LOGITS_ESCAPE = "logits read elsewhere"
    SOFT_LABELS = "soft labels that are not one-hot"
    VOCAB_AXIS = "vocabulary axis not last"
    LOSS_FORM = "loss the fused op cannot express"


@dataclasses.dataclass(frozen=True)
class MissedFusion:
    """A block that looked like ``pattern`` but was not fused."""

    pattern: str
    reason: MissReason
    where: str
    hint: str
    detail: str = ""

    def to_dict(self) -> dict[str, str]:
        return {
            "pattern": self.pattern,
            "reason": self.reason.name,
            "reason_text": self.reason.value,
            "where": self.where,
            "hint": self.hint,
            "detail": self.detail,
        }


# The platforms whose kernel decision every fused site records: the lowering platform names
# ``jax.jit(...).lower(lowering_platforms=...)`` takes.
KERNEL_PLATFORMS = ("tpu", "cuda")
_PLATFORM_LABELS = {"tpu": "TPU", "cuda": "GPU"}


@dataclasses.dataclass(frozen=True)
class FusedSite:
    """A block replaced by a fused op.

    ``platforms`` says what the op runs on each lowering platform: ``"kernel"`` (its Pallas
    kernel, or cuDNN's for attention on GPU), ``"xla"`` with the reason in ``platform_reasons``,
    or ``"interpret"``. CPU always runs XLA. It is decided when the site is fused, from the same
    rules the kernels apply at dispatch.
    ``kernels`` names the kernel where an op picks one of several on a platform (attention on
    "cuda": ``"cuDNN flash attention"`` or ``"Pallas Triton flash kernel"``).
    """

    pattern: str
    where: str
    detail: str
    bytes_saved: int = 0
    platforms: dict[str, str] = dataclasses.field(default_factory=dict)
    platform_reasons: dict[str, str] = dataclasses.field(default_factory=dict)
    # How many times one call of the function runs this site: the trip count of the loops
    # (lax.scan) around it; ``bytes_saved`` is per run.
    iterations: int = 1
    kernels: dict[str, str] = dataclasses.field(default_factory=dict)

    def runs_kernel_on(self, platform: str) -> bool:
        return self.platforms.get(platform) == "kernel"

    def _decline_notes(self) -> list[str]:
        labels = _PLATFORM_LABELS
        # Platforms declining for the same reason share one note ("TPU, GPU: XLA (...)").
        by_reason: dict[str, list[str]] = {}
        for p, runs in self.platforms.items():
            if runs == "xla" and p in labels:
                by_reason.setdefault(self.platform_reasons.get(p, "declined"), []).append(
                    labels[p])
        return [f"{', '.join(names)}: XLA ({reason})" for reason, names in by_reason.items()]

    def declines(self) -> str:
        """`` [GPU: XLA (reason)]``: the platforms that run XLA instead of the kernel, or ""."""
        notes = self._decline_notes()
        return "" if not notes else " [" + "; ".join(notes) + "]"

    def platform_notes(self) -> str:
        """What the text prints after the site: :meth:`declines`' notes, then which kernel runs
        where the op picks one of several (`` [GPU: cuDNN flash attention]``); "" for neither."""
        named = [f"{_PLATFORM_LABELS[p]}: {name}" for p, name in self.kernels.items()
                 if p in _PLATFORM_LABELS and self.runs_kernel_on(p)]
        notes = self._decline_notes() + named
        return "" if not notes else " [" + "; ".join(notes) + "]"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class FusionReport:
    """Everything jfuse did (and did not do) for one function at one signature.

    Attributes:
      function: qualified name and ``file:line`` of the user's function.
      signature: the abstract argument types it was traced with.
      sites: every fused site, in program order.
      missed: every near-miss, in program order.
      fallbacks: internal failures that made jfuse run part or all of the function unfused.
      sharding: on a multi-device mesh, what each fused call does per shard (or why it runs
        XLA's partitioned ops instead), as :class:`~jfuse.sharding.partition.ShardedCall`.
      mesh: the mesh those calls are laid out on, ``"data=4, model=2"``.
    """

    function: str = ""
    signature: str = ""
    sites: list[FusedSite] = dataclasses.field(default_factory=list)
    missed: list[MissedFusion] = dataclasses.field(default_factory=list)
    fallbacks: list[str] = dataclasses.field(default_factory=list)
    sharding: list[Any] = dataclasses.field(default_factory=list)
    mesh: str = ""

    @property
    def fused(self) -> dict[str, int]:
        """Number of sites replaced, keyed by pattern name."""
        counts: dict[str, int] = {}
        for site in self.sites:
            counts[site.pattern] = counts.get(site.pattern, 0) + 1
        return counts

    @property
    def bytes_saved(self) -> int:
        """Estimated intermediate bytes no longer written and read back, per call (a site in a
        loop body counts once per iteration)."""
        return sum(site.bytes_saved * site.iterations for site in self.sites)

    def merge(self, other: "FusionReport") -> None:
        """Fold in the report of a nested jaxpr (a scan body, a remat region)."""
        self.sites.extend(other.sites)
        self.missed.extend(other.missed)
        self.fallbacks.extend(other.fallbacks)

    def summary_line(self) -> str:
        fused = ", ".join(f"{k}={v}" for k, v in sorted(self.fused.items())) or "nothing"
        text = f"jfuse {self.function or '<fn>'}: fused {fused}; {len(self.missed)} missed"
        if self.fallbacks:
            text += f"; {len(self.fallbacks)} fallback(s)"
        return text + f"; ~{human_bytes(self.bytes_saved)} of intermediates saved per call"

    def to_dict(self) -> dict[str, Any]:
        return {
            "function": self.function,
            "signature": self.signature,
            "fused": self.fused,
            "bytes_saved": self.bytes_saved,
            "sites": [s.to_dict() for s in self.sites],
            "missed": [m.to_dict() for m in self.missed],
            "fallbacks": list(self.fallbacks),
            "mesh": self.mesh,
            "sharding": [call.to_dict() for call in self.sharding],
        }

    def text(self, verbose: bool = False) -> str:
        """The report for a person: misses first, identical sites grouped with a count, then
        per-pattern totals (see :mod:`jfuse.report_text`). ``verbose`` lists every site."""
        return render(self, verbose)

    def __str__(self) -> str:
        return self.text()
