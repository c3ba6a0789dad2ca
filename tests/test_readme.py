"""The README's commands are the ones that exist (litgpt tests its README the same way)."""

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def test_quickstart_has_exactly_two_setup_commands_and_ci_uses_one() -> None:
    quick = README.split("## Quickstart", 1)[1].split("##", 1)[0]
    block = re.search(r"```bash\n(.*?)```", quick, re.S)
    assert block is not None
    commands = [ln.split("#")[0].strip() for ln in block.group(1).splitlines() if ln.strip()]
    assert commands == ["make run", "make test"]
    assert "make test" in (REPO / ".ci" / "run").read_text()


def test_make_targets_exist_and_install_before_running() -> None:
    for target in ("run", "test"):
        r = subprocess.run(["make", "-n", target], cwd=REPO, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        assert "slothflow run" in r.stdout if target == "run" else "pytest" in r.stdout


def _readme_commands() -> set[str]:
    lines = re.findall(r"^slothflow ([a-z][^#\n]*?)\s*(?:#.*)?$", README, re.M)
    inline = re.findall(r"`slothflow ([a-z][^`]*)`", README)
    return set(lines) | set(inline)


def test_every_slothflow_command_in_readme_parses() -> None:
    from typer.testing import CliRunner

    from slothflow.cli import app

    runner = CliRunner()
    cmds = _readme_commands()
    assert len(cmds) >= 10
    for cmd in cmds:
        words = [w for w in cmd.split() if not w.startswith("-")][:2]
        # The deepest command that exists: `data clean`, else `serve` for `serve MODEL`.
        r = runner.invoke(app, [*words, "--help"])
        if r.exit_code != 0:
            r = runner.invoke(app, [words[0], "--help"])
        assert r.exit_code == 0, (cmd, r.output)
        for opt in (w.split("=")[0] for w in cmd.split() if w.startswith("--")):
            assert opt in r.output, (cmd, opt)


def test_every_module_path_the_docs_name_exists() -> None:
    """The README's layout table and ARCHITECTURE.md name modules by path; a move that
    forgets the docs fails here."""
    import re

    missing = []
    for doc in ("README.md", "ARCHITECTURE.md"):
        text = (REPO / doc).read_text()
        for path in sorted(set(re.findall(r"`((?:tasks|flows|slothflow|tests)/[\w/.]*)`", text))):
            if not (REPO / path).exists():
                missing.append(f"{doc}: {path}")
    assert missing == []
