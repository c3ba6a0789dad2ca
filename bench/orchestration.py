"""Benchmark: what Prefect and MLflow add to a run of the embedded default.

    .venv/bin/python bench/orchestration.py [--recipe default] [--repeat 2] [--set ...]

Three arms, one after the other (``--repeat N``: N rounds, every other one in reverse
order, the medians compared), each in a fresh SLOTHFLOW_HOME (so every arm builds the
base, cleans, trains, merges, evaluates and serves from nothing):

* ``direct_s``: the stage functions called in this process, no Prefect and no MLflow
  (each Prefect task's ``.fn`` with a run context that has no tracking);
* ``flow_s``: ``slothflow run`` as a user runs it (Prefect's temporary server, MLflow on
  SQLite in the home);
* ``deployment_s``: the ``finetune`` deployment on a local Prefect server with a ``cpu``
  process worker and an MLflow server, from ``create_flow_run`` to the run's final state
  (the server, pool, deployment and worker are started before the clock starts).

Prints a table and writes ``bench/results/orchestration-<UTC stamp>.json`` with the arms'
median wall times under ``arms`` and every round under ``details``. Target: flow and
deployment under 5 s over the direct calls.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
sys.path.insert(0, str(REPO))

AUTH = "bench:not-a-secret"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env(home: Path) -> dict[str, str]:
    from tasks.core import home as home_mod

    derived = set(home_mod.environment_for(home_mod.Home(home)))
    env = {k: v for k, v in os.environ.items() if k not in derived and not k.startswith("PREFECT_")}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.update(SLOTHFLOW_HOME=str(home), HF_HUB_OFFLINE="1", MLFLOW_DISABLE_TELEMETRY="true")
    return env


def _stop_serving(home: Path, port: int) -> None:
    subprocess.run(
        [str(BIN / "slothflow"), "serve", "stop", "--port", str(port)],
        env=_env(home),
        capture_output=True,
        check=False,
    )


def direct_arm(recipe: str, overrides: list[str], home: Path) -> dict[str, Any]:
    """The stage functions in this process: what the pipeline costs without orchestration
    or tracking. Run in a child so its home and imports are its own."""
    code = f"""
import json, sys, time
sys.path.insert(0, {str(REPO)!r})
t0 = time.perf_counter()
from tasks.core import home as home_mod
home = home_mod.resolve_home()
home_mod.activate(home.root)
from tasks.base_model import prepare_base_task
from tasks.core import hardware, run as run_mod, tracking
from tasks.core.config import config_hash, dump_config, load_config
from tasks.core.refs import GateBar, RunContext
from tasks.data import clean_task
from tasks.evaluate import evaluate_task
from tasks.export import export_task
from tasks.gate import gate_task
from tasks.serve import deploy_task
from tasks.train import train_task
cfg = load_config({recipe!r}, {overrides!r})
chash = config_hash(cfg)
run_id = run_mod.new_run_id(cfg, chash)
(home.run_dir(run_id)).mkdir(parents=True)
decision = hardware.decide(cfg, hardware.probe())
ctx = RunContext(run_id=run_id, run_dir=str(home.run_dir(run_id)), config_hash=chash,
    code_version=tracking.code_version(), tracking=None,
    hardware={{k.removeprefix("hardware."): v for k, v in decision.as_params().items()}})
stages = {{"imports": time.perf_counter() - t0}}
def timed(name, task, *args, **kwargs):
    t = time.perf_counter()
    out = task.fn(*args, **kwargs)
    stages[name] = time.perf_counter() - t
    return out
base = timed("base", prepare_base_task, ctx, cfg.model)
data = timed("data", clean_task, ctx, cfg.data, base, None)
trained = timed("train", train_task, ctx, cfg.train, cfg.model, base, data,
    max_new_tokens=cfg.eval.max_new_tokens, resolved_config=dump_config(cfg), system_metrics=False)
exported = timed("export", export_task, ctx, cfg.export, trained, data,
    served_model_name=cfg.tracking.registered_model, max_new_tokens=cfg.eval.max_new_tokens,
    max_seq_length=cfg.model.max_seq_length)
ev = timed("evaluate", evaluate_task, ctx, cfg.eval, data, exported, None)
gate = timed("gate", gate_task, ctx, cfg.eval, ev)
if gate.passed and cfg.deploy.enabled:
    timed("serve", deploy_task, ctx, cfg.deploy, exported.candidate_path,
        heldout_path=data.validation_path, evaluation=ev)
print(json.dumps({{"wall_s": time.perf_counter() - t0, "gate": gate.passed,
    "score": ev.scores[ev.candidate][ev.primary_metric], "stages": stages}}))
"""
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", code], env=_env(home), capture_output=True, text=True, cwd=REPO
    )
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError("direct arm failed:\n" + proc.stderr[-3000:])
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"wall_s": wall, "gate": out["gate"], "score": out["score"], "stages": out["stages"]}


def flow_arm(recipe: str, overrides: list[str], home: Path) -> dict[str, Any]:
    sets = [a for o in overrides for a in ("--set", o)]
    t0 = time.perf_counter()
    proc = subprocess.run(
        [str(BIN / "slothflow"), "run", "-r", recipe, *sets],
        env=_env(home),
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError("flow arm failed:\n" + proc.stderr[-3000:] + proc.stdout[-2000:])
    result = json.loads(next(iter(sorted(home.glob("runs/*/result.json")))).read_text())
    metric = result["gate"]["metric"]
    return {"wall_s": wall, "gate": result["gate"]["passed"], "score": result["gate"]["candidate"],
            "metric": metric}  # fmt: skip


class _Stack:
    """A Prefect server, the cpu pool, `prefect deploy --all`, a cpu worker, an MLflow
    server: started before the deployment arm's clock, stopped after."""

    def __init__(self, root: Path, home: Path) -> None:
        self.root = root
        self.procs: list[tuple[subprocess.Popen[bytes], int]] = []
        port, mport = _free_port(), _free_port()
        self.api = f"http://127.0.0.1:{port}/api"
        base = _env(home)
        self.client = {**base, "PREFECT_HOME": str(root / "client"), "PREFECT_API_URL": self.api,
                       "PREFECT_API_AUTH_STRING": AUTH}  # fmt: skip
        self._start("server", [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1",
                               "--port", str(port)],
                    {**self.client, "PREFECT_HOME": str(root / "server"),
                     "PREFECT_SERVER_API_AUTH_STRING": AUTH,
                     "PREFECT_SERVER_ANALYTICS_ENABLED": "false"})  # fmt: skip
        self._start("mlflow", [str(BIN / "mlflow"), "server", "--backend-store-uri",
                               f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination",
                               str(root / "artifacts"), "--host", "127.0.0.1", "--port",
                               str(mport), "--workers", "1"],
                    # as the compose stack runs it: no job runners (slothflow has no jobs)
                    {**base, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})  # fmt: skip
        self.mlflow = f"http://127.0.0.1:{mport}"
        self._wait(self.api + "/health")
        self._wait(self.mlflow + "/health")
        run = {"env": self.client, "check": True, "capture_output": True, "cwd": REPO}
        subprocess.run([str(BIN / "prefect"), "work-pool", "create", "cpu", "--type", "process",
                        "--base-job-template", str(REPO / "infra/work-pools/process.json")],
                       **run)  # type: ignore[call-overload]  # fmt: skip
        subprocess.run([str(BIN / "prefect"), "--no-prompt", "deploy", "--name", "finetune"],
                       **run)  # type: ignore[call-overload]  # fmt: skip
        self._start("worker", [str(BIN / "prefect"), "worker", "start", "--pool", "cpu"],
                    {**self.client, "PREFECT_HOME": str(root / "worker"),
                     "MLFLOW_TRACKING_URI": self.mlflow,
                     # the README's worker setting: a run is picked up within 2 s
                     "PREFECT_WORKER_QUERY_SECONDS": "2"}, sig=signal.SIGINT)  # fmt: skip
        while not self.call("POST", "/work_pools/cpu/workers/filter", {}):
            time.sleep(0.5)

    def _start(self, name: str, argv: list[str], env: dict[str, str], sig: int = 15) -> None:
        log = open(self.root / f"{name}.log", "wb")  # noqa: SIM115 (the process keeps it)
        proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                                start_new_session=True)  # fmt: skip
        self.procs.append((proc, sig))

    def _wait(self, url: str) -> None:
        import urllib.request

        for _ in range(240):
            try:
                with urllib.request.urlopen(url, timeout=2):
                    return
            except OSError:
                time.sleep(0.5)
        raise RuntimeError(f"{url} did not come up")

    def call(self, method: str, path: str, body: object = None) -> Any:
        import base64
        import urllib.request

        req = urllib.request.Request(
            self.api + path, method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={"content-type": "application/json",
                     "authorization": "Basic " + base64.b64encode(AUTH.encode()).decode()},
        )  # fmt: skip
        import urllib.error

        for attempt in range(5):
            try:
                with urllib.request.urlopen(req, timeout=30) as r:
                    return json.loads(r.read() or b"null")
            except urllib.error.HTTPError as exc:
                # SQLite busy: the server answers 503 for a moment (Prefect's client retries)
                if exc.code != 503 or attempt == 4:
                    raise
                time.sleep(1 + attempt)
        raise AssertionError("unreachable")

    def stop(self) -> None:
        for proc, sig in reversed(self.procs):
            if proc.poll() is None:
                os.killpg(proc.pid, sig)
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)


def _ts(value: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def _timeline(stack: _Stack, flow_run_id: str, t0: float) -> dict[str, float]:
    """Where the deployment arm's seconds went, from the server's records: the wait for a
    worker and its new process (created -> Running), each stage task's run time, and what
    is left after the last task (the flow's end, the state's round trip)."""
    fr = stack.call("GET", f"/flow_runs/{flow_run_id}")
    tasks = stack.call("POST", "/task_runs/filter", {"flow_runs": {"id": {"any_": [flow_run_id]}}})
    out: dict[str, float] = {"to_running": _ts(fr["start_time"]) - t0}
    for t in tasks:
        if t["start_time"] and t["end_time"]:
            out[t["name"].split("-")[0]] = _ts(t["end_time"]) - _ts(t["start_time"])
    ends = [_ts(t["end_time"]) for t in tasks if t["end_time"]]
    if ends and fr["end_time"]:
        out["after_last_task"] = _ts(fr["end_time"]) - max(ends)
    return out


def deployment_arm(recipe: str, overrides: list[str], home: Path, root: Path) -> dict[str, Any]:
    from tasks.core.config import load_config
    from tasks.core.settings import form_of

    stack = _Stack(root, home)
    try:
        fid = stack.call("POST", "/deployments/filter", {})[0]["id"]
        form = form_of(load_config(recipe, overrides)).model_dump(mode="json")
        t0, t0_wall = time.perf_counter(), time.time()
        run = stack.call("POST", f"/deployments/{fid}/create_flow_run",
                         {"parameters": {"config": form}})  # fmt: skip
        while True:
            state = stack.call("GET", f"/flow_runs/{run['id']}")["state"]
            if state["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
                break
            time.sleep(0.25)
        wall = time.perf_counter() - t0
        if state["type"] != "COMPLETED":
            raise RuntimeError(
                f"deployment arm ended {state['type']}: {state['message']}\n"
                + (root / "worker.log").read_text()[-3000:]
            )
        result = json.loads(next(iter(sorted(home.glob("runs/*/result.json")))).read_text())
        return {"wall_s": wall, "gate": result["gate"]["passed"],
                "score": result["gate"]["candidate"],
                "stages": _timeline(stack, run["id"], t0_wall)}  # fmt: skip
    finally:
        stack.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--recipe", default="default")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="rounds of the three arms, the order reversed every other round (a busy "
        "machine drifts); the table gives each arm's median",
    )
    args = ap.parse_args()
    # SIGTERM unwinds like Ctrl-C: the finally clauses stop the servers and the worker.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    from tasks.core.config import load_config

    port = load_config(args.recipe, args.overrides).deploy.port
    rounds: dict[str, list[dict[str, Any]]] = {"direct": [], "flow": [], "deployment": []}
    scratch = Path(tempfile.mkdtemp(prefix="bench-orch-"))
    try:
        for r in range(args.repeat):
            order = ["direct", "flow", "deployment"]
            for name in order if r % 2 == 0 else order[::-1]:
                home = scratch / f"{name}-home-{r}"
                print(f"round {r + 1}: arm {name} ...", flush=True)
                try:
                    if name == "direct":
                        rec = direct_arm(args.recipe, args.overrides, home)
                    elif name == "flow":
                        rec = flow_arm(args.recipe, args.overrides, home)
                    else:
                        (scratch / f"stack-{r}").mkdir()
                        rec = deployment_arm(
                            args.recipe, args.overrides, home, scratch / f"stack-{r}"
                        )
                    rounds[name].append(rec | {"load_before": os.getloadavg()[0]})
                finally:
                    _stop_serving(home, port)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    import statistics

    arms = {
        name: {
            "wall_s": statistics.median(x["wall_s"] for x in recs),
            "gate": all(x["gate"] for x in recs),
            "score": recs[0]["score"],
            "rounds_s": [round(x["wall_s"], 1) for x in recs],
        }
        for name, recs in rounds.items()
    }
    direct = arms["direct"]["wall_s"]
    print(f"\n{'arm':<12} {'wall s':>8} {'over direct s':>14} {'over %':>8}  gate  score  rounds")
    for name, a in arms.items():
        over = a["wall_s"] - direct
        print(
            f"{name:<12} {a['wall_s']:8.1f} {over:14.1f} {100 * over / direct:7.1f}%  "
            f"{'pass' if a['gate'] else 'FAIL'}  {a['score']:.4f}  {a['rounds_s']}"
        )
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    out = REPO / "bench" / "results" / f"orchestration-{stamp}.json"
    out.write_text(
        json.dumps(
            {
                "recipe": args.recipe,
                "overrides": args.overrides,
                "arms": {f"{k}_s": round(v["wall_s"], 2) for k, v in arms.items()},
                "over_direct_s": {
                    f"{k}_s": round(v["wall_s"] - direct, 2)
                    for k, v in arms.items()
                    if k != "direct"
                },
                "repeat": args.repeat,
                "details": rounds,
                "target_over_direct_s": 5.0,
                "machine": {
                    "cpus": os.cpu_count(),
                    "platform": platform.platform(),
                    "load": os.getloadavg(),
                },
                "command": "python bench/orchestration.py " + " ".join(sys.argv[1:]),
            },
            indent=2,
        )
        + "\n"
    )
    print(f"\nwrote {out.relative_to(REPO)}")


if __name__ == "__main__":
    main()
