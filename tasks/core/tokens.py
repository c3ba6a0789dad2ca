"""Counting tokens of chat rows the way the trainer will see them.

The data stage's length filter and the train stage's truncation count share this, so a
row the data stage keeps is a row TRL can train on whole: both count the conversation
rendered through the tokenizer's chat template (what ``apply_chat_template(messages,
tokenize=True)`` returns, special tokens of the template included). A tokenizer without
a template falls back to the turns' contents joined by newlines, and says so.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

Messages = Sequence[dict[str, Any]]

COUNTED_TEMPLATE = "the whole conversation rendered through the tokenizer's chat template"
COUNTED_JOINED = (
    "content of every turn joined by newlines (the tokenizer has no chat template), "
    "no special tokens"
)


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def counted_text(tokenizer: Any) -> str:
    """What :func:`chat_token_lengths` counts for this tokenizer (recorded in reports)."""
    return COUNTED_TEMPLATE if has_chat_template(tokenizer) else COUNTED_JOINED


def count_tokens(tokenizer: Any, texts: list[str]) -> list[int]:
    """Token count of each text, no special tokens added (a template carries its own)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and backend.truncation is None and backend.padding is None:
        # Counting needs no ids in Python: the Rust batch call without offsets is ~2x
        # cheaper than tokenizer(...), which builds a Python list per row.
        encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
        return [len(e) for e in encode(texts, add_special_tokens=False)]
    ids = tokenizer(texts, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return [len(x) for x in ids]


def chat_token_lengths(tokenizer: Any, conversations: Sequence[Messages]) -> list[int]:
    """Tokens of each conversation as the trainer tokenizes it.

    Rendering the template to text and encoding that without added special tokens is
    what ``apply_chat_template(tokenize=True)`` does; done in two steps the encoding
    runs as one batched Rust call.
    """
    if not conversations:
        return []
    if has_chat_template(tokenizer):
        texts = tokenizer.apply_chat_template([list(c) for c in conversations], tokenize=False)
    else:
        texts = ["\n".join(str(m.get("content") or "") for m in c) for c in conversations]
    return count_tokens(tokenizer, list(texts))
