"""The output folder of a clean: the names it writes, the staging folder it is built in,
and the rename that publishes it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from tasks.core.refs import MARKER
from tasks.data.read import SourceError

TRAIN = "train.jsonl"
VALIDATION = "validation.jsonl"
REJECTED = "rejected.jsonl"
MANIFEST = "manifest.jsonl"
REPORT_JSON = "report.json"
REPORT_MD = "report.md"
HISTOGRAM = "token_lengths.png"
SPOOL = ".spool.jsonl"
#: A clean is written to ``<out>.staging`` next to its output folder and renamed into
#: place when it is done; one whose data is unusable goes to ``<out>.failed`` instead.
STAGING_SUFFIX = ".staging"
FAILED_SUFFIX = ".failed"
#: Every name a clean writes to its folder, plus the pipeline stage's completion marker.
OUTPUT_NAMES = frozenset(
    {TRAIN, VALIDATION, REJECTED, MANIFEST, REPORT_JSON, REPORT_MD, HISTOGRAM, SPOOL, MARKER}
)


class DataError(ValueError):
    """The cleaned data cannot feed training (no rows left, empty validation split)."""


def load_manifest(path: Path) -> set[str]:
    """Row ids accepted by an earlier run (its ``manifest.jsonl``, or its output folder)."""
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST
    if not path.exists():
        raise SourceError(f"previous manifest not found: {path}")
    ids: set[str] = set()
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                ids.add(json.loads(line)["id"])
    return ids


def check_replaceable(out_dir: Path) -> None:
    """Refuse an output folder that holds anything a clean does not write (the inputs, a
    user's files): it is replaced as a whole."""
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise DataError(f"output folder {out_dir} is a file")
    tmp = tuple(f".{n}." for n in (REPORT_JSON, MARKER))  # write_json_atomic's temp files
    foreign = sorted(
        p.name
        for p in out_dir.iterdir()
        if p.name not in OUTPUT_NAMES and not (p.name.startswith(tmp) and p.name.endswith(".tmp"))
    )
    if foreign:
        shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
        raise DataError(
            f"output folder {out_dir} holds files a data clean does not write ({shown}); it "
            "is replaced as a whole: give a new or empty folder"
        )


def publish(staging: Path, dest: Path) -> None:
    """Rename the finished ``staging`` folder to ``dest``. A reader of ``dest`` sees the
    folder it replaces or the new one, never a part of either."""
    old = dest.with_name(f".{dest.name}.replaced")
    if old.exists():
        shutil.rmtree(old)
    if dest.exists():
        dest.rename(old)
    staging.rename(dest)
    shutil.rmtree(old, ignore_errors=True)
