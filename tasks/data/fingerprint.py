"""The inputs' fingerprint, cheaply: has the configured data changed since a run?

A scheduled retrain asks this every few hours of data that mostly has not changed, so it
must not read gigabytes to say "no new data". Each source's content hash is remembered
beside the listing facts it was computed under (size plus mtime for a local file; size
plus ETag for an object store's): while those facts are unchanged the hash is taken from
the record and no byte of content is read; only a new or changed source is read again.

The fingerprint is :func:`of_hashes` of the per-source content hashes in the configured
order, the very hashes the data stage's inputs hash is built from, so the data stage
records the same value for a pipeline run (``DataRef.source_fingerprint``) and a retrain
can compare its cheap fingerprint with the last run's.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tasks.core.refs import sha256_json, write_json_atomic
from tasks.data.sources import Source, resolve_all, source_fs, source_sha256

log = logging.getLogger(__name__)

#: Bumped if what a listing records, or how the hashes combine, ever changes.
FINGERPRINT_VERSION = 1


def of_hashes(hashes: list[str]) -> str:
    """The fingerprint of sources whose content hashes are ``hashes`` (in order)."""
    return sha256_json({"version": FINGERPRINT_VERSION, "sources": hashes})


@dataclass
class Fingerprint:
    value: str
    sources: list[dict[str, Any]]  # name, url, sha256, read (whether content was read now)
    listed: int = 0  # sources listed
    read: int = 0  # sources whose content was read (new or changed since the record)
    changed: list[str] = field(default_factory=list)  # names of those sources

    def summary(self) -> dict[str, Any]:
        return {
            "fingerprint": self.value,
            "sources": self.listed,
            "read": self.read,
            "changed": self.changed,
        }


def _identity(info: dict[str, Any]) -> Any:
    """What says a file is the one hashed before, from a listing: an object store's ETag
    (changes with the content), else the modification time."""
    for key in ("ETag", "etag", "e_tag", "md5_hash", "crc32c"):
        if info.get(key):
            return str(info[key]).strip('"')
    for key in ("mtime", "LastModified", "last_modified", "updated", "created"):
        if info.get(key) is not None:
            value = info[key]
            return value.isoformat() if hasattr(value, "isoformat") else value
    return None


def listing(src: Source) -> list[Any]:
    """``src``'s listing facts, no content read: per file its size and identity (a saved
    ``datasets`` folder: every file in it, by relative path)."""
    fs, path = source_fs(src) if not src.remote else _plain_fs(src)
    if src.format == "datasets":
        found = fs.find(path, detail=True)
        return [
            [name[len(path) :].lstrip("/"), info.get("size"), _identity(info)]
            for name, info in sorted(found.items())
        ]
    info = fs.info(path)
    return [["", info.get("size"), _identity(info)]]


def _plain_fs(src: Source) -> tuple[Any, str]:
    """A remote source's own filesystem, not fsspec's caching layer over it (whose
    ``info`` would download the file)."""
    import fsspec

    return fsspec.core.url_to_fs(src.url)  # type: ignore[no-any-return,unused-ignore]


def fingerprint(names: list[str], record: Path | None) -> Fingerprint:
    """The fingerprint of the data ``names`` (``data.sources``) hold now. ``record``: a
    JSON file of earlier hashes by URL and listing (read, then updated); None reads every
    source."""
    known: dict[str, Any] = {}
    if record is not None and record.exists():
        try:
            known = json.loads(record.read_text(encoding="utf-8")).get("sources", {})
        except (OSError, ValueError, AttributeError):
            log.warning("fingerprint: %s is unreadable; hashing every source again", record)
    sources = resolve_all(names)
    out = Fingerprint(value="", sources=[], listed=len(sources))
    for src in sources:
        facts = listing(src)
        seen = known.get(src.url)
        if seen is not None and seen.get("listing") == facts and None not in facts[0][1:]:
            sha, read = str(seen["sha256"]), False
        else:
            sha, read = source_sha256(src), True
            out.read += 1
            out.changed.append(src.name)
        known[src.url] = {"listing": facts, "sha256": sha}
        out.sources.append({"name": src.name, "url": src.url, "sha256": sha, "read": read})
    out.value = of_hashes([s["sha256"] for s in out.sources])
    if record is not None:
        record.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(record, {"version": FINGERPRINT_VERSION, "sources": known})
    return out
