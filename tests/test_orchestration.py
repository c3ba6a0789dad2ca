"""The pipeline as a service: deployments from prefect.yaml on a real Prefect server, runs
created through the API the way the UI's form posts them, executed by real process workers
on the ``cpu`` and ``gpu`` pools; the run form's attack surface; the work-pool templates."""

from __future__ import annotations

import json
import os
import urllib.error
from pathlib import Path
from typing import Any

import pytest

from tasks.core import settings
from tasks.core.config import ConfigError, PipelineForm, load_config
from tasks.core.home import Home
from tasks.train import COMPLETE_MARKER

from .conftest import REPO, PrefectStack, S3Server

pytestmark = pytest.mark.timeout(900)


def _form(recipe: str = "ci-smoke", **orchestration: Any) -> dict[str, Any]:
    form = settings.form_of(load_config(recipe)).model_dump(mode="json")
    form["orchestration"].update(orchestration)
    return form


def _property_names(schema: Any) -> set[str]:
    if isinstance(schema, dict):
        own = (
            set(schema.get("properties", {}))
            if isinstance(schema.get("properties"), dict)
            else set()
        )
        return own.union(*(_property_names(v) for v in schema.values()))
    if isinstance(schema, list):
        return set().union(*(_property_names(v) for v in schema))
    return set()


def _refused(stack: PrefectStack, deployment_id: str, body: dict[str, Any]) -> tuple[int, str]:
    try:
        stack.call("POST", f"/deployments/{deployment_id}/create_flow_run", body)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    raise AssertionError(f"the server accepted {body}")


# --------------------------------------------------------------------------- settings


def test_worker_settings_come_from_the_environment() -> None:
    s = settings.from_env(
        {
            "SLOTHFLOW_VLLM_COMMAND": "/opt/vllm/bin/python -m vllm.entrypoints.openai.api_server",
            "SLOTHFLOW_VLLM_EXTRA_ARGS": "--max-model-len 4096",
            "SLOTHFLOW_SERVE_HOST": "10.0.0.5",
            "SLOTHFLOW_SERVE_PORT": "8100",
            "SLOTHFLOW_SERVE_API_KEY": "prefect-block:vllm-key",
            "SLOTHFLOW_BENCH_COMMAND": "vllm bench serve",
            "SLOTHFLOW_ALLOWED_SOURCES": "/srv/data, s3://bucket/datasets/",
        }
    )
    cfg = settings.complete(PipelineForm(), s.model_copy(update={"allowed_sources": (str(REPO),)}))
    assert cfg.deploy.vllm_command[0] == "/opt/vllm/bin/python"
    assert cfg.deploy.extra_args == ["--max-model-len", "4096"]
    assert cfg.deploy.bench_command == ["vllm", "bench", "serve"]
    assert (cfg.deploy.host, cfg.deploy.port) == ("10.0.0.5", 8100)
    assert cfg.deploy.api_key is not None and cfg.deploy.api_key.prefect_block == "vllm-key"
    assert s.allowed_sources == ("/srv/data", "s3://bucket/datasets/")
    with pytest.raises(ConfigError, match="SLOTHFLOW_SERVE_API_KEY"):
        settings.from_env({"SLOTHFLOW_SERVE_API_KEY": "sk-the-key-itself"})
    with pytest.raises(ConfigError, match="SLOTHFLOW_ALLOWED_SOURCES"):
        settings.from_env({"SLOTHFLOW_ALLOWED_SOURCES": "data/"})


def test_form_paths_outside_the_allowlist_are_refused(tmp_path: Path) -> None:
    root = tmp_path / "allowed"
    root.mkdir()
    (root / "ok.jsonl").write_text("{}\n")
    (tmp_path / "secret.jsonl").write_text("{}\n")
    (root / "link.jsonl").symlink_to(tmp_path / "secret.jsonl")
    allowed = (str(root), "s3://bucket/datasets/")
    assert settings.is_allowed(str(root / "ok.jsonl"), allowed)
    assert settings.is_allowed("s3://bucket/datasets/a.parquet", allowed)
    for hostile in [
        str(tmp_path / "secret.jsonl"),
        str(root / ".." / "secret.jsonl"),  # '..' out of the root
        str(root / "link.jsonl"),  # a symlink out of the root
        "s3://bucket/other/a.parquet",
        "s3://bucket/datasets-evil/a.parquet",
        "filecache::s3://bucket/datasets/a.parquet",  # a chain hides its target
        "https://example.com/a.jsonl",
        "/etc/passwd",
    ]:
        assert not settings.is_allowed(hostile, allowed), hostile
    form = PipelineForm.model_validate(_form())
    form.model.chat_template = "/etc/shadow"
    with pytest.raises(ConfigError, match=r"model\.chat_template: '/etc/shadow' is outside"):
        settings.check_paths(form, (str(REPO / "data"),))
    form.model.chat_template = None
    form.model.name_or_path = "/root/models/x"
    with pytest.raises(ConfigError, match=r"model\.name_or_path"):
        settings.check_paths(form, (str(REPO / "data"),))
    form.model.name_or_path = "meta-llama/Llama-3.2-1B"  # a hub id is not a path
    settings.check_paths(form, (str(REPO / "data"),))


def test_the_form_has_no_operator_fields_and_keeps_the_config_hash() -> None:
    fields = _property_names(PipelineForm.model_json_schema())
    assert {"sources", "learning_rate", "gpu_pool", "registered_model"} <= fields
    operator = {
        "vllm_command",
        "extra_args",
        "api_key",
        "host",
        "port",
        "tracking_uri",
        "hub_token",
    }
    assert not operator & fields
    cfg = load_config("ci-smoke")
    completed = settings.complete(settings.form_of(cfg), settings.WorkerSettings())
    from tasks.core.config import config_hash

    assert config_hash(completed) == config_hash(cfg)


def test_a_local_tracking_store_is_refused_for_worker_runs(tmp_path: Path) -> None:
    home = Home(tmp_path / "home")
    cfg = load_config("ci-smoke")
    env = os.environ.pop("MLFLOW_TRACKING_URI", None)
    try:
        with pytest.raises(ConfigError, match="local store, but the GPU stages"):
            settings.require_shared_tracking(cfg, home, "the GPU stages run on a worker")
        cfg.tracking.tracking_uri = "http://mlflow.internal:5000"
        settings.require_shared_tracking(cfg, home, "the GPU stages run on a worker")
    finally:
        if env is not None:
            os.environ["MLFLOW_TRACKING_URI"] = env


# --------------------------------------------------------------------------- the real server


def test_work_pool_templates_are_accepted_by_a_real_server(prefect_stack: PrefectStack) -> None:
    for kind in ("process", "docker", "kubernetes"):
        template = json.loads((REPO / "infra" / "work-pools" / f"{kind}.json").read_text())
        created = prefect_stack.call(
            "POST",
            "/work_pools/",
            {"name": f"t-{kind}", "type": kind, "base_job_template": template},
        )
        assert created["base_job_template"]["variables"]["additionalProperties"] is False
        props = template["variables"]["properties"]
        assert "env" not in props and "command" not in props  # no run may set them
    # The server checks templates: a placeholder with no variable behind it is refused.
    broken = json.loads((REPO / "infra" / "work-pools" / "docker.json").read_text())
    broken["job_configuration"]["image"] = "{{ no_such_variable }}"
    with pytest.raises(urllib.error.HTTPError) as err:
        prefect_stack.call(
            "POST",
            "/work_pools/",
            {"name": "t-broken", "type": "docker", "base_job_template": broken},
        )
    assert err.value.code == 422
    k8s = json.loads((REPO / "infra" / "work-pools" / "kubernetes.json").read_text())
    pod = k8s["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
    resources = pod["containers"][0]["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == resources["requests"]["nvidia.com/gpu"]
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu" and pod["nodeSelector"]


def test_deployments_come_from_prefect_yaml(prefect_stack: PrefectStack) -> None:
    deployments = {d["name"]: d for d in prefect_stack.call("POST", "/deployments/filter", {})}
    assert deployments["finetune"]["work_pool_name"] == "cpu"
    assert deployments["gpu-stages"]["work_pool_name"] == "gpu"
    assert deployments["rollout"]["work_pool_name"] == "cpu"
    assert deployments["rollout"]["global_concurrency_limit"]["limit"] == 1
    assert deployments["rollout"]["concurrency_options"]["collision_strategy"] == "ENQUEUE"
    assert all(d["enforce_parameter_schema"] for d in deployments.values())
    retrain = deployments["retrain"]
    assert retrain["schedules"][0]["schedule"]["cron"] == "0 */6 * * *"
    assert retrain["global_concurrency_limit"]["limit"] == 1
    assert retrain["concurrency_options"]["collision_strategy"] == "ENQUEUE"
    # the on-new-data trigger: an automation prefect deploy made from prefect.yaml
    triggers = [
        a
        for a in prefect_stack.call("POST", "/automations/filter", {})
        if a["name"] == "on-new-data"
    ]
    assert len(triggers) == 1 and triggers[0]["trigger"]["expect"] == ["slothflow.data.updated"]
    assert triggers[0]["actions"][0]["deployment_id"] == retrain["id"]
    schema = deployments["finetune"]["parameter_openapi_schema"]
    # The UI's form: every field with its description, the recipe's values as defaults.
    defs = schema["definitions"]
    assert defs["DataConfig"]["properties"]["sources"]["description"].startswith("Input")
    assert schema["properties"]["config"]["default"]["orchestration"]["gpu_pool"] == "gpu"
    default_cfg = load_config("default")
    assert schema["properties"]["config"]["default"]["train"] == default_cfg.train.model_dump(
        mode="json"
    )
    assert "vllm_command" not in _property_names(schema)


def test_hostile_parameters_are_refused(prefect_stack: PrefectStack) -> None:
    fid = prefect_stack.deployment_id("finetune")
    hostile: list[dict[str, Any]] = [
        {"parameters": {"config": {"deploy": {"vllm_command": ["/bin/sh", "-c", "id"]}}}},
        {"parameters": {"config": {"deploy": {"extra_args": ["--trust-remote-code"]}}}},
        {"parameters": {"config": {"tracking": {"tracking_uri": "http://evil.example"}}}},
        {"parameters": {"config": {"export": {"hub_token": {"env": "AWS_SECRET_ACCESS_KEY"}}}}},
        {"job_variables": {"env": {"SLOTHFLOW_VLLM_COMMAND": "/bin/sh"}}},
        {"job_variables": {"command": "sh -c id"}},
    ]
    for body in hostile:
        code, detail = _refused(prefect_stack, fid, body)
        assert code in (409, 422), (body, code, detail)
        assert "not allowed" in detail or "unexpected" in detail, detail
    # Unauthenticated calls get nothing at all.
    import urllib.request

    req = urllib.request.Request(prefect_stack.api_url + "/deployments/filter", data=b"{}")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=10)
    assert err.value.code == 401


def test_a_source_outside_the_allowlist_fails_at_once_without_retries(
    prefect_stack: PrefectStack,
) -> None:
    form = _form()
    form["data"]["sources"] = ["/etc/passwd"]
    run = prefect_stack.call(
        "POST",
        f"/deployments/{prefect_stack.deployment_id('finetune')}/create_flow_run",
        {"parameters": {"config": form}},
    )
    done = prefect_stack.wait(run["id"], timeout=120)
    assert done["state"]["type"] == "FAILED"
    assert done["run_count"] == 1
    tasks = prefect_stack.call(
        "POST", "/task_runs/filter", {"flow_runs": {"id": {"any_": [run["id"]]}}}
    )
    assert tasks == []  # refused before the first stage
    assert not list(prefect_stack.home.glob("runs/*/run.json")) or all(
        "passwd" not in p.read_text() for p in prefect_stack.home.glob("runs/*/config.yaml")
    )


def test_a_finetune_run_trains_on_the_gpu_pool_worker(
    prefect_stack: PrefectStack, mlflow_server: str, s3_server: S3Server
) -> None:
    run = prefect_stack.call(
        "POST",
        f"/deployments/{prefect_stack.deployment_id('finetune')}/create_flow_run",
        {"parameters": {"config": _form(gpu_pool="gpu")}},
    )
    done = prefect_stack.wait(run["id"])
    logs = "\n".join(
        (prefect_stack.root / f"worker-{p}.log").read_text()[-3000:] for p in ("cpu", "gpu")
    )
    assert done["state"]["type"] == "COMPLETED", logs
    assert done["work_pool_name"] == "cpu"

    children = prefect_stack.call(
        "POST",
        "/flow_runs/filter",
        {"deployments": {"id": {"any_": [prefect_stack.deployment_id("gpu-stages")]}}},
    )
    child = next(c for c in children if c["parameters"]["run_id"].startswith("ci-smoke-"))
    assert child["work_pool_name"] == "gpu" and child["state"]["type"] == "COMPLETED"
    parent_tasks = {
        t["name"].rsplit("-", 1)[0]
        for t in prefect_stack.call(
            "POST", "/task_runs/filter", {"flow_runs": {"id": {"any_": [run["id"]]}}}
        )
    }
    child_tasks = {
        t["name"].rsplit("-", 1)[0]
        for t in prefect_stack.call(
            "POST", "/task_runs/filter", {"flow_runs": {"id": {"any_": [child["id"]]}}}
        )
    }
    assert {"train", "export", "evaluate"} <= child_tasks
    assert {"base", "data", "gate", "register"} <= parent_tasks
    assert not {"train", "export", "evaluate"} & parent_tasks

    run_dir = prefect_stack.home / "runs" / child["parameters"]["run_id"]
    result = json.loads((run_dir / "result.json").read_text())
    assert result["status"] == "FINISHED"
    assert result["stages"]["register"]["alias"] == "challenger"
    assert result["mlflow"].startswith(mlflow_server)  # the shared server, not a local store

    # The workers share no folder: the GPU worker took base and data from the run storage
    # (S3), the CPU worker took the exported model back from it, every file's hash checked.
    gpu_dir = prefect_stack.gpu_home / "runs" / run_dir.name
    assert (gpu_dir / "data" / "train.jsonl").read_bytes() == (
        run_dir / "data" / "train.jsonl"
    ).read_bytes()
    assert not (run_dir / "train").joinpath("checkpoints").exists()  # no training here
    # past export the GPU worker dropped the checkpoints; the adapter stays (the next run
    # below is served this training from the cache all the same)
    assert not (gpu_dir / "train" / "checkpoints").exists()
    assert (gpu_dir / "train" / "adapter" / "adapter_model.safetensors").exists()
    merged = Path(result["stages"]["export"]["merged"])
    assert merged.is_relative_to(prefect_stack.home) and (merged / "manifest.json").exists()
    import boto3

    env = s3_server.env
    bucket = boto3.resource(
        "s3",
        endpoint_url=s3_server.endpoint,
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        region_name=env["AWS_DEFAULT_REGION"],
    ).Bucket(s3_server.bucket)
    handed = {o.key.rsplit("/", 1)[1] for o in bucket.objects.filter(
        Prefix=f"stack/handover/{run_dir.name}/"
    )}  # fmt: skip
    assert handed == {f"{s}.json" for s in ("base", "data", "train", "export", "evaluate")}

    # Each UI links to the other: the MLflow parent run carries the flow run's id and URL,
    # the flow run has a markdown artifact with the MLflow link, the scores and the gate.
    from mlflow.tracking import MlflowClient

    mlflow_run_id = result["mlflow"].rsplit("/runs/", 1)[1].split("?")[0]
    tags = MlflowClient(mlflow_server).get_run(mlflow_run_id).data.tags
    assert tags["prefect.flow_run_id"] == run["id"]
    assert tags["prefect.flow_run_url"].endswith(f"/flow-run/{run['id']}")
    artifacts = prefect_stack.call(
        "POST", "/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [run["id"]]}}}
    )
    (report,) = [a for a in artifacts if a["type"] == "markdown"]
    assert result["mlflow"] in report["data"]
    assert "## Gate: PASSED" in report["data"] and "| merged |" in report["data"]

    # The same form again: a new run, its stages served from Prefect's cache (Cached in
    # the UI), the first run's files handed on.
    again = prefect_stack.call(
        "POST",
        f"/deployments/{prefect_stack.deployment_id('finetune')}/create_flow_run",
        {"parameters": {"config": _form(gpu_pool="gpu")}},
    )
    assert prefect_stack.wait(again["id"])["state"]["type"] == "COMPLETED"
    (second_dir,) = [
        p.parent
        for p in (prefect_stack.home / "runs").glob("*/flow_run.json")
        if json.loads(p.read_text())["flow_run_id"] == again["id"]
    ]
    assert second_dir != run_dir
    (second_child,) = [
        c
        for c in prefect_stack.call(
            "POST",
            "/flow_runs/filter",
            {"deployments": {"id": {"any_": [prefect_stack.deployment_id("gpu-stages")]}}},
        )
        if c["parameters"]["run_id"] == second_dir.name
    ]

    def states(flow_run_id: str) -> dict[str, str]:
        found = prefect_stack.call(
            "POST", "/task_runs/filter", {"flow_runs": {"id": {"any_": [flow_run_id]}}}
        )
        return {t["name"].rsplit("-", 1)[0]: t["state"]["name"] for t in found}

    gpu_side = states(second_child["id"])
    assert {gpu_side[s] for s in ("train", "export", "evaluate")} == {"Cached"}, gpu_side
    assert states(again["id"])["base"] == "Cached"
    second = json.loads((second_dir / "result.json").read_text())
    assert second["stages"]["export"]["merged"] == result["stages"]["export"]["merged"]
    assert second["stages"]["evaluate"] == result["stages"]["evaluate"]
    # nothing was trained: the GPU worker's folder of the run has the record, no checkpoint
    second_gpu = prefect_stack.gpu_home / "runs" / second_dir.name / "train"
    assert (second_gpu / "ref.json").exists() and not (second_gpu / "checkpoints").exists()


def test_the_rollout_deployment_serves_a_registered_version_and_makes_it_champion(
    prefect_stack: PrefectStack, mlflow_server: str
) -> None:
    """After the finetune test (same file, same session): its registered version, rolled
    out by the ``rollout`` deployment on the cpu worker behind that worker's endpoint."""
    import urllib.request

    from mlflow.tracking import MlflowClient

    from tasks.core.home import Home
    from tasks.serve import VERSION_HEADER, endpoints, stop_serving

    client = MlflowClient(mlflow_server)
    passed = [
        int(v.version)
        for v in client.search_model_versions("name='slothflow-ci-smoke'")
        if v.tags.get("gate") == "passed"
    ]
    assert passed, "needs the version the finetune test registers (it runs first in this file)"
    version = max(passed)
    form = _form()
    # ci-smoke's six steps do not teach the model to stop: the EOS smoke check would fail
    # it, which is the smoke test's business (test_deploy), not this one's
    form["deploy"].update(smoke={"enabled": False}, load_test={"enabled": False})
    rollout_id = prefect_stack.deployment_id("rollout")

    # a path is not a version: refused before anything is served
    bad = prefect_stack.call(
        "POST",
        f"/deployments/{rollout_id}/create_flow_run",
        {"parameters": {"model": "/etc/passwd", "config": form}},
    )
    refused = prefect_stack.wait(bad["id"])
    assert refused["state"]["type"] == "FAILED" and "not a path" in refused["state"]["message"]

    run = prefect_stack.call(
        "POST",
        f"/deployments/{rollout_id}/create_flow_run",
        {"parameters": {"model": f"slothflow-ci-smoke/{version}", "config": form}},
    )
    home = Home(prefect_stack.home)
    try:
        done = prefect_stack.wait(run["id"])
        log = (prefect_stack.root / "worker-cpu.log").read_text()[-4000:]
        assert done["state"]["type"] == "COMPLETED", log
        aliases = client.get_registered_model("slothflow-ci-smoke").aliases
        assert int(aliases["champion"]) == version and "challenger" not in aliases
        (front,) = endpoints(home)
        key = (home.root / "serve" / f"endpoint-{front.port}" / "api_key").read_text().strip()
        req = urllib.request.Request(
            f"{front.base_url}/models", headers={"Authorization": f"Bearer {key}"}
        )
        with urllib.request.urlopen(req, timeout=30) as r:
            assert r.headers[VERSION_HEADER] == f"slothflow-ci-smoke/{version}"
    finally:
        stop_serving(home)
    assert endpoints(home) == []


def _flow_run_processes(flow_run_id: str) -> list[int]:
    """Processes started for a flow run (the process worker sets PREFECT__FLOW_RUN_ID)."""
    found = []
    for env in Path("/proc").glob("[0-9]*/environ"):
        try:
            if f"PREFECT__FLOW_RUN_ID={flow_run_id}".encode() in env.read_bytes():
                found.append(int(env.parent.name))
        except OSError:
            continue
    return found


def _checkpoint_steps(run_dir: Path) -> list[int]:
    return sorted(
        int(p.name.split("-")[1])
        for p in (run_dir / "train" / "checkpoints").glob("checkpoint-*")
        if (p / COMPLETE_MARKER).exists()  # written last: the checkpoint is whole
    )


def _child_at_a_checkpoint(
    stack: PrefectStack, parent_id: str, beyond: int = 0, not_ids: tuple[str, ...] = ()
) -> dict[str, Any]:
    """The live GPU-stages flow run of pipeline run ``parent_id``, once training has
    committed a checkpoint past step ``beyond``."""
    import time

    deadline = time.time() + 300
    while time.time() < deadline:
        kids = [
            c
            for c in stack.call(
                "POST",
                "/flow_runs/filter",
                {"deployments": {"id": {"any_": [stack.deployment_id("gpu-stages")]}}},
            )
            if c["state"]["type"] in ("RUNNING", "PENDING", "SCHEDULED") and c["id"] not in not_ids
        ]
        for child in kids:
            assert child["state"]["type"] not in ("FAILED", "CRASHED"), child["state"]
            run_dir = stack.gpu_home / "runs" / child["parameters"]["run_id"]
            if [s for s in _checkpoint_steps(run_dir) if s > beyond]:
                return dict(child)
        time.sleep(0.5)
    raise AssertionError(f"the GPU stages of {parent_id} never reached a checkpoint")


def test_a_cancelled_run_resumes_and_survives_losing_its_gpu_worker(
    prefect_stack: PrefectStack,
) -> None:
    """One run's whole life as an operator meets it, in one training so CI pays once:
    cancelled from the UI after a checkpoint (nothing left running, resumable), resumed;
    then the resumed run loses its node — the GPU worker and the stage's process die at
    once (SIGKILL, nothing runs a handler). The heartbeats stop, the crash automation
    (infra/automations/) marks the GPU stages' run Crashed and reschedules it, a
    replacement worker picks it up and it resumes from its last checkpoint; the pipeline
    run that waits on it completes."""
    import signal
    import time

    from tasks.core.refs import TrainRef, load_ref

    # 1. Wait for the GPU stages' first checkpoint, then cancel the parent as the UI does.
    form = _form(gpu_pool="gpu")
    form["train"].update(max_steps=300, eval_steps=10, save_steps=10, logging_steps=10)
    fid = prefect_stack.deployment_id("finetune")
    run = prefect_stack.call(
        "POST", f"/deployments/{fid}/create_flow_run", {"parameters": {"config": form}}
    )
    child = _child_at_a_checkpoint(prefect_stack, run["id"])
    run_id = child["parameters"]["run_id"]
    prefect_stack.call(
        "POST",
        f"/flow_runs/{run['id']}/set_state",
        {"state": {"type": "CANCELLING", "message": "cancelled by the test"}, "force": True},
    )
    parent = prefect_stack.wait(run["id"], timeout=120)
    assert parent["state"]["type"] == "CANCELLED"
    cancelled = prefect_stack.wait(child["id"], timeout=120)
    assert cancelled["state"]["type"] in ("CANCELLED", "CRASHED"), cancelled["state"]
    # Nothing of either run is left running, and the GPU worker's slot is free again.
    deadline = time.time() + 30
    while (_flow_run_processes(run["id"]) or _flow_run_processes(child["id"])) and (
        time.time() < deadline
    ):
        time.sleep(0.5)
    assert not _flow_run_processes(child["id"]) and not _flow_run_processes(run["id"])
    run_dir = prefect_stack.home / "runs" / run_id
    gpu_dir = prefect_stack.gpu_home / "runs" / run_id  # where training ran
    assert not (gpu_dir / "train" / "ref.json").exists()  # training did not finish
    at_cancel = _checkpoint_steps(gpu_dir)
    assert at_cancel and max(at_cancel) < 300

    # 2. Resumable: the same run picks up from its checkpoint ...
    again = prefect_stack.call(
        "POST",
        f"/deployments/{fid}/create_flow_run",
        {"parameters": {"config": form, "resume_run_id": run_id}},
    )
    # ... and, once it has committed a checkpoint of its own, its node dies.
    child = _child_at_a_checkpoint(
        prefect_stack, again["id"], beyond=max(at_cancel), not_ids=(child["id"],)
    )
    assert prefect_stack.workers is not None
    worker = prefect_stack.workers["gpu"]
    os.killpg(worker.pid, signal.SIGKILL)
    worker.wait()
    for pid in _flow_run_processes(child["id"]):
        os.kill(pid, signal.SIGKILL)
    at_kill = _checkpoint_steps(gpu_dir)
    assert max(at_kill) > max(at_cancel) and not (gpu_dir / "train" / "ref.json").exists()
    prefect_stack.start_worker("gpu")  # the replacement node

    done = prefect_stack.wait(again["id"], timeout=600)
    assert done["state"]["type"] == "COMPLETED", done["state"]
    result = json.loads((run_dir / "result.json").read_text())
    assert result["status"] == "FINISHED" and result["run_id"] == run_id
    after = prefect_stack.call("GET", f"/flow_runs/{child['id']}")
    assert after["state"]["type"] == "COMPLETED" and after["run_count"] >= 2
    history = [
        (h["type"], h["name"])
        for h in prefect_stack.call("GET", f"/flow_run_states/?flow_run_id={child['id']}")
    ]
    assert ("CRASHED", "Crashed") in history and ("SCHEDULED", "AwaitingRetry") in history
    trained = load_ref(gpu_dir / "train", TrainRef)
    # the last resume started from a checkpoint the first resume wrote
    assert trained.metrics["resumed_from_step"] > max(at_cancel)
    assert trained.metrics["global_step"] == 300
    log_text = (prefect_stack.root / "worker-gpu.log").read_text()
    assert "resum" in log_text.lower()


CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = REPO / "test-artifacts" / "ui"


def test_a_run_started_from_the_prefect_ui_form_completes(prefect_stack: PrefectStack) -> None:
    """Debian's Chromium driven by Playwright: log in, open the finetune deployment's run
    form, find the config fields with their descriptions, submit a ci-smoke run through the
    form's JSON input, and see it complete. Screenshots go to test-artifacts/ui/."""
    if not CHROMIUM.exists():
        if os.environ.get("CI") == "true":
            pytest.fail("CI needs Debian's chromium for the UI test (make test installs it)")
        pytest.skip("no /usr/bin/chromium (apt-get install -y chromium)")
    import time

    from playwright.sync_api import sync_playwright

    from .conftest import PREFECT_AUTH

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    ui = prefect_stack.api_url.removesuffix("/api")
    fid = prefect_stack.deployment_id("finetune")
    before = {r["id"] for r in prefect_stack.call("POST", "/flow_runs/filter", {})}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(ui + "/")
            page.get_by_placeholder("admin:pass").fill(PREFECT_AUTH)
            page.get_by_role("button", name="Login").click()
            page.get_by_text("Dashboard").first.wait_for()
            page.goto(f"{ui}/deployments/deployment/{fid}/run")
            page.get_by_text("Data cleaning stage.").first.wait_for(timeout=30_000)
            text = page.inner_text("body")
            for shown in (
                "Sources (Optional)",
                "Input files or fsspec URLs",
                "Learning Rate (Optional)",
                "Peak learning rate.",
                "Gpu Pool (Optional)",
            ):
                assert shown in text, shown
            assert "Vllm Command" not in text and "Tracking Uri" not in text
            page.screenshot(path=str(ARTIFACTS / "run-form.png"))
            page.locator("text=config (Optional)").locator("xpath=..").locator(
                "button"
            ).first.click()
            page.get_by_text("Use JSON input").click()
            page.locator("textarea.p-code-input__textarea").fill(
                json.dumps(_form(gpu_pool="gpu"), indent=2)
            )
            # The run exists once the form posted it (the UI's toast for it is gone in a
            # few seconds, and a busy machine may draw it late: the API is the witness).
            # The test server is SQLite: under concurrent writes (two workers polling
            # every 2 s) it can answer "database is locked" (503), which Prefect's Python
            # client retries and the UI shows as "Something went wrong"; a user submits
            # again, and so does this test (three times at most, never after a run exists).
            created: list[dict[str, Any]] = []
            failed = page.get_by_text("Something went wrong")
            for _attempt in range(3):
                errors = failed.count()  # toasts already shown (the page's own calls)
                page.get_by_role("button", name="Submit").click()
                deadline = time.time() + 30
                while time.time() < deadline and not created:
                    created = [
                        r
                        for r in prefect_stack.call("POST", "/flow_runs/filter", {})
                        if r["id"] not in before and r["deployment_id"] == fid
                    ]
                    if not created and failed.count() > errors:  # this submit failed
                        break
                    time.sleep(0.5)
                if created:
                    break
                page.wait_for_timeout(2000)
            if not created:
                page.screenshot(path=str(ARTIFACTS / "submit-failed.png"))
                raise AssertionError("the form created no run:\n" + page.inner_text("body")[-2000:])
            (new,) = created
            done = prefect_stack.wait(new["id"])
            assert done["state"]["type"] == "COMPLETED", done["state"]
            assert done["parameters"]["config"]["name"] == "ci-smoke"
            page.goto(f"{ui}/runs/flow-run/{new['id']}")
            page.get_by_text("Completed").first.wait_for(timeout=30_000)
            page.wait_for_timeout(1500)  # the graph draws after the state badge
            page.screenshot(path=str(ARTIFACTS / "run-completed.png"))
        finally:
            browser.close()
