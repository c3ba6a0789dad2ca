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


def stage_task(
    *, cache_key: Callable[[dict[str, Any]], Any] | None = None, **task_kwargs: Any
) -> Callable[[F], F]:
    """``prefect.task(**task_kwargs)`` when Prefect is installed, else identity.

    ``cache_key``: the stage's reuse key from the task's arguments (by name). With it the
    task is cached by Prefect (:mod:`tasks.core.caching`): results persisted as JSON, a
    known key shows as Cached and skips the stage."""

    def wrap(fn: F) -> F:
        if not HAVE_PREFECT:
            return fn
        from prefect import task

        kwargs = dict(task_kwargs)
        if cache_key is not None:
            from tasks.core.caching import stage_cache

            kwargs |= {
                "cache_policy": stage_cache(kwargs["name"], cache_key, fn.__module__),
                "persist_result": True,
                "result_serializer": "json",
            }
        return task(**kwargs)(fn)  # type: ignore[no-any-return,unused-ignore]

    return wrap


#: The stages Prefect caches by their inputs hash, so the ones a refresh may name.
CACHED_STAGES = ("base", "data", "train", "export", "evaluate")


def check_refresh(names: list[str] | None) -> frozenset[str]:
    """The stages to run again even when cached; a name that is not one is a config error
    (checked before anything starts)."""
    from tasks.core.config import ConfigError

    wanted = frozenset(names or ())
    if unknown := sorted(wanted - set(CACHED_STAGES)):
        raise ConfigError(
            f"refresh: {', '.join(unknown)} is not a cached stage "
            f"(one of {', '.join(CACHED_STAGES)})"
        )
    return wanted


def is_transient(exc: BaseException | None) -> bool:
    """Failures worth a retry: I/O and connection trouble (a flaky disk or object store,
    the network, the tracking server away for a moment). A bad config, bad data, a
    missing file or a code error fails the same way every time, and a retry would only
    burn the time again."""
    from tasks.core.config import ConfigError
    from tasks.core.tracking import TrackingUnavailableError

    if isinstance(exc, ConfigError):
        return False
    if isinstance(
        exc, FileNotFoundError | PermissionError | IsADirectoryError | NotADirectoryError
    ):
        return False
    return isinstance(exc, OSError | TrackingUnavailableError)


def retry_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect ``retry_condition_fn`` of every stage: retry only :func:`is_transient`
    failures."""
    try:
        exc = state.result(raise_on_failure=False)
    except Exception as err:  # the state could not even give its exception back
        exc = err
    return is_transient(exc if isinstance(exc, BaseException) else None)
