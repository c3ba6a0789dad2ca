"""Where the configured inputs are and what they hold: a name (a local path, tried from
the working directory and then the repository, or an fsspec URL) resolved to a
:class:`Source` with its format; the filesystem each is read through (remote files via
fsspec's cache); and a source's content hash. Only here does a source fail as a whole
(:class:`SourceError`); reading it row by row is :mod:`tasks.data.formats`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import fsspec

from tasks.core.refs import sha256_update_from
from tasks.core.settings import REPO_ROOT, local_candidates

Format = Literal["jsonl", "json", "csv", "parquet", "datasets"]

#: Bytes read at a time, by the content hash and by the line-based readers.
CHUNK_BYTES = 1 << 20


class SourceError(ValueError):
    """A source that cannot be read at all (missing, empty, unknown format, unreachable)."""


class SourceUnreachableError(SourceError, ConnectionError):
    """A remote source the network could not reach this time (a connection refused or
    timed out, a DNS server that did not answer): worth a retry, unlike a host name that
    does not exist."""


def empty_source(name: str) -> SourceError:
    return SourceError(f"{name}: the file is empty")


@dataclass(frozen=True)
class Source:
    """A resolved input: what the user wrote, where it is, and how to read it."""

    name: str  # as configured (reported in rejected.jsonl)
    url: str  # fsspec URL or absolute local path
    format: Format

    @property
    def remote(self) -> bool:
        protocol = self.url.split("://", 1)[0] if "://" in self.url else "file"
        return protocol not in ("file", "local")


#: A remote source is read through fsspec's whole-file cache; ``check_files`` compares
#: the remote's identity (an object store's ETag) at every open, so a file changed
#: since it was cached is fetched again.
_REMOTE_CACHE = {"check_files": True}


def source_fs(src: Source) -> tuple[Any, str]:
    """The (filesystem, path) ``src`` is read through.

    The stage reads every source twice: first for the content hash that decides whether
    a finished clean can be reused, then to clean it. For a remote file (``s3://``...)
    fsspec's ``filecache`` keeps the downloaded copy, so while the remote file is
    unchanged the two passes are one download. Every open still compares the remote's
    identity (``check_files``): a file replaced between the hash and the clean is
    downloaded again, and the clean then reads newer bytes than the ones hashed. The copy
    lives in a temporary folder (``TMPDIR``) for the life of the process. A saved
    ``datasets`` folder is left to ``datasets``, which has its own loading.
    """
    if src.remote and src.format != "datasets":
        return _url_to_fs(f"filecache::{src.url}", filecache=_REMOTE_CACHE)
    return _url_to_fs(src.url)


#: How to install the fsspec backend of a protocol slothflow ships an extra for.
BACKEND_INSTALL = {"s3": "pip install 'slothflow[s3]'", "s3a": "pip install 'slothflow[s3]'"}


def resolve_all(names: list[str]) -> list[Source]:
    """:func:`expand` every configured source; an error names the entry (``data.sources[1]``)."""
    out: list[Source] = []
    for i, name in enumerate(names):
        try:
            out.extend(expand(name))
        except SourceError as exc:
            raise SourceError(f"data.sources[{i}]: {exc}") from exc.__cause__
    return out


#: The file names a folder or a glob contributes (compressed or not); anything else in
#: a data folder (a README, a ``.part`` upload in progress, ``_SUCCESS``) is left out.
DATA_SUFFIXES = (".jsonl", ".ndjson", ".json", ".csv", ".tsv", ".parquet", ".pq")


def _is_data_file(path: str) -> bool:
    base = path.rsplit("/", 1)[-1]
    return not base.startswith((".", "_")) and strip_compression(base).endswith(DATA_SUFFIXES)


def is_pattern(name: str) -> bool:
    return any(c in name for c in "*?[")


def expand(name: str) -> list[Source]:
    """What one configured entry names, in path order: a file or a saved ``datasets``
    folder is one source; a glob (``data/incoming/*.jsonl``, ``s3://bucket/new/*.jsonl``)
    or any other folder (``data/incoming/``, ``s3://bucket/prefix/``) is every data file
    it holds, so new files dropped there are read by the next run. Each file is then a
    source of its own, named by its path, so a rejected row still says where it was."""
    if is_pattern(name):
        found = _glob(name)
        if not found:
            raise SourceError(f"no data files match {name}")
        return [resolve(f) for f in found]
    try:
        return [resolve(name)]
    except _PlainFolder as folder:
        found = [f"{name.rstrip('/')}/{rel}" for rel in folder.files]
        if not found:
            raise SourceError(
                f"{name} is a folder with no data files ({', '.join(DATA_SUFFIXES)}) and "
                "not a saved `datasets` folder"
            ) from None
        return [resolve(f) for f in found]


def _glob(name: str) -> list[str]:
    """The data files a pattern matches, as names :func:`resolve` finds again: URLs with
    their protocol, local paths as written (relative ones against the first of the
    working directory and the repository that has a match)."""
    if "://" in name:
        protocol = name.split("://", 1)[0]
        fs, pattern = _url_to_fs(name)
        try:
            hits = fs.glob(pattern)
        except Exception as exc:
            raise _network_error(name, exc) from exc
        return sorted(f"{protocol}://{h}" for h in hits if _is_data_file(h) and fs.isfile(h))
    import glob

    p = Path(name).expanduser()
    roots = [None] if p.is_absolute() else [Path.cwd(), REPO_ROOT]
    for root in roots:
        hits = sorted(
            h
            for h in glob.glob(str(p), root_dir=root, recursive=True)
            if _is_data_file(h) and Path(root or "/", h).is_file()
        )
        if hits:
            return hits if root is None or root == Path.cwd() else [str(root / h) for h in hits]
    return []


def _url_to_fs(name: str, **options: Any) -> tuple[Any, str]:
    """``fsspec.core.url_to_fs``, with a missing backend package (s3fs for ``s3://``) as a
    :class:`SourceError` that says what to install, not an ImportError traceback."""
    try:
        return fsspec.core.url_to_fs(name, **options)  # type: ignore[no-any-return,unused-ignore]
    except ImportError as exc:
        protocol = name.split("://", 1)[0]
        how = BACKEND_INSTALL.get(protocol, f"install the fsspec backend for {protocol}://")
        raise SourceError(
            f"{name}: no filesystem backend for {protocol}:// is installed ({exc}); {how}"
        ) from exc


def resolve(name: str) -> Source:
    """Find a configured source. Relative paths try the working directory first, then the
    repository, so the shipped sample works from any folder; URLs go to fsspec as they are."""
    if "://" in name:
        fs, path = _url_to_fs(name)
        if not _remote_exists(name, fs, path):
            raise SourceError(f"input not found: {name}")
        return Source(name, name, _detect_format(name, fs.isdir(path), fs, path))
    candidates = local_candidates(name)
    for c in candidates:
        if c.exists():
            fs = fsspec.filesystem("file")
            fmt = _detect_format(name, c.is_dir(), fs, str(c))
            if c.is_file() and c.stat().st_size == 0:
                raise empty_source(name)  # here, before a tokenizer loads (compressed: on read)
            return Source(name, str(c.resolve()), fmt)
    where = " or ".join(str(c) for c in candidates)
    raise SourceError(f"input not found: {name} (looked for {where})")


def _remote_exists(name: str, fs: Any, path: str) -> bool:
    """Whether a URL names something, telling "not there" from "not reachable": fsspec's
    HTTP ``exists`` answers ``False`` for any connection error (a host that cannot be
    resolved included), so HTTP asks strictly and a network error is named as one."""
    from fsspec.implementations.http import HTTPFileSystem

    try:
        if isinstance(fs, HTTPFileSystem):
            return bool(fs.exists(path, strict=True))
        return bool(fs.exists(path))
    except FileNotFoundError:
        return False
    except Exception as exc:
        raise _network_error(name, exc) from exc


def _network_error(name: str, exc: BaseException) -> SourceError:
    """The clearest account of why ``name`` could not be reached: a host that could not
    be resolved is named as such (found anywhere in the exception's chain)."""
    import socket
    from urllib.parse import urlsplit

    host = urlsplit(name).hostname or name
    seen: BaseException | None = exc
    while seen is not None:
        for err in (seen, getattr(seen, "os_error", None)):
            if isinstance(err, socket.gaierror):
                msg = f"{name}: the host {host} could not be resolved ({err.strerror})"
                # "Temporary failure" (no DNS answer) may pass; "not known" will not.
                if err.errno == socket.EAI_AGAIN:
                    return SourceUnreachableError(msg)
                return SourceError(msg)
        seen = seen.__cause__ or seen.__context__
    return SourceUnreachableError(f"{name}: network error reaching {host}: {exc}")


#: Compression suffixes fsspec infers (``compression="infer"``) and decompresses on read.
COMPRESSION_SUFFIXES = (".gz", ".bz2", ".xz", ".zst")


def strip_compression(name: str) -> str:
    """``name`` lower-cased without its compression suffix: ``a.TSV.bz2`` -> ``a.tsv``."""
    lower = name.lower()
    for suffix in COMPRESSION_SUFFIXES:
        lower = lower.removesuffix(suffix)
    return lower


class _PlainFolder(SourceError):
    """A folder that is not a saved ``datasets`` folder: :func:`expand` reads the data
    files in it (``files``: their paths relative to it, sorted)."""

    def __init__(self, name: str, files: list[str]) -> None:
        super().__init__(f"{name} is a folder but not a saved `datasets` folder")
        self.files = files


def _detect_format(name: str, is_dir: bool, fs: Any, path: str) -> Format:
    if is_dir:
        markers = ("dataset_info.json", "state.json", "dataset_dict.json")
        if any(fs.exists(f"{path.rstrip('/')}/{m}") for m in markers):
            return "datasets"
        root = path.rstrip("/")
        files = sorted(
            f[len(root) + 1 :] for f in fs.find(root) if _is_data_file(f) and f.startswith(root)
        )
        raise _PlainFolder(name, files)
    lower = strip_compression(name)
    if lower.endswith((".jsonl", ".ndjson")):
        return "jsonl"
    if lower.endswith(".json"):
        return "json"
    if lower.endswith((".csv", ".tsv")):
        return "csv"
    if lower.endswith((".parquet", ".pq")):
        return "parquet"
    raise SourceError(
        f"{name}: unknown format (expected .jsonl, .json, .csv, .parquet or a saved "
        "datasets folder)"
    )


def source_sha256(src: Source) -> str:
    """Content hash of a source (every file of a folder, in path order)."""
    import hashlib

    fs, path = source_fs(src)
    h = hashlib.sha256()
    files = sorted(fs.find(path)) if src.format == "datasets" else [path]
    for f in files:
        if src.format == "datasets":
            h.update(os.path.relpath(f, path).encode() + b"\0")
        with fs.open(f, "rb") as fh:
            sha256_update_from(h, fh, CHUNK_BYTES)
    return h.hexdigest()
