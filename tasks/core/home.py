"""SLOTHFLOW_HOME: the one folder that holds every piece of state of the embedded default.

MLflow's SQLite store and artifacts, Prefect's home and memo store, the Hugging Face
and compiler caches and every run's outputs live under it, so nothing is written to
``$HOME`` and deleting the folder resets everything.

This module must stay import-light: :func:`activate` sets environment variables that
Prefect, MLflow and Hugging Face read *at import time*, so it runs before they load.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

HOME_ENV = "SLOTHFLOW_HOME"
DEFAULT_HOME_NAME = ".slothflow"


class HomeBusyError(RuntimeError):
    """Another slothflow process holds the home's embedded stores."""


@dataclass(frozen=True)
class Home:
    root: Path

    @property
    def runs(self) -> Path:
        return self.root / "runs"

    @property
    def mlflow_dir(self) -> Path:
        return self.root / "mlflow"

    @property
    def mlflow_db_uri(self) -> str:
        return f"sqlite:///{self.mlflow_dir / 'mlflow.db'}"

    @property
    def mlflow_artifacts(self) -> Path:
        return self.mlflow_dir / "artifacts"

    @property
    def prefect(self) -> Path:
        return self.root / "prefect"

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    @property
    def stage_cache(self) -> Path:
        """Prefect's records of finished stages (``results/``, JSON) and their locks."""
        return self.root / "stage-cache"

    @property
    def models(self) -> Path:
        """Base models built on the spot (the embedded default), keyed by content."""
        return self.root / "models"

    @property
    def lock_file(self) -> Path:
        return self.root / "home.lock"

    def run_dir(self, run_id: str) -> Path:
        return self.runs / run_id


def resolve_home(explicit: str | os.PathLike[str] | None = None) -> Home:
    """The home from an explicit path, else ``$SLOTHFLOW_HOME``, else ``./.slothflow``."""
    raw = explicit or os.environ.get(HOME_ENV) or (Path.cwd() / DEFAULT_HOME_NAME)
    return Home(Path(raw).expanduser().resolve())


def environment_for(home: Home) -> dict[str, str]:
    """Environment variables that keep every library's state inside ``home``.

    Values the user already exported win (``setdefault`` semantics in :func:`activate`),
    so pointing ``HF_HOME`` at a shared model cache still works.
    """
    cache = home.cache
    return {
        HOME_ENV: str(home.root),
        # Prefect: ephemeral server DB, profiles and the memo store (which ephemeral
        # mode writes to ~/.prefect unless told otherwise).
        "PREFECT_HOME": str(home.prefect),
        "PREFECT_MEMO_STORE_PATH": str(home.prefect / "memo_store.toml"),
        "PREFECT_LOCAL_STORAGE_PATH": str(home.prefect / "storage"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        # Prefect's own temporary server (a Secret block looked up outside `slothflow run`)
        # gets 20 s to start by default; a loaded 2-core machine took longer.
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
        "PREFECT_UI_ENABLED": "false",
        # MLflow telemetry writes ~/.config/mlflow and phones home.
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DO_NOT_TRACK": "1",
        # Hugging Face hub/datasets caches.
        "HF_HOME": str(cache / "huggingface"),
        "HF_HUB_DISABLE_TELEMETRY": "1",
        # Compilers and everything else that defaults to ~/.cache or /tmp.
        "XDG_CACHE_HOME": str(cache),
        "TRITON_CACHE_DIR": str(cache / "triton"),
        "TORCHINDUCTOR_CACHE_DIR": str(cache / "inductor"),
        "VLLM_CACHE_ROOT": str(cache / "vllm"),
        "VLLM_NO_USAGE_STATS": "1",
        "MPLCONFIGDIR": str(cache / "matplotlib"),
        "TOKENIZERS_PARALLELISM": "false",
    }


def activate(explicit: str | os.PathLike[str] | None = None) -> Home:
    """Resolve the home, create it and export its environment (user values win)."""
    home = resolve_home(explicit)
    for d in (home.root, home.runs, home.mlflow_dir, home.prefect, home.cache):
        d.mkdir(parents=True, exist_ok=True)
    env = environment_for(home)
    if explicit is not None:
        # An explicit --home must win over an inherited SLOTHFLOW_HOME.
        os.environ[HOME_ENV] = env.pop(HOME_ENV)
    for key, value in env.items():
        os.environ.setdefault(key, value)
    return home


@contextlib.contextmanager
def exclusive(home: Home, what: str) -> Iterator[None]:
    """Hold the home's embedded stores for one process at a time.

    SQLite (MLflow's store, Prefect's ephemeral DB) tolerates one writer; two
    pipelines writing one home would meet ``database is locked`` half-way through a
    stage. We refuse the second one up front with a clear message instead. The
    ``flock`` is released by the kernel when the process dies, so a killed run
    never leaves a stale lock behind.
    """
    home.root.mkdir(parents=True, exist_ok=True)
    fd = os.open(home.lock_file, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            holder = _read_holder(home.lock_file)
            raise HomeBusyError(
                f"SLOTHFLOW_HOME={home.root} is in use by another slothflow process "
                f"({holder}). Its SQLite stores take one writer at a time: wait for it "
                f"to finish, or run with a different --home / {HOME_ENV}."
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "what": what, "since": time.time()}).encode())
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the flock


def _read_holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return "unknown holder"
    return f"pid {info.get('pid', '?')}, {info.get('what', '?')}"
