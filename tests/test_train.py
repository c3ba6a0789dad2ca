"""Stage ``train``: backend choice, clear errors, label masks, a short run whose loss
falls, checkpoint bookkeeping. The kill-and-resume test is in test_train_resume.py."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import pytest

from bench.sample_data import write_split
from tasks.base_model import prepare_base
from tasks.core.config import ConfigError, PipelineConfig, load_config
from tasks.core.hardware import BackendNotReadyError, HardwareDecision, Probe, decide
from tasks.core.home import Home
from tasks.core.orchestration import is_transient
from tasks.core.refs import BaseModelRef, DataRef
from tasks.train import (
    COMPLETE_MARKER,
    StepJournal,
    build_trainer,
    check_settings,
    data_ref_from_folder,
    last_complete_checkpoint,
    load_peft,
    load_unsloth,
    mark_complete,
    read_chat_rows,
    rotate,
    select_backend,
)
from tests.recording import RecordingTracker
from tests.train_fixtures import run_train

CPU = HardwareDecision("cpu", "peft", "float32", False, "test: cpu")
GPU_UNSLOTH = HardwareDecision("cuda", "unsloth", "bfloat16", True, "test: cuda + unsloth")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> DataRef:
    return write_split(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def smoke() -> PipelineConfig:
    return load_config("ci-smoke")


@pytest.fixture(scope="module")
def base(smoke: PipelineConfig, session_home: Home) -> BaseModelRef:
    return prepare_base(smoke.model, session_home)


# --------------------------------------------------------------------------- choices


def test_backend_dispatch_and_unsloth_is_a_clear_error() -> None:
    assert select_backend(CPU) is load_peft
    assert select_backend(GPU_UNSLOTH) is load_unsloth
    smoke_cfg = load_config("ci-smoke")
    with pytest.raises(BackendNotReadyError, match=r"train\.backend=peft"):
        load_unsloth(smoke_cfg.train, smoke_cfg.model, None, GPU_UNSLOTH)  # type: ignore[arg-type]


def test_settings_checks_name_the_field() -> None:
    with pytest.raises(ConfigError, match=r"train\.save_steps=5 .* train\.eval_steps=3"):
        check_settings(load_config("ci-smoke", ["train.save_steps=5"]).train, CPU)
    with pytest.raises(ConfigError, match=r"train\.gradient_checkpointing='unsloth'"):
        check_settings(load_config("ci-smoke", ["train.gradient_checkpointing=unsloth"]).train, CPU)


def test_hardware_decision_round_trips_through_the_run_context() -> None:
    d = decide(load_config("ci-smoke"), Probe(cuda=False))
    ctx_form = {k.removeprefix("hardware."): v for k, v in d.as_params().items()}
    assert HardwareDecision.from_params(ctx_form) == d
    assert HardwareDecision.from_params(GPU_UNSLOTH.as_params()) == GPU_UNSLOTH


def test_only_io_failures_are_retried() -> None:
    from tasks.core.tracking import TrackingUnavailableError

    assert is_transient(OSError("disk hiccup"))
    assert is_transient(ConnectionResetError())
    assert is_transient(TrackingUnavailableError("mlflow away"))
    assert not is_transient(ConfigError("bad field"))
    assert not is_transient(FileNotFoundError("no such data"))
    assert not is_transient(RuntimeError("shape mismatch"))
    # and through Prefect's retry hook, with the state Prefect builds from the exception
    from prefect.states import Failed

    from tasks.core.orchestration import retry_transient

    assert retry_transient(None, None, Failed(data=OSError("disk hiccup")))
    assert not retry_transient(None, None, Failed(data=ConfigError("bad field")))


def test_data_folder_without_splits_is_refused(tmp_path: Path, data: DataRef) -> None:
    with pytest.raises(ConfigError, match=r"missing train\.jsonl"):
        data_ref_from_folder(tmp_path)
    ref = data_ref_from_folder(Path(data.path))
    assert ref.fingerprint == data.fingerprint and ref.train_rows == data.train_rows


# --------------------------------------------------------------------------- checkpoints


def _ckpt(root: Path, step: int, complete: bool = True) -> Path:
    p = root / f"checkpoint-{step}"
    p.mkdir(parents=True)
    (p / "adapter_model.safetensors").write_bytes(b"x")
    if complete:
        mark_complete(p)
    return p


def test_half_written_checkpoint_is_ignored_for_the_previous_one(tmp_path: Path) -> None:
    _ckpt(tmp_path, 3)
    six = _ckpt(tmp_path, 6)
    torn = _ckpt(tmp_path, 9, complete=False)  # the process died while writing it
    assert last_complete_checkpoint(tmp_path) == six
    assert not torn.exists()  # removed, so the trainer cannot mistake or reuse it
    assert last_complete_checkpoint(tmp_path / "none") is None


def test_rotation_keeps_last_k_plus_best(tmp_path: Path) -> None:
    ck = {s: _ckpt(tmp_path, s) for s in (3, 6, 9, 12, 15)}
    removed = rotate(tmp_path, keep=2, best=ck[6])
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "checkpoint-12",
        "checkpoint-15",
        "checkpoint-6",
    ]
    assert set(removed) == {ck[3], ck[9]}
    assert all((p / COMPLETE_MARKER).exists() for p in tmp_path.iterdir())


def test_checkpoints_removed_after_export_leave_the_finished_stage_valid(tmp_path: Path) -> None:
    """What the flow does once export passed: the checkpoints go, the best adapter and the
    tokenizer stay, and the stage's cached result still names only files that exist (a
    resumed run is served it instead of training again)."""
    from tasks.core.caching import _missing_files
    from tasks.core.refs import TrainRef
    from tasks.train.checkpoints import prepare_checkpoints, remove_checkpoints

    train_dir = tmp_path / "run" / "train"
    ckpts = train_dir / "checkpoints"
    prepare_checkpoints(ckpts, "key")
    for step in (3, 6):
        _ckpt(ckpts, step)
    for part, name in (("adapter", "adapter_model.safetensors"), ("tokenizer", "tokenizer.json")):
        (train_dir / part).mkdir()
        (train_dir / part / name).write_bytes(b"w" * 10)
    # what an earlier removal set aside and did not finish (killed mid-way)
    (train_dir / ".checkpoints.removing-1-2" / "checkpoint-9").mkdir(parents=True)
    (train_dir / ".checkpoints.removing-1-2" / "checkpoint-9" / "x").write_bytes(b"y" * 5)
    base = BaseModelRef(
        stage="base", path="org/m", name_or_path="org/m", revision="r", tokenizer_path="org/m",
        chat_template_sha256="t",
    )  # fmt: skip
    ref = TrainRef(
        stage="train",
        path=str(train_dir),
        adapter_path=str(train_dir / "adapter"),
        tokenizer_path=str(train_dir / "tokenizer"),
        base=base,
        data_fingerprint="f",
        config_hash="c",
        backend="peft",
        best_step=6,
        metrics={},
    )
    assert remove_checkpoints(train_dir) > 5
    assert sorted(p.name for p in train_dir.iterdir()) == ["adapter", "tokenizer"]
    assert _missing_files(ref) == []
    assert remove_checkpoints(train_dir) == 0  # nothing left: harmless again
    assert prepare_checkpoints(ckpts, "key") is None  # a training run again starts over


def test_step_journal_survives_a_torn_line(tmp_path: Path) -> None:
    j = StepJournal(tmp_path / "j.jsonl")
    j.record("train", 1)
    j.record("eval", 3)
    with open(tmp_path / "j.jsonl", "a") as f:
        f.write('{"kind": "train", "st')  # killed mid-write
    again = StepJournal(tmp_path / "j.jsonl")
    assert again.seen("train", 1) and again.seen("eval", 3) and not again.seen("train", 3)


def test_a_point_killed_while_being_sent_reaches_mlflow_once(tmp_path: Path) -> None:
    """A SIGKILL inside the tracker call (the point may or may not have landed) leaves
    an intent without a confirmation. The resumed attempt sends that point again as it
    was recorded, whatever it would compute now, and a real MLflow store ends up with
    it exactly once, in both cases; a confirmed point is not sent again."""
    from mlflow.tracking import MlflowClient

    from tasks.core.tracking import MlflowTracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("journal")).info.run_id
    tracker = MlflowTracker(uri, run_id)
    path = tmp_path / "j.jsonl"

    class Killed(BaseException):
        pass

    class DiesAfterSending:  # the point lands, then the process dies before confirming
        def log_metrics(self, metrics: Any, step: Any = None, timestamp_ms: Any = None) -> None:
            tracker.log_metrics(metrics, step=step, timestamp_ms=timestamp_ms)
            raise Killed

    class DiesBeforeSending:  # dies inside the call before anything lands
        def log_metrics(self, metrics: Any, step: Any = None, timestamp_ms: Any = None) -> None:
            raise Killed

    first = StepJournal(path)
    first.log_metrics_once(tracker, "train", 1, {"train_loss": 2.0})
    with pytest.raises(Killed):
        first.log_metrics_once(
            DiesAfterSending(), "train", 2, {"train_loss": 1.5, "tokens_per_s": 10.0}
        )  # type: ignore[arg-type]
    with pytest.raises(Killed):
        first.log_metrics_once(DiesBeforeSending(), "train", 3, {"train_loss": 1.2})  # type: ignore[arg-type]

    resumed = StepJournal(path)
    assert resumed.seen("train", 1) and not resumed.seen("train", 2)
    for step, now in ((1, 9.9), (2, 1.5), (3, 1.2)):  # the replay: tokens/s is wall time
        resumed.log_metrics_once(tracker, "train", step, {"train_loss": now, "tokens_per_s": 99.0})
    loss = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "train_loss"))
    assert loss == [(1, 2.0), (2, 1.5), (3, 1.2)]
    speed = [(m.step, m.value) for m in client.get_metric_history(run_id, "tokens_per_s")]
    assert speed == [(2, 10.0)]  # step 2 as first sent; step 3 was recorded without it
    assert all(StepJournal(path).seen("train", s) for s in (1, 2, 3))


def test_a_checkpoint_without_a_loss_sum_rebuilds_it_from_its_logged_losses(
    tmp_path: Path,
) -> None:
    """Checkpoints written before they carried the sum: each logged loss is the mean
    over its logging window, so it counts once per step of that window."""
    from tasks.train import LOSS_SUM_FILE, carried_loss_sum

    ck = _ckpt(tmp_path, 6)
    history = [
        {"loss": 3.0, "step": 2},
        {"eval_loss": 9.0, "step": 3},
        {"loss": 2.0, "step": 4},
        {"loss": 1.5, "step": 6},
    ]
    (ck / "trainer_state.json").write_text(json.dumps({"global_step": 6, "log_history": history}))
    assert carried_loss_sum(ck) == pytest.approx(3.0 * 2 + 2.0 * 2 + 1.5 * 2)
    (ck / LOSS_SUM_FILE).write_text(json.dumps({"step": 6, "train_loss_sum": 11.25}))
    assert carried_loss_sum(ck) == 11.25  # what the checkpoint stored wins
    assert carried_loss_sum(None) == 0.0


# --------------------------------------------------------------------------- the trainer


def test_assistant_only_loss_masks_everything_but_the_answer(
    smoke: PipelineConfig, base: BaseModelRef, data: DataRef, tmp_path: Path
) -> None:
    rows = read_chat_rows(data.train_path)[:8]
    model, tok = load_peft(smoke.train, smoke.model, base, CPU)
    trainer = build_trainer(smoke.train, smoke.model, CPU, model, tok, rows, rows[:2], tmp_path)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(rows))])
    for ids, labels, row in zip(batch["input_ids"], batch["labels"], rows, strict=True):
        kept = [int(i) for i, lab in zip(ids, labels, strict=True) if lab != -100]
        # exactly the answer and the end-of-turn token that teaches the model to stop
        assert tok.decode(kept) == row["messages"][-1]["content"] + tok.eos_token
        assert (labels != -100).sum() < len(ids) // 4


def test_rows_over_max_seq_length_are_counted_truncated_and_dropped(
    base: BaseModelRef, data: DataRef, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """TRL truncates rows longer than max_seq_length and drops those left without an answer
    token; the stage counts both (metrics ``train_rows_truncated``/``_dropped``)."""
    from tasks.core.tokens import chat_token_lengths
    from tasks.train import length_fit

    cfg = load_config("ci-smoke", ["data.max_tokens=64", "model.max_seq_length=64"])
    rows = read_chat_rows(data.train_path)[:6]
    long_answer = {
        "messages": [*rows[0]["messages"][:-1], {"role": "assistant", "content": "7 " * 30}]
    }
    long_prompt = {"messages": [{"role": "user", "content": "9 " * 60}, rows[1]["messages"][-1]]}
    rows = [*rows, long_answer, long_prompt]
    model, tok = load_peft(cfg.train, cfg.model, base, CPU)
    lengths = chat_token_lengths(tok, [r["messages"] for r in rows])
    # the count is exactly what apply_chat_template(tokenize=True) gives the trainer
    assert lengths == [
        len(tok.apply_chat_template(r["messages"], tokenize=True, return_dict=False)) for r in rows
    ]
    assert sum(n > 64 for n in lengths) == 2, lengths
    trainer = build_trainer(cfg.train, cfg.model, CPU, model, tok, rows, rows[:2], tmp_path)
    assert len(trainer.train_dataset) == len(rows) - 1  # the prompt-only row is gone
    with caplog.at_level("WARNING", logger="tasks.train"):
        fit = length_fit(cfg.train, cfg.model.max_seq_length, lengths, len(trainer.train_dataset))
    assert fit == {"train_rows_truncated": 1, "train_rows_dropped": 1}
    assert "2 of 8 training rows are longer than model.max_seq_length=64" in caplog.text


def test_full_sequence_loss_when_configured(
    smoke: PipelineConfig, base: BaseModelRef, data: DataRef, tmp_path: Path
) -> None:
    cfg = load_config("ci-smoke", ["train.assistant_only_loss=false"])
    rows = read_chat_rows(data.train_path)[:2]
    model, tok = load_peft(cfg.train, cfg.model, base, CPU)
    trainer = build_trainer(cfg.train, cfg.model, CPU, model, tok, rows, rows, tmp_path)
    batch = trainer.data_collator([trainer.train_dataset[0]])
    assert (batch["labels"] != -100).sum() == batch["attention_mask"].sum()


def test_trained_tokens_are_counted_once_per_step_without_padding(
    smoke: PipelineConfig, base: BaseModelRef, data: DataRef, tmp_path: Path
) -> None:
    """The trainer state's token count (what tokens/s and checkpoints use) is the answer
    to "how many real tokens were trained on": one epoch of rows of different lengths,
    padded in each micro-batch, counts every row's own length exactly once. The loss
    sum behind the final train_loss is the trainer's own, gradient accumulation and all."""
    from tasks.train import LossSum, TokenCounter, train_callback_cls

    cfg = load_config(
        "ci-smoke",
        ["train.micro_batch_size=3", "train.grad_accum=2", "train.max_steps=2"],
    )
    rows = read_chat_rows(data.train_path)[:12]
    model, tok = load_peft(cfg.train, cfg.model, base, CPU)
    tokens, loss_sum = TokenCounter(), LossSum()
    cb = train_callback_cls()(
        tracker=RecordingTracker(),
        journal=StepJournal(tmp_path / "j.jsonl"),
        ckpt_dir=tmp_path / "ckpt",
        keep=1,
        samples=[],
        tokenizer=tok,
        max_new_tokens=2,
        tokens=tokens,
        loss_sum=loss_sum,
    )
    trainer = build_trainer(
        cfg.train,
        cfg.model,
        CPU,
        model,
        tok,
        rows,
        rows[:2],
        tmp_path / "ckpt",
        [cb],
        tokens,
        loss_sum,
    )
    lengths = [len(r["input_ids"]) for r in trainer.train_dataset]
    assert len(set(lengths)) > 1  # micro-batches carry padding
    out = trainer.train()
    # 2 optimizer steps x 2 micro-batches x 3 rows = the 12 rows, each once
    assert trainer.state.num_input_tokens_seen == sum(lengths)
    assert tokens.take() == 0  # nothing left pending after the last step
    # uninterrupted, the run's mean step loss is transformers' train_loss
    assert loss_sum.total() / 2 == pytest.approx(out.training_loss, rel=1e-6)
    steps = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(steps) == 2 and out.training_loss == pytest.approx(sum(steps) / 2, rel=1e-6)


def test_padding_free_off_pads_and_auto_leaves_the_choice_to_the_backend(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """'off' is passed to TRL as padding_free=False (padded rows);
    'auto' passes nothing, so Unsloth's own SFTConfig default (None: it decides) holds."""
    import trl

    from tasks.train import sft_config

    off = load_config("ci-smoke", ["train.padding_free=off"])  # YAML's bare off: a boolean
    assert off.train.padding_free == "off"
    assert sft_config(off.train, off.model, CPU, tmp_path).padding_free is False
    with pytest.raises(ConfigError, match=r"train\.packing=true .* train\.padding_free=off"):
        check_settings(
            load_config("ci-smoke", ["train.packing=true", "train.padding_free=off"]).train, CPU
        )
    with pytest.raises(ConfigError, match=r"train\.padding_free"):
        load_config("ci-smoke", ["train.padding_free=on"])  # TRL alone cannot honour it
    # what 'auto' hands SFTConfig: no padding_free at all (recorded, not built)
    seen: dict[str, Any] = {}
    monkeypatch.setattr(trl, "SFTConfig", lambda **kwargs: seen.update(kwargs))
    smoke_cfg = load_config("ci-smoke")
    sft_config(smoke_cfg.train, smoke_cfg.model, CPU, tmp_path)
    assert seen and "padding_free" not in seen


def test_token_metrics_need_cuda() -> None:
    cfg = load_config("ci-smoke", ["train.token_metrics=true"])
    with pytest.raises(ConfigError, match=r"train\.token_metrics=true needs CUDA"):
        check_settings(cfg.train, CPU)


@pytest.fixture(scope="module")
def short_run(
    smoke: PipelineConfig,
    base: BaseModelRef,
    data: DataRef,
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Any, RecordingTracker, Path]:
    cfg = load_config(
        "ci-smoke", ["train.max_steps=16", "train.eval_steps=8", "train.save_steps=8"]
    )
    out = tmp_path_factory.mktemp("train")
    tracker = RecordingTracker()
    return run_train(cfg, base, data, out, CPU, tracker), tracker, out


def test_short_run_loss_falls_and_exports_the_best_adapter(
    short_run: tuple[Any, RecordingTracker, Path],
) -> None:
    ref, tracker, _out = short_run
    losses = [v for _, v in tracker.series("train_loss")]
    assert len(losses) == 16
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.3, losses
    evals = tracker.series("eval_loss")
    assert [s for s, _ in evals] == [8, 16]
    assert ref.best_step == min(evals, key=lambda e: e[1])[0]
    assert ref.metrics["best_eval_loss"] == pytest.approx(min(v for _, v in evals))
    adapter = Path(ref.adapter_path)
    assert {"adapter_model.safetensors", "adapter_config.json"} <= {
        p.name for p in adapter.iterdir()
    }
    assert not list(adapter.glob("*.bin"))
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 8
    assert (Path(ref.tokenizer_path) / "tokenizer.json").exists()
    assert ref.backend == "peft" and ref.data_fingerprint
    # every row the data stage kept fits: nothing truncated or dropped by TRL
    assert ref.metrics["train_rows_truncated"] == 0 == ref.metrics["train_rows_dropped"]


def test_short_run_tracks_what_the_issue_lists(
    short_run: tuple[Any, RecordingTracker, Path],
) -> None:
    ref, tracker, out = short_run
    for key in ("train_loss", "learning_rate", "grad_norm", "tokens_per_s", "eval_loss"):
        assert tracker.series(key), key
    assert all(v > 0 for _, v in tracker.series("tokens_per_s"))
    steps = [s for s, _ in tracker.series("train_loss")]
    assert steps == sorted(set(steps))  # one value per step
    assert set(tracker.dicts) == {"samples/step-000008.json", "samples/step-000016.json"}
    sample = tracker.dicts["samples/step-000016.json"]["samples"][0]
    assert set(sample) == {"prompt", "expected", "generated"}
    logged = {a for _, a in tracker.artifacts}
    assert {"adapter", "tokenizer", "trainer"} <= logged
    assert "checkpoints" not in " ".join(str(p) for p, _ in tracker.artifacts)
    assert "config/resolved.yaml" in tracker.texts
    # the summary train_loss: the mean of the 16 per-step losses (logging_steps=1)
    losses = [v for _, v in tracker.series("train_loss")]
    assert len(losses) == 16
    assert ref.metrics["train_loss"] == pytest.approx(sum(losses) / 16, rel=1e-6)
    assert tracker.inputs == ["train", "validation"]
    assert tracker.tags["slothflow.best_step"] == str(ref.best_step)
    # last K (2) complete checkpoints plus the best, nothing else
    kept = sorted(p.name for p in (out / "checkpoints").glob("checkpoint-*"))
    assert kept == ["checkpoint-16", "checkpoint-8"]


def test_packed_batches_keep_documents_apart_on_cpu(
    base: BaseModelRef, data: DataRef, tmp_path: Path
) -> None:
    """Packing (TRL's best-fit, padding-free) flattens rows into one sequence with
    restarting position ids; transformers then builds a block-diagonal mask for sdpa.
    The packed loss must equal the rows' losses computed one by one."""
    import torch

    cfg = load_config("ci-smoke", ["train.packing=true", "train.early_stopping_patience=2"])
    rows = read_chat_rows(data.train_path)[:6]
    model, tok = load_peft(cfg.train, cfg.model, base, CPU)
    trainer = build_trainer(cfg.train, cfg.model, CPU, model, tok, rows, rows[:2], tmp_path)
    from transformers import EarlyStoppingCallback

    assert any(isinstance(c, EarlyStoppingCallback) for c in trainer.callback_handler.callbacks)
    batch = trainer.data_collator(
        [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))]
    )
    assert "attention_mask" not in batch and batch["input_ids"].shape[0] == 1
    pos = batch["position_ids"][0]
    starts = [*(i for i in range(len(pos)) if pos[i] == 0), len(pos)]
    assert len(starts) - 1 == len(rows)  # every row packed, none cut

    model.eval()
    with torch.no_grad():
        packed = model(**{k: batch[k] for k in ("input_ids", "position_ids")}).logits[0]
        for a, b in itertools.pairwise(starts):
            alone = model(input_ids=batch["input_ids"][:, a:b]).logits[0]
            torch.testing.assert_close(packed[a:b], alone, rtol=1e-4, atol=1e-4)


def test_cli_train_names_what_is_wrong(data: DataRef, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from slothflow.cli import app

    runner = CliRunner()
    r = runner.invoke(app, ["train", "--data", data.path, "-r", "ci-smoke", "--run-id", "nope-1"])
    assert r.exit_code == 2 and "cannot resume 'nope-1'" in r.output, r.output
    r = runner.invoke(app, ["train", "--data", str(tmp_path), "-r", "ci-smoke"])
    assert r.exit_code == 2 and "no train.jsonl" in r.output, r.output


# --------------------------------------------------------------------------- GPU decisions
# The decisions below are pure functions of config, model shape and free memory; they
# are checked here on CPU. Their effect on a real GPU is in tests/test_train_gpu.py.

H200 = HardwareDecision("cuda", "unsloth", "bfloat16", True, "test: H200", "NVIDIA H200", 139.8)


def _llama3_8b_config() -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
    )


def test_unsloth_falls_back_to_peft_for_other_architectures_only_under_auto() -> None:
    from tasks.core.hardware import for_model

    auto = load_config("llama3-8b-qlora", ["train.backend=auto"])
    assert for_model(auto.train.backend, H200, "llama") is H200
    fallback = for_model(auto.train.backend, H200, "phi3")
    assert fallback.backend == "peft" and fallback.load_in_4bit and fallback.dtype == "bfloat16"
    assert "no kernels for model_type 'phi3'" in fallback.reason
    with pytest.raises(ConfigError, match=r"train\.backend='unsloth' but Unsloth has no kernels"):
        for_model(load_config("llama3-8b-qlora").train.backend, H200, "phi3")


def test_auto_checkpointing_is_off_when_the_activations_fit() -> None:
    from tasks.train import activation_bytes, choose_gradient_checkpointing

    cfg = load_config("llama3-8b-qlora", ["train.gradient_checkpointing=auto"])
    shape = _llama3_8b_config()
    need = activation_bytes(shape, 4, 2048)
    # 8B, micro-batch 4 x 2048: 27.5 GiB of layer activations + 7.8 GiB of fp32 logits
    # (measured on the H200: 35.7 GiB peak, 4-bit weights included)
    assert 34 * 2**30 < need < 37 * 2**30
    roomy = choose_gradient_checkpointing(
        cfg.train, cfg.model.max_seq_length, H200, shape, 130 * 2**30
    )  # an H200 after load
    assert roomy.mode is False and roomy.label == "off"
    assert roomy.reason.endswith("off, no recompute") and "GiB free" in roomy.reason
    tight = choose_gradient_checkpointing(
        cfg.train, cfg.model.max_seq_length, H200, shape, 40 * 2**30
    )  # a 48 GB card
    assert tight.mode == "unsloth" and "unsloth (offloaded)" in tight.reason
    # explicit settings are honoured as they are, on every backend
    for mode, want in (("on", True), ("off", False), ("unsloth", "unsloth")):
        c = load_config("llama3-8b-qlora", [f"train.gradient_checkpointing={mode}"])
        assert (
            choose_gradient_checkpointing(
                c.train, c.model.max_seq_length, H200, shape, 130 * 2**30
            ).mode
            == want
        )
    # PEFT keeps its rule: on with CUDA, off on CPU; the trainer's flag is Unsloth's to set
    peft_gpu = HardwareDecision("cuda", "peft", "bfloat16", True, "test")
    assert (
        choose_gradient_checkpointing(
            cfg.train, cfg.model.max_seq_length, peft_gpu, shape, None
        ).mode
        is True
    )
    assert (
        choose_gradient_checkpointing(load_config("default").train, 2048, CPU, None, None).mode
        is False
    )


def test_the_trainers_checkpointing_flag_is_for_peft_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Unsloth arms its checkpointing in get_peft_model; the trainer's own flag would
    wrap the model a second time. PEFT on CUDA turns it on under 'auto'. (SFTConfig is
    recorded, not built: bf16 arguments refuse to build without a GPU.)"""
    import trl

    from tasks.train import sft_config

    seen: dict[str, Any] = {}
    monkeypatch.setattr(trl, "SFTConfig", lambda **kwargs: seen.update(kwargs))
    cfg = load_config("llama3-8b-qlora", ["train.gradient_checkpointing=auto"])
    sft_config(cfg.train, cfg.model, H200, tmp_path)
    assert seen["gradient_checkpointing"] is False
    sft_config(
        cfg.train, cfg.model, HardwareDecision("cuda", "peft", "bfloat16", True, "test"), tmp_path
    )
    assert seen["gradient_checkpointing"] is True
    default = load_config("default")
    sft_config(default.train, default.model, CPU, tmp_path)
    assert seen["gradient_checkpointing"] is False


def test_mfu_counts_flops_like_the_gpu_baseline() -> None:
    """``../shared/gpu/README.md``: raw Unsloth on the 8B shape, 11,294 tokens/s = 36.4%
    MFU of 989 TFLOP/s, counting 4 N_frozen + 6 N_lora + attention."""
    from tasks.train import flops_per_token, peak_flops

    lora_8b = 32 * 16 * ((4096 + 4096) * 2 + 2 * (4096 + 1024) + 2 * (4096 + 14336) + 18432)
    fpt = flops_per_token(_llama3_8b_config(), 2048, lora_8b)
    assert 11294 * fpt / 989e12 == pytest.approx(0.364, abs=0.001)
    assert peak_flops("NVIDIA H200") == peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops("NVIDIA A100-SXM4-80GB") == 312e12  # torch's name: no spaces to split
    assert peak_flops("NVIDIA GeForce RTX 3090") is None and peak_flops(None) is None


def test_out_of_memory_is_recognised_and_the_message_names_the_knobs() -> None:
    import torch

    from tasks.train import TrainOutOfMemoryError, is_cuda_oom, oom_message

    assert is_cuda_oom(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"))
    assert is_cuda_oom(RuntimeError("CUDA out of memory. Tried to allocate 20.00 MiB"))
    assert not is_cuda_oom(RuntimeError("shape mismatch")) and not is_cuda_oom(OSError("x"))
    cfg = load_config("llama3-8b-qlora")
    msg = oom_message(
        cfg.train,
        cfg.model.max_seq_length,
        H200,
        torch.OutOfMemoryError("CUDA out of memory. Tried 9 GiB\nmore"),
    )
    for knob in (
        "train.micro_batch_size=4",
        "train.grad_accum=4",
        "model.max_seq_length=2048",
        "train.lora.r=16",
        "train.gradient_checkpointing=unsloth",
        "Tried 9 GiB",
    ):
        assert knob in msg, knob
    # not retried by Prefect: the same settings run out of memory the same way
    assert not is_transient(TrainOutOfMemoryError(msg))


def test_system_metrics_reach_the_mlflow_run_while_training_on_cuda(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The wiring only: MLflow's own monitor, started for the stage's run, samples and logs
    (here CPU/memory/disk; GPU utilisation and memory need a GPU and pynvml)."""
    import time

    from mlflow.tracking import MlflowClient

    from tasks import train as train_mod
    from tasks.core.tracking import MlflowTracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    run = client.create_run(client.create_experiment("sysmetrics"))
    tracker = MlflowTracker(uri, run.info.run_id)
    monkeypatch.setattr(train_mod, "SYSTEM_METRICS_INTERVAL_S", 0.5)
    with train_mod._system_metrics(tracker, CPU):  # not CUDA: no monitor
        time.sleep(1.2)
    with train_mod._system_metrics(tracker, H200, enabled=False):  # tracking.system_metrics
        time.sleep(1.2)
    assert not client.get_run(run.info.run_id).data.metrics
    with train_mod._system_metrics(tracker, H200):
        time.sleep(1.6)
    keys = set(client.get_run(run.info.run_id).data.metrics)
    assert any(k.startswith("system/cpu_utilization") for k in keys), keys


def test_auto_padding_pads_rows_of_one_length_and_leaves_ragged_ones_padding_free() -> None:
    """``train.padding_free: auto`` on Unsloth: rows of about one length (the 8B bench's
    2048-token rows, rows cut at the limit) get padded batches, so Unsloth's compiled
    decoder blocks run; ragged rows keep Unsloth's padding-free batches; the PEFT
    backend, packing and an explicit setting are left alone. The reason names the waste."""
    from tasks.train import choose_padding, pad_waste

    t = load_config("llama3-8b-qlora", ["train.packing=false"]).train
    same = [2048] * 64
    assert pad_waste(same, 4, 2048) == 0.0
    assert 0.1 < pad_waste([10, 30] * 32, 2, 2048) < 1 / 3  # a mixed pair wastes 1/3
    assert pad_waste([3000, 2048, 5000, 2048], 4, 2048) == 0.0  # cut at the limit
    choice = choose_padding(t, H200, same, 2048)
    assert choice.mode == "off" and "0.0% of the tokens" in choice.reason
    ragged = [int(40 + 30 * (i % 7)) for i in range(300)]
    choice = choose_padding(t, H200, ragged, 2048)
    assert choice.mode == "auto" and "Unsloth's choice" in choice.reason
    assert choose_padding(t, CPU, same, 2048).mode == "auto"  # TRL pads anyway
    packed = load_config("llama3-8b-qlora").train
    assert choose_padding(packed, H200, same, 2048).mode == "auto"
    off = t.model_copy(update={"padding_free": "off"})
    assert choose_padding(off, H200, ragged, 2048).mode == "off"


# --------------------------------------------------------------------------- warm start


def _as_champion(adapter: Path, base: BaseModelRef, dst: Path, **base_update: str) -> Any:
    """A trained adapter as a registered version holds it (the adapter folder with the
    manifest export writes, recording ``base`` changed by ``base_update``), handed over as
    the flow hands the champion's over."""
    import shutil

    from tasks.core.artifacts import ManifestInfo, init_adapter_of, read_manifest, write_manifest
    from tasks.core.refs import ResolvedModel

    shutil.copytree(adapter, dst)
    recorded = base.model_copy(update=base_update)
    info = ManifestInfo(
        recorded, recorded.chat_template_sha256, "d", "c", "test", "r", "float32", [0]
    )
    write_manifest(dst, "adapter", info, {}, {})
    version = ResolvedModel(
        "tiny/1", dst, read_manifest(dst), "tiny/1 (champion)", "tiny", 1, adapter_path=dst
    )
    return init_adapter_of(version)


def test_a_warm_start_begins_from_the_adapters_weights(
    short_run: tuple[Any, RecordingTracker, Path],
    base: BaseModelRef,
    data: DataRef,
    tmp_path: Path,
) -> None:
    """``train.init_adapter=champion``: the fresh LoRA's B matrices are zeros, a warm
    start's are the champion's, so its first loss is already about where the cold run's
    16 steps ended; the MLflow run names the version it started from."""
    import torch
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file

    from tasks.train import load_init_weights

    cold, cold_tracker, _ = short_run
    init = _as_champion(Path(cold.adapter_path), base, tmp_path / "champion")
    cfg = load_config(
        "ci-smoke",
        [
            "train.init_adapter=champion",
            "train.max_steps=1",
            "train.eval_steps=1",
            "train.save_steps=1",
        ],
    )
    model, _tok = load_peft(cfg.train, cfg.model, base, CPU)
    fresh = get_peft_model_state_dict(model)
    assert all(not v.any() for k, v in fresh.items() if "lora_B" in k)
    load_init_weights(model, init)
    saved = load_file(str(tmp_path / "champion" / "adapter_model.safetensors"))
    loaded = get_peft_model_state_dict(model)
    assert loaded.keys() == saved.keys()
    assert all(torch.equal(loaded[k], saved[k]) for k in saved)
    assert any(v.any() for k, v in saved.items() if "lora_B" in k)

    tracker = RecordingTracker()
    run_train(cfg, base, data, tmp_path / "warm", CPU, tracker, init_adapter=init)
    cold_losses = [v for _, v in cold_tracker.series("train_loss")]
    warm_first = tracker.series("train_loss")[0][1]
    # the same first batch (same seed and rows): only the starting weights differ
    assert warm_first < cold_losses[0] - 0.2, (warm_first, cold_losses)
    assert abs(warm_first - cold_losses[-1]) < 0.2, (warm_first, cold_losses)
    assert tracker.tags["slothflow.init_adapter"] == "tiny/1"
    assert cold_tracker.tags["slothflow.init_adapter"] == "none"


def test_a_warm_start_that_does_not_fit_is_refused_before_the_base_loads(
    short_run: tuple[Any, RecordingTracker, Path],
    base: BaseModelRef,
    data: DataRef,
    tmp_path: Path,
) -> None:
    """Another base revision, another LoRA shape, a file changed since its manifest, a
    champion with merged weights only: one line naming train.init_adapter, in the time it
    takes to read a manifest, with nothing written."""
    import time

    from tasks.core.artifacts import init_adapter_of
    from tasks.core.refs import ResolvedModel

    adapter = Path(short_run[0].adapter_path)
    cfg = load_config("ci-smoke", ["train.init_adapter=champion"])
    other = _as_champion(adapter, base, tmp_path / "other", revision="sha256:" + "0" * 64)
    cases = [
        (cfg, other, r"\(tiny/1\) was trained on .* @ sha256:0{64}, but this run's base is"),
        (
            load_config("ci-smoke", ["train.init_adapter=champion", "train.lora.r=16"]),
            _as_champion(adapter, base, tmp_path / "same"),
            r"another LoRA shape \(train\.lora\.r=16 vs 8\)",
        ),
    ]
    for i, (config_, init, says) in enumerate(cases):
        t0 = time.monotonic()
        out = tmp_path / f"out-{i}"
        with pytest.raises(ConfigError, match=r"^train\.init_adapter=champion .*" + says):
            run_train(config_, base, data, out, CPU, init_adapter=init)
        assert time.monotonic() - t0 < 5 and not out.exists()
    tampered = _as_champion(adapter, base, tmp_path / "tampered")
    (Path(tampered.path) / "adapter_config.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"adapter_config\.json is not the file its manifest"):
        run_train(cfg, base, data, tmp_path / "out", CPU, init_adapter=tampered)
    merged_only = ResolvedModel("tiny@champion", tmp_path, {}, "tiny/3", "tiny", 3)
    with pytest.raises(ConfigError, match=r"^train\.init_adapter=champion: tiny/3 has merged"):
        init_adapter_of(merged_only)


def test_the_train_cache_key_names_the_adapter_a_warm_start_begins_from(
    short_run: tuple[Any, RecordingTracker, Path], base: BaseModelRef, data: DataRef, tmp_path: Path
) -> None:
    """Prefect's key of the train task: a warm start from v2 is not served the training
    that started from v1; the same weights under another version number are."""
    from tasks.core.artifacts import InitAdapter
    from tasks.core.refs import RunContext
    from tasks.train import train_task

    v1 = _as_champion(Path(short_run[0].adapter_path), base, tmp_path / "v1")
    v2 = v1.model_copy(update={"label": "tiny/2", "files": {**v1.files, "x": "changed"}})
    same_weights = InitAdapter(path="/elsewhere", label="tiny/7", files=v1.files)
    hardware = {k.removeprefix("hardware."): v for k, v in CPU.as_params().items()}
    ctx = RunContext(
        run_id="r", run_dir=str(tmp_path), config_hash="c", code_version="v", hardware=hardware
    )
    cfg = load_config("ci-smoke", ["train.init_adapter=champion"])
    args = {"ctx": ctx, "cfg": cfg.train, "model": cfg.model, "base": base, "data": data}
    key = train_task.cache_policy.key_of  # type: ignore[attr-defined]
    keys = [key({**args, "init_adapter": i}) for i in (None, v1, v2, same_weights)]
    assert len(set(keys[:3])) == 3 and keys[3] == keys[1]


def test_the_flow_hands_training_the_champions_adapter_from_the_registry(
    short_run: tuple[Any, RecordingTracker, Path],
    base: BaseModelRef,
    mlflow_server: str,
    tmp_path: Path,
) -> None:
    """The pipeline's warm-start step (flows/pipeline.py ``_gpu_part``: the champion task,
    then ``_warm_start``) on a real MLflow server's registry, without Prefect (its run
    logger silenced: a temporary Prefect server costs more than the rest of the test). No
    champion yet: a fresh LoRA; a champion with an adapter: that adapter, downloaded from
    the registry, passing the train stage's checks; merged weights only: refused."""
    import uuid

    from prefect.logging import disable_run_logger

    from flows.pipeline import _warm_start
    from tasks.core.artifacts import ManifestInfo, read_manifest, write_manifest
    from tasks.core.refs import RunContext
    from tasks.core.tracking import registry as reg
    from tasks.registry import champion_task
    from tasks.train import check_init_adapter

    uri, name = mlflow_server, f"tiny-{uuid.uuid4().hex[:8]}"
    ctx = RunContext(
        run_id="r",
        run_dir=str(tmp_path / "run"),
        config_hash="c",
        code_version="v",
        hardware={},
        tracking={"tracking_uri": uri},
    )

    def warm_start() -> Any:  # _gpu_part's lines under train.init_adapter=champion
        with disable_run_logger():
            return _warm_start(ctx, name, champion_task.fn(ctx, name))

    client = reg.client(uri)
    experiment = client.create_experiment(name)

    def register(kind: str, folder: Path) -> int:  # and make it champion
        reg.ensure_registered_model(client, name)
        run = client.create_run(experiment).info.run_id
        manifests = {kind: read_manifest(folder)}
        version = reg.create_version(
            client, name, run, {kind: folder}, manifests, tags={}, description=""
        )
        reg.promote(name, version.number, uri)
        return version.number

    assert warm_start() is None

    adapter = Path(_as_champion(Path(short_run[0].adapter_path), base, tmp_path / "a").path)
    assert register("adapter", adapter) == 1
    init = warm_start()
    assert init.label == f"{name}/1" and init.files == read_manifest(adapter)["files"]
    assert Path(init.path) != adapter  # the copy downloaded from the server
    check_init_adapter(init, load_config("ci-smoke").train.lora, base)

    merged = tmp_path / "merged"
    merged.mkdir()
    write_manifest(merged, "merged", ManifestInfo(base, "t", "d", "c", "v", "r", "f", []), {}, {})
    assert register("merged", merged) == 2
    with pytest.raises(ConfigError, match=rf"^train\.init_adapter=champion: {name}/2 has merged"):
        warm_start()


def test_cli_train_refuses_a_warm_start_it_cannot_look_up(data: DataRef) -> None:
    from typer.testing import CliRunner

    from slothflow.cli import app

    args = ["train", "--data", data.path, "-r", "ci-smoke", "--set", "train.init_adapter=champion"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 2 and "`slothflow train` starts from the base model" in r.output
