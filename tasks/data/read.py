"""Streaming readers: every input row becomes one :class:`RawRecord`, good or bad.

A reader never raises for bad *content*: malformed JSON, invalid UTF-8 and
over-long lines come out as records with a ``reason`` so the caller can
quarantine them with their source and line number. Only an unreadable *source*
(missing file, unknown format) raises :class:`SourceError`.

Memory stays bounded: line-based formats are read in fixed-size binary chunks, and
a line longer than ``max_line_bytes`` is skipped while it streams past (only a short
preview is kept), so a 100 MB line never sits in memory whole.

Where a source is and what format it has: :mod:`tasks.data.sources`; the readers, one
per format: :mod:`tasks.data.formats`. This module is the entry the stage imports.
"""

from __future__ import annotations

from tasks.data.formats import (
    JSON_SHAPES,
    PREVIEW_BYTES,
    ProgressFn,
    RawRecord,
    clip,
    lines,
    read,
)
from tasks.data.sources import (
    BACKEND_INSTALL,
    CHUNK_BYTES,
    COMPRESSION_SUFFIXES,
    Format,
    Source,
    SourceError,
    SourceUnreachableError,
    resolve,
    resolve_all,
    source_fs,
    source_sha256,
)

__all__ = [
    "BACKEND_INSTALL",
    "CHUNK_BYTES",
    "COMPRESSION_SUFFIXES",
    "JSON_SHAPES",
    "PREVIEW_BYTES",
    "Format",
    "ProgressFn",
    "RawRecord",
    "Source",
    "SourceError",
    "SourceUnreachableError",
    "clip",
    "lines",
    "read",
    "resolve",
    "resolve_all",
    "source_fs",
    "source_sha256",
]
