"""Retraining on new data: the data fingerprint (listing first, content only for what
changed), the ``retrain`` deployment on a real Prefect server and worker, the
``on-new-data`` trigger fed by ``slothflow data notify``, and the notification
automations sending to a real HTTP receiver on loopback."""

from __future__ import annotations

import http.server
import json
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import fsspec
import pytest

from tasks.core import settings
from tasks.core.config import load_config
from tasks.data.fingerprint import fingerprint
from tasks.data.sources import expand

from .conftest import BIN, REPO, PrefectStack, S3Server, clean_env

pytestmark = pytest.mark.timeout(900)

SAMPLE = REPO / "data" / "sample" / "topics_chat.jsonl"


class _Opens:
    """Counts files opened for reading through fsspec (content reads), by path."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.paths: list[str] = []
        real = fsspec.spec.AbstractFileSystem.open

        def counting(fs: Any, path: str, mode: str = "rb", *a: Any, **kw: Any) -> Any:
            if "r" in mode:
                self.paths.append(str(path))
            return real(fs, path, mode, *a, **kw)

        monkeypatch.setattr(fsspec.spec.AbstractFileSystem, "open", counting)


def test_folders_and_globs_expand_to_their_data_files(tmp_path: Path) -> None:
    (tmp_path / "b").mkdir()
    for name in ("a.jsonl", "b/c.jsonl.gz", "notes.md", ".d.jsonl.part", "_SUCCESS"):
        (tmp_path / name).write_bytes(b"x")
    names = [s.name for s in expand(str(tmp_path))]
    assert names == [f"{tmp_path}/a.jsonl", f"{tmp_path}/b/c.jsonl.gz"]
    assert [s.name for s in expand(f"{tmp_path}/*.jsonl")] == [f"{tmp_path}/a.jsonl"]
    with pytest.raises(ValueError, match="no data files match"):
        expand(f"{tmp_path}/*.csv")


def test_unchanged_data_is_listed_and_not_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, s3_server: S3Server
) -> None:
    """A second fingerprint of unchanged data reads no file; an added file (local, or an
    object in S3) is the only one read; a rewritten file is read again."""
    for k, v in s3_server.env.items():
        monkeypatch.setenv(k, v)
    folder = tmp_path / "incoming"
    folder.mkdir()
    lines = SAMPLE.read_text().splitlines(keepends=True)
    (folder / "part-1.jsonl").write_text("".join(lines[:100]))
    (folder / "part-2.jsonl").write_text("".join(lines[100:200]))
    prefix = f"s3://{s3_server.bucket}/fp-{tmp_path.name}/"
    s3 = fsspec.filesystem("s3")
    s3.pipe(prefix + "a.jsonl", "".join(lines[200:300]).encode())
    record = tmp_path / "record.json"
    sources = [str(folder), prefix]

    first = fingerprint(sources, record)
    assert (first.listed, first.read) == (3, 3)

    opens = _Opens(monkeypatch)
    again = fingerprint(sources, record)
    assert (again.value, again.read, opens.paths) == (first.value, 0, [])

    (folder / "part-3.jsonl").write_text("".join(lines[300:310]))
    s3.pipe(prefix + "b.jsonl", "".join(lines[310:320]).encode())
    added = fingerprint(sources, record)
    assert added.value != first.value
    assert sorted(added.changed) == sorted([f"{folder}/part-3.jsonl", prefix + "b.jsonl"])
    assert {p.rsplit("/", 1)[-1] for p in opens.paths} == {"part-3.jsonl", "b.jsonl"}

    opens.paths.clear()
    time.sleep(0.01)  # a new mtime even on coarse clocks
    (folder / "part-1.jsonl").write_text("".join(lines[1:101]))  # same size class, new bytes
    rewritten = fingerprint(sources, record)
    assert rewritten.changed == [f"{folder}/part-1.jsonl"] and rewritten.value != added.value
    # The data stage records the same value for a run over the same data.
    from tasks.data.fingerprint import of_hashes
    from tasks.data.read import resolve_all, source_sha256

    assert of_hashes([source_sha256(s) for s in resolve_all(sources)]) == rewritten.value


# --------------------------------------------------------------------------- the deployment


class _Receiver(http.server.BaseHTTPRequestHandler):
    received: ClassVar[list[dict[str, Any]]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        self.received.append(
            {"auth": self.headers.get("authorization"), "body": json.loads(body or b"{}")}
        )
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def receiver() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    received: ClassVar[list[dict[str, Any]]] = []
    handler = type("Handler", (_Receiver,), {"received": received})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hook", received
    server.shutdown()


def _runs_of(stack: PrefectStack, deployment_id: str) -> list[dict[str, Any]]:
    return list(
        stack.call(
            "POST",
            "/flow_runs/filter",
            {"flow_runs": {"deployment_id": {"any_": [deployment_id]}}, "sort": "START_TIME_ASC"},
        )
    )


def _cli(stack: PrefectStack, *args: str, env: dict[str, str] | None = None) -> str:
    """``slothflow ...`` as an operator runs it against the server: its own home."""
    import subprocess

    home, fake = stack.root / "cli-home", stack.root / "cli-fakehome"
    fake.mkdir(exist_ok=True)
    proc = subprocess.run(
        [str(BIN / "slothflow"), *args],
        env={**clean_env(home, fake), **stack.env, **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
        cwd=stack.root,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def _report_of(stack: PrefectStack, run_id: str) -> dict[str, Any]:
    return dict(json.loads((stack.home / "runs" / run_id / "data" / "report.json").read_text()))


def _cancel(stack: PrefectStack, run: dict[str, Any]) -> None:
    state = stack.call("GET", f"/flow_runs/{run['id']}")["state"]["type"]
    # a run no worker has started yet is cancelled outright; a started one is asked to stop
    target = "CANCELLED" if state in ("SCHEDULED", "PENDING") else "CANCELLING"
    stack.call(
        "POST",
        f"/flow_runs/{run['id']}/set_state",
        {"state": {"type": target, "message": "not under test here"}, "force": True},
    )


def _result(run: dict[str, Any], stack: PrefectStack) -> dict[str, Any]:
    """A completed retrain that trained: the pipeline's summary (its subflow's result)."""
    children = stack.call(
        "POST",
        "/flow_runs/filter",
        {"flow_runs": {"parent_flow_run_id": {"any_": [run["id"]]}}},
    )
    assert len(children) == 1, children
    from tasks.core import run as run_mod
    from tasks.core.home import Home

    run_id = run_mod.run_of_flow_run(Home(stack.home), children[0]["id"])
    assert run_id is not None
    return dict(json.loads((stack.home / "runs" / run_id / "result.json").read_text()))


def test_retrain_trains_once_per_data_and_notifies_a_blocked_gate(
    prefect_stack: PrefectStack,
    mlflow_server: str,
    receiver: tuple[str, list[dict[str, Any]]],
) -> None:
    stack = prefect_stack
    assert stack.data is not None
    url, received = receiver
    folder = stack.data / "retrain"
    folder.mkdir()
    # 600 rows: cleaning them takes no time, and 10% of them is a held-out set >= 20 rows
    lines = SAMPLE.read_text().splitlines(keepends=True)[:600]
    (folder / "part-1.jsonl").write_text("".join(lines[:-40]))
    form = settings.form_of(load_config("ci-smoke")).model_dump(mode="json")
    form["data"]["sources"] = [str(folder)]
    # its own experiment and model: other tests' ci-smoke runs are not this recipe's past
    form["tracking"].update(experiment="retrain-test", registered_model="retrain-test")
    form["deploy"]["enabled"] = True  # a passing candidate goes to the rollout deployment
    dep = stack.deployment_id("retrain")
    stack.call("PATCH", f"/deployments/{dep}", {"parameters": {"config": form, "reason": "test"}})

    # 1. First data: trains, registers, hands the version to the rollout deployment.
    first = stack.wait(stack.call("POST", f"/deployments/{dep}/create_flow_run", {})["id"])
    assert first["state"]["type"] == "COMPLETED", first["state"]
    summary = _result(first, stack)
    assert summary["gate"]["passed"] and summary["stages"]["register"]["model"] == "retrain-test/1"
    rollouts = _runs_of(stack, stack.deployment_id("rollout"))
    mine = [r for r in rollouts if r["parameters"].get("model") == "retrain-test/1"]
    assert len(mine) == 1, rollouts
    # Serving is the rollout tests' subject: stop this one rather than wait for it.
    _cancel(stack, mine[0])

    # 2. The schedule fires again with the data unchanged: nothing read, nothing trained.
    second = stack.wait(
        stack.call(
            "POST", f"/deployments/{dep}/create_flow_run", {"parameters": {"reason": "schedule"}}
        )["id"]
    )
    assert second["state"]["type"] == "COMPLETED" and second["state"]["name"] == "No new data"
    assert summary["run_id"] in second["state"]["message"], second["state"]["message"]
    assert not stack.call(
        "POST", "/flow_runs/filter", {"flow_runs": {"parent_flow_run_id": {"any_": [second["id"]]}}}
    )
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("retrain-test")
    checks = client.search_runs([exp.experiment_id], "tags.`slothflow.kind` = 'check'")
    assert [c.data.tags["slothflow.retrain.decision"] for c in checks] == ["No new data"]
    parent = client.search_runs(
        [exp.experiment_id],
        f"tags.`slothflow.run_id` = '{summary['run_id']}' and tags.`slothflow.kind` = 'pipeline'",
    )[0]
    fingerprint_tag = parent.data.tags["slothflow.source_fingerprint"]
    assert checks[0].data.tags["slothflow.source_fingerprint"] == fingerprint_tag
    check_summary = json.loads(
        Path(client.download_artifacts(checks[0].info.run_id, "summary.json")).read_text()
    )
    assert (check_summary["sources"], check_summary["read"]) == (1, 0)

    # 3. Notifications on (created from the repo), a stricter gate, new rows in the folder,
    #    and two notifications of the same data: one retrain trains (and its gate blocks
    #    it), the other ends "Already trained" naming that run.
    _cli(stack, "notifications", "apply",
         env={"SLOTHFLOW_NOTIFY_URL": url, "SLOTHFLOW_NOTIFY_TOKEN": "hook-token"})  # fmt: skip
    try:
        _notified_once(stack, dep, form, folder, lines, summary, received)
    finally:
        # the session's server outlives this test: later tests' failures notify nobody
        for a in stack.call("POST", "/automations/filter", {}):
            if a["name"].startswith("slothflow-notify-"):
                stack.call("DELETE", f"/automations/{a['id']}")
    shutil.rmtree(folder)


def _notified_once(
    stack: PrefectStack,
    dep: str,
    form: dict[str, Any],
    folder: Path,
    lines: list[str],
    summary: dict[str, Any],
    received: list[dict[str, Any]],
) -> None:
    names = {a["name"] for a in stack.call("POST", "/automations/filter", {})}
    assert {"slothflow-notify-failed-runs", "slothflow-notify-gate-blocked",
            "slothflow-notify-rolled-back"} <= names  # fmt: skip
    form["eval"]["threshold"] = 1.0
    stack.call("PATCH", f"/deployments/{dep}", {"parameters": {"config": form, "reason": "test"}})
    (folder / "part-2.jsonl").write_text("".join(lines[-40:]))
    before = {r["id"] for r in _runs_of(stack, dep)}
    for _ in range(2):
        _cli(stack, "data", "notify", str(folder))
    deadline = time.time() + 60
    while len(new := [r for r in _runs_of(stack, dep) if r["id"] not in before]) < 2:
        assert time.time() < deadline, "the on-new-data trigger started no runs"
        time.sleep(1)
    ended = [stack.wait(r["id"]) for r in new]
    assert all(r["state"]["type"] == "COMPLETED" for r in ended), [r["state"] for r in ended]
    assert all(r["parameters"]["reason"].startswith("slothflow.data.updated") for r in ended)
    trained = [r for r in ended if r["state"]["name"] == "Completed"]
    skipped = [r for r in ended if r["state"]["name"] == "Already trained"]
    assert len(trained) == 1 and len(skipped) == 1, [r["state"] for r in ended]
    blocked = _result(trained[0], stack)
    assert blocked["gate"]["passed"] is False and "register" not in blocked["stages"]
    assert blocked["run_id"] in skipped[0]["state"]["message"]
    report = _report_of(stack, blocked["run_id"])
    # only the new rows are new: the first run's rows came in through its manifest
    assert (
        report["previous_manifest"]["rows"]
        == summary["stages"]["data"]["train"] + (summary["stages"]["data"]["validation"])
    )
    assert 0 < report["new_records"] <= 40
    assert blocked["stages"]["data"]["new_rows"] == report["new_records"]

    # One notification, for the blocked gate, with its reasons; the token as a header.
    deadline = time.time() + 60
    while not received and time.time() < deadline:
        time.sleep(0.5)
    time.sleep(3)  # anything else would have come by now
    assert len(received) == 1, received
    assert received[0]["auth"] == "Bearer hook-token"
    text = received[0]["body"]["subject"] + " " + received[0]["body"]["body"]
    assert "blocked" in text and blocked["run_id"] in text
    assert any(reason.split(" ")[0] in text for reason in blocked["gate"]["reasons"]), text
