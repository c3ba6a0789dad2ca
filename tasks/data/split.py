"""Passes 2 and 3 over the spool: near-duplicates (rows taken in order of preference, so
each cluster keeps its most preferred member), then the survivors split by a salted hash
of their id and written out."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import orjson

from tasks.core.config import DataConfig
from tasks.data import dedup
from tasks.data.layout import MANIFEST, TRAIN, VALIDATION
from tasks.data.quarantine import Quarantine
from tasks.data.rows import canonical, prompt_and_answer
from tasks.data.spool import Spooled, spool_id, spool_lines


def split_of(rid: str, salt: str, val_fraction: float) -> str:
    """``"validation"`` or ``"train"`` from a salted hash of the row id alone, so adding or
    removing other rows never moves a row to the other split."""
    h = hashlib.sha256(f"{salt}\0{rid}".encode()).digest()
    return "validation" if int.from_bytes(h[:8], "big") / 2**64 < val_fraction else "train"


def near_dup_pass(
    cfg: DataConfig, st: Spooled, quarantine: Quarantine, spool_path: Path
) -> tuple[np.ndarray, dedup.NearDupIndex | None, set[int]]:
    """Pass 2: which spooled rows survive near-dedup. The index keeps the first row
    inserted of each cluster, so rows go in by preference: those of the previous manifest
    first (a later arrival never evicts them), then the cleanest
    (:func:`~tasks.data.rows.dirtiness`), then the earliest."""
    n = len(st.lengths)
    keep = np.ones(n, dtype=bool)
    if not cfg.near_dup or not n:
        return keep, None, set()
    boiler = dedup.boilerplate(st.para_counts, n, cfg.near_dup_boilerplate_fraction)
    index = dedup.NearDupIndex(cfg.near_dup_threshold, cfg.near_dup_num_perm, cfg.near_dup_bands, n)
    prev = np.frombuffer(bytes(st.in_previous), dtype=np.uint8)
    order = np.lexsort((np.arange(n), np.asarray(st.dirt, dtype=np.int64), 1 - prev))
    kept_ids: list[str] = []
    kept_rows: list[int] = []  # the spool row of each kept one, to re-read it
    with open(spool_path, "rb") as spool, open(spool_path, "rb") as reread:

        def shingles_of(k: int) -> list[str]:
            reread.seek(st.offsets[kept_rows[k]])
            msgs = orjson.loads(reread.readline())["messages"]
            return dedup.shingles(prompt_and_answer(msgs)[0], boiler, cfg.near_dup_ngram)

        for i in order.tolist():
            # In file order when nothing is preferred: the seeks stay inside the buffer.
            spool.seek(st.offsets[i])
            row = orjson.loads(spool.readline())
            prompt, answer = prompt_and_answer(row["messages"])
            tokens = dedup.shingles(prompt, boiler, cfg.near_dup_ngram)
            if not tokens:
                continue
            hit = index.add(tokens, dedup.answer_key(answer), shingles_of)
            if hit is None:
                kept_ids.append(row["id"])
                kept_rows.append(i)
            else:
                keep[i] = False
                quarantine.add(
                    "near_duplicate",
                    st.names[st.source_no[i]],
                    st.lines_no[i],
                    canonical(row["messages"]),
                    duplicate_of=kept_ids[hit],
                )
    return keep, index, boiler


def write_pass(
    cfg: DataConfig, st: Spooled, keep: np.ndarray, spool_path: Path, out_dir: Path
) -> tuple[dict[str, int], list[int], dict[str, str]]:
    """Pass 3: split the survivors by hash and copy their spooled lines out. Returns the
    rows per split, the kept rows' lengths and each split file's sha256, hashed as it is
    written (the very bytes of the file, so no second read of it)."""
    counts = {"train": 0, "validation": 0}
    digests = {"train": hashlib.sha256(), "validation": hashlib.sha256()}
    kept_lengths: list[int] = []
    with (
        open(out_dir / TRAIN, "wb") as ftrain,
        open(out_dir / VALIDATION, "wb") as fval,
        open(out_dir / MANIFEST, "wb") as fman,
    ):
        for i, (_, line) in enumerate(spool_lines(spool_path)):
            if not keep[i]:
                continue
            rid = spool_id(line)
            split = split_of(rid, cfg.split_salt, cfg.val_fraction)
            counts[split] += 1
            kept_lengths.append(st.lengths[i])
            (fval if split == "validation" else ftrain).write(line)
            digests[split].update(line)
            fman.write(b'{"id":"%s","split":"%s"}\n' % (rid.encode(), split.encode()))
    return counts, kept_lengths, {k: h.hexdigest() for k, h in digests.items()}
