"""Near-duplicate detection: MinHash + LSH (rensa) over what makes a row distinctive.

What counts as a near-duplicate, and why:

* **Prompt shingles, not whole rows.** Word n-grams of the prompt (every turn before
  the final answer), lower-cased, punctuation dropped.
* **Boilerplate paragraphs are left out.** A paragraph (blank-line separated) that
  recurs in a large share of rows -- a shared instruction such as "Name the topic of the
  sentence (one of: ...)" -- says nothing about whether two rows are the same example;
  shingling it makes every templated row look alike (on the shipped sample a whole-row
  check flags hundreds of distinct sentences). If nothing distinctive is left, the
  whole prompt is used.
* **Same answer required.** Two near-identical prompts with *different* answers are
  conflicting labels, not duplicates: both are kept and counted (``conflicting_answers``
  in the report) so a person can look.

The first row inserted wins. The caller inserts rows by preference: the previous run's
manifest first (a row accepted earlier is never evicted by a later arrival), then the
cleanest (:func:`tasks.data.rows.dirtiness`: fewest normalisation fixes, no shouting),
then the earliest, so a sloppy copy never displaces a clean original.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from collections.abc import Callable, Iterable

import numpy as np

WORD_RE = re.compile(r"\w+")
PARAGRAPH_RE = re.compile(r"\n\s*\n")
SEED = 42
#: A paragraph must recur in at least this many rows (and the configured share) to
#: count as boilerplate, so small data sets never lose their content to it.
BOILERPLATE_MIN_ROWS = 10
#: Hash values of each kept row's signature held in memory to pre-screen LSH
#: candidates before the exact check (the full signature would cost 4 bytes per
#: permutation per row: ~0.5 GB per million rows at 128).
PRESCREEN_VALUES = 32
#: Candidates whose pre-screen estimate is within this of the threshold are checked
#: exactly (the estimate's standard error from 32 values is ~0.08).
PRESCREEN_SLACK = 0.25


def _h64(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "big")


def paragraph_words(prompt: str) -> list[list[str]]:
    return [WORD_RE.findall(p.lower()) for p in PARAGRAPH_RE.split(prompt)]


def paragraph_keys(prompt: str) -> list[int]:
    """Keys of a prompt's distinct paragraphs (for counting how often each recurs)."""
    return sorted({_h64(" ".join(w)) for w in paragraph_words(prompt) if w})


def boilerplate(counts: Counter[int], rows: int, fraction: float) -> set[int]:
    floor = max(BOILERPLATE_MIN_ROWS, fraction * rows)
    return {k for k, c in counts.items() if c >= floor}


def shingles(prompt: str, boiler: set[int], n: int) -> list[str]:
    """Word n-grams of the prompt's non-boilerplate paragraphs."""
    paras = [w for w in paragraph_words(prompt) if w]
    kept = [w for w in paras if _h64(" ".join(w)) not in boiler] or paras
    words = [w for p in kept for w in p]
    if len(words) <= n:
        return [" ".join(words)] if words else []
    return [" ".join(words[i : i + n]) for i in range(len(words) - n + 1)]


def answer_key(answer: str) -> int:
    """Answers compare equal when their words match, ignoring case and punctuation."""
    words = WORD_RE.findall(answer.casefold())
    return _h64(" ".join(words) if words else answer)


class NearDupIndex:
    """Greedy near-duplicate filter: :meth:`add` returns the kept row a new row duplicates,
    or ``None`` and keeps it. LSH finds candidates; each is verified on the estimated
    Jaccard similarity of the full signatures and on the answer."""

    def __init__(self, threshold: float, num_perm: int, bands: int, capacity: int) -> None:
        from rensa import RMinHashLSH

        if num_perm % bands:
            raise ValueError(f"near_dup_num_perm={num_perm} must be a multiple of bands={bands}")
        self.threshold = threshold
        self.num_perm = num_perm
        self.lsh = RMinHashLSH(threshold, num_perm, bands)
        self.width = min(PRESCREEN_VALUES, num_perm)
        self.sigs = np.empty((max(capacity, 1), self.width), dtype=np.uint32)
        self.answers = np.empty(max(capacity, 1), dtype=np.uint64)
        self.size = 0
        self.conflicts = 0

    def add(
        self, tokens: list[str], answer: int, shingles_of: Callable[[int], list[str]]
    ) -> int | None:
        """Keep the row (returns ``None``) or name the kept row it duplicates.

        LSH proposes candidates, a part of the signature screens them, and the decision is
        the *exact* Jaccard of the shingle sets (``shingles_of(k)`` re-reads kept row
        ``k``), so an unlucky estimate never removes a row that is merely similar.
        """
        from rensa import RMinHash

        m = RMinHash(self.num_perm, SEED)
        m.update(tokens)
        sig = np.asarray(m.digest()[: self.width], dtype=np.uint32)
        candidates = self.lsh.query(m)
        conflict = False
        if candidates:
            idx = np.sort(np.fromiter(candidates, dtype=np.int64, count=len(candidates)))
            est = (self.sigs[idx] == sig).mean(axis=1)
            for k in idx[est >= self.threshold - PRESCREEN_SLACK]:
                same_answer = self.answers[k] == np.uint64(answer)
                if conflict and not same_answer:
                    continue  # one confirmed conflict is enough to count this row
                if jaccard(tokens, shingles_of(int(k))) < self.threshold:
                    continue
                if same_answer:
                    return int(k)  # the earliest kept row
                conflict = True
        if conflict:
            self.conflicts += 1
        i = self.size
        self.sigs[i] = sig
        self.answers[i] = answer
        self.lsh.insert(i, m)
        self.size += 1
        return None


def jaccard(a: Iterable[str], b: Iterable[str]) -> float:
    """Exact Jaccard similarity of two shingle sets (tests and the benchmark's recall)."""
    sa, sb = set(a), set(b)
    return len(sa & sb) / len(sa | sb) if sa or sb else 1.0
