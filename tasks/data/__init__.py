"""The data stage: read any common SFT format, normalise, validate, quarantine,
deduplicate, split and report.

- :func:`clean` -- the plain function (unit tests and ``slothflow data clean`` call it);
- :func:`clean_task` -- the Prefect task the pipeline flow calls;
- ``read`` (the readers' entry), ``sources`` (resolving a source, its filesystem and content
  hash), ``formats`` (one streaming reader per format), ``rows`` (per-row rules), ``dedup`` (near-duplicates),
  ``tokenizer`` (the length filter's tokenizer), ``quarantine`` (``rejected.jsonl``),
  ``spool`` (pass 1), ``split`` (passes 2 and 3), ``report`` (the reports), ``layout``
  (the output folder), ``clean`` (the entry points).
"""

from tasks.data.clean import (
    DataError,
    check_output,
    clean,
    clean_task,
    inputs_hash,
    load_manifest,
    split_of,
)
from tasks.data.read import SourceError
from tasks.data.rows import REASONS

__all__ = [
    "REASONS",
    "DataError",
    "SourceError",
    "check_output",
    "clean",
    "clean_task",
    "inputs_hash",
    "load_manifest",
    "split_of",
]
