"""The deployment files are checked, not just shipped: they parse, pin the same
versions as pyproject.toml, and copy only paths that exist."""

import re
import tomllib
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def _pins() -> dict[str, str]:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    return {
        m[1].lower(): m[2]
        for d in deps
        if (m := re.match(r"([A-Za-z0-9_.-]+)(?:\[.*\])?==(\S+)", d))
    }


def test_compose_parses_and_pins_pyproject_versions() -> None:
    compose = yaml.safe_load((REPO / "infra" / "compose.yaml").read_text())
    images = {name: svc.get("image", "") for name, svc in compose["services"].items()}
    pins = _pins()
    assert images["mlflow"].endswith(f":v{pins['mlflow']}")
    assert images["prefect-server"].startswith(f"prefecthq/prefect:{pins['prefect']}-")
    for name, image in images.items():
        assert ":" in image and not image.endswith(":latest"), f"{name} image must be pinned"
    # Published ports stay on loopback unless someone means otherwise.
    for svc in compose["services"].values():
        for port in svc.get("ports", []):
            assert port.startswith("127.0.0.1:"), port


def test_compose_takes_secrets_from_env_not_values() -> None:
    text = (REPO / "infra" / "compose.yaml").read_text()
    for key in ("POSTGRES_PASSWORD", "MINIO_ROOT_PASSWORD", "AWS_SECRET_ACCESS_KEY"):
        for line in text.splitlines():
            if f"{key}:" in line:
                assert "${" in line, line
    compose = yaml.safe_load(text)
    # Credentials never on a command line (visible in `ps`).
    for svc in compose["services"].values():
        assert "POSTGRES_PASSWORD" not in str(svc.get("command", ""))
    example = (REPO / "infra" / ".env.example").read_text()
    assert all(
        line.endswith("=") for line in example.splitlines() if line and not line.startswith("#")
    )


def test_dockerfile_copies_existing_paths_and_pins_torch() -> None:
    text = (REPO / "docker" / "Dockerfile").read_text()
    for src in re.findall(r"^COPY (?!--)(.+) \S+$", text, flags=re.M):
        for part in src.split():
            assert (REPO / part).exists(), f"Dockerfile copies missing path {part}"
    assert f"torch=={_pins()['torch']}" in text
    assert "python:3.11" in text
