"""The length filter's tokenizer: which one, how it is loaded, what identifies it in the
stage's inputs hash, and the lengths it counts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tasks.core.models import base_tokenizer_revision, load_base_tokenizer
from tasks.core.models import load_tokenizer as load_named_tokenizer
from tasks.core.refs import BaseModelRef
from tasks.core.revision import tokenizer_revision
from tasks.core.tokens import chat_token_lengths
from tasks.data.rows import Message, content_text

#: The length filter's tokenizer: the base stage's (the pipeline), a folder or hub id as
#: given (``slothflow data clean --tokenizer``), or none (the filter is skipped).
TokenizerSpec = BaseModelRef | str | None


def tokenizer_location(tokenizer: TokenizerSpec) -> tuple[str, str | None] | None:
    """``(path or hub id, hub revision)`` of the tokenizer; the revision is the base's
    pinned commit for its own hub tokenizer, ``None`` for a name given as it is."""
    if tokenizer is None:
        return None
    if isinstance(tokenizer, BaseModelRef):
        return tokenizer.tokenizer_path, base_tokenizer_revision(tokenizer)
    return tokenizer, None


def load_tokenizer(tokenizer: TokenizerSpec) -> Any:
    """The base stage's tokenizer exactly as training loads it (pinned revision), or a
    folder / hub id given by name."""
    if tokenizer is None:
        return None
    if isinstance(tokenizer, BaseModelRef):
        return load_base_tokenizer(tokenizer)
    return load_named_tokenizer(tokenizer)


def tokenizer_identity(tokenizer: TokenizerSpec) -> str | None:
    """Content hash of a local tokenizer folder's files; a hub id with the commit it is
    pinned to (``org/name@<commit>``), else the name as given."""
    loc = tokenizer_location(tokenizer)
    if loc is None:
        return None
    path, revision = loc
    p = Path(path)
    if p.is_dir():
        return tokenizer_revision(p)
    return f"{path}@{revision}" if revision else path


def token_lengths(tokenizer: Any, msgs_batch: list[list[Message]]) -> list[int]:
    """Each row's length in tokens, or in whitespace-separated words without a tokenizer."""
    if tokenizer is None:
        return [len(content_text(m).split()) for m in msgs_batch]
    return chat_token_lengths(tokenizer, msgs_batch)
