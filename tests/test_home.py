import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tasks.core import home as home_mod


def test_environment_keeps_every_cache_inside_home(tmp_path: Path) -> None:
    env = home_mod.environment_for(home_mod.Home(tmp_path))
    for key in (
        "PREFECT_HOME",
        "PREFECT_MEMO_STORE_PATH",
        "HF_HOME",
        "XDG_CACHE_HOME",
        "TRITON_CACHE_DIR",
        "VLLM_CACHE_ROOT",
        "MPLCONFIGDIR",
    ):
        assert env[key].startswith(str(tmp_path)), key
    assert env["MLFLOW_DISABLE_TELEMETRY"] == "true"


def test_default_home_is_in_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SLOTHFLOW_HOME", raising=False)
    monkeypatch.chdir(tmp_path)
    assert home_mod.resolve_home().root == tmp_path / ".slothflow"


_HOLD = textwrap.dedent(
    """
    import sys, time
    from tasks.core import home
    h = home.Home(__import__("pathlib").Path(sys.argv[1]))
    with home.exclusive(h, "holder"):
        print("held", flush=True)
        time.sleep(60)
    """
)


def _holder(root: Path) -> subprocess.Popen[str]:
    p = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(root)], stdout=subprocess.PIPE, text=True
    )
    assert p.stdout is not None and p.stdout.readline().strip() == "held"
    return p


def test_second_process_gets_a_clear_error_and_lock_survives_no_crash(tmp_path: Path) -> None:
    h = home_mod.Home(tmp_path)
    p = _holder(tmp_path)
    try:
        with (
            pytest.raises(home_mod.HomeBusyError, match=rf"pid {p.pid}, holder") as exc,
            home_mod.exclusive(h, "second"),
        ):
            pass
        assert "--home" in str(exc.value)
    finally:
        # SIGKILL: the kernel drops the flock with the process; no stale lock remains.
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
    with home_mod.exclusive(h, "after the holder died"):
        pass


def test_concurrent_cli_run_is_refused_cleanly(tmp_path: Path) -> None:
    from tests.conftest import clean_env

    p = _holder(tmp_path / "h")
    try:
        fake_home = tmp_path / "fakehome"
        fake_home.mkdir()
        t0 = time.time()
        r = subprocess.run(
            [str(Path(sys.executable).parent / "slothflow"), "run", "-r", "ci-smoke"],
            env=clean_env(tmp_path / "h", fake_home),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert r.returncode == 2, r.stderr
        assert "in use by another slothflow process" in r.stderr
        assert time.time() - t0 < 60
    finally:
        p.kill()
        p.wait()
