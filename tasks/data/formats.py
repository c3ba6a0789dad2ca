"""The readers, one per format: JSON Lines, JSON (an array streamed element by element,
or JSON Lines named ``.json``), CSV/TSV, Parquet and saved ``datasets`` folders, and
:func:`read`, which picks one for a :class:`~tasks.data.sources.Source`. What they
promise (bad content as records, bounded memory) is in :mod:`tasks.data.read`.
"""

from __future__ import annotations

import codecs
import csv
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

import orjson

from tasks.data.sources import (
    CHUNK_BYTES,
    Source,
    SourceError,
    empty_source,
    source_fs,
    strip_compression,
)

#: Bytes of an over-long or undecodable line (characters of a decoded one) kept for the
#: quarantine file.
PREVIEW_BYTES = 1000

#: ``progress(source, done, total)``: bytes for files, rows for Parquet/datasets.
ProgressFn = Callable[[str, int, int | None], None]


@dataclass(frozen=True, slots=True)
class RawRecord:
    """One input row. ``value`` is the decoded object, or ``None`` when ``reason`` says why
    it could not be decoded (``text`` then holds a preview of the raw row)."""

    source: str
    line: int  # 1-based line (JSONL, CSV) or record index (JSON array, Parquet, datasets)
    value: Any = None
    reason: str | None = None
    text: str = ""
    detail: str = ""
    truncated: bool = False  # ``text`` is cut off: the row goes on past it (see clip)


def read(
    src: Source, max_line_bytes: int, progress: ProgressFn | None = None
) -> Iterator[RawRecord]:
    """Every non-blank row of ``src`` as a :class:`RawRecord`, in file order."""
    if src.format == "parquet":
        yield from _read_parquet(src, progress)
    elif src.format == "datasets":
        yield from _read_datasets(src, progress)
    else:
        fs, path = source_fs(src)
        total = _size(fs, path)
        with fs.open(path, "rb", compression="infer") as f:
            counted = _Counted(f, src.name, total, progress)
            if src.format == "jsonl":
                yield from _read_jsonl(counted, src.name, max_line_bytes)
            elif src.format == "json":
                yield from _read_json(counted, src.name, max_line_bytes)
            else:
                yield from _read_csv(counted, src.name, max_line_bytes)
        if counted.blank:  # nothing but whitespace, so not one record came out
            raise empty_source(src.name)


def _size(fs: Any, path: str) -> int | None:
    try:
        return int(fs.size(path))
    except Exception:  # some filesystems cannot tell; the bar then has no total
        return None


class _Counted:
    """A binary reader that reports how many bytes went through it."""

    def __init__(self, f: BinaryIO, name: str, total: int | None, progress: ProgressFn | None):
        self.f, self.name, self.total, self.progress, self.done = f, name, total, progress, 0
        self.blank = True  # every byte so far was whitespace

    def read(self, n: int = -1) -> bytes:
        block = self.f.read(n)
        self.done += len(block)
        if self.blank and not block.isspace() and block:
            self.blank = False
        if self.progress is not None:
            self.progress(self.name, self.done, self.total)
        return block


# --------------------------------------------------------------------------- line based


def lines(
    f: _Counted | BinaryIO, max_bytes: int, chunk: int = CHUNK_BYTES
) -> Iterator[tuple[int, bytes | None, bytes]]:
    """``(line_no, line, preview)`` for every line; ``line`` is ``None`` when the line is
    longer than ``max_bytes`` (then ``preview`` holds its first ``PREVIEW_BYTES + 1``
    bytes: one more than a preview keeps, so :func:`clip` knows whether it cut the line).
    At most ``max_bytes + chunk`` bytes are held at any time."""
    keep = PREVIEW_BYTES + 1
    lineno = 0
    buf = bytearray()
    overflow: bytes | None = None  # preview of the current line once it is too long
    while block := f.read(chunk):
        start = 0
        while True:
            nl = block.find(b"\n", start)
            piece = block[start:] if nl < 0 else block[start:nl]
            if overflow is None and len(buf) + len(piece) > max_bytes:
                overflow = bytes(buf[:keep]) + piece[: max(0, keep - len(buf))]
                buf = bytearray()  # release what was held; the rest streams past unread
            elif overflow is not None:
                if len(overflow) < keep:
                    overflow += piece[: keep - len(overflow)]
            else:
                if nl < 0:
                    buf += piece
                else:
                    lineno += 1
                    if buf:
                        buf += piece
                        yield lineno, bytes(buf), b""
                        buf.clear()
                    else:
                        yield lineno, piece, b""
            if nl < 0:
                break
            if overflow is not None:
                lineno += 1
                yield lineno, None, overflow
                overflow = None
            start = nl + 1
    if overflow is not None:
        yield lineno + 1, None, overflow
    elif buf:
        yield lineno + 1, bytes(buf), b""


def clip(raw: str | bytes, limit: int = PREVIEW_BYTES) -> tuple[str, bool]:
    """The first ``limit`` characters (bytes of an undecoded line) of a quarantined row as
    text, and whether that cut anything off. The one place a row's text is shortened, so
    a cut is known where it happens, never guessed from the length later."""
    cut = len(raw) > limit
    head = raw[:limit]
    return (head.decode("utf-8", "replace") if isinstance(head, bytes) else head), cut


def _rejected(
    source: str,
    line: int,
    reason: str,
    raw: str | bytes = "",
    detail: str = "",
    *,
    continues: bool = False,
) -> RawRecord:
    """A record that could not be decoded, with a :func:`clip` of its raw text.
    ``continues``: the row goes on past ``raw`` (the rest was never read)."""
    text, cut = clip(raw)
    return RawRecord(
        source, line, reason=reason, text=text, detail=detail, truncated=cut or continues
    )


def _decode_line(
    name: str, lineno: int, line: bytes | None, preview: bytes, max_bytes: int
) -> RawRecord | str:
    """Shared first steps of JSONL/CSV lines: the record to reject, or the decoded text."""
    if line is None:
        return _rejected(
            name, lineno, "line_too_long", preview, f"line longer than max_line_bytes={max_bytes}"
        )
    if line.startswith(codecs.BOM_UTF8):
        line = line[len(codecs.BOM_UTF8) :]
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError as exc:
        return _rejected(name, lineno, "invalid_utf8", line, str(exc)[:200])


def _loads(text: str) -> Any:
    """orjson (several times faster); the standard library only for what orjson refuses
    but JSON allows (integers beyond 64 bits), so such rows are not called malformed."""
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return json.loads(text)


def _read_jsonl(f: _Counted, name: str, max_bytes: int) -> Iterator[RawRecord]:
    for lineno, line, preview in lines(f, max_bytes):
        if line is not None and not line.strip():
            continue  # blank lines are layout, not records
        text = _decode_line(name, lineno, line, preview, max_bytes)
        if isinstance(text, RawRecord):
            yield text
            continue
        try:
            yield RawRecord(name, lineno, value=_loads(text))
        except (ValueError, RecursionError) as exc:
            yield _rejected(name, lineno, "malformed_json", text, str(exc))


#: What a ``.json`` source may hold, for the error about anything else.
JSON_SHAPES = (
    "a JSON array of rows ([{...}, {...}]) or JSON Lines (one row object per line), each "
    "row alpaca (instruction/output) or chat (messages)"
)


def _read_json(f: _Counted, name: str, max_bytes: int) -> Iterator[RawRecord]:
    """A JSON document: an array of records is streamed element by element; anything
    else (an object first) is read as JSON Lines, which is what ``datasets`` writes to
    ``.json`` files -- unless the whole file is one object that is not a row (rows
    wrapped in ``{"data": [...]}``), a :class:`SourceError` naming the accepted shapes."""
    head = f.read(CHUNK_BYTES)
    body = head.lstrip(codecs.BOM_UTF8 + b" \t\r\n")
    if body[:1] == b"{":
        head = _refuse_a_wrapper(head, f, name, max_bytes)
    if body[:1] != b"[":
        yield from _read_jsonl(_Prepended(head, f), name, max_bytes)  # type: ignore[arg-type]
        return
    yield from _json_array(_Prepended(head, f), name, max_bytes)


def _refuse_a_wrapper(head: bytes, f: _Counted, name: str, max_bytes: int) -> bytes:
    """Raise if the first JSON value of ``head`` (read on up to ``max_bytes``) is an
    object that is not a row and is the whole file or spans several lines (a JSON Lines
    row cannot). Returns what was read, for the JSON Lines reader to start over with."""
    from tasks.data.rows import has_row_shape

    decoder = json.JSONDecoder()

    def read_more() -> bool:
        nonlocal head
        more = f.read(CHUNK_BYTES) if len(head) <= max_bytes else b""
        head += more
        return bool(more)

    while True:
        text = head.decode("utf-8", "replace").lstrip("\ufeff \t\r\n")
        try:
            value, end = decoder.raw_decode(text)
            break
        except (ValueError, RecursionError):
            if not read_more():
                return head  # not one readable value: the line reader reports the lines
    if not isinstance(value, dict) or has_row_shape(value):
        return head
    multiline = "\n" in text[:end]
    while not multiline and not text[end:].strip() and read_more():
        text = head.decode("utf-8", "replace").lstrip("\ufeff \t\r\n")
    alone = not text[end:].strip()
    if multiline or alone:
        keys = ", ".join(sorted(map(str, value))[:8])
        raise SourceError(
            f"{name}: the file is one JSON object (keys: {keys}), not rows; accepted "
            f"shapes: {JSON_SHAPES}"
        )
    return head


class _Prepended:
    def __init__(self, head: bytes, f: _Counted) -> None:
        self.head, self.f = head, f

    def read(self, n: int = -1) -> bytes:
        if self.head:
            out, self.head = self.head, b""
            return out
        return self.f.read(n)


def _json_array(f: _Prepended, name: str, max_bytes: int) -> Iterator[RawRecord]:
    decoder = json.JSONDecoder()
    utf8 = codecs.getincrementaldecoder("utf-8")("strict")
    buf = ""
    pos = 0
    index = 0
    eof = False
    started = False

    def fill() -> bool:
        nonlocal buf, pos, eof
        block = f.read(CHUNK_BYTES)
        eof = not block
        buf = buf[pos:] + utf8.decode(block, final=eof)
        pos = 0
        return not eof

    try:
        while True:
            # skip layout between elements
            while True:
                while pos < len(buf) and buf[pos] in " \t\r\n,\ufeff[":
                    if buf[pos] == "[":
                        if started:
                            break
                        started = True
                    pos += 1
                if pos < len(buf) or not fill():
                    break
            if pos >= len(buf) or buf[pos] == "]":
                return
            while True:
                try:
                    value, end = decoder.raw_decode(buf, pos)
                    break
                except (ValueError, RecursionError) as exc:
                    # Only an element cut off by the end of the buffer can parse with more
                    # of it; nesting too deep (RecursionError) or a number too long to
                    # convert (a plain ValueError) stays malformed however much is read.
                    incomplete = isinstance(exc, json.JSONDecodeError)
                    if incomplete and not eof and len(buf) - pos <= max_bytes:
                        fill()
                        continue
                    # No way to find where a broken element ends: the rest is one bad record.
                    index += 1
                    reason = "line_too_long" if incomplete and not eof else "malformed_json"
                    yield _rejected(
                        name,
                        index,
                        reason,
                        buf[pos : pos + PREVIEW_BYTES + 1],
                        str(exc),
                        continues=not eof,
                    )
                    return
            index += 1
            yield RawRecord(name, index, value=value)
            pos = end
    except UnicodeDecodeError as exc:
        # The undecodable bytes (and whatever follows) come after the text kept.
        yield _rejected(
            name,
            index + 1,
            "invalid_utf8",
            buf[pos : pos + PREVIEW_BYTES],
            str(exc),
            continues=True,
        )


def _read_csv(f: _Counted, name: str, max_bytes: int) -> Iterator[RawRecord]:
    delimiter = "\t" if strip_compression(name).endswith(".tsv") else ","
    bad: list[RawRecord] = []

    def text_lines() -> Iterator[str]:
        for lineno, line, preview in lines(f, max_bytes):
            got = _decode_line(name, lineno, line, preview, max_bytes)
            if isinstance(got, RawRecord):
                bad.append(got)
                yield "\n"  # keeps csv's line count in step with the file
            else:
                yield got + "\n"

    csv.field_size_limit(max(max_bytes, 131072))
    reader = csv.reader(text_lines(), delimiter=delimiter)
    header: list[str] | None = None
    while True:
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            yield _rejected(name, reader.line_num, "malformed_csv", detail=str(exc))
            continue
        finally:
            yield from bad
            bad.clear()
        if not row or not any(cell.strip() for cell in row):
            continue
        if header is None:
            header = [h.strip().lstrip("\ufeff") for h in row]
            continue
        if len(row) != len(header):
            yield _rejected(
                name,
                reader.line_num,
                "malformed_csv",
                ",".join(row),
                f"{len(row)} fields, header has {len(header)}",
            )
            continue
        value: dict[str, Any] = dict(zip(header, row, strict=True))
        if isinstance(value.get("messages"), str):
            # A chat row in CSV keeps its messages as a JSON string in one column.
            try:
                value["messages"] = _loads(value["messages"])
            except (ValueError, RecursionError) as exc:
                yield _rejected(
                    name,
                    reader.line_num,
                    "malformed_json",
                    value["messages"],
                    f"messages column: {exc}",
                )
                continue
        yield RawRecord(name, reader.line_num, value=value)


# --------------------------------------------------------------------------- columnar


def _read_parquet(src: Source, progress: ProgressFn | None) -> Iterator[RawRecord]:
    import pyarrow.parquet as pq

    fs, path = source_fs(src)
    if _size(fs, path) == 0:
        raise empty_source(src.name)
    with fs.open(path, "rb") as f:
        try:
            pf = pq.ParquetFile(f)
        except Exception as exc:  # pyarrow's ArrowInvalid and friends: a broken file
            raise SourceError(f"{src.name}: not a readable Parquet file ({exc})") from exc
        total = pf.metadata.num_rows
        index = 0
        for batch in pf.iter_batches(batch_size=4096):
            for value in batch.to_pylist():
                index += 1
                yield RawRecord(src.name, index, value=value)
            if progress is not None:
                progress(src.name, index, total)


def _read_datasets(src: Source, progress: ProgressFn | None) -> Iterator[RawRecord]:
    import datasets

    loaded = datasets.load_from_disk(src.url)
    splits = loaded.items() if isinstance(loaded, datasets.DatasetDict) else [("", loaded)]
    for split, ds in splits:
        name = f"{src.name}[{split}]" if split else src.name
        index = 0
        for batch in ds.iter(batch_size=4096):
            keys = list(batch)
            n = len(batch[keys[0]]) if keys else 0
            for i in range(n):
                index += 1
                yield RawRecord(name, index, value={k: batch[k][i] for k in keys})
            if progress is not None:
                progress(name, index, len(ds))
