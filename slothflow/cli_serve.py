"""``slothflow serve``: start, inspect, stop and read the logs of managed vLLM servers.

``slothflow serve MODEL`` is short for ``slothflow serve start MODEL``: the group
below inserts ``start`` when the first word is not one of its commands.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table
from typer.core import TyperGroup

from slothflow.common import console, friendly_errors, load_recipe, out
from tasks.core import home as home_mod
from tasks.core.config import ConfigError

if TYPE_CHECKING:
    from tasks.core.config import PipelineConfig
    from tasks.serve import DeployRef


class _DefaultStart(TyperGroup):
    """A group whose unknown first word is the MODEL of ``start``."""

    # typer vendors its own click; Any keeps this independent of which one it is.
    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ctx.help_option_names:
            args = ["start", *args]
        return super().parse_args(ctx, args)


serve_app = typer.Typer(
    cls=_DefaultStart,
    help="Serve a model with vLLM (OpenAI-compatible API) and manage the server: "
    "[bold]slothflow serve MODEL[/] starts one (same as [bold]serve start MODEL[/]); "
    "status, stop and logs manage it.",
    no_args_is_help=True,
    rich_markup_mode="rich",
)

PortOpt = Annotated[
    int | None, typer.Option("--port", "-p", help="Port (default: deploy.port of the recipe).")
]


@contextmanager
def serve_errors() -> Iterator[None]:
    """The CLI's known failures (config, busy home, unreachable tracking store: exit 2),
    plus a server that failed its start or checks (exit 1, its log tail included). Every
    message is printed as text: vLLM's log lines carry ``[file.py:71]``-style tags that
    Rich would read as markup."""
    from tasks.serve import ServeError

    with friendly_errors():
        try:
            yield
        except ServeError as exc:
            console.print(
                f"[bold red]serve failed:[/] {escape(str(exc))}", highlight=False, soft_wrap=True
            )
            raise typer.Exit(1) from None


def _home() -> home_mod.Home:
    return home_mod.resolve_home()


@serve_app.command("start")
def start(
    model: Annotated[
        str,
        typer.Argument(
            help="Model folder (merged weights, or an exported artifact with manifest.json); "
            "NAME@alias or NAME/version once the registry is available.",
            show_default=False,
        ),
    ],
    recipe: Annotated[
        str, typer.Option("--recipe", "-r", help="Recipe whose deploy section applies.")
    ] = "default",
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set", "-s", help="Override a field, e.g. --set deploy.load_test.enabled=false."
        ),
    ] = None,
    port: PortOpt = None,
    host: Annotated[
        str | None, typer.Option("--host", help="Bind address (default: loopback).")
    ] = None,
    heldout: Annotated[
        Path | None,
        typer.Option(
            "--heldout",
            help="JSONL of chat rows whose last turn is the reference answer, for the smoke test.",
        ),
    ] = None,
    expected_score: Annotated[
        float | None,
        typer.Option(
            "--expected-score",
            min=0.0,
            max=1.0,
            help="Offline exact match on --heldout; the served model must come within "
            "deploy.smoke.tolerance of it.",
        ),
    ] = None,
    track: Annotated[
        bool, typer.Option("--track", help="Record the stage in MLflow as a run of its own.")
    ] = False,
) -> None:
    """Serve MODEL behind the stable endpoint on deploy.port (nginx) and print its URL.

    The new version's vLLM server starts on a free loopback port and is checked there (health, warm-up, smoke test, load test with SLOs); only then does the endpoint switch to it, and the version it replaces stops once its requests have finished. A failed check stops the new server and leaves the old one serving."""
    with serve_errors():
        from tasks.serve import rollout, summary_lines

        _check_heldout(heldout, expected_score)
        cfg = load_recipe(recipe, set_)
        home = _home()
        kwargs = _deploy_args(cfg, home, heldout, expected_score, host, port)
        if track:
            ref = _deploy_tracked(cfg, home, model, kwargs)
        else:
            ref = rollout(cfg.deploy, model, **kwargs)
    for line in summary_lines(ref):
        out.print(line, soft_wrap=True, highlight=False, markup=False)


def _check_heldout(heldout: Path | None, expected_score: float | None) -> None:
    """Before the config and the model: a wrong option fails in an instant."""
    if expected_score is not None and heldout is None:
        raise ConfigError("--expected-score needs --heldout (the rows it was measured on)")
    if heldout is not None and not heldout.is_file():
        raise ConfigError(f"--heldout {heldout}: no such file")


def _deploy_args(
    cfg: PipelineConfig,
    home: home_mod.Home,
    heldout: Path | None,
    expected_score: float | None,
    host: str | None,
    port: int | None,
) -> dict[str, Any]:
    """The keyword arguments of ``deploy`` common to a tracked and an untracked start;
    NAME@alias and NAME/version resolve through the recipe's tracking store."""
    from tasks.core.tracking import registry, resolve_tracking_uri
    from tasks.serve import registry_resolver

    uri = resolve_tracking_uri(cfg.tracking, home)
    return dict(
        home=home,
        heldout=heldout,
        expected_score=expected_score,
        host=host,
        port=port,
        resolver=registry_resolver(uri, registry.cache_dir(home, uri)),
    )


def _deploy_tracked(
    cfg: PipelineConfig, home: home_mod.Home, model: str, kwargs: dict[str, Any]
) -> DeployRef:
    """``--track``: the serve stage as an MLflow run of its own, under the home's lock
    like a pipeline run, its reference kept in the run's summary."""
    from tasks.core.run import stage, tracked_run
    from tasks.serve import rollout

    with (
        home_mod.exclusive(home, f"slothflow serve {model}"),
        tracked_run(cfg, home) as (ctx, summary),
        stage(ctx, "serve") as tracker,
    ):
        ref = rollout(cfg.deploy, model, tracker=tracker, run_id=ctx.run_id, **kwargs)
        summary["serve"] = ref.model_dump(mode="json")
    return ref


@serve_app.command("status")
def status(
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """What is running: each endpoint and the versions behind it (model, version, port, pid, since when). Stops orphaned servers."""
    from tasks.serve import endpoints, servers

    with serve_errors():
        running = servers(_home())
        fronts = {e.port: e for e in endpoints(_home())}
    if as_json:
        rows = [
            {
                **s.model_dump(mode="json"),
                "endpoint": fronts[s.endpoint_port].base_url
                if s.endpoint_port in fronts
                else s.base_url,
                "backend": s.base_url,
                "weight": next(
                    (b.weight for b in fronts[s.endpoint_port].backends if b.port == s.port),
                    0,
                )
                if s.endpoint_port in fronts
                else None,
            }
            for s in running
        ]
        out.print_json(json.dumps(rows))
        return
    if not running:
        out.print("no slothflow-managed vLLM server is running")
        return
    for e in fronts.values():
        routes = ", ".join(f"{b.version} {b.weight}% (:{b.port})" for b in e.serving)
        out.print(
            f"endpoint {e.base_url} (nginx pid {e.pid}) -> {routes}",
            highlight=False,
            markup=False,
            soft_wrap=True,
        )
    header = ("port", "pid", "phase", "model", "version", "since", "endpoint")
    table_rows = [
        (
            str(s.port),
            str(s.pid),
            s.phase,
            s.model_spec,
            s.version,
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s.started_at)),
            fronts[s.endpoint_port].base_url if s.endpoint_port in fronts else s.base_url,
        )
        for s in running
    ]
    isatty = getattr(out.file, "isatty", None)
    if not (isatty and isatty()):
        # Piped or redirected, Rich would lay the table out for 80 columns and cut the
        # long cells (a model's path); a script or `grep` wants every value whole. Not
        # Console.is_terminal: FORCE_COLOR (set by many CI systems) makes that true.
        for cells in (header, *table_rows):
            typer.echo("\t".join(cells))  # not Rich: it would expand the tabs
        return
    table = Table(*header)
    for cells in table_rows:
        table.add_row(*cells)
    out.print(table)


@serve_app.command("stop")
def stop(
    port: Annotated[
        int | None,
        typer.Option(
            "--port", "-p", help="Only the endpoint on this port (and what is behind it)."
        ),
    ] = None,
) -> None:
    """Stop the endpoints and every version behind them (all, or the endpoint on --port): nginx first, then each vLLM server (SIGTERM, then SIGKILL)."""
    from tasks.serve import stop_serving

    with serve_errors():
        stopped_endpoints, stopped = stop_serving(_home(), port)
    if not stopped and not stopped_endpoints:
        out.print("nothing to stop" + (f" on port {port}" if port else ""))
    for e in stopped_endpoints:
        out.print(f"stopped the endpoint on port {e.port} (nginx pid {e.pid})", highlight=False)
    for s in stopped:
        out.print(f"stopped {s.model_spec} on port {s.port} (pid {s.pid})", highlight=False)


@serve_app.command("logs")
def logs(
    port: Annotated[int | None, typer.Option("--port", "-p", help="Server port.")] = None,
    lines: Annotated[int, typer.Option("--lines", "-n", min=1, help="Lines from the end.")] = 50,
) -> None:
    """Print the end of a server's log (also after it stopped or failed to start); the endpoint's port shows the version it serves."""
    from tasks.serve import LOG_FILE, log_tail, read_endpoint, serve_root, server_dir, servers

    with serve_errors():
        home = _home()
        front = read_endpoint(home, port) if port is not None else None
        if front is not None and front.serving:
            port = front.serving[-1].port
        if port is None:
            running = servers(home)
            if len(running) > 1:
                raise ConfigError(
                    "several servers run: pick one with --port "
                    + ", ".join(str(s.port) for s in running)
                )
            if running:
                port = running[0].port
            else:
                found = sorted(
                    serve_root(home).glob(f"*/{LOG_FILE}"), key=lambda p: p.stat().st_mtime
                )
                if not found:
                    raise ConfigError(f"no server logs under {serve_root(home)}")
                port = int(found[-1].parent.name)
        path = server_dir(home, port) / LOG_FILE
        if not path.exists():
            raise ConfigError(f"no log for port {port} ({path})")
    out.print(f"# {path}", highlight=False)
    out.out(log_tail(path, lines), highlight=False)
