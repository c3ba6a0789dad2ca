"""Prefect at the edge of each stage module.

Stage modules define their Prefect task next to the plain function (retry policy
beside the code it governs). The GPU device image has no Prefect, and a GPU test
imports a stage module to call its plain function; so when Prefect is absent the
decorator leaves the function as it is. The pipeline flow itself always needs
Prefect, and importing ``flows`` without it fails loudly.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])

HAVE_PREFECT = importlib.util.find_spec("prefect") is not None


def stage_task(**task_kwargs: Any) -> Callable[[F], F]:
    """``prefect.task(**task_kwargs)`` when Prefect is installed, else identity."""

    def wrap(fn: F) -> F:
        if not HAVE_PREFECT:
            return fn
        from prefect import task

        return task(**task_kwargs)(fn)  # type: ignore[no-any-return,unused-ignore]

    return wrap
