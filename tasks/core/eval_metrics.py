"""Scoring of one generated answer against the reference: exact match and token F1.

This file is also copied verbatim into every generated lm-eval task folder as
``utils.py`` (the task YAML names ``!function utils.process_results``), so the task
folder reproduces the scores with the plain ``lm_eval --include_path DIR`` command,
without slothflow installed. Keep it standard-library only.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from typing import Any

_SPACES = re.compile(r"\s+")
_EDGE_PUNCT = string.punctuation + "“”‘’«»"


def normalize(text: str) -> str:
    """Case-folded, whitespace collapsed, punctuation stripped at both ends: a model
    that answers ``"Food."`` for ``food`` is right; one that answers ``"food and
    music"`` is not."""
    return _SPACES.sub(" ", text).strip().strip(_EDGE_PUNCT).strip().casefold()


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize(prediction) == normalize(reference))


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD-style F1 over whitespace tokens of the normalised strings."""
    pred = normalize(prediction).split()
    ref = normalize(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def process_results(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    """lm-eval hook for the ``generate_until`` task: one generation per document."""
    prediction = results[0] if results else ""
    return {
        "exact_match": exact_match(prediction, doc["answer"]),
        "f1": token_f1(prediction, doc["answer"]),
    }
