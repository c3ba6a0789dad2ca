"""``rejected.jsonl``: every row the clean does not keep, with its reason, source and line."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import IO, Any

from tasks.data.read import RawRecord, clip
from tasks.data.rows import scrub

#: Longest text kept for a quarantined row whose JSON parsed (line-based rows are
#: already bounded by max_line_bytes).
MAX_REJECTED_TEXT = 100_000

_PARTIAL_TAIL = re.compile(r"\S*\Z")


class Quarantine:
    """``rejected.jsonl`` writer. Scrubs the text it writes when PII scrubbing is on, so
    the quarantine never keeps what scrubbing removed from the clean data."""

    def __init__(self, path: Path, pii: bool) -> None:
        # backslashreplace: a lone surrogate from a JSON escape must not crash the writer
        self.f: IO[str] = open(path, "w", encoding="utf-8", errors="backslashreplace")  # noqa: SIM115
        self.pii = pii
        self.counts: Counter[str] = Counter()
        self.pii_counts: Counter[str] = Counter()  # PII found in rejected rows

    def add(
        self,
        reason: str,
        source: str,
        line: int,
        text: str = "",
        detail: str = "",
        duplicate_of: str | None = None,
        truncated: bool = False,
    ) -> None:
        """``truncated``: ``text`` was cut off (:func:`~tasks.data.read.clip`); a whole
        text is written as it is (scrubbed)."""
        self.counts[reason] += 1
        if self.pii:
            text = scrub(text, self.pii_counts)
            detail = scrub(detail, self.pii_counts)
            if truncated:
                # A cut-off text may end inside an address or number the patterns no
                # longer recognise ("jane.doe@exa"): drop its last, partial token.
                text = _PARTIAL_TAIL.sub("", text)
        row: dict[str, Any] = {"reason": reason, "source": source, "line": line, "text": text}
        if detail:
            row["detail"] = detail
        if duplicate_of:
            row["duplicate_of"] = duplicate_of
        self.f.write(json.dumps(row, ensure_ascii=False) + "\n")

    def add_record(self, rec: RawRecord, reason: str, detail: str) -> None:
        try:
            whole = json.dumps(rec.value, ensure_ascii=False, default=str)
        except (ValueError, RecursionError):
            whole = repr(rec.value)
        text, truncated = clip(whole, MAX_REJECTED_TEXT)
        self.add(reason, rec.source, rec.line, text, detail, truncated=truncated)

    def close(self) -> None:
        self.f.close()
