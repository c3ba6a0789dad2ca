"""Options shared by several commands (one definition, the same help everywhere)."""

from __future__ import annotations

from typing import Annotated

import typer

RecipeOpt = Annotated[
    str,
    typer.Option(
        "--recipe", "-r", help="Recipe name (see `slothflow config list`) or path to a YAML file."
    ),
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--set", "-s", help="Override one field, e.g. --set train.max_steps=20 (repeatable)."
    ),
]
