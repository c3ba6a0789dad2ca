"""Kill-and-resume: SIGKILL `slothflow train` after a checkpoint, run it again for the same
run, and check that it resumed (not restarted), that the adapter equals an uninterrupted
run's, and that MLflow holds every step exactly once, in one stage run."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.sample_data import write_split
from tasks.base_model import prepare_base
from tasks.core.config import load_config
from tasks.core.hardware import HardwareDecision
from tasks.core.home import Home
from tasks.core.refs import TrainRef
from tasks.train import COMPLETE_MARKER
from tests.conftest import BIN, REPO, clean_env
from tests.recording import RecordingTracker
from tests.train_fixtures import run_train

#: Long enough that the kill (after step 7) lands far from the end even when a loaded
#: machine makes the 20 ms poller late by many steps; short enough for a quick test.
MAX_STEPS = 30
SETS = [
    f"train.max_steps={MAX_STEPS}",
    "train.eval_steps=3",
    "train.save_steps=3",
    "train.logging_steps=1",
]
CPU = HardwareDecision("cpu", "peft", "float32", False, "no CUDA device")


@contextlib.contextmanager
def _slothflow(
    args: list[str], env: dict[str, str], log: Path
) -> Iterator[subprocess.Popen[bytes]]:
    """``slothflow ARGS`` in the background, its output in ``log``; killed (and the log
    closed) on the way out, however the test ends."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [str(BIN / "slothflow"), *args], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT
        )
        try:
            yield proc
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()


def _wait_for(pred, proc: subprocess.Popen[bytes], log: Path, timeout: float = 600) -> None:  # type: ignore[no-untyped-def]
    deadline = time.time() + timeout
    while not pred():
        if proc.poll() is not None:
            pytest.fail(
                f"slothflow exited ({proc.returncode}) too early:\n{log.read_text()[-3000:]}"
            )
        if time.time() > deadline:
            proc.kill()
            pytest.fail(f"timed out:\n{log.read_text()[-3000:]}")
        time.sleep(0.02)


@pytest.mark.slow
def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    import torch
    from mlflow.tracking import MlflowClient
    from safetensors.torch import load_file

    data = write_split(tmp_path / "data", limit=600)
    home = tmp_path / "home"
    db = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**clean_env(home, tmp_path / "fake-home"), "MLFLOW_TRACKING_URI": db}
    args = ["train", "--data", data.path, "-r", "ci-smoke"]
    for s in SETS:
        args += ["--set", s]

    # 1. start, and SIGKILL it once checkpoint-6 is committed and step 7 has reached
    #    MLflow: the resumed attempt replays step 7 and must not log it a second time.
    runs = home / "runs"

    def committed(step: int) -> list[Path]:
        return list(runs.glob(f"*/train/checkpoints/checkpoint-{step}/{COMPLETE_MARKER}"))

    def step7_logged() -> bool:
        return any('"step": 7' in j.read_text() for j in runs.glob("*/train/tracked_steps.jsonl"))

    with _slothflow(args, env, tmp_path / "first.log") as first:
        _wait_for(lambda: bool(committed(6)) and step7_logged(), first, tmp_path / "first.log")
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert first.returncode == -signal.SIGKILL
    (run_dir,) = [p for p in runs.iterdir() if p.is_dir()]
    assert not (run_dir / "train" / "ref.json").exists()  # it really was cut short
    assert not committed(MAX_STEPS)

    # 2. run it again for the same run: it must resume, not restart
    with _slothflow([*args, "--run-id", run_dir.name], env, tmp_path / "second.log") as second:
        rc = second.wait(timeout=600)
    assert rc == 0, (tmp_path / "second.log").read_text()[-3000:]
    blob = json.loads((run_dir / "train" / "ref.json").read_text())
    resumed = TrainRef.model_validate(blob["ref"])
    assert 6 <= resumed.metrics["resumed_from_step"] < MAX_STEPS
    assert resumed.metrics["global_step"] == MAX_STEPS
    assert "resuming from checkpoint-" in (tmp_path / "second.log").read_text()

    # 3. the same training, uninterrupted, in this process
    cfg = load_config("ci-smoke", SETS)
    base = prepare_base(cfg.model, Home(home))
    rec = RecordingTracker()
    whole = run_train(cfg, base, data, tmp_path / "whole", CPU, rec)
    assert whole.best_step == resumed.best_step
    # the run's train_loss covers every step, the killed attempt's too (exact resume:
    # the per-step losses are the same, so their mean is too)
    assert resumed.metrics["train_loss"] == pytest.approx(whole.metrics["train_loss"], rel=1e-4)
    exported = json.loads((run_dir / "train" / "trainer_state.json").read_text())
    (summary,) = [e["train_loss"] for e in exported["log_history"] if "train_loss" in e]
    assert summary == resumed.metrics["train_loss"]
    a = load_file(str(Path(resumed.adapter_path) / "adapter_model.safetensors"))
    b = load_file(str(Path(whole.adapter_path) / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and a
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
    last = load_file(
        str(
            run_dir
            / "train"
            / "checkpoints"
            / f"checkpoint-{MAX_STEPS}"
            / "adapter_model.safetensors"
        )
    )
    last_whole = load_file(
        str(
            tmp_path
            / "whole"
            / "checkpoints"
            / f"checkpoint-{MAX_STEPS}"
            / "adapter_model.safetensors"
        )
    )
    for k in last:
        torch.testing.assert_close(last[k], last_whole[k], rtol=1e-5, atol=1e-6, msg=k)

    # 4. MLflow: one train stage run, every step exactly once, the same values
    client = MlflowClient(tracking_uri=db)
    (exp,) = [e for e in client.search_experiments() if e.name == cfg.tracking.experiment]
    stage_runs = client.search_runs(
        [exp.experiment_id],
        filter_string=f"tags.`slothflow.run_id` = '{run_dir.name}' and tags.`slothflow.stage` = 'train'",
    )
    assert len(stage_runs) == 1
    assert stage_runs[0].info.status == "FINISHED"
    rid = stage_runs[0].info.run_id
    history = {
        key: sorted((m.step, m.value) for m in client.get_metric_history(rid, key))
        for key in ("train_loss", "eval_loss", "learning_rate")
    }
    assert [s for s, _ in history["train_loss"]] == list(range(1, MAX_STEPS + 1))
    assert [s for s, _ in history["learning_rate"]] == list(range(1, MAX_STEPS + 1))
    assert [s for s, _ in history["eval_loss"]] == list(range(3, MAX_STEPS + 1, 3))
    want = dict(rec.series("train_loss"))
    for step, value in history["train_loss"]:
        assert value == pytest.approx(want[step], rel=1e-4), step
    # the summary is the mean of those per-step losses (logging_steps=1), all of them
    mean = sum(v for _, v in history["train_loss"]) / MAX_STEPS
    (final,) = client.get_metric_history(rid, "final_train_loss")
    assert final.value == pytest.approx(mean, rel=1e-4)
    assert final.value == pytest.approx(resumed.metrics["train_loss"], rel=1e-6)
    # the killed attempt's metrics and the resumed ones landed in the same run
    assert client.get_run(rid).data.params["train.backend"] == "peft"
    assert os.path.exists(resumed.adapter_path)
