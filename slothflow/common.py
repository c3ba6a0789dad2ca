"""What every ``slothflow`` command module shares: the two consoles, the known-failure
handling (one line and exit 2 instead of a traceback) and recipe loading.

It imports no other command module, so ``cli.py`` and the ``cli_*`` modules can all
import it and ``cli.py`` can import the ``cli_*`` modules at its top without a cycle.
Only light modules are imported here: heavy ones wait until ``SLOTHFLOW_HOME`` has set
the environment they read at import time.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape

from tasks.core.config import ConfigError
from tasks.core.home import HomeBusyError

# Messages, progress and logs go to stderr; results (tables, paths, JSON) to stdout.
console = Console(stderr=True)
out = Console()


def print_error(exc: BaseException) -> None:
    """One ``error:`` line on stderr; the message is text, never Rich markup."""
    console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)


def is_known_failure(exc: BaseException) -> bool:
    """A bad config, a busy home or an unreachable tracking store: the user's to fix."""
    if isinstance(exc, ConfigError | HomeBusyError):
        return True
    # Only on a failure: commands that never touch tracking (config, data) do not load it.
    from tasks.core.tracking import TrackingUnavailableError

    return isinstance(exc, TrackingUnavailableError)


@contextmanager
def friendly_errors() -> Iterator[None]:
    """Known failure kinds become one clear line and exit code 2, not a traceback."""
    try:
        yield
    except Exception as exc:
        if not is_known_failure(exc):
            raise
        print_error(exc)
        raise typer.Exit(2) from None


def load_recipe(recipe: str, overrides: list[str] | None) -> Any:
    """The resolved config of a recipe name or YAML path, with ``--set`` overrides."""
    from tasks.core.config import load_config

    return load_config(recipe, overrides or [])
