"""The one module that owns MLflow.

Stage functions never import MLflow: they receive a :class:`Tracker` (a small
callback interface) and call it. :class:`NullTracker` records nothing and needs no
MLflow (the GPU machine has none); :class:`MlflowTracker` writes to a run through
``MlflowClient`` with explicit run ids, so stages running in Prefect's worker
threads never share MLflow's global "active run" state.

Run layout: one parent run per pipeline run, one nested run per stage. Both are
found again by tags (``slothflow.run_id``, ``slothflow.stage``), so a resumed run
re-attaches to its MLflow runs instead of starting new ones.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol

from pydantic import BaseModel

from tasks.core.config import REPO_ROOT, TrackingConfig
from tasks.core.home import Home

log = logging.getLogger(__name__)

TAG_RUN_ID = "slothflow.run_id"
TAG_STAGE = "slothflow.stage"
TAG_KIND = "slothflow.kind"
TAG_ATTEMPT = "slothflow.attempt"  # 1 for a new run, +1 each time a resume re-attaches
TAG_RECIPE = "slothflow.recipe"
TAG_SOURCE_FINGERPRINT = "slothflow.source_fingerprint"  # the raw inputs (tasks.data.fingerprint)


class TrackingUnavailableError(RuntimeError):
    """The configured tracking store cannot be reached."""


class Tracker(Protocol):
    """What a stage may record. Every method is cheap to call and never raises for
    a missing tracking backend (use :class:`NullTracker`)."""

    def log_params(self, params: Mapping[str, Any]) -> None: ...
    def log_metrics(
        self,
        metrics: Mapping[str, float],
        step: int | None = None,
        timestamp_ms: int | None = None,
    ) -> None:
        """Metric points at ``step``, stamped ``timestamp_ms`` (default: now). Sending the
        very same points again (values, step and timestamp) leaves one copy in MLflow:
        how the training journal makes a resend after a kill harmless."""
        ...

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None: ...
    def log_dict(self, obj: Any, name: str) -> None: ...
    def log_text(self, text: str, name: str) -> None: ...
    def set_tags(self, tags: Mapping[str, str]) -> None: ...
    def log_attempt_params(self, params: Mapping[str, Any]) -> None: ...
    def log_input(
        self, name: str, source: str, sha256: str, context: str, num_rows: int | None = None
    ) -> None: ...

    @property
    def mlflow_run_id(self) -> str | None:
        """The MLflow run this tracker writes to (None: no MLflow). The registry attaches
        a version's artifacts to it."""
        ...

    def system_metrics(self, interval_s: float) -> contextlib.AbstractContextManager[None]:
        """Sample GPU/CPU/disk metrics into the run while the block runs; never fails."""
        ...


class NullTracker:
    """Records nothing. The default for stage functions run outside the pipeline."""

    def log_params(self, params: Mapping[str, Any]) -> None:
        pass

    def log_metrics(
        self,
        metrics: Mapping[str, float],
        step: int | None = None,
        timestamp_ms: int | None = None,
    ) -> None:
        pass

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        pass

    def log_dict(self, obj: Any, name: str) -> None:
        pass

    def log_text(self, text: str, name: str) -> None:
        pass

    def set_tags(self, tags: Mapping[str, str]) -> None:
        pass

    def log_attempt_params(self, params: Mapping[str, Any]) -> None:
        pass

    def log_input(
        self, name: str, source: str, sha256: str, context: str, num_rows: int | None = None
    ) -> None:
        pass

    @property
    def mlflow_run_id(self) -> str | None:
        return None

    def system_metrics(self, interval_s: float) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()


class TrackingRef(BaseModel):
    """What tasks pass around instead of a live client: small, JSON-able, and enough
    to re-open the run on another machine."""

    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    run_id: str  # slothflow's run id (not MLflow's)


# --------------------------------------------------------------------------- helpers


def redact_uri(uri: str) -> str:
    """Hide a password embedded in a URI before it is printed or logged."""
    parts = urllib.parse.urlsplit(uri)
    if parts.password:
        netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
        return urllib.parse.urlunsplit(parts._replace(netloc=netloc))
    return uri


def resolve_tracking_uri(cfg: TrackingConfig, home: Home) -> str:
    uri = cfg.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or home.mlflow_db_uri
    check_no_credentials(uri)
    return uri


def check_no_credentials(uri: str) -> None:
    """Refuse a tracking URI that embeds a password.

    The URI travels in task parameters (which Prefect stores and shows), ``run.json`` and
    logs; credentials must not. MLflow servers take ``MLFLOW_TRACKING_USERNAME`` /
    ``MLFLOW_TRACKING_PASSWORD`` (or ``MLFLOW_TRACKING_TOKEN``) from the environment, and
    PostgreSQL takes ``PGPASSWORD`` (or ``~/.pgpass``).
    """
    if urllib.parse.urlsplit(uri).password:
        raise TrackingUnavailableError(
            f"tracking URI {redact_uri(uri)} embeds a password; keep credentials out of URIs: "
            "set MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD for an MLflow server, "
            "or PGPASSWORD for a PostgreSQL store"
        )


def check_reachable(uri: str, timeout_s: float) -> None:
    """Fail fast, with a clear message, when a configured store does not answer.

    MLflow's own HTTP client retries with backoff for minutes; a pipeline that is
    going to fail should say so at start, not after the data stage.
    """
    scheme = urllib.parse.urlsplit(uri).scheme
    if scheme in ("http", "https"):
        url = uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as resp:
                if resp.status != 200:
                    raise TrackingUnavailableError(
                        f"MLflow server {redact_uri(uri)} answered /health with HTTP {resp.status}"
                    )
        except (urllib.error.URLError, OSError, TimeoutError) as exc:
            raise TrackingUnavailableError(
                f"MLflow tracking server {redact_uri(uri)} is unreachable "
                f"(no answer on /health within {timeout_s:g}s: {exc}). Start it, fix "
                "tracking.tracking_uri / MLFLOW_TRACKING_URI, or unset both to use the local store."
            ) from None
    elif scheme.startswith(("postgresql", "mysql", "mssql")):
        import sqlalchemy

        try:
            engine = sqlalchemy.create_engine(uri, connect_args={"connect_timeout": int(timeout_s)})
            with engine.connect():
                pass
            engine.dispose()
        except Exception as exc:
            raise TrackingUnavailableError(
                f"MLflow database {redact_uri(uri)} is unreachable: {type(exc).__name__}"
            ) from None
    elif scheme == "sqlite":
        db = Path(uri.removeprefix("sqlite:///"))
        db.parent.mkdir(parents=True, exist_ok=True)
        if not os.access(db.parent, os.W_OK):
            raise TrackingUnavailableError(f"MLflow SQLite folder {db.parent} is not writable")


def open_store(uri: str) -> None:
    """Open the tracking store at ``uri`` once, so that a local SQLite store's tables exist
    (their migrations take ~3 s on a fresh home) before the run needs them: called while
    the caller would otherwise only wait. The engine MLflow caches per URI is the one the
    run's clients then reuse."""
    from mlflow.tracking import MlflowClient

    MlflowClient(tracking_uri=uri)


def _git(*args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, check=True, timeout=10
    ).stdout.strip()


def code_version() -> str:
    """Git commit of the code that runs (``-dirty`` with local edits), else the package
    version; recorded on every run so a result can be traced to its code."""
    try:
        sha = _git("rev-parse", "HEAD")
        dirty = _git("status", "--porcelain", "--untracked-files=no")
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        from importlib.metadata import version

        return f"slothflow=={version('slothflow')}"


def _flatten(prefix: str, obj: Any, out: dict[str, str]) -> None:
    if isinstance(obj, dict):
        for k, v in obj.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out[prefix] = json.dumps(obj) if isinstance(obj, list) else str(obj)


def flatten_params(obj: Mapping[str, Any]) -> dict[str, str]:
    """Nested config dict -> ``{"train.lora.r": "16", ...}`` for ``log_params``."""
    out: dict[str, str] = {}
    _flatten("", dict(obj), out)
    return out


# --------------------------------------------------------------------------- MLflow


class MlflowTracker:
    """A :class:`Tracker` bound to one MLflow run id."""

    def __init__(self, tracking_uri: str, mlflow_run_id: str) -> None:
        from mlflow.tracking import MlflowClient

        self.tracking_uri = tracking_uri
        self._mlflow_run_id = mlflow_run_id
        self.client = MlflowClient(tracking_uri=tracking_uri)
        # This run's params as logged so far: read from the store once (a resumed stage
        # re-attaches to a run that has some), then kept here, so each log_params is one
        # request instead of a read and a write (a run makes ~200 requests; over HTTP to
        # a tracking server each costs a round trip).
        self._params: dict[str, str] | None = None

    def _logged_params(self) -> dict[str, str]:
        if self._params is None:
            self._params = dict(self.client.get_run(self._mlflow_run_id).data.params)
        return self._params

    @property
    def mlflow_run_id(self) -> str:
        return self._mlflow_run_id

    @contextlib.contextmanager
    def system_metrics(self, interval_s: float) -> Iterator[None]:
        """MLflow's own system-metrics monitor on this run; a monitor that cannot start
        is logged and skipped (metrics are not worth failing a training run for)."""
        monitor = None
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            monitor = SystemMetricsMonitor(
                self._mlflow_run_id,
                sampling_interval=interval_s,
                resume_logging=True,
                tracking_uri=self.tracking_uri,
            )
            monitor.start()
        except Exception:
            log.warning("MLflow system metrics unavailable", exc_info=True)
            monitor = None
        try:
            yield
        finally:
            if monitor is not None:
                monitor.finish()

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        existing = self._logged_params()
        # MLflow params are write-once; a resumed stage re-logs the same values, so
        # skip those already there (a *different* value is a real conflict and raises).
        new = [
            Param(k, str(v)[:6000]) for k, v in params.items() if existing.get(k) != str(v)[:6000]
        ]
        for p in new:
            if p.key in existing:
                raise ValueError(
                    f"MLflow param {p.key} of this run is {existing[p.key]!r}; this attempt "
                    f"has {p.value!r} (params are write-once: a value that may change on "
                    "resume belongs in log_attempt_params)"
                )
        for i in range(0, len(new), 100):
            self.client.log_batch(self.mlflow_run_id, params=new[i : i + 100])
            existing.update((p.key, p.value) for p in new[i : i + 100])

    def log_attempt_params(self, params: Mapping[str, Any]) -> None:
        """Settings that may change when a run is resumed (serving, tracking, hardware):
        the first attempt's values under their own names, a later attempt's *changed*
        values as ``<name>.attempt<N>``, so every attempt's values stay on record and no
        logged param is ever rewritten (MLflow refuses that)."""
        run = self.client.get_run(self.mlflow_run_id)
        existing = self._params = dict(run.data.params)
        attempt = int(run.data.tags.get(TAG_ATTEMPT, "1"))
        out: dict[str, str] = {}
        for k, v in params.items():
            value = str(v)[:6000]
            if k not in existing:
                out[k] = value
            elif existing[k] != value and attempt > 1:
                out[f"{k}.attempt{attempt}"] = value
        self.log_params(out)

    def log_metrics(
        self,
        metrics: Mapping[str, float],
        step: int | None = None,
        timestamp_ms: int | None = None,
    ) -> None:
        import time

        from mlflow.entities import Metric

        ts = int(time.time() * 1000) if timestamp_ms is None else timestamp_ms
        batch = [Metric(k, float(v), ts, step or 0) for k, v in metrics.items()]
        if batch:
            self.client.log_batch(self.mlflow_run_id, metrics=batch)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.mlflow_run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(self.mlflow_run_id, str(path), artifact_path)

    def log_dict(self, obj: Any, name: str) -> None:
        self.client.log_dict(self.mlflow_run_id, obj, name)

    def log_text(self, text: str, name: str) -> None:
        self.client.log_text(self.mlflow_run_id, text, name)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        from mlflow.entities import RunTag

        batch = [RunTag(k, str(v)) for k, v in tags.items()]
        for i in range(0, len(batch), 100):  # one request per 100 tags, not one per tag
            self.client.log_batch(self.mlflow_run_id, tags=batch[i : i + 100])

    def log_input(
        self, name: str, source: str, sha256: str, context: str, num_rows: int | None = None
    ) -> None:
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.entities import DatasetInput, InputTag

        src = _dataset_source(source)
        # MLflow's own digest samples only the first rows; we record the full-content
        # sha256 both as the digest (truncated, as MLflow expects) and as a param.
        ds = MetaDataset(source=src, name=name, digest=sha256[:16])
        tags = [InputTag(key="mlflow.data.context", value=context)]
        self.client.log_inputs(
            self.mlflow_run_id, datasets=[DatasetInput(ds._to_mlflow_entity(), tags=tags)]
        )
        params = {f"data.{name}.sha256": sha256, f"data.{name}.source": source}
        if num_rows is not None:
            params[f"data.{name}.rows"] = str(num_rows)
        self.log_params(params)

    def end(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.mlflow_run_id, status=status)


def _dataset_source(source: str) -> Any:
    from mlflow.data.http_dataset_source import HTTPDatasetSource

    scheme = urllib.parse.urlsplit(source).scheme
    if scheme in ("http", "https"):
        return HTTPDatasetSource(url=source)
    from mlflow.data.filesystem_dataset_source import FileSystemDatasetSource

    class _Source(FileSystemDatasetSource):
        """A plain path/URI source; MLflow ships no generic one for local files."""

        def __init__(self, uri: str) -> None:
            self._uri = uri

        @property
        def uri(self) -> str:
            return self._uri

        @staticmethod
        def _get_source_type() -> str:
            return "path"

        def load(self, dst_path: str | None = None) -> str:
            return self._uri

        @staticmethod
        def _can_resolve(raw_source: Any) -> bool:
            return False

        @classmethod
        def _resolve(cls, raw_source: Any) -> _Source:
            return cls(str(raw_source))

        def to_dict(self) -> dict[str, Any]:
            return {"uri": self._uri}

        @classmethod
        def from_dict(cls, source_dict: dict[Any, Any]) -> _Source:
            return cls(source_dict["uri"])

    return _Source(source if scheme else Path(source).resolve().as_uri())


#: The experiment kind MLflow's UI reads (3.x); without it 3.17 opens the GenAI view.
TAG_EXPERIMENT_KIND = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"  # the UI's "Machine learning" (training runs)


def _experiment_id(client: Any, name: str, home: Home, uri: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if TAG_EXPERIMENT_KIND not in (exp.tags or {}):  # a kind chosen in the UI stays
            client.set_experiment_tag(exp.experiment_id, TAG_EXPERIMENT_KIND, EXPERIMENT_KIND)
        return str(exp.experiment_id)
    # A SQLite store has no server to decide where artifacts go; MLflow would fall back
    # to ./mlruns in whatever the working directory is. Keep them beside the database.
    location = None
    if uri == home.mlflow_db_uri:
        location = home.mlflow_artifacts.as_uri()
    elif uri.startswith("sqlite:///"):
        location = (Path(uri.removeprefix("sqlite:///")).parent / "artifacts").as_uri()
    return str(
        client.create_experiment(
            name, artifact_location=location, tags={TAG_EXPERIMENT_KIND: EXPERIMENT_KIND}
        )
    )


def _find_run(client: Any, experiment_id: str, tags: Mapping[str, str]) -> str | None:
    filt = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    runs = client.search_runs([experiment_id], filter_string=filt, max_results=1)
    return runs[0].info.run_id if runs else None


def open_pipeline_run(cfg: TrackingConfig, home: Home, run_id: str) -> TrackingRef:
    """Create (or re-attach to) the parent MLflow run of pipeline run ``run_id``."""
    from mlflow.tracking import MlflowClient

    uri = resolve_tracking_uri(cfg, home)
    check_reachable(uri, cfg.connect_timeout_s)
    client = MlflowClient(tracking_uri=uri)
    exp_id = _experiment_id(client, cfg.experiment, home, uri)
    tags = {TAG_RUN_ID: run_id, TAG_KIND: "pipeline"}
    mlflow_id = _find_run(client, exp_id, tags)
    if mlflow_id is None:
        run = client.create_run(exp_id, run_name=run_id, tags={**tags, TAG_ATTEMPT: "1"})
        mlflow_id = run.info.run_id
    else:
        _reattach(client, mlflow_id)
    return TrackingRef(
        tracking_uri=uri, experiment_id=exp_id, parent_run_id=mlflow_id, run_id=run_id
    )


@dataclasses.dataclass(frozen=True)
class PastRun:
    """A pipeline run as MLflow recorded it (what a retrain compares its inputs with)."""

    run_id: str  # slothflow's run id
    mlflow_run_id: str
    status: str  # MLflow's: RUNNING, FINISHED, FAILED, KILLED
    start_time_ms: int
    source_fingerprint: str | None
    flow_run_id: str | None  # the Prefect flow run that ran it, if one did


def pipeline_runs(cfg: TrackingConfig, home: Home, recipe: str, limit: int = 50) -> list[PastRun]:
    """The recipe's pipeline runs, newest first (a store without the experiment: none)."""
    from mlflow.tracking import MlflowClient

    uri = resolve_tracking_uri(cfg, home)
    check_reachable(uri, cfg.connect_timeout_s)
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(cfg.experiment)
    if exp is None:
        return []
    runs = client.search_runs(
        [exp.experiment_id],
        filter_string=f"tags.`{TAG_KIND}` = 'pipeline' and tags.`{TAG_RECIPE}` = '{recipe}'",
        order_by=["attributes.start_time DESC"],
        max_results=limit,
    )
    return [
        PastRun(
            run_id=r.data.tags.get(TAG_RUN_ID, ""),
            mlflow_run_id=r.info.run_id,
            status=r.info.status,
            start_time_ms=int(r.info.start_time or 0),
            source_fingerprint=r.data.tags.get(TAG_SOURCE_FINGERPRINT),
            flow_run_id=r.data.tags.get("prefect.flow_run_id"),
        )
        for r in runs
    ]


def record_check(
    cfg: TrackingConfig, home: Home, name: str, tags: Mapping[str, str], summary: Mapping[str, Any]
) -> str:
    """A short MLflow run of its own for a decision that trained nothing (a retrain that
    found no new data), so it shows in the experiment beside the runs that did. Returns
    its URL."""
    from mlflow.tracking import MlflowClient

    uri = resolve_tracking_uri(cfg, home)
    client = MlflowClient(tracking_uri=uri)
    exp_id = _experiment_id(client, cfg.experiment, home, uri)
    run = client.create_run(exp_id, run_name=name, tags={TAG_KIND: "check", **tags})
    t = MlflowTracker(uri, run.info.run_id)
    t.log_dict(dict(summary), "summary.json")
    t.end("FINISHED")
    return run_url(TrackingRef(tracking_uri=uri, experiment_id=exp_id,
                               parent_run_id=run.info.run_id, run_id=name))  # fmt: skip


def pipeline_tracker(ref: TrackingRef) -> MlflowTracker:
    return MlflowTracker(ref.tracking_uri, ref.parent_run_id)


def stage_tracker(ref: TrackingRef, stage: str) -> MlflowTracker:
    """The nested run of one stage (created, or re-attached to on resume)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=ref.tracking_uri)
    tags = {TAG_RUN_ID: ref.run_id, TAG_STAGE: stage}
    mlflow_id = _find_run(client, ref.experiment_id, tags)
    if mlflow_id is None:
        run = client.create_run(
            ref.experiment_id,
            run_name=stage,
            tags={
                **tags,
                TAG_KIND: "stage",
                TAG_ATTEMPT: "1",
                "mlflow.parentRunId": ref.parent_run_id,
            },
        )
        mlflow_id = run.info.run_id
    else:
        _reattach(client, mlflow_id)
    return MlflowTracker(ref.tracking_uri, mlflow_id)


def _reattach(client: Any, mlflow_id: str) -> None:
    """A resumed run's MLflow run: running again, one attempt more."""
    tags = client.get_run(mlflow_id).data.tags
    client.set_tag(mlflow_id, TAG_ATTEMPT, str(int(tags.get(TAG_ATTEMPT, "1")) + 1))
    client.update_run(mlflow_id, status="RUNNING")


def run_url(ref: TrackingRef) -> str:
    """Where a person finds the run: a UI link for servers, the store path locally."""
    scheme = urllib.parse.urlsplit(ref.tracking_uri).scheme
    if scheme in ("http", "https"):
        base = redact_uri(ref.tracking_uri).rstrip("/")
        # MLflow 3's UI picks its view from this parameter, else from the browser's last
        # choice (GenAI by default): a training run opens in the training view.
        return (
            f"{base}/#/experiments/{ref.experiment_id}/runs/{ref.parent_run_id}"
            "?workflowType=machine_learning"
        )
    return (
        f"run {ref.parent_run_id} in {redact_uri(ref.tracking_uri)} "
        f"(browse: mlflow ui --backend-store-uri {redact_uri(ref.tracking_uri)})"
    )
