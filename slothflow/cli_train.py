"""``slothflow train``: the base and train stages alone, on an already-cleaned data folder.

Opened with :func:`tasks.core.run.open_run` and recorded with :func:`tasks.core.run.stage`, so a
stage run by hand lands in MLflow exactly like one run by the pipeline; re-running
with ``--run-id`` resumes it (finished stages reused, training from its last
complete checkpoint, the same MLflow runs).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from slothflow.common import console, friendly_errors, load_recipe, out
from slothflow.options import RecipeOpt, SetOpt
from tasks.core import home as home_mod


def train_cmd(
    data: Annotated[
        Path,
        typer.Option(
            "--data",
            "-d",
            help="Cleaned data folder: train.jsonl and validation.jsonl of chat rows (what "
            "the data stage / `slothflow data clean` writes).",
            exists=True,
            file_okay=False,
        ),
    ],
    recipe: RecipeOpt = "default",
    set_: SetOpt = None,
    run_id: Annotated[
        str | None,
        typer.Option(
            "--run-id",
            help="Resume this run (same config): training continues from its last complete "
            "checkpoint. Default: a new run.",
        ),
    ] = None,
) -> None:
    """Fine-tune the recipe's base model on DATA (stages base + train), tracked in MLflow."""
    from tasks.core.interrupt import signals_as_interrupt

    # A signal unwinds through tracked_run: the run is marked INTERRUPTED, resumable.
    with friendly_errors(), signals_as_interrupt():
        from tasks.core.config import ConfigError, dump_config
        from tasks.data.clean import DataError, check_output

        try:  # first: an empty or failed data folder must not wait for a model to load
            check_output(data)
        except DataError as exc:
            raise ConfigError(f"--data: {exc}") from None
        cfg = load_recipe(recipe, set_)
        if cfg.train.init_adapter != "none":
            # Looking the champion up, and gating against it, are the pipeline's: here
            # the setting would be ignored without a word.
            raise ConfigError(
                f"train.init_adapter={cfg.train.init_adapter}: `slothflow train` starts "
                "from the base model; warm-start with `slothflow run`, or set "
                "train.init_adapter=none"
            )
        home = home_mod.resolve_home()
        with home_mod.exclusive(home, f"slothflow train --recipe {recipe}"):
            from flows.preflight import preflight
            from tasks.base_model import prepare_base_in_run
            from tasks.core.run import tracked_run
            from tasks.train import data_ref_from_folder, train_in_run

            preflight(cfg, home, run_id, set_, serving=False, registering=False)
            data_ref = data_ref_from_folder(data)
            with tracked_run(cfg, home, resume_run_id=run_id) as (ctx, summary):
                console.print(
                    f"run [bold]{ctx.run_id}[/] — {ctx.hardware['reason']}", highlight=False
                )
                try:
                    base = prepare_base_in_run(ctx, cfg.model)
                    ref = train_in_run(
                        ctx,
                        cfg.train,
                        cfg.model,
                        base,
                        data_ref,
                        max_new_tokens=cfg.eval.max_new_tokens,
                        resolved_config=dump_config(cfg),
                        system_metrics=cfg.tracking.system_metrics,
                    )
                except BaseException:
                    console.print(
                        f"Resume with: [bold]slothflow train --data {data} -r {recipe} "
                        f"--run-id {ctx.run_id}[/]"
                    )
                    raise
                summary["train"] = ref.model_dump(mode="json")
    for line in [
        f"[bold green]trained[/]: run {ctx.run_id}",
        f"  adapter:     {ref.adapter_path}",
        f"  best step:   {ref.best_step} (eval loss {ref.metrics['best_eval_loss']:.4f})",
        f"  base:        {ref.base.name_or_path} @ {ref.base.revision}",
    ]:
        out.print(line, soft_wrap=True, highlight=False)
