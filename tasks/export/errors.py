"""The export stage's errors: a wrong export (parity or stop check, or a merge that cannot run here)."""

from __future__ import annotations

from tasks.core.artifacts import ArtifactError


class ExportError(ArtifactError):
    """The export is wrong (parity or stop check failed, or the merge cannot run here)."""


class StopCheckError(ExportError):
    """Greedy generation did not end on EOS on every probe prompt."""

    def __init__(self, fraction: float, message: str) -> None:
        super().__init__(message)
        self.fraction = fraction
