"""Base-model revisions: hub commits through a real HF cache layout (offline), and
content hashes of local folders."""

from pathlib import Path

import pytest

from tasks.core.config import ConfigError
from tasks.core.revision import local_revision, resolve_revision


def _model_dir(root: Path) -> Path:
    root.mkdir(parents=True)
    (root / "model.safetensors").write_bytes(b"\x00weights")
    (root / "tokenizer.json").write_text("{}")
    (root / "config.json").write_text('{"model_type": "llama"}')
    return root


def test_local_revision_is_a_content_hash(tmp_path: Path) -> None:
    a = _model_dir(tmp_path / "a")
    rev = local_revision(a)
    assert rev.startswith("sha256:") and len(rev) == 7 + 64
    (a / "README.md").write_text("docs do not count")
    assert local_revision(a) == rev
    b = tmp_path / "b"
    import shutil

    shutil.copytree(a, b)
    assert local_revision(b) == rev  # the folder's location does not count
    (b / "tokenizer.json").write_text('{"changed": true}')
    assert local_revision(b) != rev
    (a / "model.safetensors").write_bytes(b"\x01weights")
    assert local_revision(a) != rev


def test_local_folder_without_safetensors_is_refused(tmp_path: Path) -> None:
    d = tmp_path / "m"
    d.mkdir()
    (d / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(ConfigError, match="safetensors only"):
        resolve_revision(str(d))


def test_hub_id_resolves_to_commit_from_cache_offline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub.constants as c

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--acme--tiny"
    _model_dir(repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    assert resolve_revision("acme/tiny") == commit
    assert resolve_revision("acme/tiny", "main") == commit
    assert resolve_revision("acme/tiny", commit) == commit
    with pytest.raises(ConfigError, match="not in the local Hugging Face cache"):
        resolve_revision("acme/tiny", "v2")
    with pytest.raises(ConfigError, match="neither a local folder nor a hub id"):
        resolve_revision("not a model")
