"""The report's tables: scores per model, and held-out prompts side by side (expected,
base, candidate) as Markdown and HTML."""

from __future__ import annotations

import html
from typing import Any

from tasks.core import eval_metrics


def _cell(text: str, width: int = 120) -> str:
    text = text.replace("\n", " ⏎ ").replace("|", "\\|")
    return text if len(text) <= width else text[: width - 1] + "…"


def side_by_side(
    items: list[dict[str, Any]],
    base: dict[int, str],
    candidate: dict[int, str],
    rows: int,
    candidate_label: str,
) -> tuple[str, str]:
    """Markdown and HTML tables of ``rows`` held-out prompts: expected, base, candidate."""
    md = [
        f"| # | prompt (last user turn) | expected | base | {candidate_label} | ok |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    body = []
    for i, it in enumerate(items[:rows]):
        got = candidate.get(i, "")
        ok = "✅" if eval_metrics.exact_match(got, it["answer"]) else "❌"
        md.append(
            f"| {i} | {_cell(it['question'])} | {_cell(it['answer'])} | "
            f"{_cell(base.get(i, ''))} | {_cell(got)} | {ok} |"
        )
        cells = (str(i), it["question"], it["answer"], base.get(i, ""), got, ok)
        body.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
    head = "".join(
        f"<th>{h}</th>"
        for h in ("#", "prompt (last user turn)", "expected", "base", candidate_label, "ok")
    )
    page = (
        "<!doctype html><meta charset='utf-8'><style>td,th{border:1px solid #ccc;padding:4px;"
        "vertical-align:top;white-space:pre-wrap}table{border-collapse:collapse}</style>"
        f"<table><tr>{head}</tr>{''.join(body)}</table>"
    )
    return "\n".join(md) + "\n", page


def scores_table(scores: dict[str, dict[str, float]]) -> str:
    keys = ["exact_match", "f1", "answer_perplexity", "answer_greedy_acc", "n_items"]
    lines = ["| model | " + " | ".join(keys) + " |", "|" + " --- |" * (len(keys) + 1)]
    for model, s in scores.items():
        lines.append(
            f"| {model} | " + " | ".join(f"{s.get(k, float('nan')):.4g}" for k in keys) + " |"
        )
    return "\n".join(lines) + "\n"
