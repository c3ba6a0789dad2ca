"""The whole pipeline on a GPU, run the way a GPU user runs it (marked ``gpu``: skipped
without CUDA; run on the device machine with the kit that ``make gpu-kit`` builds):

    source .gpu/setup.sh && GPU_E2E_OUT=$OUT python3 -m pytest tests/test_gpu_e2e.py -s

One host, as on a single GPU box: a Prefect server (SQLite, basic auth), an MLflow server
(SQLite), the ``cpu`` and ``gpu`` process pools from ``infra/work-pools/``, ``prefect
deploy --all`` of ``prefect.yaml``, and a worker per pool (the gpu one with ``--limit 1``)
sharing one ``SLOTHFLOW_HOME``. A ``finetune`` run of the ``gpu-1b`` recipe (Llama-3.2-1B's
shape built on the spot, 4-bit QLoRA with Unsloth) is created through the API; its GPU
stages run as the ``gpu-stages`` deployment on the gpu worker. Every command goes through
``python -m`` because the kit installs into a folder on PYTHONPATH, without console
scripts. The test asserts the stage outputs, the MLflow records and the parity figure, and
writes ``gpu_e2e-<UTC stamp>.json`` (each stage's seconds and peak GPU memory) to
``$GPU_E2E_OUT`` (the device's ``$OUT``; ``bench/results/`` keeps the committed ones).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tasks.core import settings
from tasks.core.config import load_config
from tests.conftest import (
    PREFECT_AUTH,
    REPO,
    PrefectStack,
    _all_ok,
    _stop,
    _wait_http,
    clean_env,
    free_port,
    stack_client_env,
)

pytestmark = [pytest.mark.gpu, pytest.mark.e2e, pytest.mark.slow]

RECIPE = "gpu-1b"
PY = [sys.executable, "-m"]
STAGES = ("base", "data", "train", "export", "evaluate", "gate", "register")


@contextlib.contextmanager
def one_host_stack(root: Path) -> Iterator[tuple[PrefectStack, str]]:
    """Prefect server + MLflow server + the cpu and gpu workers on one host sharing one
    home: (the stack, the MLflow server's URI). Everything stops on exit."""
    import signal

    port, mport = free_port(), free_port()
    api = f"http://127.0.0.1:{port}/api"
    mlflow_uri = f"http://127.0.0.1:{mport}"
    base = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "SLOTHFLOW_"))}
    client = stack_client_env(root, api)
    (root / "fakehome").mkdir(parents=True, exist_ok=True)
    procs: list[tuple[subprocess.Popen[bytes], int]] = []
    logs = []

    def start(name: str, argv: list[str], env: dict[str, str], sig: int) -> subprocess.Popen[bytes]:
        log = open(root / f"{name}.log", "ab")  # noqa: SIM115 (closed on exit)
        logs.append(log)
        proc = subprocess.Popen(
            argv, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        procs.append((proc, sig))
        return proc

    home = root / "home"
    try:
        server = start(
            "server",
            [*PY, "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            {**client, "PREFECT_HOME": str(root / "server"),
             "PREFECT_SERVER_API_AUTH_STRING": PREFECT_AUTH, "PREFECT_UI_API_URL": api},
            signal.SIGTERM,
        )  # fmt: skip
        mlflow = start(
            "mlflow",
            [*PY, "mlflow", "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
             "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1",
             "--port", str(mport), "--workers", "1"],
            base,
            signal.SIGKILL,  # a throwaway server: its job runners ignore SIGINT for ~10 s
        )  # fmt: skip
        _wait_http(api + "/health", server, root / "server.log")
        _wait_http(mlflow_uri + "/health", mlflow, root / "mlflow.log")
        _all_ok([
            [*PY, "prefect", "work-pool", "create", pool, "--type", "process",
             "--base-job-template", str(REPO / "infra" / "work-pools" / "process.json")]
            for pool in ("cpu", "gpu")
        ], client)  # fmt: skip
        worker = {
            **clean_env(home, root / "fakehome"),
            **client,
            "PREFECT_HOME": str(root / "worker"),
            "MLFLOW_TRACKING_URI": mlflow_uri,
            "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "30",
            "PREFECT_WORKER_QUERY_SECONDS": "2",
        }
        for pool in ("cpu", "gpu"):
            start(
                f"worker-{pool}",
                [*PY, "prefect", "worker", "start", "--pool", pool, "--name", f"e2e-{pool}",
                 *(["--limit", "1"] if pool == "gpu" else [])],
                # The cpu worker sees no GPU, as on the CPU node it normally runs on: the
                # pipeline's side of a GPU recipe must not need one.
                {**worker, **({"CUDA_VISIBLE_DEVICES": ""} if pool == "cpu" else {})},
                signal.SIGINT,  # a worker stops on SIGINT (ENVIRONMENT.md)
            )  # fmt: skip
        _all_ok([[*PY, "prefect", "--no-prompt", "deploy", "--all"]], client)
        stack = PrefectStack(api_url=api, home=home, gpu_home=home, env=client, root=root)
        deadline = time.time() + 120
        while not all(
            stack.call("POST", f"/work_pools/{p}/workers/filter", {}) for p in ("cpu", "gpu")
        ):
            if time.time() > deadline:
                raise RuntimeError("the workers did not register")
            time.sleep(0.5)
        yield stack, mlflow_uri
    finally:
        for proc, sig in reversed(procs):
            _stop(proc, sig, grace=10)
        for log in logs:
            log.close()
        if out := os.environ.get("GPU_E2E_OUT"):  # the device returns only what is there
            tails = [
                f"===== {f.name}\n" + f.read_text(errors="replace")[-40_000:]
                for f in sorted(root.glob("*.log"))
            ]
            Path(out).mkdir(parents=True, exist_ok=True)
            (Path(out) / "gpu_e2e-stack-logs.txt").write_text("\n".join(tails))


def run_finetune(
    stack: PrefectStack, recipe: str, timeout: float = 540
) -> tuple[dict[str, Any], dict[str, Any], float]:
    """A finetune run of ``recipe`` with its GPU stages on the gpu pool, created as the UI
    does and waited for: (the pipeline's flow run, its gpu-stages flow run, wall seconds)."""
    form = settings.form_of(load_config(recipe)).model_dump(mode="json")
    form["orchestration"]["gpu_pool"] = "gpu"
    t0 = time.perf_counter()
    run = stack.call(
        "POST",
        f"/deployments/{stack.deployment_id('finetune')}/create_flow_run",
        {"parameters": {"config": form}},
    )
    done = stack.wait(run["id"], timeout=timeout)
    wall = time.perf_counter() - t0
    children = [
        c
        for c in stack.call(
            "POST",
            "/flow_runs/filter",
            {"deployments": {"id": {"any_": [stack.deployment_id("gpu-stages")]}}},
        )
        if c["parent_task_run_id"] is not None
    ]
    logs = "\n".join(
        f"--- {p}\n" + (stack.root / f"{p}.log").read_text(errors="replace")[-6000:]
        for p in ("worker-cpu", "worker-gpu")
    )
    assert done["state"]["type"] == "COMPLETED", logs
    assert len(children) == 1, children
    return done, children[0], wall


def stage_records(mlflow_uri: str, parent_run_id: str) -> dict[str, dict[str, Any]]:
    """Each stage's MLflow run under the pipeline's: status, seconds, metrics."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_uri)
    parent = client.get_run(parent_run_id)
    runs = client.search_runs(
        [parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent_run_id}'"
    )
    out = {}
    for r in runs:
        out[r.data.tags["slothflow.stage"]] = {
            "status": r.info.status,
            "seconds": (r.info.end_time - r.info.start_time) / 1000 if r.info.end_time else None,
            "metrics": dict(r.data.metrics),
            "params": dict(r.data.params),
        }
    return out


@pytest.fixture(scope="module")
def gpu_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[PrefectStack, str]]:
    with one_host_stack(tmp_path_factory.mktemp("gpu-stack")) as stack:
        yield stack


def test_the_gpu_recipe_runs_end_to_end_through_a_gpu_worker(
    gpu_stack: tuple[PrefectStack, str], tmp_path: Path
) -> None:
    import torch

    stack, mlflow_uri = gpu_stack
    record: dict[str, Any] = {
        "recipe": RECIPE,
        "gpu": torch.cuda.get_device_name(0),
        "passed": False,
        "command": "source .gpu/setup.sh && GPU_E2E_OUT=$OUT python3 -m pytest "
        "tests/test_gpu_e2e.py -s",
    }
    out = Path(os.environ.get("GPU_E2E_OUT") or tmp_path)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    try:
        done, child, wall = run_finetune(stack, RECIPE)
        record["wall_s"] = round(wall, 1)
        # The GPU stages ran as the gpu-stages deployment, on the gpu pool's worker.
        assert done["work_pool_name"] == "cpu"
        assert child["work_pool_name"] == "gpu" and child["state"]["type"] == "COMPLETED"
        run_dir = stack.home / "runs" / child["parameters"]["run_id"]
        result = json.loads((run_dir / "result.json").read_text())
        assert result["status"] == "FINISHED", result
        record["result"] = result["stages"]
        mlflow_run_id = result["mlflow"].rsplit("/runs/", 1)[1].split("?")[0]
        stages = stage_records(mlflow_uri, mlflow_run_id)
        record["stages"] = {
            s: {
                "seconds": stages[s]["seconds"] and round(stages[s]["seconds"], 1),
                "peak_gb": stages[s]["metrics"].get("stage_gpu_peak_gb"),
            }
            for s in STAGES
            if s in stages
        }
        assert set(STAGES) <= set(stages), sorted(stages)
        assert all(stages[s]["status"] == "FINISHED" for s in STAGES), stages

        # train: Unsloth, 4-bit, on the GPU, and it learned
        train = stages["train"]
        assert train["params"]["train.backend"] == "unsloth", train["params"]
        assert train["params"]["train.device"] == "cuda"
        assert train["params"]["train.load_in_4bit"] == "True"
        assert train["metrics"]["final_train_loss"] < 2.0, train["metrics"]
        assert 0.5 < train["metrics"]["gpu_peak_mem_gb"] < 40
        record["train"] = {k: train["metrics"].get(k) for k in (
            "final_train_loss", "final_best_eval_loss", "final_train_tokens_per_s",
            "final_global_step", "gpu_peak_mem_gb")}  # fmt: skip
        # export: Unsloth's merged 16-bit save, parity with base + adapter, and it stops
        export = stages["export"]
        assert export["params"]["export.merge_method"] == "unsloth", export["params"]
        parity = export["metrics"]["export.parity_max_abs_diff"]
        record["parity_max_abs_diff"] = parity
        record["parity_atol"] = float(export["params"]["export.parity_atol"])
        assert parity <= record["parity_atol"], export
        assert export["metrics"]["export.stop_fraction"] >= 0.9, export["metrics"]
        merged = Path(result["stages"]["export"]["merged"])
        assert list(merged.glob("*.safetensors")) and not list(merged.glob("*.bin"))
        # evaluate: lm-eval on the GPU, base vs adapter vs merged
        ev = stages["evaluate"]["metrics"]
        record["scores"] = {k: ev[f"{k}.exact_match"] for k in ("base", "adapter", "merged")}
        assert ev["merged.exact_match"] == pytest.approx(ev["adapter.exact_match"], abs=0.02)
        # the gate passed and the version is registered as the challenger
        assert result["gate"]["passed"], result["gate"]
        assert result["stages"]["register"]["alias"] == "challenger"
        from mlflow.tracking import MlflowClient

        name, number = result["stages"]["register"]["model"].rsplit("/", 1)
        version = MlflowClient(mlflow_uri).get_model_version_by_alias(name, "challenger")
        assert version.version == number
        record["registered"] = result["stages"]["register"]["model"]
        for s in ("train", "export", "evaluate"):
            assert (stages[s]["metrics"].get("stage_gpu_peak_gb") or 0) > 0.1, (s, stages[s])
        record["passed"] = True
    finally:
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"gpu_e2e-{stamp}.json"
        path.write_text(json.dumps(record, indent=2, default=str) + "\n")
        print(f"\nGPU-E2E {path}: " + json.dumps(record.get("stages"), default=str), flush=True)
