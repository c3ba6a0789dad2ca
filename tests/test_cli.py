"""The `slothflow` command as a user runs it (subprocesses, real Prefect and MLflow)."""

import json
import re
import subprocess
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import BIN, clean_env, run_slothflow

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
        # a failed gate changes nothing: the rule printed with its numbers, every
        # artifact kept, nothing registered or served, version 1 still answering
        assert "gate FAILED" in weak.stdout and "gate:        FAILED" in weak.stdout
        assert "vs champion" in " ".join(weak.stdout.split()), weak.stdout[-3000:]
        result2 = json.loads((second / "result.json").read_text())
        assert result2["status"] == "FINISHED"
        assert "register" not in result2["stages"] and "serve" not in result2["stages"]
        assert {"data", "train", "export", "evaluate"} <= set(result2["stages"])
        assert (second / "export").is_dir() and not (second / "serve").exists()
        again = client.chat.completions.with_raw_response.create(
            model="slothflow-embedded", messages=prompt, max_tokens=2
        )
        assert again.headers["x-slothflow-version"] == "slothflow-embedded/1"
        ml = _client(home)
        registered = ml.get_registered_model("slothflow-embedded")
        assert {k: int(v) for k, v in registered.aliases.items()} == {"champion": 1}
        versions = ml.search_model_versions("name='slothflow-embedded'")
        assert [int(v.version) for v in versions] == [1]  # nothing new registered
        exp = ml.get_experiment_by_name("slothflow")
        runs = ml.search_runs([exp.experiment_id], "tags.`slothflow.kind` = 'pipeline'")
        assert sorted(r.data.tags["slothflow.gate"] for r in runs) == ["failed", "passed"]

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
def test_a_second_run_rolls_out_over_the_first_under_streaming_load(tmp_path: Path) -> None:
    """`slothflow run -r ci-smoke` with serving on, twice in one home. While the second
    run starts its version, passes its checks, takes a canary share and is switched to,
    vLLM's benchmark tool streams through the endpoint from 4 slots for over 60 s: no
    request fails and no stream is cut short. Then `slothflow models rollback` brings
    version 1 back the same way and swaps the aliases. (A failed gate changing nothing
    is the default pipeline's test above.)"""
    import time

    from tasks import serve as d
    from tasks.core.config import DeployConfig
    from tasks.core.home import Home
    from tests.conftest import free_port

    port = free_port()
    serve = [
        *("run", "-r", "ci-smoke", "--set", "deploy.enabled=true", "--set", f"deploy.port={port}"),
        # ci-smoke's six steps do not teach the model to stop: the EOS smoke check would
        # fail it, which is the smoke test's business (test_deploy), not this one's; the
        # load test has its own tests there too
        *("--set", "deploy.smoke.enabled=false", "--set", "deploy.load_test.enabled=false"),
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
        v1 = json.loads((home / "serve" / str(v1_backend) / "state.json").read_text())

        # the second run in the background; the load starts once its version's server
        # is starting (the switch is a minute or so away then) and lasts over 60 s
        (tmp_path / "fakehome").mkdir(exist_ok=True)
        second = subprocess.Popen(
            [str(BIN / "slothflow"), *serve],
            cwd=tmp_path,
            env=clean_env(home, tmp_path / "fakehome"),
            stdout=open(tmp_path / "second.out", "w"),  # noqa: SIM115 (closed by the child)
            stderr=open(tmp_path / "second.err", "w"),  # noqa: SIM115
        )
        load = None
        try:
            deadline = time.monotonic() + 600
            while not [
                p
                for p in (home / "serve").glob("[0-9]*/state.json")
                if p.parent.name != str(v1_backend)
            ]:
                assert second.poll() is None, (tmp_path / "second.err").read_text()[-3000:]
                assert time.monotonic() < deadline, "the second run never started a server"
                time.sleep(0.5)
            spec = d.LoadSpec(
                concurrency=4,
                # 180 s at 5/s: past the switch, which came 97 s after the server's start
                # on a busy CI-sized machine (66 s of load ended 19 s before it) and over
                # 120 s on a slower one (120 s of load ended before it)
                requests=5 * 180,
                request_rate=5.0,
                input_len=16,
                max_tokens=8,
                ignore_eos=True,
                timeout_s=400,
            )
            load = d.start_load(
                DeployConfig(),
                Home(home),
                f"http://127.0.0.1:{port}",
                key,
                "slothflow-ci-smoke",
                v1["model_path"],
                spec,
                tmp_path / "load",
            )
            rc = second.wait(timeout=900)
            streaming_at_switch = load.proc.poll() is None  # the run ends with the switch
            report = load.wait()
        finally:
            if load is not None:
                load.stop()
            if second.poll() is None:
                second.terminate()
                second.wait(timeout=60)
        out, err = (tmp_path / "second.out").read_text(), (tmp_path / "second.err").read_text()
        assert rc == 0, out[-3000:] + err[-3000:]
        assert streaming_at_switch, "the load ended before the switch: lengthen it"
        assert report.requests >= 200 and report.duration_s >= 60, report
        assert report.errors == 0 and report.truncated == 0, report.error_samples
        logged = " ".join(err.split())
        assert "canary step 1: 50% to slothflow-ci-smoke/2" in logged, logged[-3000:]
        # the probe asked the run's held-out rows and agreed with its offline answers
        assert re.search(r"probe (\d\.\d{3}) vs \1 offline", logged), logged[-3000:]
        (v2_backend,) = _endpoint_backends(home, port)
        assert v2_backend != v1_backend
        assert not (home / "serve" / str(v1_backend) / "state.json").exists()  # drained, stopped
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/models", headers={"Authorization": f"Bearer {key}"}
        )
        with urllib.request.urlopen(req, timeout=30) as resp:
            assert resp.headers["x-slothflow-version"] == "slothflow-ci-smoke/2"
        aliases = _client(home).get_registered_model("slothflow-ci-smoke").aliases
        assert {k: int(v) for k, v in aliases.items()} == {"champion": 2, "previous": 1}

        # `slothflow models rollback`: version 1 back through a canary step, aliases swapped
        rb_sets = serve[5:]  # the run's deploy settings, port included
        rb = _run(["models", "rollback", "-r", "ci-smoke", *rb_sets], tmp_path, timeout=400)
        assert rb.returncode == 0, rb.stdout[-2000:] + rb.stderr[-4000:]
        assert "canary step 1" in " ".join((rb.stdout + rb.stderr).split())  # printed as it went
        aliases = _client(home).get_registered_model("slothflow-ci-smoke").aliases
        assert {k: int(v) for k, v in aliases.items()} == {"champion": 1, "previous": 2}
        (back,) = _endpoint_backends(home, port)
        assert back not in (v1_backend, v2_backend)  # v1 again, on a server of its own
        with urllib.request.urlopen(req, timeout=30) as resp:
            assert resp.headers["x-slothflow-version"] == "slothflow-ci-smoke/1"
            assert json.loads(resp.read())["data"][0]["id"] == "slothflow-ci-smoke"
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
