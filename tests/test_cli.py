"""The `slothflow` command as a user runs it (subprocesses, real Prefect and MLflow)."""

import json
import re
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import run_slothflow

_run = run_slothflow


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["run"],
        ["info"],
        ["config"],
        ["config", "show"],
        ["config", "validate"],
        ["config", "schema"],
        ["config", "list"],
    ],
)
def test_help_reads_well(args: list[str], tmp_path: Path) -> None:
    r = _run([*args, "--help"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert "Usage: slothflow" in r.stdout
    assert "Traceback" not in r.stdout + r.stderr


def test_config_validate_names_the_bad_field(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lora:\n    rnk: 8\n")
    r = _run(["config", "validate", str(bad)], tmp_path)
    assert r.returncode == 2
    assert "train.lora.rnk: unknown key" in r.stdout


def test_run_with_bad_override_is_a_clear_error(tmp_path: Path) -> None:
    r = _run(["run", "-r", "ci-smoke", "--set", "train.backend=tensorflow"], tmp_path)
    assert r.returncode == 2
    assert "train.backend" in r.stderr and "Traceback" not in r.stderr


def test_run_refuses_4bit_on_cpu(tmp_path: Path) -> None:
    r = _run(["run", "-r", "ci-smoke", "--set", "model.load_in_4bit=true"], tmp_path)
    assert r.returncode == 2
    assert "load_in_4bit=true needs CUDA" in r.stderr


def test_unreachable_tracking_server_fails_fast(tmp_path: Path) -> None:
    from tests.conftest import free_port

    r = _run(
        [
            "run",
            "-r",
            "ci-smoke",
            "--set",
            f"tracking.tracking_uri=http://127.0.0.1:{free_port()}",
            "--set",
            "tracking.connect_timeout_s=2",
        ],
        tmp_path,
        timeout=120,
    )
    assert r.returncode == 2, r.stderr[-2000:]
    assert "unreachable" in r.stderr


def test_serve_errors_are_one_clear_message_printed_as_text(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """A failed server's message carries vLLM's log tail, whose ``[core.py:71]`` tags and
    paths in brackets are not Rich markup: printed as they are (exit 1). A tracking URI
    with a password is the CLI's known config failure (exit 2), not a traceback."""
    import typer

    from slothflow.cli_serve import serve_errors
    from tasks.serve import ServeError

    with pytest.raises(typer.Exit) as exit_, serve_errors():
        raise ServeError("vLLM exited: INFO [core.py:71] loading [/tmp/a] failed")
    assert exit_.value.exit_code == 1
    assert "INFO [core.py:71] loading [/tmp/a] failed" in capsys.readouterr().err
    r = _run(
        ["serve", str(tmp_path), "--set", "tracking.tracking_uri=http://u:secret@127.0.0.1:1"],
        tmp_path,
        timeout=120,
    )
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and "secret" not in r.stderr + r.stdout


def _client(home: Path):  # type: ignore[no-untyped-def]
    from mlflow.tracking import MlflowClient

    return MlflowClient(f"sqlite:///{home / 'mlflow' / 'mlflow.db'}")


def _endpoint_backends(home: Path, port: int) -> list[int]:
    state = json.loads((home / "serve" / f"endpoint-{port}" / "endpoint.json").read_text())
    return [b["port"] for b in state["backends"] if b["weight"] > 0]


def _stream_while(
    client: Any, prompt: Any, action: Any, model: str = "slothflow-embedded"
) -> tuple[tuple[Any, list[str]], list[Any]]:
    """``action()`` while four clients stream chat completions through the endpoint;
    returns (action's result, the streamed answers) and the clients' errors."""
    import threading

    streamed: list[str] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            try:
                chunks = client.chat.completions.create(
                    model=model,
                    messages=prompt,
                    max_tokens=8,
                    temperature=0,
                    stream=True,
                )
                streamed.append("".join(c.choices[0].delta.content or "" for c in chunks))
            except BaseException as exc:  # recorded: the assertion names it
                errors.append(exc)
            # steady, light traffic: on two cores a client loop with no pause starves the
            # new version's start (its engine took 3 min to come up under it)
            stop.wait(0.5)

    threads = [threading.Thread(target=loop) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        result = action()
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    return (result, streamed), errors


@pytest.mark.e2e
@pytest.mark.slow
def test_default_pipeline_learns_and_serves(tmp_path: Path) -> None:
    """`make run`'s job: the embedded default, end to end, ending with a real vLLM server
    that answers held-out questions; then `slothflow serve stop` leaves nothing running."""
    from openai import OpenAI

    from tests.conftest import free_port

    port = free_port()
    r = _run(["run", "--set", f"deploy.port={port}"], tmp_path, timeout=1500)
    try:
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
        home = tmp_path / "home"
        (run_dir,) = (home / "runs").iterdir()
        result = json.loads((run_dir / "result.json").read_text())
        ev = result["stages"]["evaluate"]
        assert ev["items"] >= 200
        assert ev["merged"] >= 0.9 and ev["base"] <= 0.05, ev
        assert result["gate"]["passed"]
        assert f"endpoint: http://127.0.0.1:{port}/v1" in r.stdout
        assert f"slothflow serve stop --port {port}" in r.stdout
        key = next((home / "serve").rglob("api_key")).read_text().strip()
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key)
        lines = (run_dir / "data" / "validation.jsonl").read_text().splitlines()
        rows = [json.loads(x) for x in lines[:20]]
        right = 0
        for row in rows:
            prompt = [m for m in row["messages"] if m["role"] != "assistant"]
            want = row["messages"][-1]["content"]
            out = client.chat.completions.create(
                model="slothflow-embedded", messages=prompt, max_tokens=8, temperature=0
            )
            right += out.choices[0].message.content.strip() == want
        assert right >= 17, f"{right}/20 served answers correct"
        # behind the stable endpoint (nginx), the answering version named; now champion
        raw = client.chat.completions.with_raw_response.create(
            model="slothflow-embedded", messages=prompt, max_tokens=2
        )
        assert raw.headers["x-slothflow-version"] == "slothflow-embedded/1"
        assert result["stages"]["promote"]["aliases"] == {"champion": 1}
        assert "promote:" in r.stdout
        assert json.loads((home / "serve" / f"endpoint-{port}" / "endpoint.json").read_text())

        # A second, weaker run in the same home: its evaluation scores the champion on
        # the same held-out set and the gate blocks the regression; v1 keeps serving.
        weak = _run(
            ["run", "--set", f"deploy.port={port}", "--set", "train.max_steps=2"],
            tmp_path,
            timeout=900,
        )
        assert weak.returncode == 3, weak.stdout[-3000:] + weak.stderr[-3000:]
        (second,) = [d for d in (home / "runs").iterdir() if d != run_dir]
        gate = json.loads((second / "result.json").read_text())["gate"]
        assert gate["passed"] is False and gate["champion"] >= 0.9, gate
        assert any("vs champion" in reason for reason in gate["reasons"]), gate["reasons"]
        again = client.chat.completions.with_raw_response.create(
            model="slothflow-embedded", messages=prompt, max_tokens=2
        )
        assert again.headers["x-slothflow-version"] == "slothflow-embedded/1"
        registered = _client(home).get_registered_model("slothflow-embedded")
        assert {k: int(v) for k, v in registered.aliases.items()} == {"champion": 1}

        # A version rolled out over a serving one (checks, canary under streaming
        # clients, switch) is the next test's (ci-smoke: seconds, not minutes, per run)
        # and tests/test_rollout.py's; `models rollback` with no previous changes nothing.
        (first_backend,) = _endpoint_backends(home, port)
        # no previous champion yet: a rollback says so and changes nothing
        rb = _run(["models", "rollback", "--set", f"deploy.port={port}"], tmp_path)
        assert rb.returncode == 2 and "no 'previous' version" in rb.stderr, rb.stderr
        assert _endpoint_backends(home, port) == [first_backend]
    finally:
        stop = _run(["serve", "stop"], tmp_path)
    assert stop.returncode == 0, stop.stderr
    status = _run(["serve", "status", "--json"], tmp_path)
    assert json.loads(status.stdout or "[]") == []


@pytest.mark.e2e
@pytest.mark.slow
def test_a_second_run_rolls_out_over_the_first_and_a_failed_gate_changes_nothing(
    tmp_path: Path,
) -> None:
    """`slothflow run -r ci-smoke` with serving on, twice in one home: the second version
    goes through the canary and the switch while four clients stream through the
    endpoint, and none of their requests fails. A third run whose candidate misses the
    bar is not registered or served, keeps every artifact and exits 3; version 2 keeps
    serving."""
    from openai import OpenAI

    from tests.conftest import free_port

    port = free_port()
    serve = [
        *("run", "-r", "ci-smoke", "--set", "deploy.enabled=true", "--set", f"deploy.port={port}"),
        # ci-smoke's six steps do not teach the model to stop: the EOS smoke check would
        # fail it, which is the smoke test's business (test_deploy), not this one's
        *("--set", "deploy.smoke.enabled=false", "--set", "deploy.load_test.slo_p99_s=30"),
        *("--set", "deploy.canary.steps=[50]", "--set", "deploy.canary.window_s=6"),
        *("--set", "deploy.canary.min_requests=10", "--set", "deploy.canary.latency_slack_s=1.5"),
        *("--set", "deploy.canary.max_p99_latency_ratio=2"),
        *("--set", "deploy.canary.max_p99_ttft_ratio=2"),
    ]
    home = tmp_path / "home"
    try:
        first = _run(serve, tmp_path, timeout=900)
        assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
        assert f"endpoint: http://127.0.0.1:{port}/v1" in first.stdout
        (v1_backend,) = _endpoint_backends(home, port)
        key = next((home / "serve").rglob("api_key")).read_text().strip()
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0)
        prompt = [{"role": "user", "content": "Name the topic of the sentence: a goal!"}]
        (second, streamed), errors = _stream_while(
            client, prompt, lambda: _run(serve, tmp_path, timeout=900), "slothflow-ci-smoke"
        )
        assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
        assert not errors, errors[:3]
        assert len(streamed) >= 8, streamed
        logged = " ".join(second.stderr.split())
        assert "canary step 1: 50% to slothflow-ci-smoke/2" in logged, logged[-3000:]
        # the probe asked the run's held-out rows and agreed with its offline answers
        assert re.search(r"probe (\d\.\d{3}) vs \1 offline", logged), logged[-3000:]
        (v2_backend,) = _endpoint_backends(home, port)
        assert v2_backend != v1_backend
        raw = client.chat.completions.with_raw_response.create(
            model="slothflow-ci-smoke", messages=prompt, max_tokens=2
        )
        assert raw.headers["x-slothflow-version"] == "slothflow-ci-smoke/2"
        aliases = _client(home).get_registered_model("slothflow-ci-smoke").aliases
        assert {k: int(v) for k, v in aliases.items()} == {"champion": 2, "previous": 1}

        failed = _run([*serve, "--set", "eval.threshold=1.0"], tmp_path, timeout=900)
        assert failed.returncode == 3, failed.stdout[-3000:] + failed.stderr[-3000:]
        assert "gate FAILED" in failed.stdout and "gate:        FAILED" in failed.stdout
        assert "exact_match 0.0000 (need >= 1)" in failed.stdout  # the rule, with numbers
        (third,) = [d for d in (home / "runs").iterdir() if not (d / "register").exists()]
        result = json.loads((third / "result.json").read_text())
        assert result["status"] == "FINISHED" and result["gate"]["passed"] is False
        assert "register" not in result["stages"] and "serve" not in result["stages"]
        assert {"data", "train", "export", "evaluate"} <= set(result["stages"])
        assert not (third / "serve").exists()
        client_ml = _client(home)
        exp = client_ml.get_experiment_by_name("slothflow")
        runs = client_ml.search_runs([exp.experiment_id], "tags.`slothflow.kind` = 'pipeline'")
        assert sorted(r.data.tags["slothflow.gate"] for r in runs) == ["failed", "passed", "passed"]
        versions = client_ml.search_model_versions("name='slothflow-ci-smoke'")
        assert sorted(int(v.version) for v in versions) == [1, 2]  # nothing new registered
        assert _endpoint_backends(home, port) == [v2_backend]  # version 2 keeps serving
    finally:
        stop = _run(["serve", "stop"], tmp_path)
    assert stop.returncode == 0, stop.stderr


def test_train_refuses_a_failed_data_folder_before_loading_a_model(tmp_path: Path) -> None:
    """What a failed `data clean` leaves (its reports, empty splits) and an empty folder:
    one clear line and exit 2, in the time it takes to start the command."""
    import time

    from tasks.core.config import DataConfig
    from tasks.data import DataError, clean

    bad = tmp_path / "bad.jsonl"
    bad.write_text("{broken\n")
    with pytest.raises(DataError):
        clean(DataConfig(sources=[str(bad)]), tmp_path / "clean")
    (tmp_path / "empty").mkdir()
    for folder, says in (("clean.failed", "data clean that failed"), ("empty", "is empty")):
        t0 = time.monotonic()
        r = _run(["train", "--data", folder, "-r", "ci-smoke"], tmp_path, timeout=120)
        assert r.returncode == 2, r.stderr[-2000:]
        assert says in r.stderr and "Traceback" not in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert time.monotonic() - t0 < 60
        runs = tmp_path / "home" / "runs"
        assert not runs.exists() or not any(runs.iterdir())  # no run was opened
