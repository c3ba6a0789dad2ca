from __future__ import annotations

import typing
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from tasks.core.config import (
    ConfigError,
    PipelineConfig,
    SecretRef,
    build_config,
    config_hash,
    list_recipes,
    load_config,
)

RECIPES = list_recipes()


def test_shipped_recipes_exist() -> None:
    assert {p.stem for p in RECIPES} >= {"default", "ci-smoke", "llama3-8b-qlora"}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_every_recipe_validates_and_opens_with_its_command(path: Path) -> None:
    cfg = load_config(str(path))
    assert isinstance(cfg, PipelineConfig)
    first = path.read_text().splitlines()[0]
    assert first.startswith("# slothflow run"), (
        f"{path.name} must open with the command that runs it"
    )
    if path.stem != "default":
        assert f"-r {path.stem}" in first


def test_gpu_recipe_has_the_seed_hyperparameters() -> None:
    cfg = load_config("llama3-8b-qlora")
    t = cfg.train
    assert (t.lora.r, t.lora.alpha, t.lora.dropout, t.lora.use_rslora) == (16, 16, 0.0, True)
    assert len(t.lora.target_modules) == 7
    assert (t.learning_rate, t.lr_scheduler, t.warmup_ratio, t.max_grad_norm) == (
        2e-4,
        "cosine",
        0.03,
        1.0,
    )
    assert (t.micro_batch_size, t.grad_accum, t.num_epochs) == (4, 4, 3)
    assert (cfg.model.max_seq_length, t.packing, t.optimizer) == (2048, True, "adamw_torch")
    assert t.gradient_checkpointing == "auto" and cfg.model.load_in_4bit


@pytest.mark.parametrize(
    "raw, key",
    [
        ({"trian": {}}, "trian"),
        ({"train": {"lora": {"rank": 8}}}, "train.lora.rank"),
        ({"data": {"val_fraction": 0.1, "colour": 1}}, "data.colour"),
    ],
)
def test_unknown_keys_are_errors_naming_the_key(raw: dict, key: str) -> None:
    with pytest.raises(ConfigError) as exc:
        build_config(raw)
    assert f"{key}: unknown key" in str(exc.value)


def test_bad_value_names_the_field() -> None:
    with pytest.raises(ConfigError, match=r"train\.backend"):
        build_config({"train": {"backend": "tensorflow"}})
    with pytest.raises(ConfigError, match=r"data\.val_fraction"):
        build_config({"data": {"val_fraction": 1.5}})


def test_data_max_tokens_must_fit_model_max_seq_length() -> None:
    with pytest.raises(
        ConfigError, match=r"data\.max_tokens=300 exceeds model\.max_seq_length=128"
    ):
        load_config("default", ["data.max_tokens=300"])
    assert load_config("default", ["data.max_tokens=128"]).data.max_tokens == 128
    # the defaults agree with each other
    defaults = build_config({})
    assert defaults.data.max_tokens <= defaults.model.max_seq_length


def test_recipe_name_is_safe_in_run_ids_paths_and_mlflow_filters() -> None:
    """The name starts every run id: a path separator or a quote in it would put the run
    folder outside runs/ or break the MLflow search filter that re-attaches runs."""
    for bad in ("../x", "x'y", "a b", "", "-x", "x" * 65):
        with pytest.raises(ConfigError, match=r"name"):
            load_config("default", [f"name={bad}"])
    assert load_config("default", ["name=my-recipe_2.1"]).name == "my-recipe_2.1"


def test_smoke_budget_must_cover_the_evaluation_budget() -> None:
    """The smoke test compares served answers with the offline evaluation's item by item;
    a smaller answer budget would cut answers the evaluation let finish."""
    with pytest.raises(
        ConfigError,
        match=r"deploy\.smoke\.max_tokens=16 is below eval\.max_new_tokens=64",
    ):
        load_config("default", ["eval.max_new_tokens=64"])
    ok = load_config("default", ["eval.max_new_tokens=64", "deploy.smoke.max_tokens=64"])
    assert ok.deploy.smoke.max_tokens == 64
    # nothing to compare when nothing is served or smoke-tested
    load_config("default", ["eval.max_new_tokens=64", "deploy.enabled=false"])
    load_config("default", ["eval.max_new_tokens=64", "deploy.smoke.enabled=false"])
    # the shipped GPU recipe answers in up to 256 tokens and smoke-tests as many
    gpu = load_config("llama3-8b-qlora")
    assert gpu.deploy.smoke.max_tokens >= gpu.eval.max_new_tokens == 256


def test_overrides_apply_parse_yaml_and_validate() -> None:
    cfg = load_config("default", ["train.max_steps=7", "train.lora.target_modules=[q_proj]"])
    assert cfg.train.max_steps == 7 and cfg.train.lora.target_modules == ["q_proj"]
    with pytest.raises(ConfigError, match=r"train\.nope"):
        load_config("default", ["train.nope=1"])
    with pytest.raises(ConfigError, match=r"section\.field=value"):
        load_config("default", ["train.max_steps"])


def test_unknown_recipe_lists_the_known_ones() -> None:
    with pytest.raises(ConfigError, match="ci-smoke"):
        load_config("no-such-recipe")


def _walk(model: type[BaseModel], prefix: str = "") -> typing.Iterator[tuple[str, typing.Any]]:
    for name, field in model.model_fields.items():
        yield f"{prefix}{name}", field
        ann = field.annotation
        for t in (ann, *typing.get_args(ann)):
            if isinstance(t, type) and issubclass(t, BaseModel):
                yield from _walk(t, f"{prefix}{name}.")


def test_every_field_has_a_description() -> None:
    fields = list(_walk(PipelineConfig))
    assert len(fields) > 60
    assert [n for n, f in fields if not f.description] == []


def test_choices_are_enums_in_the_ui_schema() -> None:
    schema = PipelineConfig.model_json_schema()
    backend = schema["$defs"]["TrainConfig"]["properties"]["backend"]
    assert backend["enum"] == ["auto", "unsloth", "peft"]
    assert backend["description"]


def test_config_hash_is_canonical() -> None:
    base = load_config("default")
    raw = yaml.safe_load((RECIPES[0].parent / "default.yaml").read_text())
    # Spelling out every default, in another key order, hashes the same.
    spelled = base.model_dump(mode="json")
    reordered = dict(reversed(list(spelled.items())))
    assert config_hash(build_config(reordered)) == config_hash(base)
    # Where results are logged or how the model is served does not count...
    assert config_hash(
        load_config("default", ["tracking.experiment=other", "deploy.port=9"])
    ) == config_hash(base)
    # ...what is produced does.
    assert config_hash(load_config("default", ["train.learning_rate=0.002"])) != config_hash(base)
    assert raw["name"] == base.name


def test_secret_ref_holds_names_not_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="variable"):
        SecretRef(env="hf_abcdefghijklmnopqrstuvwxyz0123456789-!")
    ref = SecretRef(env="SLOTHFLOW_TEST_SECRET")
    monkeypatch.delenv("SLOTHFLOW_TEST_SECRET", raising=False)
    with pytest.raises(ConfigError, match="SLOTHFLOW_TEST_SECRET") as exc:
        ref.resolve()
    monkeypatch.setenv("SLOTHFLOW_TEST_SECRET", "s3cr3t-value")
    assert ref.resolve() == "s3cr3t-value"
    assert "s3cr3t" not in str(exc.value)


def test_secret_source_is_the_one_actually_used(tmp_path: Path) -> None:
    """A configured Prefect block that does not exist falls back to the variable, and the
    reported source says so (users are pointed at what to rotate). Real Prefect, in a
    child process with its own home: its ephemeral API answers that the block is missing
    (and its server stops with that process, not at this one's exit)."""
    import json
    import subprocess
    import sys

    from tests.conftest import clean_env

    code = """
import json, os
from pathlib import Path
from tasks.core import home
from tasks.core.config import ConfigError, SecretRef
home.activate(Path(os.environ["SLOTHFLOW_HOME"]))
out = [SecretRef(env="SLOTHFLOW_TEST_KEY").resolve_with_source(),
       SecretRef(prefect_block="slothflow-no-such-block", env="SLOTHFLOW_TEST_KEY")
       .resolve_with_source()]
try:
    SecretRef(prefect_block="slothflow-no-such-block").resolve()
except ConfigError as exc:
    out.append(str(exc))
print(json.dumps(out))
"""
    (tmp_path / "fakehome").mkdir()
    env = clean_env(tmp_path / "home", tmp_path / "fakehome") | {"SLOTHFLOW_TEST_KEY": "k-123"}
    r = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=180
    )
    assert r.returncode == 0, r.stderr[-2000:]
    env_only, both, missing = json.loads(r.stdout.strip().splitlines()[-1])
    assert env_only == ["k-123", "env:SLOTHFLOW_TEST_KEY"]
    assert both == ["k-123", "env:SLOTHFLOW_TEST_KEY"]
    assert "'slothflow-no-such-block' not found" in missing


# Today's hash of every shipped recipe, first pinned before the tasks/core/ move (de45a0a);
# all moved with train.init_adapter (issue 16: a warm start produces another adapter, so
# the field is hashed like any other, and the canonical form has no per-field exclusion).
PINNED_HASHES = {
    "ci-smoke": "8b05b17ab30c583e6c1ad491973630fc9fe654e1bdbbd21459deb5887eea468d",
    "default": "b5a4b6f02741ba06c7fce3450251b3685e6dfb2e256f3bfc0963e18882eb3367",
    # added with the GPU end-to-end recipe (issue 14)
    "gpu-1b": "7df499f84671a4c36c1cba42b2521cccf3883c9221f7193efadfa81afd161fbc",
    "llama3-8b-qlora": "96a489113dcb7c319d035eeb6f32c3bf42ae50ea54583ef3080a83c0e3bfd0e4",
}


def test_shipped_recipe_hashes_are_pinned() -> None:
    """The config hash names what a run produces (run ids, resume, cached stages), so a
    refactor must not move it. This fails when a config field, a default, a shipped recipe
    or the canonical form changes, and when a recipe is added or removed. To change a hash
    on purpose, update the pin here and explain why in the commit message."""
    got = {p.stem: config_hash(load_config(p.stem)) for p in list_recipes()}
    assert got == PINNED_HASHES
