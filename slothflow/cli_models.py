"""``slothflow evaluate`` and ``slothflow models ...`` (the registry).

Kept apart from ``cli.py`` so that file only wires them in; heavy imports stay inside
the commands (after ``SLOTHFLOW_HOME`` has set the environment).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from slothflow.common import friendly_errors, load_recipe, out
from tasks.core.config import ConfigError

if TYPE_CHECKING:
    from tasks.core.config import PipelineConfig
    from tasks.core.home import Home
    from tasks.core.tracking.retention import RetentionPlan
    from tasks.export import ExportRef

models_app = typer.Typer(
    help="The MLflow model registry: versions, aliases (challenger / champion / previous), "
    "metrics and lineage.",
    no_args_is_help=True,
)


def _read_ref(path: Path, model: Any) -> Any:
    if not path.exists():
        raise ConfigError(f"no stage reference at {path} (did that stage finish?)")
    return model.model_validate(json.loads(path.read_text(encoding="utf-8"))["ref"])


# The options as types: the command's signature stays readable, and typer reads the
# help from them all the same.
RunOption = Annotated[
    str | None,
    typer.Option(
        "--run",
        help="A pipeline run id (or 'last'): its export, held-out split and config are used.",
    ),
]
ExportDirOption = Annotated[
    Path | None,
    typer.Option(
        "--export-dir",
        help="An export stage folder (with ref.json, adapter/ and merged/); overrides the run's.",
    ),
]
ValidationOption = Annotated[
    Path | None,
    typer.Option(
        "--validation",
        help="Held-out chat rows (JSONL of {id, messages}); default: the run's validation split.",
    ),
]
ChampionOption = Annotated[
    str | None,
    typer.Option(
        "--champion",
        help="Also score a registered model on the same rows, e.g. slothflow-embedded@champion.",
    ),
]
OutOption = Annotated[
    Path | None,
    typer.Option("--out", "-o", help="Output folder (default: <run>/evaluate-cli-<time>)."),
]
RecipeOption = Annotated[
    str | None,
    typer.Option(
        "--recipe", "-r", help="Recipe for the eval.* settings (default: the run's own config)."
    ),
]
SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override a field, e.g. --set eval.limit=50."),
]


def evaluate_cmd(
    run: RunOption = None,
    export_dir: ExportDirOption = None,
    validation: ValidationOption = None,
    champion: ChampionOption = None,
    out_dir: OutOption = None,
    recipe: RecipeOption = None,
    set_: SetOption = None,
) -> None:
    """Run evaluation alone: lm-eval on base, adapter and merged model of an export.

    Point it at a finished run (--run ID or --run last) or at an export folder
    (--export-dir DIR plus --validation FILE). It writes results.json, the side-by-side
    table (side_by_side.md/.html), per-item generations and the generated lm-eval task
    folder (rerunnable with `lm_eval --include_path`) to --out, prints the scores and the
    gate's decision, and records nothing in MLflow or the registry.
    """
    with friendly_errors():
        from tasks.core import hardware
        from tasks.core import home as home_mod
        from tasks.evaluate import evaluate, scores_table
        from tasks.gate import decide

        # The option checks come first (run, export, recipe, rows): a wrong option fails
        # before a registry download or a model load.
        home = home_mod.resolve_home()
        run_dir = _run_dir(home, run)
        export = _export_of(export_dir, run_dir)
        cfg = load_recipe(_recipe_for(recipe, run_dir), set_)
        validation_path, fingerprint = _held_out(validation, run_dir)
        results_dir = _results_dir(out_dir, run_dir, export)
        champ_path, champ_label = _champion(champion, cfg, home) if champion else (None, None)
        hw = hardware.decide(cfg, hardware.probe())
        ref = evaluate(
            cfg.eval,
            validation_path,
            fingerprint,
            export,
            results_dir,
            hw,
            champion_path=champ_path,
            champion_label=champ_label,
        )
        decision = decide(cfg.eval, ref)
    out.print(scores_table(ref.scores), soft_wrap=True, highlight=False)
    out.print(decision.summary(), soft_wrap=True, highlight=False)
    out.print(f"results: {ref.results_path}\ntable:   {ref.table_path}", soft_wrap=True)


def _run_dir(home: Home, run: str | None) -> Path | None:
    """The folder of --run ID (or 'last'); None without --run."""
    if run is None:
        return None
    from tasks.core.run import latest_run_id

    run_id = latest_run_id(home) if run == "last" else run
    if run_id is None:
        raise ConfigError(f"--run last: no runs in {home.runs}")
    run_dir = home.run_dir(run_id)
    if not run_dir.exists():
        raise ConfigError(f"no run {run_id!r} in {home.runs}")
    return run_dir


def _export_of(export_dir: Path | None, run_dir: Path | None) -> ExportRef:
    """The export to score: --export-dir, else the run's export stage."""
    from tasks.export import ExportRef

    if export_dir is None:
        if run_dir is None:
            raise ConfigError("give --run ID (or 'last') or --export-dir DIR")
        export_dir = run_dir / "export"
    return _read_ref(export_dir / "ref.json", ExportRef)


def _recipe_for(recipe: str | None, run_dir: Path | None) -> str:
    """--recipe, else the config the run was made with, else the embedded default."""
    if recipe is None and run_dir is not None and (run_dir / "config.yaml").exists():
        return str(run_dir / "config.yaml")
    return recipe or "default"


def _held_out(validation: Path | None, run_dir: Path | None) -> tuple[str, str]:
    """The rows to score and their fingerprint: --validation as given, else the run's split."""
    from tasks.core.refs import DataRef

    if validation is not None:
        return str(validation), f"file:{validation}"
    if run_dir is not None:
        data = _read_ref(run_dir / "data" / "ref.json", DataRef)
        return data.validation_path, data.fingerprint
    raise ConfigError("--export-dir needs --validation FILE (the held-out rows)")


def _results_dir(out_dir: Path | None, run_dir: Path | None, export: ExportRef) -> Path:
    """--out, else a new timestamped folder in the run (or beside the export); created."""
    path = (
        out_dir or (run_dir or Path(export.path)) / f"evaluate-cli-{time.strftime('%Y%m%d-%H%M%S')}"
    )
    path.mkdir(parents=True, exist_ok=True)
    return path


def _champion(spec: str, cfg: PipelineConfig, home: Home) -> tuple[str, str]:
    """A registered model (NAME@alias, NAME/version) fetched into the registry cache, to be
    scored on the same rows: its local path and the label the table shows."""
    from tasks.core import tracking
    from tasks.core.tracking import registry

    uri = tracking.resolve_tracking_uri(cfg.tracking, home)
    resolved = registry.resolve(spec, uri, registry.cache_dir(home, uri))
    return str(resolved.path), f"{resolved.name} v{resolved.number}"


@models_app.command("list")
def models_list(
    name: Annotated[
        str | None,
        typer.Option(
            "--name", help="Registered model (default: the recipe's tracking.registered_model)."
        ),
    ] = None,
    recipe: Annotated[
        str, typer.Option("--recipe", "-r", help="Recipe (for the tracking store).")
    ] = "default",
    set_: Annotated[list[str] | None, typer.Option("--set", "-s", help="Override a field.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Show every version: aliases, metrics and lineage (run, data, config, base revision).

    Aliases: challenger = passed the gate, awaits rollout; champion = serves now;
    previous = the champion before (rollback target).
    """
    with friendly_errors():
        from tasks.core import home as home_mod
        from tasks.core import tracking
        from tasks.core.tracking import registry

        cfg = load_recipe(recipe, set_)
        home = home_mod.resolve_home()
        uri = tracking.resolve_tracking_uri(cfg.tracking, home)
        model = name or cfg.tracking.registered_model
        if registry.store_missing(uri):
            # Asking MLflow would create and migrate the store (~20 s) to answer "none".
            if as_json:
                print("[]")
            else:
                out.print(
                    f"no registered models: {tracking.redact_uri(uri)} does not exist yet",
                    soft_wrap=True,
                    highlight=False,
                    markup=False,
                )
            return
        tracking.check_reachable(uri, cfg.tracking.connect_timeout_s)
        versions = registry.list_versions(model, uri)
    if as_json:
        import sys

        sys.stdout.write(json.dumps(versions, indent=2) + "\n")
        return
    if not versions:
        out.print(f"no versions of {model!r} in {tracking.redact_uri(uri)}")
        return
    # Plain lines, never wrapped or truncated: run ids and hashes stay copy-pasteable.
    lines = [f"{model} ({tracking.redact_uri(uri)}): {len(versions)} version(s)"]
    for v in versions:
        t = v["tags"]
        m = t.get("primary_metric", "exact_match")
        created = time.strftime("%Y-%m-%d %H:%M", time.gmtime(v["created"] / 1000))
        lines.append(
            f"  v{v['version']:<4} [{', '.join(v['aliases']) or '-'}]  {created}  "
            f"{m} {t.get(f'eval.{m}', '?')} (base {t.get(f'eval.base.{m}', '?')}, "
            f"{t.get('eval.n_items', '?')} items)  "
            f"gate >= {t.get(registry.TAG_GATE_THRESHOLD, '?')} "
            f"margin {t.get(registry.TAG_GATE_MARGIN, '?')}  run {t.get('slothflow.run_id', '?')}  "
            f"data {t.get('data_fingerprint', '?')[:12]}  config {t.get('config_hash', '?')[:12]}  "
            f"base {t.get('base_model', '?')}@{t.get('base_revision', '?')[:19]}"
            + (f"  PRUNED {t[registry.TAG_PRUNED]}" if registry.TAG_PRUNED in t else "")
        )
    lines.append("aliases: " + "; ".join(f"{a} = {d}" for a, d in registry.ALIASES.items()))
    for line in lines:
        out.print(line, soft_wrap=True, highlight=False, markup=False)


RecipeOpt = Annotated[
    str, typer.Option("--recipe", "-r", help="Recipe (tracking store, deploy section).")
]
SetOpt = Annotated[list[str] | None, typer.Option("--set", "-s", help="Override a field.")]


@models_app.command("promote")
def models_promote(
    spec: Annotated[
        str, typer.Argument(help="NAME/VERSION: a registered version that passed its gate.")
    ],
    recipe: RecipeOpt = "default",
    set_: SetOpt = None,
) -> None:
    """Roll NAME/VERSION out behind the stable endpoint (deploy.port) and make it the champion.

    The version starts beside the serving one and passes the serving checks on its own port before the endpoint switches; the old champion becomes previous. A failed rollout leaves the old version serving and the aliases untouched."""
    with friendly_errors():
        from tasks.core.tracking import registry

        name, alias, version = registry.parse_spec(spec)
        if alias is not None or version is None:
            raise ConfigError(f"{spec!r}: promote takes NAME/VERSION (e.g. {name}/3)")
        _release(name, version, recipe, set_, "promoted")


@models_app.command("rollback")
def models_rollback(
    name: Annotated[
        str | None,
        typer.Option(
            "--name", help="Registered model (default: the recipe's tracking.registered_model)."
        ),
    ] = None,
    recipe: RecipeOpt = "default",
    set_: SetOpt = None,
) -> None:
    """Bring the previous champion back into service, the same way as a promotion, and swap the aliases (champion <-> previous)."""
    with friendly_errors():
        from tasks.core import home as home_mod
        from tasks.core import tracking
        from tasks.core.tracking import registry

        cfg = load_recipe(recipe, set_)
        model = name or cfg.tracking.registered_model
        uri = tracking.resolve_tracking_uri(cfg.tracking, home_mod.resolve_home())
        tracking.check_reachable(uri, cfg.tracking.connect_timeout_s)
        aliases = registry.model_aliases(registry.client(uri), model)
        if aliases is None:
            raise ConfigError(f"no registered model {model!r} in {tracking.redact_uri(uri)}")
        if registry.PREVIOUS not in aliases:
            raise ConfigError(
                f"{model} has no 'previous' version to roll back to (aliases: "
                + (", ".join(f"{a}={v}" for a, v in sorted(aliases.items())) or "none")
                + ")"
            )
        _release(model, aliases[registry.PREVIOUS], recipe, set_, "rolled back to")


def _release(name: str, version: int, recipe: str, set_: list[str] | None, verb: str) -> None:
    """Release ``name/version`` (tasks.serve.release): behind the endpoint, then champion."""
    from tasks.core import home as home_mod
    from tasks.core import tracking
    from tasks.core.tracking import registry
    from tasks.serve import release, summary_lines

    cfg = load_recipe(recipe, set_)
    home = home_mod.resolve_home()
    uri = tracking.resolve_tracking_uri(cfg.tracking, home)
    tracking.check_reachable(uri, cfg.tracking.connect_timeout_s)
    with home_mod.exclusive(home, f"slothflow models {verb} {name}/{version}"):
        ref = release(cfg.deploy, f"{name}/{version}", uri, home=home)
    aliases = ref.aliases or {}
    out.print(
        f"{verb} {name}/{version}: champion; previous: {aliases.get(registry.PREVIOUS, 'none')}",
        soft_wrap=True,
        highlight=False,
        markup=False,
    )
    for line in summary_lines(ref):
        out.print(line, soft_wrap=True, highlight=False, markup=False)


@models_app.command("prune")
def models_prune(
    name: Annotated[
        str | None,
        typer.Argument(help="Registered model (default: the recipe's tracking.registered_model)."),
    ] = None,
    keep: Annotated[
        int | None,
        typer.Option(
            "--keep",
            min=1,
            help="Keep the newest K versions besides those holding an alias "
            "(default: tracking.keep_versions).",
        ),
    ] = None,
    yes: Annotated[
        bool,
        typer.Option("--yes", help="Delete; without it the plan is shown and nothing changes."),
    ] = False,
    recipe: Annotated[
        str, typer.Option("--recipe", "-r", help="Recipe (for the tracking store).")
    ] = "default",
    set_: SetOpt = None,
) -> None:
    """Retention by hand: what a pipeline run does after each registration.

    Every version that holds an alias (champion, previous, challenger, ...) keeps its artifacts, and so do the newest K; the others' artifacts, registry downloads and run exports are deleted, and each is tagged slothflow.pruned (its record, lineage and metrics stay; it can no longer be served, promoted or rolled back to). Without --yes only the plan is shown."""
    with friendly_errors():
        from tasks.core import home as home_mod
        from tasks.core import tracking
        from tasks.core.tracking import registry, retention

        cfg = load_recipe(recipe, set_)
        home = home_mod.resolve_home()
        uri = tracking.resolve_tracking_uri(cfg.tracking, home)
        model = name or cfg.tracking.registered_model
        k = keep or cfg.tracking.keep_versions
        if registry.store_missing(uri):
            out.print(
                f"nothing to prune: {tracking.redact_uri(uri)} does not exist yet",
                soft_wrap=True,
                highlight=False,
                markup=False,
            )
            return
        tracking.check_reachable(uri, cfg.tracking.connect_timeout_s)
        plan = retention.plan(model, uri, home, k)
        if not plan.versions:
            raise ConfigError(f"no versions of {model!r} in {tracking.redact_uri(uri)}")
        _print_plan(plan, tracking.redact_uri(uri))
        if not yes:
            if plan.to_prune:
                out.print(
                    f"{len(plan.to_prune)} version(s) to prune, "
                    f"{retention.human_bytes(plan.size)}; nothing deleted (add --yes to delete)",
                    soft_wrap=True,
                    highlight=False,
                )
            return
        with home_mod.exclusive(home, f"slothflow models prune {model}"):
            done = retention.apply(plan, uri)
    for o in done:
        line = (
            f"kept v{o.version}: {o.skipped}"
            if o.skipped
            else f"pruned v{o.version}: {retention.human_bytes(o.freed)} freed"
        )
        out.print(line, soft_wrap=True, highlight=False, markup=False)
    freed = sum(o.freed for o in done)
    out.print(f"freed {retention.human_bytes(freed)}", soft_wrap=True, highlight=False)


def _print_plan(plan: RetentionPlan, uri: str) -> None:
    """The plan as plain lines, one per version (never wrapped: paths stay copy-pasteable)."""
    from tasks.core.tracking.retention import human_bytes

    lines = [
        f"{plan.name} ({uri}): keep the versions that hold an alias and the newest {plan.keep}",
        f"  {'version':<8} {'aliases':<28} {'size':>9}  what",
    ]
    for v in plan.versions:
        if v.action == "prune":
            what = "delete " + ", ".join(f"{d.what} {d.where}" for d in v.deletions)
            size = human_bytes(v.size)
        elif v.action == "pruned":
            what, size = f"already {v.why}", "-"
        else:
            what, size = f"keep ({v.why})", "-"
        aliases = ", ".join(v.aliases) or "-"
        lines.append(f"  v{v.version:<7} {aliases:<28} {size:>9}  {what}")
    for line in lines:
        out.print(line, soft_wrap=True, highlight=False, markup=False)
