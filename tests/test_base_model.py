"""Stage ``base``: the embedded build, local folders and hub ids through a real Hugging
Face cache layout (offline), safetensors only, never remote code, chat templates."""

from __future__ import annotations

import hashlib
import json
import shutil
import uuid
from pathlib import Path

import pytest

from tasks.base_model import LOAD_KWARGS, prepare_base
from tasks.core import embedded
from tasks.core.config import ConfigError, ModelConfig, load_config
from tasks.core.home import Home


@pytest.fixture(scope="module")
def smoke_model_cfg() -> ModelConfig:
    return load_config("ci-smoke").model


@pytest.fixture(scope="module")
def tiny_dir(smoke_model_cfg: ModelConfig, session_home: Home) -> Path:
    return embedded.ensure_built(smoke_model_cfg.embedded, session_home.models)


def _hub_layout(src: Path, repo_id: str) -> tuple[Path, str]:
    """Copy a model folder into ``HF_HUB_CACHE`` the way ``snapshot_download`` lays it
    out: ``models--org--name/snapshots/<commit>/`` plus ``refs/main``."""
    from huggingface_hub.constants import HF_HUB_CACHE

    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    repo = Path(HF_HUB_CACHE) / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / commit
    shutil.copytree(src, snap)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snap, commit


def test_embedded_base(smoke_model_cfg: ModelConfig, session_home: Home, tiny_dir: Path) -> None:
    ref = prepare_base(smoke_model_cfg, session_home)
    assert Path(ref.name_or_path) == tiny_dir
    assert ref.revision.startswith("sha256:")
    assert ref.tokenizer_path == ref.name_or_path
    assert ref.chat_template_sha256 == hashlib.sha256(embedded.CHAT_TEMPLATE.encode()).hexdigest()
    assert ref.license == "Apache-2.0"


def test_a_named_shape_is_built_on_the_spot_over_the_embedded_tokenizer(
    fresh_home: Home, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``embedded:llama-3.2-1b`` (configs/gpu-1b.yaml) goes through the named-shape build:
    grouped-query attention, tied embeddings, the shape's own vocabulary beyond the
    tokenizer's ids, bfloat16 weights. Here with the dimensions scaled down (the real
    one is built on the GPU device by tests/test_gpu_e2e.py); a name that is not one is
    a config error naming the field."""
    import json

    from tasks.base_model import check_base
    from tasks.core.config import ConfigError, load_config

    small = dict(embedded.SHAPES["embedded:llama-3.2-1b"], hidden_size=64,
                 intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, vocab_size=1024)  # fmt: skip
    monkeypatch.setitem(embedded.SHAPES, "embedded:llama-3.2-1b", small)
    cfg = load_config("gpu-1b").model
    check_base(cfg)
    ref = prepare_base(cfg, fresh_home)
    folder = Path(ref.name_or_path)
    assert folder.name.startswith("llama-3.2-1b-") and folder.parent == fresh_home.models
    built = json.loads((folder / "config.json").read_text())
    assert (built["num_key_value_heads"], built["tie_word_embeddings"]) == (2, True)
    assert built["vocab_size"] == 1024 and built["dtype"] == "bfloat16"
    assert built["rope_parameters"]["rope_type"] == "llama3"
    tiny = prepare_base(load_config("default").model, fresh_home)
    assert Path(tiny.name_or_path).name.startswith("tiny-llama-")  # a build of its own
    with pytest.raises(ConfigError, match=r"name_or_path='embedded:nope'.*embedded:llama-3\.2-1b"):
        check_base(load_config("default", ["model.name_or_path=embedded:nope"]).model)


def test_hub_id_offline_through_the_cache_layout(
    smoke_model_cfg: ModelConfig, session_home: Home, tiny_dir: Path
) -> None:
    """The real ``from_pretrained(repo_id, revision=commit)`` path, with no network."""
    from tasks.core.hardware import HardwareDecision
    from tasks.train import load_peft

    repo_id = f"slothflow-test/tiny-{uuid.uuid4().hex[:8]}"
    snap, commit = _hub_layout(tiny_dir, repo_id)
    cfg = smoke_model_cfg.model_copy(update={"name_or_path": repo_id, "revision": "main"})
    ref = prepare_base(cfg, session_home)
    assert ref.name_or_path == repo_id  # passed to from_pretrained as a hub id
    assert ref.revision == commit  # the branch resolved to the commit it points at
    assert Path(ref.path) == snap

    pipeline_cfg = load_config("ci-smoke", [f"model.name_or_path={repo_id}"])
    hw = HardwareDecision("cpu", "peft", "float32", False, "test")
    model, tok = load_peft(pipeline_cfg.train, pipeline_cfg.model, ref, hw)
    from safetensors.torch import load_file

    on_disk = load_file(str(snap / "model.safetensors"))
    loaded = model.get_base_model().state_dict()
    name = "model.embed_tokens.weight"
    assert (loaded[name] == on_disk[name]).all()  # the snapshot's weights, not a fresh init
    assert tok.chat_template == embedded.CHAT_TEMPLATE


def test_hub_id_missing_from_the_offline_cache_is_a_config_error(
    smoke_model_cfg: ModelConfig, session_home: Home
) -> None:
    cfg = smoke_model_cfg.model_copy(update={"name_or_path": "nobody/not-cached"})
    with pytest.raises(ConfigError, match="not in the local Hugging Face cache"):
        prepare_base(cfg, session_home)


def test_pickle_only_weights_are_refused(
    smoke_model_cfg: ModelConfig, session_home: Home, tiny_dir: Path, tmp_path: Path
) -> None:
    d = tmp_path / "bin-only"
    shutil.copytree(tiny_dir, d)
    (d / "model.safetensors").rename(d / "pytorch_model.bin")
    with pytest.raises(ConfigError, match="safetensors"):
        prepare_base(smoke_model_cfg.model_copy(update={"name_or_path": str(d)}), session_home)


def test_remote_code_is_never_trusted(
    smoke_model_cfg: ModelConfig, session_home: Home, tiny_dir: Path, tmp_path: Path
) -> None:
    assert LOAD_KWARGS == {"trust_remote_code": False}
    d = tmp_path / "custom-code"
    shutil.copytree(tiny_dir, d)
    conf = json.loads((d / "config.json").read_text())
    conf["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (d / "config.json").write_text(json.dumps(conf))
    with pytest.raises(ConfigError, match="trust_remote_code"):
        prepare_base(smoke_model_cfg.model_copy(update={"name_or_path": str(d)}), session_home)
    # and nothing in the code base ever turns it on
    root = Path(__file__).resolve().parents[1]
    offenders = [
        p
        for sub in ("tasks", "flows", "slothflow")
        for p in (root / sub).rglob("*.py")
        if "trust_remote_code=True" in p.read_text()
    ]
    assert offenders == []


def test_chat_template_from_config_or_a_clear_error(
    smoke_model_cfg: ModelConfig, session_home: Home, tiny_dir: Path, tmp_path: Path
) -> None:
    d = tmp_path / "no-template"
    shutil.copytree(tiny_dir, d)
    tc = json.loads((d / "tokenizer_config.json").read_text())
    tc.pop("chat_template", None)
    (d / "tokenizer_config.json").write_text(json.dumps(tc))
    (d / "chat_template.jinja").unlink(missing_ok=True)
    cfg = smoke_model_cfg.model_copy(update={"name_or_path": str(d)})
    with pytest.raises(ConfigError, match=r"model\.chat_template"):
        prepare_base(cfg, session_home)

    template = tmp_path / "t.jinja"
    template.write_text(embedded.CHAT_TEMPLATE.replace("<|assistant|>", "<|assistant|> "))
    ref = prepare_base(cfg.model_copy(update={"chat_template": str(template)}), session_home)
    assert ref.tokenizer_path != ref.name_or_path  # a tokenizer copy that carries it
    assert ref.chat_template_sha256 == hashlib.sha256(template.read_bytes()).hexdigest()
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(ref.tokenizer_path).chat_template == template.read_text()

    with pytest.raises(ConfigError, match=r"model\.chat_template: file not found"):
        prepare_base(cfg.model_copy(update={"chat_template": "nope.jinja"}), session_home)


def test_resumed_base_stage_notices_a_changed_folder_or_template(
    smoke_model_cfg: ModelConfig, tiny_dir: Path, tmp_path: Path
) -> None:
    """The base stage's cache key covers what the name resolves to (a local folder's
    content) and the chat-template file's content, not only the config text."""
    from tasks.base_model import base_inputs_hash, prepare_base_in_run
    from tasks.core.refs import RunContext

    d = tmp_path / "model"
    shutil.copytree(tiny_dir, d)
    template = tmp_path / "t.jinja"
    template.write_text(embedded.CHAT_TEMPLATE)
    cfg = smoke_model_cfg.model_copy(
        update={"name_or_path": str(d), "chat_template": str(template)}
    )
    ctx = RunContext(
        run_id="t", run_dir=str(tmp_path / "run"), config_hash="x", code_version="x", hardware={}
    )
    first = prepare_base_in_run(ctx, cfg)
    key = base_inputs_hash(cfg)
    assert prepare_base_in_run(ctx, cfg) == first  # nothing changed: the same reference
    (d / "README.md").write_text("notes")  # not part of the model: same key
    assert base_inputs_hash(cfg) == key

    # the same config text, an edited template file: redone, with the new template
    template.write_text(embedded.CHAT_TEMPLATE.replace("<|assistant|>", "<|assistant|> "))
    assert base_inputs_hash(cfg) != key
    second = prepare_base_in_run(ctx, cfg)
    assert second.chat_template_sha256 == hashlib.sha256(template.read_bytes()).hexdigest()
    assert second.chat_template_sha256 != first.chat_template_sha256

    # the same config text, a changed local folder: redone, with the new revision
    key = base_inputs_hash(cfg)
    cfg_json = json.loads((d / "config.json").read_text())
    cfg_json["rms_norm_eps"] = 1e-5 if cfg_json.get("rms_norm_eps") != 1e-5 else 1e-6
    (d / "config.json").write_text(json.dumps(cfg_json))
    assert base_inputs_hash(cfg) != key
    third = prepare_base_in_run(ctx, cfg)
    assert third.revision != second.revision


def test_the_data_stage_loads_and_keys_the_hub_tokenizer_at_the_pinned_commit(
    smoke_model_cfg: ModelConfig, session_home: Home, tiny_dir: Path, tmp_path: Path
) -> None:
    """``refs/main`` moves on to a commit whose tokenizer has no chat template; a base
    pinned to the earlier commit still loads, filters with and hashes that commit's."""
    from transformers import AutoTokenizer

    from tasks.core.models import base_tokenizer_revision, load_base_tokenizer, template_sha256
    from tasks.data import clean, inputs_hash
    from tasks.data.clean import tokenizer_identity
    from tests.test_data import cfg_for, good_rows, report_of, write_jsonl

    repo_id = f"slothflow-test/pinned-{uuid.uuid4().hex[:8]}"
    snap, commit = _hub_layout(tiny_dir, repo_id)
    ref = prepare_base(smoke_model_cfg.model_copy(update={"name_or_path": repo_id}), session_home)
    assert (ref.name_or_path, ref.tokenizer_path, ref.revision) == (repo_id, repo_id, commit)
    assert base_tokenizer_revision(ref) == commit

    newer = "f" * 40
    moved = snap.parent / newer
    shutil.copytree(snap, moved)
    tc = json.loads((moved / "tokenizer_config.json").read_text())
    tc.pop("chat_template", None)
    (moved / "tokenizer_config.json").write_text(json.dumps(tc))
    (moved / "chat_template.jinja").unlink(missing_ok=True)
    (snap.parent.parent / "refs" / "main").write_text(newer)
    assert not AutoTokenizer.from_pretrained(repo_id).chat_template  # main: no template

    tok = load_base_tokenizer(ref)
    assert tok.chat_template == embedded.CHAT_TEMPLATE
    assert template_sha256(tok.chat_template) == ref.chat_template_sha256

    src = write_jsonl(tmp_path / "in.jsonl", good_rows(40))
    cfg = cfg_for(src, val_fraction=0.3, min_tokens=1)
    clean(cfg, tmp_path / "out", ref)
    lf = report_of(tmp_path / "out")["length_filter"]
    assert lf["chat_template"] is True  # the pinned commit's tokenizer, not main's
    assert (lf["tokenizer"], lf["tokenizer_revision"]) == (repo_id, commit)

    # The stage's cache key names the commit: another one is another input.
    assert tokenizer_identity(ref) == f"{repo_id}@{commit}"
    other = ref.model_copy(update={"revision": newer})
    assert inputs_hash(cfg, other) != inputs_hash(cfg, ref) == inputs_hash(cfg, ref)


def test_template_sha256_is_the_recorded_hash() -> None:
    from tasks.core.models import template_sha256

    text = "{{ messages }} — é"
    assert template_sha256(text) == hashlib.sha256(text.encode("utf-8")).hexdigest()
