"""One in-memory :class:`~tasks.core.tracking.Tracker` for every test that checks what a stage
reports (our own interface, not a library mock)."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.core.tracking import Tracker


@dataclass(frozen=True)
class LoggedInput:
    name: str
    source: str
    sha256: str
    context: str
    num_rows: int | None


class RecordingTracker:
    """Keeps every call: metrics by step, params, artifacts, dicts, texts, tags, inputs."""

    def __init__(self) -> None:
        self.system_metrics_intervals: list[float] = []
        self.metrics: list[tuple[int | None, dict[str, float]]] = []
        self.params: dict[str, Any] = {}
        self.artifacts: list[tuple[Path, str | None]] = []
        self.dicts: dict[str, Any] = {}
        self.texts: dict[str, str] = {}
        self.tags: dict[str, str] = {}
        self.logged_inputs: list[LoggedInput] = []

    def log_params(self, params: Mapping[str, Any]) -> None:
        self.params.update(params)

    def log_metrics(
        self,
        metrics: Mapping[str, float],
        step: int | None = None,
        timestamp_ms: int | None = None,
    ) -> None:
        self.metrics.append((step, dict(metrics)))

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self.artifacts.append((Path(path), artifact_path))

    def log_dict(self, obj: Any, name: str) -> None:
        self.dicts[name] = obj

    def log_text(self, text: str, name: str) -> None:
        self.texts[name] = text

    def set_tags(self, tags: Mapping[str, str]) -> None:
        self.tags.update(tags)

    def log_attempt_params(self, params: Mapping[str, Any]) -> None:
        self.params.update(params)

    def log_input(
        self, name: str, source: str, sha256: str, context: str, num_rows: int | None = None
    ) -> None:
        self.logged_inputs.append(LoggedInput(name, source, sha256, context, num_rows))

    @property
    def mlflow_run_id(self) -> str | None:
        return None

    def system_metrics(self, interval_s: float) -> contextlib.AbstractContextManager[None]:
        self.system_metrics_intervals.append(interval_s)
        return contextlib.nullcontext()

    # ------------------------------------------------------------------ reading back

    @property
    def inputs(self) -> list[str]:
        """Names of the logged inputs, in order."""
        return [i.name for i in self.logged_inputs]

    def input(self, name: str) -> LoggedInput:
        return next(i for i in self.logged_inputs if i.name == name)

    def series(self, key: str) -> list[tuple[int | None, float]]:
        """``(step, value)`` of every logged ``key``."""
        return [(s, m[key]) for s, m in self.metrics if key in m]

    def latest(self) -> dict[str, float]:
        """Every metric's last logged value, regardless of step."""
        out: dict[str, float] = {}
        for _, m in self.metrics:
            out.update(m)
        return out


def _conforms(t: RecordingTracker) -> Tracker:
    return t  # mypy checks RecordingTracker against the Tracker protocol here
