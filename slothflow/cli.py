"""The ``slothflow`` command.

Heavy libraries (Prefect, MLflow, torch) are imported inside the commands, after
``SLOTHFLOW_HOME`` has set the environment they read at import time.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from slothflow.cli_models import evaluate_cmd, models_app
from slothflow.cli_notify import data_notify, notifications_app
from slothflow.cli_serve import serve_app
from slothflow.cli_train import train_cmd
from slothflow.common import (
    console,
    friendly_errors,
    is_known_failure,
    load_recipe,
    out,
    print_error,
)
from slothflow.options import RecipeOpt, SetOpt
from tasks.core import home as home_mod
from tasks.core.config import ConfigError
from tasks.core.orchestration import check_refresh

app = typer.Typer(
    name="slothflow",
    help="Instruction data + base LLM -> cleaned data, LoRA/QLoRA fine-tune, lm-eval gate, "
    "merged export, vLLM serving. Orchestrated by Prefect, tracked in MLflow.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
)
config_app = typer.Typer(help="Inspect and validate recipes.", no_args_is_help=True)
app.add_typer(config_app, name="config")
data_app = typer.Typer(
    help="Clean instruction data (the pipeline's data stage); announce new data.",
    no_args_is_help=True,
)
app.add_typer(data_app, name="data")


@app.callback()
def main(
    home: Annotated[
        Path | None,
        typer.Option(
            "--home",
            envvar=home_mod.HOME_ENV,
            help="Folder for all local state (MLflow store, Prefect home, caches, runs). "
            "Default: ./.slothflow",
        ),
    ] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
) -> None:
    import logging

    from rich.logging import RichHandler

    home_mod.activate(home)
    # Our own modules log at INFO; third-party libraries only their warnings (some log
    # bytecode disassembly or every HTTP request at INFO). --verbose shows everything.
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(message)s",
        handlers=[RichHandler(console=console, show_path=False, rich_tracebacks=True)],
    )
    for ours in ("tasks", "flows", "slothflow"):
        logging.getLogger(ours).setLevel(logging.DEBUG if verbose else logging.INFO)
    if not verbose:
        quiet_http_logs()


def verbose_logging() -> bool:
    import logging

    return logging.getLogger().level <= logging.DEBUG


def quiet_http_logs() -> None:
    """Per-request HTTP lines from the Prefect, MLflow and OpenAI clients drown the stage
    logs. Called again after Prefect is imported: its logging set-up resets levels."""
    import logging

    for noisy in ("httpx", "httpcore", "urllib3", "openai", "alembic", "mlflow.store.db.utils"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


@app.command()
def run(
    recipe: RecipeOpt = "default",
    set_: SetOpt = None,
    resume: Annotated[
        str | None,
        typer.Option(
            "--resume",
            help="Resume a run of the same config by id (or 'last'): finished stages are "
            "reused, the failed stage runs again.",
        ),
    ] = None,
    refresh: Annotated[
        list[str] | None,
        typer.Option(
            "--refresh",
            help="Run this stage again even when its inputs are unchanged and Prefect has it "
            "cached (base, data, train, export, evaluate); repeatable.",
        ),
    ] = None,
) -> None:
    """Run the whole pipeline as a Prefect flow: base -> data -> train -> export -> evaluate -> gate -> register -> serve.

    With no options it runs the embedded default: a tiny model built on the spot, local MLflow on SQLite and Prefect without a server.
    """
    from tasks.core.interrupt import Interrupted, interrupt_of, is_interrupt, signals_as_interrupt

    # Signals first: a Ctrl-C or SIGTERM from here on unwinds through every finally below
    # (stage runs closed, run marked INTERRUPTED, servers stopped, lock released).
    with friendly_errors(), signals_as_interrupt() as received:
        home = home_mod.resolve_home()
        run_id: str | None = None
        try:
            cfg = load_recipe(recipe, set_)
            check_refresh(refresh)
            with home_mod.exclusive(home, f"slothflow run --recipe {recipe}"):
                from flows import temporary_server

                # Before preflight: its checks import Prefect, which reads the URL then.
                port = None if os.environ.get("PREFECT_API_URL") else temporary_server.reserve()
                # The temporary server boots in its own process (6-10 s) while this one
                # checks the run and imports and opens what the first stages need.
                with _prefect_api(home, port) as api_ready:
                    from flows.preflight import preflight

                    plan = preflight(cfg, home, resume, set_)
                    for note in plan.notes:
                        console.print(note, highlight=False, markup=False, soft_wrap=True)
                    run_id = plan.resume_run_id
                    from flows.pipeline import pipeline
                    from tasks.core import models, tracking

                    tracking.open_store(tracking.resolve_tracking_uri(plan.config.tracking, home))
                    models.preload()
                    api_ready()
                    if not verbose_logging():
                        quiet_http_logs()
                    summary = pipeline(
                        config=plan.config, resume_run_id=run_id, refresh=refresh or None
                    )
        except BaseException as exc:
            if not is_interrupt(exc):
                if isinstance(exc, Exception) and not is_known_failure(exc):
                    _report_failure(home, recipe, exc)
                raise
            signum = (interrupt_of(exc) or Interrupted(received[0] if received else 2)).signum
            _report_interrupt(home, recipe, run_id, signum)
            raise typer.Exit(128 + signum) from None
    _print_summary(summary)
    if summary.get("gate") and not summary["gate"]["passed"]:
        # A finished run whose model was not promoted: distinct from a crash (1) and a
        # bad config (2), so schedulers and scripts can tell them apart.
        raise typer.Exit(3)


@contextmanager
def _prefect_api(home: home_mod.Home, port: int | None) -> Iterator[Callable[[], object]]:
    """A configured Prefect server (``PREFECT_API_URL``) as it is (``port`` None); else
    Prefect's temporary server on ``port``, started now and run so that a signal cannot
    kill it before the flow has said how it ended (see flows/temporary_server.py). Yields
    what to call before the first API call: it waits until the server answers."""
    if port is None:
        yield lambda: None
        return
    from flows.temporary_server import temporary_server

    with temporary_server(home.prefect, port) as ready:
        yield ready


def _report_failure(home: home_mod.Home, recipe: str, exc: BaseException) -> None:
    last = _last_run(home)
    console.print(
        f"[bold red]pipeline failed:[/] {escape(f'{type(exc).__name__}: {exc}')}",
        soft_wrap=True,
    )
    if last:
        console.print(
            f"Earlier stages' results are kept in {home.run_dir(last)}.\n"
            f"Fix the cause, then resume: [bold]slothflow run -r {recipe} --resume {last}[/]",
            soft_wrap=True,
        )
    raise typer.Exit(1) from None


def _report_interrupt(home: home_mod.Home, recipe: str, run_id: str | None, signum: int) -> None:
    import json
    import signal

    name = signal.Signals(signum).name
    last = run_id or _last_run(home)
    result = home.run_dir(last) / "result.json" if last else None
    started = (
        result is not None
        and result.exists()
        and json.loads(result.read_text()).get("status") == "INTERRUPTED"
    )
    if last and started:
        console.print(
            f"[bold yellow]interrupted[/] by {name}: run {last} stopped; finished stages and "
            f"the last training checkpoint are kept.\nResume: [bold]slothflow run -r {recipe} "
            f"--resume {last}[/]",
            soft_wrap=True,
            highlight=False,
        )
    else:
        console.print(f"[bold yellow]interrupted[/] by {name} before the run started")


def _last_run(home: home_mod.Home) -> str | None:
    from tasks.core.run import latest_run_id

    return latest_run_id(home)


def _print_summary(summary: dict[str, Any]) -> None:
    # Plain lines, never wrapped or truncated: paths and URIs must stay copy-pasteable.
    gate = summary.get("gate")
    failed = gate is not None and not gate["passed"]
    head = (
        "[bold yellow]pipeline finished, gate FAILED[/]"
        if failed
        else "[bold green]pipeline finished[/]"
    )
    out.print(f"{head}: run {summary['run_id']}", soft_wrap=True, highlight=False)
    lines = [
        f"  outputs:     {summary['run_dir']}",
        f"  config hash: {summary['config_hash'][:12]}",
        f"  hardware:    {summary['hardware']}",
    ]
    lines += [
        f"  {stage + ':':<12} {_short(ref)}" for stage, ref in summary.get("stages", {}).items()
    ]
    if gate is not None:
        champion = "" if gate["champion"] is None else f", champion {gate['champion']:.4f}"
        lines.append(
            f"  gate:        {'PASSED' if gate['passed'] else 'FAILED'} — {gate['metric']} "
            f"candidate {gate['candidate']:.4f} vs base {gate['base']:.4f}{champion}"
        )
        lines += [f"               - {reason}" for reason in gate["reasons"]]
    if "mlflow" in summary:
        lines.append(f"  MLflow:      {summary['mlflow']}")
    lines += summary.get("serving", [])
    # Model output and paths may contain "[...]": never read them as Rich markup.
    for line in lines:
        out.print(line, soft_wrap=True, highlight=False, markup=False)


def _short(ref: Any) -> str:
    if isinstance(ref, dict):
        return ", ".join(f"{k}={v}" for k, v in ref.items() if k not in ("stage",))[:200]
    return str(ref)[:200]


@app.command()
def info(recipe: RecipeOpt = "default", set_: SetOpt = None) -> None:
    """Show where state lives, the tracking store and the hardware decision."""
    with friendly_errors():
        from tasks.core import hardware, tracking

        cfg = load_recipe(recipe, set_)
        home = home_mod.resolve_home()
        probe = hardware.probe()
        table = Table(show_header=False)
        table.add_row("SLOTHFLOW_HOME", str(home.root))
        table.add_row(
            "tracking", tracking.redact_uri(tracking.resolve_tracking_uri(cfg.tracking, home))
        )
        try:
            table.add_row("hardware", hardware.decide(cfg, probe).reason)
        except ConfigError as exc:
            table.add_row("hardware", f"[red]{exc}[/]")
        out.print(table)


@config_app.command("list")
def config_list() -> None:
    """List the shipped recipes."""
    from tasks.core.config import list_recipes

    for p in list_recipes():
        first = next((ln for ln in p.read_text().splitlines() if ln.startswith("#")), "")
        out.print(f"[bold]{p.stem}[/]  {first.lstrip('# ')}")


@config_app.command("show")
def config_show(
    recipe: RecipeOpt = "default",
    set_: SetOpt = None,
    hash_only: Annotated[bool, typer.Option("--hash", help="Print only the config hash.")] = False,
) -> None:
    """Print the fully resolved config (defaults filled in) and its hash."""
    with friendly_errors():
        from tasks.core.config import config_hash, dump_config

        cfg = load_recipe(recipe, set_)
        if hash_only:
            out.print(config_hash(cfg))
            return
        sys.stdout.write(dump_config(cfg))
        sys.stdout.write(f"# config_hash: {config_hash(cfg)}\n")


@config_app.command("validate")
def config_validate(
    paths: Annotated[
        list[Path] | None, typer.Argument(help="Recipe files (default: every shipped recipe).")
    ] = None,
) -> None:
    """Validate recipes strictly; exit 2 naming the bad field when one is invalid."""
    from tasks.core.config import list_recipes, load_config

    bad = 0
    for p in paths or list_recipes():
        try:
            load_config(str(p))
            out.print(f"[green]ok[/]  {p}")
        except ConfigError as exc:
            bad += 1
            out.print(f"[red]bad[/] {exc}", highlight=False)
    if bad:
        raise typer.Exit(2)


@config_app.command("schema")
def config_schema() -> None:
    """Print the JSON schema of the pipeline config (the Prefect UI form)."""
    from tasks.core.config import PipelineConfig

    sys.stdout.write(json.dumps(PipelineConfig.model_json_schema(), indent=2) + "\n")


@data_app.command("clean")
def data_clean(
    inputs: Annotated[
        list[str],
        typer.Argument(
            help="Input files or fsspec URLs (JSONL, JSON, CSV, Parquet, saved datasets "
            "folder); they replace data.sources of the recipe."
        ),
    ],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")],
    recipe: RecipeOpt = "default",
    set_: SetOpt = None,
    tokenizer: Annotated[
        str | None,
        typer.Option(
            "--tokenizer",
            help="Tokenizer folder (or hub id) for the token-length filter; without it the "
            "filter is skipped, and the report says so.",
        ),
    ] = None,
    previous: Annotated[
        Path | None,
        typer.Option(
            "--previous",
            help="manifest.jsonl (or output folder) of an earlier run: its rows win every "
            "duplicate tie and keep their split.",
        ),
    ] = None,
) -> None:
    """Read, normalise, validate, quarantine, deduplicate and split instruction data."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn

    from tasks.data import DataError, SourceError, clean

    with friendly_errors():
        cfg = load_recipe(recipe, [*(set_ or []), f"data.sources={json.dumps(inputs)}"]).data
        tasks: dict[str, Any] = {}
        with Progress(
            TextColumn("{task.description}"), BarColumn(), DownloadColumn(), console=console
        ) as bar:

            def progress(source: str, done: int, total: int | None) -> None:
                if source not in tasks:
                    tasks[source] = bar.add_task(f"reading {source}", total=total)
                bar.update(tasks[source], completed=done)

            try:
                ref = clean(cfg, out_dir, tokenizer, previous, progress=progress)
            except (DataError, SourceError) as exc:
                print_error(exc)
                raise typer.Exit(2) from None
    report = json.loads(Path(ref.report_path).read_text())
    rejected = sum(report["rejected"].values())
    for line in [
        f"[bold green]cleaned[/]: {report['input_records']} rows in, {report['kept_records']} "
        f"kept (train {ref.train_rows}, validation {ref.validation_rows}), {rejected} rejected",
        *(f"  {k}: {v}" for k, v in report["rejected"].items()),
        f"  report:      {out_dir / 'report.md'}",
        f"  fingerprint: {ref.fingerprint}",
    ]:
        out.print(line, soft_wrap=True, highlight=False)


# The commands defined in the cli_* modules, registered last so that `--help` lists
# them after this file's own: commands run, info, evaluate, train; groups config, data,
# models, serve.
app.command("evaluate")(evaluate_cmd)
app.command("train")(train_cmd)
data_app.command("notify")(data_notify)
app.add_typer(models_app, name="models")
app.add_typer(serve_app, name="serve")
app.add_typer(notifications_app, name="notifications")


if __name__ == "__main__":
    app()
