"""The MLflow registry on real MLflow (SQLite in tmp_path, and one real `mlflow server`),
and the four stage tasks chained on a real run: champion vs challenger."""

from __future__ import annotations

import json
import re
import uuid
from pathlib import Path
from typing import Any

import pytest

from tasks.evaluate import EvalRef
from tasks.gate import GateRef
from tests import export_fixtures as fx


def _ev() -> EvalRef:
    s = {"exact_match": 0.95, "f1": 0.95, "answer_perplexity": 1.1, "answer_nll": 0.1}
    return EvalRef(
        stage="evaluate",
        path="/x",
        n_items=220,
        primary_metric="exact_match",
        candidate="merged",
        scores={"base": {**s, "exact_match": 0.0}, "adapter": s, "merged": s},
        results_path="/x/r.json",
        table_path="/x/t.md",
        validation_fingerprint="f",
    )


def _gate(passed: bool = True) -> GateRef:
    return GateRef(
        stage="gate",
        path="/x",
        passed=passed,
        reasons=[] if passed else ["exact_match 0.1 (need >= 0.9)"],
        decision_path="/x/gate.json",
        primary_metric="exact_match",
        candidate=0.95,
        base=0.0,
        champion=None,
    )


def _run(uri: str, artifacts: Path | None) -> str:
    from mlflow.tracking import MlflowClient

    c = MlflowClient(uri)
    exp = c.create_experiment(
        f"t-{uuid.uuid4().hex[:8]}", artifact_location=artifacts.as_uri() if artifacts else None
    )
    return str(c.create_run(exp).info.run_id)


def _register(uri: str, run: str, name: str = "tiny-topics", run_id: str = "r-1") -> Any:
    from tasks.core.refs import GateBar
    from tasks.registry import register

    return register(
        name,
        GateBar.of(fx.pipeline_cfg().eval),
        fx.exported("random"),
        _ev(),
        _gate(),
        tracking_uri=uri,
        mlflow_run_id=run,
        run_id=run_id,
    )


def test_parse_spec() -> None:
    from tasks.core.config import ConfigError
    from tasks.core.tracking.registry import parse_spec

    assert parse_spec("m@champion") == ("m", "champion", None)
    assert parse_spec("models:/m-x/12") == ("m-x", None, 12)
    with pytest.raises(ConfigError, match="NAME@alias"):
        parse_spec("m")


def test_registry_downloads_land_in_one_cache_folder_per_tracking_store(tmp_path: Path) -> None:
    """The one place evaluation (champion), `slothflow evaluate --champion` and serving
    download registry versions to."""
    from tasks.core.home import Home
    from tasks.core.tracking.registry import cache_dir

    home = Home(tmp_path / "home")
    a = cache_dir(home, "https://user:s3cret@mlflow-a.example:5000")
    b = cache_dir(home, "https://mlflow-b.example:5000")
    assert a != b  # both stores have a tiny-topics/1: their downloads must not mix
    assert a.parent == b.parent == home.cache / "registry"
    assert cache_dir(home, "https://user:s3cret@mlflow-a.example:5000/") == a
    assert "s3cret" not in str(a)  # the URI's credentials stay out of the path


def test_register_adds_a_challenger_version_with_lineage(tmp_path: Path) -> None:
    from tasks.core.tracking.registry import CHALLENGER, list_versions, resolve

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    ref = _register(uri, _run(uri, tmp_path / "artifacts"))
    assert (ref.version, ref.alias, ref.model_uri) == (1, CHALLENGER, "models:/tiny-topics/1")

    [v] = list_versions("tiny-topics", uri)
    exp = fx.exported("random")
    assert v["aliases"] == [CHALLENGER]
    assert v["tags"]["slothflow.run_id"] == "r-1"
    assert v["tags"]["data_fingerprint"] == exp.data_fingerprint
    assert v["tags"]["config_hash"] == exp.config_hash
    assert v["tags"]["base_revision"] == exp.base.revision
    assert v["tags"]["eval.exact_match"] == "0.95"

    for spec in ("tiny-topics@challenger", "tiny-topics/1"):
        got = resolve(spec, uri)
        assert got.number == 1 and got.path == got.merged_path
        assert got.label == f"tiny-topics/1 ({CHALLENGER})"
        assert got.manifest["kind"] == "merged"
        assert (got.path / "model.safetensors").exists()
        assert (
            got.adapter_path is not None
            and (got.adapter_path / "adapter_model.safetensors").exists()
        )
        # The registered manifest carries the evaluation and the gate, and points here.
        assert got.manifest["metrics"]["eval.merged.exact_match"] == 0.95
        assert got.manifest["gate"]["passed"] is True
        assert got.manifest["serving"]["model"] == str(got.path)


def test_register_twice_for_one_run_makes_one_version(tmp_path: Path) -> None:
    """register_task retries: an attempt that created the version but failed before the
    alias was set must not leave a second version behind."""
    from tasks.core.tracking.registry import CHALLENGER, list_versions

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    first = _register(uri, _run(uri, tmp_path / "a1"))
    # A retry runs in a new attempt (a new MLflow stage run) of the same pipeline run.
    again = _register(uri, _run(uri, tmp_path / "a2"))
    assert first.version == again.version == 1
    assert again.source == first.source
    assert [(v["version"], v["aliases"]) for v in list_versions("tiny-topics", uri)] == [
        (1, [CHALLENGER])
    ]
    # Another pipeline run of the same candidate is a new version.
    other = _register(uri, _run(uri, tmp_path / "a3"), run_id="r-2")
    assert other.version == 2
    assert len(list_versions("tiny-topics", uri)) == 2


def test_current_champion_is_none_only_when_the_registry_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow.exceptions import MlflowException

    from tasks.core.tracking.registry import NotRegisteredError, current_champion, resolve
    from tests.conftest import free_port

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert current_champion("tiny-topics", uri) is None  # no such registered model
    _register(uri, _run(uri, tmp_path / "a1"))
    assert current_champion("tiny-topics", uri) is None  # registered, no champion alias
    with pytest.raises(NotRegisteredError, match="not found"):
        resolve("tiny-topics/7", uri)

    # A store that cannot be reached is an error, never "no champion yet" (the gate
    # would then skip its champion rule).
    port = free_port()  # closed again: nothing listens there
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    with pytest.raises(MlflowException) as info:
        current_champion("tiny-topics", f"http://127.0.0.1:{port}")
    assert not isinstance(info.value, NotRegisteredError)


def test_champion_task_finds_the_champion_of_a_tracked_run(tmp_path: Path) -> None:
    """The flow's champion step: None without tracking or without a champion, else the
    champion on this machine for the evaluate stage to re-score."""
    from tasks.core.refs import RunContext
    from tasks.core.tracking.registry import promote
    from tasks.registry import champion_task

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    untracked = RunContext(
        run_id="r", run_dir=str(tmp_path / "run"), config_hash="c", code_version="v", hardware={}
    )
    tracked = untracked.model_copy(update={"tracking": {"tracking_uri": uri}})
    assert champion_task.fn(untracked, "tiny-topics") is None
    _register(uri, _run(uri, tmp_path / "a1"))
    assert champion_task.fn(tracked, "tiny-topics") is None  # a challenger only
    promote("tiny-topics", 1, uri)
    champ = champion_task.fn(tracked, "tiny-topics")
    assert champ is not None and (champ.name, champ.number) == ("tiny-topics", 1)
    assert champ.label == "tiny-topics/1 (champion)" and champ.path == champ.merged_path


def test_register_refuses_a_failed_gate(tmp_path: Path) -> None:
    from tasks.registry import GateNotPassedError, register

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with pytest.raises(GateNotPassedError, match=r"need >= 0\.9"):
        register(
            "tiny-topics",
            _bar(),
            fx.exported("random"),
            _ev(),
            _gate(passed=False),
            tracking_uri=uri,
            mlflow_run_id="unused",
            run_id="r",
        )


def test_promote_moves_champion_to_previous(tmp_path: Path) -> None:
    from tasks.core.config import ConfigError
    from tasks.core.tracking.registry import current_champion, list_versions, promote, resolve

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert current_champion("tiny-topics", uri) is None
    _register(uri, _run(uri, tmp_path / "a1"))
    promote("tiny-topics", 1, uri)
    _register(uri, _run(uri, tmp_path / "a2"), run_id="r-2")  # the next pipeline run
    aliases = {v["version"]: v["aliases"] for v in list_versions("tiny-topics", uri)}
    assert aliases == {2: ["challenger"], 1: ["champion"]}

    promote("tiny-topics", 2, uri)
    aliases = {v["version"]: v["aliases"] for v in list_versions("tiny-topics", uri)}
    assert aliases == {2: ["champion"], 1: ["previous"]}
    champ = current_champion("tiny-topics", uri)
    assert champ is not None and champ.number == 2
    with pytest.raises(ConfigError, match="not found"):
        resolve("tiny-topics@challenger", uri)


def test_registry_against_an_mlflow_server(mlflow_server: str, tmp_path: Path) -> None:
    from tasks.core.tracking.registry import current_champion, list_versions, resolve

    name = f"tiny-{uuid.uuid4().hex[:6]}"
    assert current_champion(name, mlflow_server) is None  # the REST answer for "no model"
    ref = _register(mlflow_server, _run(mlflow_server, None), name=name)
    assert current_champion(name, mlflow_server) is None  # model, but no champion alias
    assert ref.source.startswith("mlflow-artifacts:")  # proxied by the server, not a local path
    got = resolve(f"{name}@challenger", mlflow_server, cache_dir=tmp_path / "cache")
    assert got.path.is_relative_to(tmp_path / "cache")  # downloaded through the server
    assert json.loads((got.path / "manifest.json").read_text())["kind"] == "merged"
    assert got.manifest["artifact_path"] == str(got.path)
    assert list_versions(name, mlflow_server)[0]["aliases"] == ["challenger"]
    # A second resolve reuses the download.
    assert resolve(f"{name}/1", mlflow_server, cache_dir=tmp_path / "cache").path == got.path

    # Retention through the server: the proxied artifacts and the home's download go.
    from mlflow.artifacts import list_artifacts

    from tasks.core.home import Home
    from tasks.core.tracking import registry as reg
    from tasks.core.tracking import retention

    home = Home(tmp_path / "home")
    cache = reg.cache_dir(home, mlflow_server)
    assert resolve(f"{name}/1", mlflow_server, cache).path.is_relative_to(cache / name / "1")
    _register(mlflow_server, _run(mlflow_server, None), name=name, run_id="r-2")
    plan = retention.plan(name, mlflow_server, home, keep=1)
    (v1,) = plan.to_prune
    assert [(d.what, d.where) for d in v1.deletions][:1] == [("artifacts", ref.source)]
    assert [d.what for d in v1.deletions] == ["artifacts", "cache"] and v1.deletions[0].size > 0
    assert retention.apply(plan, mlflow_server) == [retention.Outcome(1, freed=v1.size)]
    assert list_artifacts(ref.source, tracking_uri=mlflow_server) == []
    assert not (cache / name / "1").exists()
    with pytest.raises(reg.PrunedVersionError, match="version 1 was pruned on"):
        resolve(f"{name}/1", mlflow_server, cache)
    assert resolve(f"{name}@challenger", mlflow_server, cache).number == 2


def test_models_list_cli_shows_versions_aliases_metrics_lineage(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from slothflow.cli import app

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    _register(uri, _run(uri, tmp_path / "artifacts"))
    args = [
        "models",
        "list",
        "--set",
        f"tracking.tracking_uri={uri}",
        "--set",
        "tracking.registered_model=tiny-topics",
    ]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "challenger" in res.output and "exact_match 0.95" in res.output and "r-1" in res.output
    assert "gate >= 0.9 margin 0.2" in res.output  # the bar a looser gate is refused against
    res = CliRunner().invoke(app, [*args, "--json"])
    assert json.loads(res.output)[0]["tags"]["config_hash"] == "c" * 64


# --------------------------------------------------------------------------- the stage tasks


@pytest.mark.slow
def test_stage_tasks_chain_and_a_weaker_challenger_loses_to_the_champion(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    from tasks.core.home import Home
    from tasks.core.refs import GateBar
    from tasks.core.run import open_run
    from tasks.core.tracking.registry import list_versions, promote
    from tasks.evaluate import evaluate_task
    from tasks.export import export_task
    from tasks.gate import gate_task
    from tasks.registry import champion_task, register_task

    home = Home(tmp_path / "home")
    data = fx.data_ref()

    def chain(cfg: Any, adapter: Path) -> tuple[Any, ...]:
        ctx = open_run(cfg, home)
        exp = export_task.fn(ctx, cfg.export, fx.train_ref(adapter), data, **fx.export_values(cfg))
        champion = champion_task.fn(ctx, cfg.tracking.registered_model)
        ev = evaluate_task.fn(ctx, cfg.eval, data, exp, champion)
        gate = gate_task.fn(ctx, cfg.eval, ev)
        name = cfg.tracking.registered_model
        reg = register_task.fn(ctx, name, GateBar.of(cfg.eval), exp, ev, gate)
        return ctx, exp, ev, gate, reg

    adapters = fx.trained_adapters()
    cfg_a = fx.pipeline_cfg()
    _, _, _, gate_a, reg_a = chain(cfg_a, adapters["strong"])
    assert gate_a.passed and reg_a is not None and reg_a.version == 1
    # (Reuse of a finished stage is Prefect's cache: tests/test_caching.py.)
    uri = home.mlflow_db_uri
    promote("tiny-topics", 1, uri)

    # Only the champion rule can fail the weaker model: threshold and margin are off.
    cfg_b = fx.pipeline_cfg(
        name="issue6-b",
        eval={"threshold": 0.0, "base_margin": 0.0},
        export={"stop_check": "warn"},
    )
    ctx_b, _, ev_b, gate_b, reg_b = chain(cfg_b, adapters["weak"])
    assert ev_b.champion == "tiny-topics v1"
    assert ev_b.scores["champion"]["exact_match"] >= 0.9  # re-evaluated on the held-out set
    assert not gate_b.passed
    assert len(gate_b.reasons) == 1 and "champion" in gate_b.reasons[0]
    assert reg_b is None
    assert [v["version"] for v in list_versions("tiny-topics", uri)] == [1]
    assert (Path(ctx_b.run_dir) / "export" / "merged" / "model.safetensors").exists()  # kept

    client = MlflowClient(uri)
    assert ctx_b.tracking is not None
    parent = client.get_run(ctx_b.tracking["parent_run_id"])
    assert parent.data.tags["slothflow.gate"] == "failed"


# --------------------------------------------------------------------------- guard rails


def test_each_recipe_registers_into_its_own_model_unless_configured() -> None:
    """A recipe whose gate cannot fail (ci-smoke) must not share a registered model with
    the one a stricter recipe serves: the default name comes from the recipe's name."""
    from tasks.core.config import config_hash, load_config

    default, smoke = load_config("default"), load_config("ci-smoke")
    assert default.tracking.registered_model == f"slothflow-{default.name}"
    assert smoke.tracking.registered_model == f"slothflow-{smoke.name}"
    assert default.tracking.registered_model != smoke.tracking.registered_model
    named = load_config("ci-smoke", ["tracking.registered_model=shared"])
    assert named.tracking.registered_model == "shared"
    assert config_hash(named) == config_hash(smoke)  # tracking is outside the hash
    renamed = load_config("ci-smoke", ["name=other"])
    assert renamed.tracking.registered_model == "slothflow-other"


def _bar(**eval_: float) -> Any:
    from tasks.core.refs import GateBar

    return GateBar.of(fx.pipeline_cfg(eval=eval_).eval)


def _weak_bar(**eval_: float) -> Any:
    return _bar(**{"threshold": 0.0, "base_margin": 0.0, **eval_})


def test_a_weaker_gate_cannot_move_an_alias_of_a_stricter_model(tmp_path: Path) -> None:
    """ci-smoke's gate (threshold 0, margin 0) into a model whose champion passed
    threshold 0.9: refused, naming both, and the aliases stay where they were."""
    from tasks.core.config import ConfigError
    from tasks.core.tracking.registry import list_versions, promote
    from tasks.registry import register

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    _register(uri, _run(uri, tmp_path / "a1"))  # the default gate: threshold 0.9
    promote("tiny-topics", 1, uri)
    with pytest.raises(ConfigError) as info:
        register(
            "tiny-topics",
            _weak_bar(),
            fx.exported("random"),
            _ev(),
            _gate(),
            tracking_uri=uri,
            mlflow_run_id=_run(uri, tmp_path / "a2"),
            run_id="r-2",
        )
    msg = str(info.value)
    assert "tiny-topics" in msg and "champion" in msg and "version 1" in msg
    assert "0.9" in msg and "threshold 0 " in msg  # its bar and this run's
    assert [(v["version"], v["aliases"]) for v in list_versions("tiny-topics", uri)] == [
        (1, ["champion"])
    ]


def test_check_can_register_refuses_before_the_run_and_allows_an_equal_gate(
    tmp_path: Path,
) -> None:
    """What the preflight calls: the same refusal, before any stage, without writing."""
    from tasks.registry import WeakerGateError, check_can_register

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    name = "tiny-topics"
    check_can_register(name, _weak_bar(), uri)  # no such model yet: anything may register
    _register(uri, _run(uri, tmp_path / "a1"))  # challenger, gated at 0.9 / margin 0.2
    with pytest.raises(WeakerGateError, match=r"challenger \(version 1\)"):
        check_can_register(name, _weak_bar(), uri)
    with pytest.raises(WeakerGateError, match="base_margin"):
        check_can_register(name, _weak_bar(threshold=0.9), uri)  # a lower margin is weaker too
    check_can_register(name, _bar(), uri)  # the same bar
    check_can_register(name, _bar(threshold=0.95), uri)  # a stricter one
    # Another model name is another model: nothing to compare with.
    check_can_register("other", _weak_bar(), uri)


def test_a_version_without_a_recorded_gate_counts_as_stricter(tmp_path: Path) -> None:
    """A version registered before the bar was recorded (or by hand) has an unknown bar:
    only an explicit decision may put a weaker gate's version beside it."""
    from mlflow.tracking import MlflowClient

    from tasks.registry import WeakerGateError, check_can_register

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri, registry_uri=uri)
    client.create_registered_model("tiny-topics")
    mv = client.create_model_version("tiny-topics", source=str(tmp_path), run_id=None)
    client.set_registered_model_alias("tiny-topics", "champion", mv.version)
    with pytest.raises(WeakerGateError, match="no recorded gate"):
        check_can_register("tiny-topics", _bar(threshold=1.0, base_margin=1.0), uri)


def test_models_list_on_an_empty_home_answers_without_creating_a_store(tmp_path: Path) -> None:
    from tests.conftest import run_slothflow

    r = run_slothflow(["models", "list"], tmp_path, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert not (tmp_path / "home" / "mlflow" / "mlflow.db").exists()
    assert "no registered models" in r.stdout


# --------------------------------------------------------------------------- retention


def _files(folder: Path, size: int) -> Path:
    (folder / "merged").mkdir(parents=True)
    (folder / "merged" / "model.safetensors").write_bytes(b"m" * size)
    return folder


def test_retention_keeps_aliased_and_newest_versions_and_prunes_the_rest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Five versions, champion on v2 and previous on v1. The flow's retention step keeps
    the newest 2 and prunes v3 (its artifacts, registry download and run export gone, its
    record kept and refused by resolve) and tags the pipeline's run; then `models prune
    --keep 1` shows v4 and deletes nothing, an alias gained after planning saves it, and
    with --yes it goes. The aliased versions and the newest stay servable throughout."""
    from mlflow.tracking import MlflowClient
    from typer.testing import CliRunner

    from slothflow.cli import app
    from tasks.core.home import Home
    from tasks.core.refs import RunContext
    from tasks.core.tracking import TrackingRef, retention
    from tasks.core.tracking import registry as reg
    from tasks.registry import retention_task

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    name = "tiny-topics"
    for i in range(1, 6):
        _register(uri, _run(uri, tmp_path / f"a{i}"), run_id=f"r-{i}")
    reg.promote(name, 1, uri)
    reg.promote(name, 2, uri)  # champion 2, previous 1
    c = MlflowClient(uri, registry_uri=uri)
    c.delete_registered_model_alias(name, "challenger")  # the newest are kept as such only
    home = Home(tmp_path / "home")
    monkeypatch.setenv("SLOTHFLOW_HOME", str(home.root))
    cache = reg.cache_dir(home, uri) / name
    for v in (3, 4, 5):  # a registry download and a run's export, as real files
        _files(cache / str(v) / "model", 300)
        _files(home.run_dir(f"r-{v}") / "export", 200)
    sources = {v: Path(reg.resolve(f"{name}/{v}", uri).path).parent for v in range(1, 6)}

    def size(v: int) -> int:
        return sum(p.stat().st_size for p in sources[v].rglob("*") if p.is_file()) + 500

    # 1. After a registration, in the flow: aliases + the newest 2.
    parent = _run(uri, tmp_path / "p")
    exp = c.get_run(parent).info.experiment_id
    tracked = TrackingRef(tracking_uri=uri, experiment_id=exp, parent_run_id=parent, run_id="r-5")
    ctx = RunContext(
        run_id="r-5", run_dir=str(home.run_dir("r-5")), config_hash="c", code_version="v",
        hardware={}, tracking=tracked.model_dump(),
    )  # fmt: skip
    freed_v3 = size(3)
    assert retention_task.fn(ctx, name, 2) == {
        "pruned": [3],
        "freed": retention.human_bytes(freed_v3),
    }
    tags = c.get_run(parent).data.tags
    assert tags["slothflow.pruned_versions"] == "3"
    assert tags["slothflow.pruned_bytes"] == str(freed_v3)
    assert not sources[3].exists() and not (cache / "3").exists()
    assert not (home.run_dir("r-3") / "export").exists()
    v3 = reg.version_tags(c, name, 3)
    assert v3[reg.TAG_PRUNED_BYTES] == str(freed_v3) and v3["gate"] == "passed"  # record kept
    with pytest.raises(reg.PrunedVersionError) as info:
        reg.resolve(f"{name}/3", uri)
    assert re.fullmatch(
        r"model 'tiny-topics/3': tiny-topics version 3 was pruned on "
        r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ; its artifacts are gone",
        str(info.value),
    )

    # 2. By hand, keeping only the newest: the dry run shows v4 and changes nothing.
    cli = ["models", "prune", name, "--keep", "1", "--set", f"tracking.tracking_uri={uri}"]
    dry = CliRunner().invoke(app, cli)
    assert dry.exit_code == 0, dry.output
    lines = {ln.split()[0]: ln for ln in dry.output.splitlines() if ln.startswith("  v")}
    assert "keep (newest 1)" in lines["v5"] and "keep (champion)" in lines["v2"]
    assert "keep (previous)" in lines["v1"] and "already pruned on" in lines["v3"]
    assert "delete artifacts" in lines["v4"] and retention.human_bytes(size(4)) in lines["v4"]
    assert "1 version(s) to prune" in dry.output and "nothing deleted" in dry.output
    assert sources[4].exists() and (cache / "4").exists()
    assert reg.resolve(f"{name}/4", uri).number == 4

    # An alias set after planning, before applying: the version is left whole.
    plan = retention.plan(name, uri, home, keep=1)
    assert [v.version for v in plan.to_prune] == [4] and plan.size == size(4)
    reg.set_alias(c, name, "challenger", 4)
    assert retention.apply(plan, uri) == [retention.Outcome(4, skipped="it holds challenger now")]
    assert sources[4].exists() and reg.TAG_PRUNED not in reg.version_tags(c, name, 4)
    c.delete_registered_model_alias(name, "challenger")

    freed_v4 = size(4)
    done = CliRunner().invoke(app, [*cli, "--yes"])
    assert done.exit_code == 0, done.output
    assert f"pruned v4: {retention.human_bytes(freed_v4)} freed" in done.output
    assert not sources[4].exists() and [p.name for p in cache.iterdir()] == ["5"]
    assert (home.run_dir("r-5") / "export" / "merged" / "model.safetensors").exists()
    for v in (1, 2, 5):
        assert (reg.resolve(f"{name}/{v}", uri).path / "model.safetensors").exists()

    # A version registered by hand may point at any folder: never retention's to delete.
    own = _files(tmp_path / "someone-elses-model", 10)
    for _ in range(2):  # v6 and v7, the newest
        c.create_model_version(name, source=str(own), run_id=None)
    by_version = {v.version: v for v in retention.plan(name, uri, home, keep=1).versions}
    assert by_version[6].action == "keep" and "not registered by slothflow" in by_version[6].why
    assert by_version[5].action == "prune"
