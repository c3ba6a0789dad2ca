"""Every module imports on a CPU machine without GPU-only packages."""

import importlib
import importlib.util
import pkgutil

import pytest

PACKAGES = ["slothflow", "tasks", "flows"]


def _modules() -> list[str]:
    names = []
    for pkg in PACKAGES:
        mod = importlib.import_module(pkg)
        names.append(pkg)
        names += [m.name for m in pkgutil.walk_packages(mod.__path__, prefix=f"{pkg}.")]
    return names


@pytest.mark.parametrize("name", _modules())
def test_module_imports(name: str) -> None:
    importlib.import_module(name)


def test_gpu_only_packages_not_installed_here() -> None:
    # Importing unsloth on this CPU kills the process (SIGILL); it must stay a GPU extra.
    assert importlib.util.find_spec("unsloth") is None
