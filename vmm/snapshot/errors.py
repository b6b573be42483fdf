"""The snapshot package's error, apart from the file format so that parsing
``vmm run``'s options does not load the format (issue 17: start-up)."""

from __future__ import annotations

from ..errors import UsageError


class SnapshotError(UsageError):
    """A snapshot file is unusable, or snapshot options conflict: one line naming the problem."""
