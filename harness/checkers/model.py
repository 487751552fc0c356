"""What a checker returns: findings and one result per clause."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

# "error": the checker itself raised; the clause has no verdict (never a pass), the traceback is in metrics.
Outcome = Literal["passed", "failed", "not_exercised", "error"]


SPEC_DEFAULT = "SPEC default"
_LABELS = {"check_period": "check period", "tolerance": "tolerance", "grace": "grace"}


@dataclass(frozen=True)
class Windows:
    """The windows of SPEC.md: W = check period + tolerance, G = start-up grace.

    ``sources`` says where each value came from (field name -> e.g. ``"command line --check-period"``,
    ``"SPEC default"``), so that a report can say why a run was judged with these windows. It is a
    label only: two Windows with the same values are equal whatever their sources.
    """

    check_period: float = 5.0
    tolerance: float = 1.0
    grace: float = 30.0
    sources: dict[str, str] = field(default_factory=dict, compare=False)

    @property
    def W(self) -> float:
        return self.check_period + self.tolerance

    @property
    def G(self) -> float:
        return self.grace

    def describe(self) -> str:
        """One line: ``W = 6 s, G = 30 s (check period 5 s, tolerance 1 s, grace 30 s: SPEC default)``."""
        text = f"W = {self.W:g} s, G = {self.G:g} s"
        by_source: dict[str, list[str]] = {}
        for name, label in _LABELS.items():
            if self.sources.get(name):
                by_source.setdefault(self.sources[name], []).append(f"{label} {getattr(self, name):g} s")
        if by_source:
            text += " (" + "; ".join(f"{', '.join(values)}: {source}" for source, values in by_source.items()) + ")"
        return text


@dataclass
class Finding:
    """One violation: the clause, where, when, the events that prove it, and one line for a person."""

    clause: str
    explanation: str
    stage: str | None = None
    queues: list[str] = field(default_factory=list)
    start: float | None = None
    end: float | None = None
    evidence: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "clause": self.clause, "explanation": self.explanation, "stage": self.stage,
            "queues": self.queues, "start": self.start, "end": self.end, "evidence": self.evidence,
        }


@dataclass
class ClauseResult:
    """A clause's outcome for one scenario; ``exercised`` says how often it was put to the test."""

    clause: str
    outcome: Outcome
    exercised: str = ""
    findings: list[Finding] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def failed(self) -> bool:
        return self.outcome == "failed"

    @property
    def errored(self) -> bool:
        return self.outcome == "error"
