"""Export: merge, parity and stop checks, manifests, publishing (Hub boundary mocked)."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any, ClassVar

import pytest

from tests import export_fixtures as fx
from tests.recording import RecordingTracker


def _corrupt(merged: Path, scale: float = 0.05, suffix: str = "q_proj.weight") -> None:
    """Shift one weight matrix, as a merge that applied the scaling wrongly would."""
    from safetensors.torch import load_file, save_file

    weights = load_file(merged / "model.safetensors")
    key = next(k for k in weights if k.endswith(suffix))
    weights[key] = weights[key] + scale
    save_file(weights, merged / "model.safetensors", metadata={"format": "pt"})


# --------------------------------------------------------------------------- pure helpers


def test_stop_token_ids_union_of_config_tokenizer_and_template() -> None:
    from tasks.core.models import load_tokenizer
    from tasks.export.checks import stop_token_ids, turn_end_token_id

    tok = load_tokenizer(str(fx.base_dir()))
    eos = tok.eos_token_id
    # The embedded template ends an answer with the EOS token itself.
    assert turn_end_token_id(tok) == eos
    assert stop_token_ids(tok, None) == [eos]
    # A configured list is kept in order and completed, never reordered or duplicated.
    assert stop_token_ids(tok, [5, eos]) == [5, eos]
    assert stop_token_ids(tok, 6) == [6, eos]


def test_relocate_manifest_rewrites_artifact_paths() -> None:
    from tasks.core.artifacts import relocate_manifest

    m = {
        "artifact_path": "/old/adapter",
        "serving": {
            "model": "/bases/tiny",
            "vllm_args": ["--enable-lora", "--lora-modules", "m=/old/adapter"],
        },
    }
    got = relocate_manifest(m, Path("/new/place/adapter"))
    assert got["serving"]["vllm_args"][-1] == "m=/new/place/adapter"
    assert got["serving"]["model"] == "/bases/tiny"  # the base is not inside the artifact
    assert m["serving"]["vllm_args"][-1] == "m=/old/adapter"  # input untouched


@pytest.mark.parametrize(
    ("r", "want"),
    [(1, 8), (8, 8), (9, 16), (24, 32), (64, 64), (65, 128), (257, 320), (321, 512), (512, 512)],
)
def test_max_lora_rank_rounds_up_to_a_value_vllm_accepts(r: int, want: int) -> None:
    from tasks.core.artifacts import VLLM_LORA_RANKS, vllm_args, vllm_max_lora_rank

    assert vllm_max_lora_rank(r) == want
    args = vllm_args("adapter", "m", 256, "bfloat16", Path("/a"), r)
    assert int(args[args.index("--max-lora-rank") + 1]) in VLLM_LORA_RANKS


def test_max_lora_rank_above_what_vllm_serves_is_an_error() -> None:
    from tasks.core.artifacts import ArtifactError, vllm_max_lora_rank

    with pytest.raises(ArtifactError, match="could not be served"):
        vllm_max_lora_rank(513)


def test_adapter_vllm_args_pin_the_trained_base_revision() -> None:
    from tasks.export import vllm_args

    commit = "0123456789abcdef0123456789abcdef01234567"
    hub = vllm_args("adapter", "m", 256, "bfloat16", Path("/a"), 16, commit)
    assert hub[hub.index("--revision") + 1] == commit
    # A local base (no hub commit) and a merged folder have no revision to pin.
    assert "--revision" not in vllm_args("adapter", "m", 256, "bfloat16", Path("/a"), 16, None)
    assert "--revision" not in vllm_args("merged", "m", 256, "bfloat16")


# --------------------------------------------------------------------------- parity


def test_parity_matches_for_a_real_merge_and_catches_a_corrupted_one(tmp_path: Path) -> None:
    from tasks.export import (
        ExportError,
        check_parity,
        load_tokenizer,
        merge_peft,
        probe_merged,
        probe_prompts,
    )

    adapter = fx.random_adapter()
    train = fx.train_ref(adapter)
    merged = tmp_path / "merged"
    merge_peft(train, "float32", "cpu", merged)
    tok = load_tokenizer(str(fx.base_dir()))
    tok.save_pretrained(merged)
    prompts = probe_prompts(tok, fx.data_ref().validation_path, 3)
    base = str(fx.base_dir())

    probe = probe_merged(str(merged), prompts, 1, "float32", "cpu")
    diff = check_parity(probe, base, str(adapter), "float32", "cpu", 1e-3)
    # What is compared: merged logits vs base + unmerged adapter; in float32 only the
    # summation order differs.
    assert diff < 1e-4

    # The adapter really changes the logits, so parity is not trivially satisfied by a
    # merge that silently dropped it: the bare base is far from the merged model.
    from tasks.core.models import load_causal_lm
    from tasks.export.checks import probe_logits

    bare = probe_logits(load_causal_lm(base, "float32", "cpu"), tok, prompts)
    assert max(float((a - b).abs().max()) for a, b in zip(bare, probe.logits, strict=True)) > 1e-2

    _corrupt(merged)
    corrupted = probe_merged(str(merged), prompts, 1, "float32", "cpu")
    with pytest.raises(ExportError, match="parity check failed"):
        check_parity(corrupted, base, str(adapter), "float32", "cpu", 1e-3)


def test_export_loads_the_merge_once_and_reads_the_base_generation_config_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both checks run on one load of the merged folder; the base's generation config
    gives the EOS ids and the written config from one read."""
    import sys

    from transformers import GenerationConfig

    from tasks import export as export_mod
    from tasks.core import models
    from tasks.export import checks, merge

    loads: list[str] = []
    real_load = models.load_causal_lm

    def counting_load(path: str, *args: Any) -> Any:
        loads.append(path)
        return real_load(path, *args)

    gen_reads: list[str] = []
    real_read = GenerationConfig.from_pretrained.__func__

    def counting_read(cls: Any, path: Any, *args: Any, **kw: Any) -> Any:
        if (
            sys._getframe(1).f_globals["__name__"].startswith("tasks.export")
        ):  # not transformers' own
            gen_reads.append(str(path))
        return real_read(cls, path, *args, **kw)

    for module in (merge, checks):  # the merge's own load; the probe's and parity's loads
        monkeypatch.setattr(module, "load_causal_lm", counting_load)
    monkeypatch.setattr(GenerationConfig, "from_pretrained", classmethod(counting_read))
    out = tmp_path / "export"
    train = fx.train_ref(fx.random_adapter())
    cfg = fx.pipeline_cfg(export={"stop_check": "warn"})
    ref = export_mod.export(
        cfg.export,
        train,
        fx.data_ref(),
        out,
        fx.cpu(),
        **fx.export_values(cfg),
        run_id="t",
        code_version="test",
    )
    assert ref.merged_path == str(out / "merged")
    base = train.base.name_or_path
    # The merge's own base load (merge_peft), the merged model, the parity reference.
    assert loads == [base, str(out / "merged.staging"), base]
    # The base's, once; the saved one of the merge, read by the stop check.
    assert gen_reads == [base, str(out / "merged.staging")]


def test_export_stage_fails_when_the_merge_is_corrupted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tasks import export as export_mod

    real_merge = export_mod.merge_peft

    def bad_merge(train: Any, dtype: str, device: str, out: Path) -> None:
        real_merge(train, dtype, device, out)
        _corrupt(out)

    monkeypatch.setattr(export_mod, "merge_peft", bad_merge)
    out = tmp_path / "export"
    # An earlier attempt's merge must not stay servable either.
    (out / "merged").mkdir(parents=True)
    (out / "merged" / "model.safetensors").write_bytes(b"stale")
    cfg = fx.pipeline_cfg()
    with pytest.raises(export_mod.ExportError, match="parity check failed"):
        export_mod.export(
            cfg.export,
            fx.train_ref(fx.random_adapter()),
            fx.data_ref(),
            out,
            fx.cpu(),
            **fx.export_values(cfg),
            run_id="t",
            code_version="test",
        )
    # Nothing under the servable name (`slothflow serve <run>/export/merged` serves any
    # model folder); the rejected merge is kept for inspection, without a manifest.
    assert not (out / "merged").exists()
    assert not (out / "merged.staging").exists()
    assert (out / "merged.rejected" / "model.safetensors").exists()
    assert not (out / "merged.rejected" / "manifest.json").exists()


def test_export_stage_rejects_a_merge_that_does_not_stop(tmp_path: Path) -> None:
    from tasks.export import StopCheckError, export

    out = tmp_path / "export"
    cfg = fx.pipeline_cfg(export={"stop_check": "fail"})
    # The random adapter never learned to end its answer.
    with pytest.raises(StopCheckError, match="did not end on an EOS token"):
        export(
            cfg.export,
            fx.train_ref(fx.random_adapter()),
            fx.data_ref(),
            out,
            fx.cpu(),
            **fx.export_values(cfg),
            run_id="t",
            code_version="test",
        )
    assert not (out / "merged").exists()
    assert (out / "merged.rejected" / "generation_config.json").exists()


def test_export_refuses_a_chat_template_the_base_did_not_record(tmp_path: Path) -> None:
    from tasks.export import ExportError, export

    train = fx.train_ref(fx.random_adapter())
    train = train.model_copy(
        update={"base": train.base.model_copy(update={"chat_template_sha256": "0" * 64})}
    )
    cfg = fx.pipeline_cfg()
    with pytest.raises(ExportError, match="chat template mismatch"):
        export(
            cfg.export,
            train,
            fx.data_ref(),
            tmp_path / "export",
            fx.cpu(),
            **fx.export_values(cfg),
            run_id="t",
            code_version="test",
        )
    assert not (tmp_path / "export").exists()  # refused before writing anything


@pytest.mark.parametrize(
    ("backend", "dtype", "want"),
    [
        ("unsloth", "bfloat16", "unsloth"),
        ("unsloth", "float16", "unsloth"),
        # Unsloth's merged save writes 16-bit only; its adapter is a plain PEFT adapter.
        ("unsloth", "float32", "peft"),
        ("peft", "bfloat16", "peft"),
        ("peft", "float32", "peft"),
    ],
)
def test_merge_method_by_backend_and_dtype(backend: str, dtype: str, want: str) -> None:
    from tasks.export import merge_method

    method, why = merge_method(backend, dtype)
    assert method == want
    assert ("Unsloth's merged 16-bit save" in why) is (want == "unsloth")
    assert ("merge_and_unload" in why) is (want == "peft")


def test_unsloth_adapter_exported_in_float32_is_merged_by_peft(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The embedded default recipe (export.dtype=float32, train.backend=auto → Unsloth on
    CUDA) must export: PEFT merges the Unsloth adapter, Unsloth's 16-bit save is not used."""
    from tasks import export as export_mod
    from tasks.export import gpu_merge

    def no_merge_16bit(*args: Any, **kw: Any) -> dict[str, Any]:
        raise AssertionError("merge_16bit called for a float32 export")

    monkeypatch.setattr(gpu_merge, "merge_16bit", no_merge_16bit)
    peft_calls: list[tuple[str, str]] = []
    real_merge = export_mod.merge_peft

    def recording_merge(train: Any, dtype: str, device: str, out: Path) -> None:
        peft_calls.append((dtype, device))
        real_merge(train, dtype, device, out)

    monkeypatch.setattr(export_mod, "merge_peft", recording_merge)
    train = fx.train_ref(fx.random_adapter()).model_copy(update={"backend": "unsloth"})
    out = tmp_path / "export"
    tracker = RecordingTracker()
    cfg = fx.pipeline_cfg(export={"dtype": "float32", "stop_check": "warn"})
    with caplog.at_level(logging.INFO, logger="tasks.export"):
        ref = export_mod.export(
            cfg.export,
            train,
            fx.data_ref(),
            out,
            fx.cpu(),
            **fx.export_values(cfg),
            run_id="t",
            code_version="test",
            tracker=tracker,
        )
    assert peft_calls == [("float32", "cpu")]
    assert ref.merged_path == str(out / "merged") and ref.dtype == "float32"
    assert (out / "merged" / "model.safetensors").exists()
    assert not (out / "merged.rejected").exists()
    assert ref.parity_max_abs_diff is not None and ref.parity_max_abs_diff <= ref.parity_atol
    assert ref.parity_max_abs_diff < 1e-4  # a real float32 merge, not a 16-bit one
    assert tracker.params["export.merge_method"] == "peft"
    assert "peft merge (train.backend=unsloth, export.dtype=float32" in caplog.text


def test_unsloth_merge_refuses_float32_before_importing_unsloth(tmp_path: Path) -> None:
    """Checked first, so the refusal names the dtype even where Unsloth cannot load."""
    from tasks.export.gpu_merge import merge_16bit

    train = fx.train_ref(fx.random_adapter())
    with pytest.raises(ValueError, match="bfloat16 or float16, not 'float32'"):
        merge_16bit(train.base, train.adapter_path, train.tokenizer_path, tmp_path / "m", "float32")
    assert not (tmp_path / "m").exists()


def test_unsloth_branch_hands_gpu_merge_the_stage_arguments(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The plumbing into ``gpu_merge.merge_16bit`` (our function, replaced by a CPU merge
    here; Unsloth itself is exercised on the device by tests/test_train_gpu.py)."""
    from tasks import export as export_mod
    from tasks.export import gpu_merge

    calls: list[dict[str, Any]] = []

    def cpu_merge_16bit(
        base: Any, adapter_dir: Any, tokenizer_dir: Any, out_dir: Any, **kw: Any
    ) -> dict[str, Any]:
        calls.append(
            {"base": base, "adapter": adapter_dir, "tok": tokenizer_dir, "out": out_dir, **kw}
        )
        export_mod.merge_peft(train, kw["dtype"], "cpu", Path(out_dir))
        return {"path": str(out_dir)}

    monkeypatch.setattr(gpu_merge, "merge_16bit", cpu_merge_16bit)
    train = fx.train_ref(fx.random_adapter()).model_copy(update={"backend": "unsloth"})
    cfg = fx.pipeline_cfg(export={"dtype": "bfloat16", "stop_check": "warn"})
    out = tmp_path / "export"
    tracker = RecordingTracker()
    ref = export_mod.export(
        cfg.export,
        train,
        fx.data_ref(),
        out,
        fx.cpu(),
        **fx.export_values(cfg),
        run_id="t",
        code_version="test",
        tracker=tracker,
    )
    [call] = calls
    assert call["base"] == train.base  # merge_16bit rewrites the adapter's base path to it
    assert (call["adapter"], call["tok"]) == (train.adapter_path, train.tokenizer_path)
    assert Path(call["out"]) == out / "merged.staging"  # checked before it is renamed
    assert call["dtype"] == "bfloat16"
    assert call["max_seq_length"] == cfg.model.max_seq_length
    assert ref.merged_path == str(out / "merged") and ref.dtype == "bfloat16"
    assert tracker.params["export.merge_method"] == "unsloth"
    assert json.loads((out / "merged" / "manifest.json").read_text())["artifact_path"] == str(
        out / "merged"
    )


# --------------------------------------------------------------------------- the full export


@pytest.mark.slow
def test_export_writes_checked_artifacts_and_manifests() -> None:
    from tasks.export import chat_template_sha256, load_tokenizer

    ref = fx.exported("strong")
    merged, adapter = Path(ref.merged_path or ""), Path(ref.adapter_path)
    assert ref.parity_max_abs_diff is not None and ref.parity_max_abs_diff < 1e-4
    assert ref.stop_fraction == 1.0

    # safetensors only, tokenizer and chat template beside the weights
    assert (merged / "model.safetensors").exists()
    assert not list(merged.glob("*.bin")) and not list(adapter.glob("*.bin"))
    assert (adapter / "adapter_model.safetensors").exists()
    tok = load_tokenizer(str(merged))
    template = (merged / "chat_template.jinja").read_text()
    assert template == tok.chat_template
    gen = json.loads((merged / "generation_config.json").read_text())
    eos = gen["eos_token_id"]
    assert tok.eos_token_id in ([eos] if isinstance(eos, int) else eos)

    m = json.loads((merged / "manifest.json").read_text())
    a = json.loads((adapter / "manifest.json").read_text())
    assert m["kind"] == "merged" and a["kind"] == "adapter"
    base = fx.base_ref()
    for man in (m, a):
        assert man["base_model"] == {
            "id": base.name_or_path,
            "revision": base.revision,
            "license": "Apache-2.0",
        }
        assert man["chat_template_sha256"] == chat_template_sha256(template)
        assert man["data_fingerprint"] == fx.data_ref().fingerprint
        assert man["config_hash"] == "c" * 64
        assert man["code_version"] == "test"
        assert man["metrics"]["train.loss"] == 0.1
        assert man["metrics"]["export.parity_max_abs_diff"] == ref.parity_max_abs_diff
    assert m["files"]["model.safetensors"]  # content hashes of what the manifest describes

    # Serving contract: a list of vLLM CLI flags.
    margs = m["serving"]["vllm_args"]
    assert margs[margs.index("--max-model-len") + 1] == "256"
    assert m["serving"]["served_model_name"] == "tiny-topics"
    aargs = a["serving"]["vllm_args"]
    assert "--enable-lora" in aargs
    assert aargs[aargs.index("--lora-modules") + 1] == f"tiny-topics={adapter}"
    assert aargs[aargs.index("--max-lora-rank") + 1] == "64"
    assert a["serving"]["model"] == base.name_or_path


@pytest.mark.slow
def test_stop_check_catches_a_model_whose_eos_was_removed(tmp_path: Path) -> None:
    from tasks.export import (
        StopCheckError,
        check_stop,
        load_tokenizer,
        probe_merged,
        probe_prompts,
    )

    good = Path(fx.exported("strong").merged_path or "")
    prompts = probe_prompts(load_tokenizer(str(good)), fx.data_ref().validation_path, 4)
    assert check_stop(probe_merged(str(good), prompts, 4, "float32", "cpu")) == 1.0

    # The field failure: the exported generation config names a different end token
    # (e.g. <|end_of_text|> where the chat template ends turns with <|eot_id|>).
    broken = tmp_path / "broken"
    shutil.copytree(good, broken)
    gen = json.loads((broken / "generation_config.json").read_text())
    gen["eos_token_id"] = gen["bos_token_id"]
    (broken / "generation_config.json").write_text(json.dumps(gen))
    with pytest.raises(StopCheckError, match="did not end on an EOS token") as info:
        check_stop(probe_merged(str(broken), prompts, 4, "float32", "cpu"))
    assert info.value.fraction == 0.0


# --------------------------------------------------------------------------- publishing


class FakeHfApi:
    """Stands in for huggingface_hub.HfApi: the Hub is the one boundary we mock."""

    calls: ClassVar[list[tuple[str, dict[str, Any]]]] = []

    def __init__(self, token: str | None = None) -> None:
        FakeHfApi.calls.append(("init", {"token": token}))

    #: What the Hub says about the repo after create_repo (an existing repo keeps its own).
    private: ClassVar[bool | None] = True

    def create_repo(self, repo_id: str, **kw: Any) -> None:
        FakeHfApi.calls.append(("create_repo", {"repo_id": repo_id, **kw}))

    def repo_info(self, repo_id: str, **kw: Any) -> Any:
        from types import SimpleNamespace

        FakeHfApi.calls.append(("repo_info", {"repo_id": repo_id, **kw}))
        return SimpleNamespace(id=repo_id, private=FakeHfApi.private)

    def upload_folder(self, **kw: Any) -> None:
        files = sorted(p.name for p in Path(kw["folder_path"]).iterdir())
        FakeHfApi.calls.append(("upload_folder", {**kw, "files": files}))


def _publishable(folder: Path) -> Path:
    from tasks.export import ManifestInfo, write_manifest

    shutil.copytree(fx.random_adapter(), folder)
    info = ManifestInfo(
        base=fx.base_ref(),
        chat_template_sha256="t" * 64,
        data_fingerprint="d" * 64,
        config_hash="c" * 64,
        code_version="abc123",
        run_id="run-1",
        dtype="float32",
        eos_token_ids=[2],
    )
    write_manifest(folder, "adapter", info, {"eval.exact_match": 0.97}, {"vllm_args": ["--x"]})
    return folder


@pytest.fixture
def fake_hub(monkeypatch: pytest.MonkeyPatch) -> type[FakeHfApi]:
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHfApi)
    monkeypatch.setattr(FakeHfApi, "calls", [])
    monkeypatch.setattr(FakeHfApi, "private", True)
    return FakeHfApi


def test_publish_pushes_a_private_repo_with_a_model_card(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    fake_hub: type[FakeHfApi],
) -> None:
    from tasks.export.publish import publish

    folder = _publishable(tmp_path / "adapter")
    secret = "hf_TESTSECRET_never_logged"
    monkeypatch.setenv("SLOTHFLOW_TEST_HF_TOKEN", secret)
    cfg = fx.pipeline_cfg(
        export={
            "publish": True,
            "hub_repo": "acme/tiny-topics",
            "hub_token": {"env": "SLOTHFLOW_TEST_HF_TOKEN"},
        }
    ).export
    with caplog.at_level(logging.DEBUG):
        url = publish(folder, cfg)

    assert url == "https://huggingface.co/acme/tiny-topics"
    kinds = [c[0] for c in FakeHfApi.calls]
    assert kinds == ["init", "create_repo", "repo_info", "upload_folder"]
    assert FakeHfApi.calls[0][1]["token"] == secret  # handed to the client, nowhere else
    assert FakeHfApi.calls[1][1]["private"] is True
    assert "README.md" in FakeHfApi.calls[3][1]["files"]
    card = (folder / "README.md").read_text()
    assert "acme/tiny-topics" in card and "d" * 64 in card and "eval.exact_match" in card
    assert secret not in caplog.text and secret not in card


def test_publish_refuses_an_existing_public_repo(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake_hub: type[FakeHfApi]
) -> None:
    from tasks.core.config import ConfigError
    from tasks.export.publish import publish

    folder = _publishable(tmp_path / "adapter")
    card = (folder / "README.md").read_text()  # PEFT's own card
    monkeypatch.setenv("SLOTHFLOW_TEST_HF_TOKEN", "hf_x")
    fake_hub.private = False  # someone made acme/public-one public on purpose
    cfg = fx.pipeline_cfg(
        export={
            "publish": True,
            "hub_repo": "acme/public-one",
            "hub_token": {"env": "SLOTHFLOW_TEST_HF_TOKEN"},
        }
    ).export
    with pytest.raises(ConfigError, match="is public"):
        publish(folder, cfg)
    assert [c[0] for c in fake_hub.calls] == ["init", "create_repo", "repo_info"]  # no upload
    assert (folder / "README.md").read_text() == card  # nothing written for a refused push


def test_export_publishes_the_artifact_publish_kind_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake_hub: type[FakeHfApi]
) -> None:
    from tasks.export import export

    monkeypatch.setenv("SLOTHFLOW_TEST_HF_TOKEN", "hf_x")
    out = tmp_path / "export"
    tracker = RecordingTracker()
    cfg = fx.pipeline_cfg(
        export={
            "stop_check": "warn",
            "publish": True,
            "publish_kind": "adapter",
            "hub_repo": "acme/tiny-adapter",
            "hub_token": {"env": "SLOTHFLOW_TEST_HF_TOKEN"},
        }
    )
    ref = export(
        cfg.export,
        fx.train_ref(fx.random_adapter()),
        fx.data_ref(),
        out,
        fx.cpu(),
        **fx.export_values(cfg),
        run_id="t",
        code_version="test",
        tracker=tracker,
    )
    assert ref.merged_path is not None  # a merged model exists, yet the adapter is pushed
    [upload] = [kw for kind, kw in fake_hub.calls if kind == "upload_folder"]
    assert upload["folder_path"] == ref.adapter_path
    assert "adapter_model.safetensors" in upload["files"]
    assert tracker.tags["slothflow.hub_repo"] == "https://huggingface.co/acme/tiny-adapter"


def test_publishing_a_merged_model_that_is_not_merged_is_refused_up_front(
    tmp_path: Path,
) -> None:
    from tasks.core.config import ConfigError
    from tasks.export import export

    cfg = fx.pipeline_cfg(
        export={"merge": False, "publish": True, "publish_kind": "merged", "hub_repo": "a/b"}
    )
    with pytest.raises(ConfigError, match=r"publish_kind=merged but export\.merge is false"):
        export(
            cfg.export,
            fx.train_ref(fx.random_adapter()),
            fx.data_ref(),
            tmp_path / "export",
            fx.cpu(),
            **fx.export_values(cfg),
            run_id="t",
            code_version="test",
        )
    assert not (tmp_path / "export").exists()


def test_publish_without_token_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake_hub: type[FakeHfApi]
) -> None:
    from tasks.core.config import ConfigError
    from tasks.export.publish import publish

    monkeypatch.delenv("SLOTHFLOW_TEST_HF_TOKEN", raising=False)
    cfg = fx.pipeline_cfg(
        export={
            "publish": True,
            "hub_repo": "acme/x",
            "hub_token": {"env": "SLOTHFLOW_TEST_HF_TOKEN"},
        }
    ).export
    with pytest.raises(ConfigError, match="SLOTHFLOW_TEST_HF_TOKEN"):
        publish(tmp_path, cfg)


@pytest.mark.gpu
def test_parity_on_cuda_in_bfloat16_within_the_default_tolerance(tmp_path: Path) -> None:
    """On the GPU the export is 16-bit: merged bf16 weights vs bf16 base + adapter."""
    from tasks.export import (
        ExportError,
        check_parity,
        load_tokenizer,
        merge_peft,
        probe_merged,
        probe_prompts,
    )
    from tasks.export.checks import DEFAULT_PARITY_ATOL

    adapter = fx.random_adapter()
    merged = tmp_path / "merged"
    merge_peft(fx.train_ref(adapter), "bfloat16", "cuda", merged)
    tok = load_tokenizer(str(fx.base_dir()))
    tok.save_pretrained(merged)
    prompts = probe_prompts(tok, fx.data_ref().validation_path, 8)
    base = str(fx.base_dir())
    atol = DEFAULT_PARITY_ATOL["bfloat16"]
    probe = probe_merged(str(merged), prompts, 1, "bfloat16", "cuda")
    diff = check_parity(probe, base, str(adapter), "bfloat16", "cuda", atol)
    print(f"bf16 cuda parity max|dlogit| = {diff:.4g} (atol {atol})")
    assert diff <= atol
    # The tiny random model's logits are small, so shift the output layer itself.
    _corrupt(merged, scale=0.5, suffix="lm_head.weight")
    corrupted = probe_merged(str(merged), prompts, 1, "bfloat16", "cuda")
    with pytest.raises(ExportError, match="parity check failed"):
        check_parity(corrupted, base, str(adapter), "bfloat16", "cuda", atol)


def test_cast_saved_recasts_weights_saved_in_another_dtype(tmp_path: Path) -> None:
    """Unsloth's merge keeps a float32 base's dtype (seen on the H200); merge_16bit casts
    the weights to the asked dtype before renaming the folder into place, and leaves the
    tokenizer and generation files the merge wrote."""
    from safetensors import safe_open

    from tasks.export.gpu_merge import cast_saved, saved_dtype

    folder = tmp_path / "merged"
    shutil.copytree(fx.base_dir(), folder)
    (folder / "generation_config.json").write_text('{"eos_token_id": 7}')
    assert saved_dtype(folder) == "float32"
    assert cast_saved(folder, "bfloat16") is True
    assert saved_dtype(folder) == "bfloat16"
    shards = list(folder.glob("*.safetensors"))
    assert shards
    for shard in shards:
        with safe_open(str(shard), "pt") as f:
            dtypes = {str(f.get_tensor(k).dtype) for k in f.keys()}  # noqa: SIM118 (no __iter__)
        assert dtypes == {"torch.bfloat16"}, dtypes
    assert json.loads((folder / "generation_config.json").read_text()) == {"eos_token_id": 7}
    assert (folder / "tokenizer.json").exists()
    assert not list(tmp_path.glob(".*"))  # no staging left behind
    assert cast_saved(folder, "bfloat16") is False  # already right: nothing to do
