"""Findings: what the walker and the audits report about a page-table tree."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum
from typing import Callable

__all__ = ["Severity", "Finding", "WalkReport"]


class Severity(IntEnum):
    """How much a finding matters."""

    INFO = 0
    WARNING = 1
    ERROR = 2


@dataclass(frozen=True, slots=True)
class Finding:
    """One observation: ``kind`` (a short slug), where, and a readable ``detail``."""

    kind: str
    virt: int | None
    size: int
    detail: str
    severity: Severity = Severity.WARNING
    #: Paging level (4 = PML4 .. 1 = PT) of the entry concerned, if any.
    level: int | None = None
    #: Physical address of the table holding the entry concerned, if any.
    table: int | None = None
    #: Raw value of the entry concerned, if any.
    entry: int | None = None

    def __str__(self) -> str:
        where = "" if self.virt is None else f" at {self.virt:#x}"
        return f"{self.severity.name.lower()}: {self.kind}{where}: {self.detail}"


@dataclass
class WalkReport:
    """What a walk saw besides the runs: findings and the table frames it read.

    At most ``max_findings`` findings are kept (a hostile tree can produce one
    per entry); the rest are only counted in ``suppressed``.
    """

    findings: list[Finding] = field(default_factory=list)
    #: Level number -> sorted array of the table frames read at that level.
    tables: dict = field(default_factory=dict)
    tables_visited: int = 0
    #: True if the walk stopped early at ``max_tables``.
    truncated: bool = False
    max_findings: int = 1000
    suppressed: int = 0
    on_finding: Callable[[Finding], None] | None = None

    @property
    def room(self) -> int:
        """How many more findings will be kept."""
        return max(0, self.max_findings - len(self.findings))

    def add(self, finding: Finding) -> None:
        if len(self.findings) >= self.max_findings:
            self.suppressed += 1
            return
        self.findings.append(finding)
        if self.on_finding is not None:
            self.on_finding(finding)

    def of_kind(self, *kinds: str) -> list[Finding]:
        return [f for f in self.findings if f.kind in kinds]
