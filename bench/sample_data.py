"""A DataRef-format folder made from the shipped sample, without the data stage.

The training tests and ``bench/train_cpu.py`` need cleaned, split data; a fixed, fast
stand-in keeps them (and the CPU bench's recorded numbers) independent of the data
stage's rules, which are tested on their own. This writes what the data stage
hands over: ``train.jsonl`` / ``validation.jsonl`` of chat rows
(``{"id", "messages"}``), alpaca rows converted to chat, split by a salted hash of
the row's content (so a row's split never depends on the others) and deduplicated
on the user prompt, which keeps every validation prompt out of training.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from tasks.core.embedded import SAMPLE_FILES as SAMPLE
from tasks.core.refs import DataRef, data_fingerprint, sha256_file, sha256_json
from tasks.data.clean import split_of


def _chat_rows(path: Path) -> Iterator[list[dict[str, str]]]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            if "messages" in row:
                yield row["messages"]
            else:
                prompt = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
                yield [
                    {"role": "user", "content": prompt},
                    {"role": "assistant", "content": row["output"]},
                ]


def write_split(
    out_dir: Path,
    sources: tuple[Path, ...] = SAMPLE,
    val_fraction: float = 0.1,
    salt: str = "slothflow-v1",
    limit: int | None = None,
) -> DataRef:
    """Write ``out_dir/{train,validation}.jsonl`` and return their :class:`DataRef`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    seen: set[str] = set()
    splits: dict[str, list[dict[str, object]]] = {"train": [], "validation": []}
    for src in sources:
        for messages in _chat_rows(src):
            prompt = messages[0]["content"]
            if prompt in seen:
                continue
            seen.add(prompt)
            split = split_of(prompt, salt, val_fraction)  # the data stage's rule, by prompt
            splits[split].append({"id": sha256_json(messages)[:16], "messages": messages})
            if limit is not None and len(seen) >= limit:
                break
    paths = {}
    for split, rows in splits.items():
        p = out_dir / f"{split}.jsonl"
        with open(p, "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        paths[split] = p
    report = out_dir / "report.json"
    # The data stage's report keys that readers of a data folder check
    # (tasks.data.check_output: rows kept, rows per split).
    counts = {k: len(v) for k, v in splits.items()}
    report.write_text(json.dumps({"kept_records": sum(counts.values()), "splits": counts}))
    return DataRef(
        stage="data",
        path=str(out_dir),
        train_path=str(paths["train"]),
        validation_path=str(paths["validation"]),
        fingerprint=data_fingerprint(sha256_file(paths["train"]), sha256_file(paths["validation"])),
        train_rows=len(splits["train"]),
        validation_rows=len(splits["validation"]),
        report_path=str(report),
    )
