"""The evaluate stage's error."""

from __future__ import annotations


class EvalError(RuntimeError):
    """Evaluation could not produce trustworthy numbers (e.g. adapter and merged disagree)."""
