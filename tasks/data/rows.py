"""One row at a time: shape conversion, normalisation, validation, PII scrubbing, identity.

Everything here is a small pure function; a bad row raises :class:`Reject` with a
reason from :data:`REASONS`, and the caller quarantines it.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections import Counter
from typing import Any

import orjson

Message = dict[str, str]

ROLES = ("system", "user", "assistant")

#: Every reason a row can be quarantined for, with what it means (report.md lists them).
REASONS: dict[str, str] = {
    "line_too_long": "the input line is longer than data.max_line_bytes (skipped unread)",
    "invalid_utf8": "the row's bytes are not valid UTF-8",
    "malformed_json": "the row is not valid JSON",
    "malformed_csv": "the CSV record cannot be parsed or has the wrong number of fields",
    "not_an_object": "the row is a JSON value but not an object",
    "unknown_shape": "neither chat (`messages`) nor alpaca (`instruction`/`output`)",
    "wrong_type": "a field has the wrong type (e.g. content not a string)",
    "bad_role": "a message role is not system, user or assistant",
    "bad_role_order": "roles must be [system], user, assistant, user, ..., assistant",
    "empty_prompt": "a user message is empty after normalisation",
    "empty_answer": "an assistant message is empty after normalisation",
    "too_few_tokens": "shorter than data.min_tokens tokens",
    "too_many_tokens": "longer than data.max_tokens tokens",
    "exact_duplicate": "identical (after normalisation) to an earlier row",
    "near_duplicate": "near-identical prompt and the same answer as a kept row",
}


class Reject(Exception):
    """A row that fails a rule; ``reason`` is a key of :data:`REASONS`."""

    def __init__(self, reason: str, detail: str = "") -> None:
        assert reason in REASONS, reason
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


# --------------------------------------------------------------------------- normalisation

# Zero-width characters that carry no meaning in training text. ZWJ/ZWNJ (U+200D,
# U+200C) are kept on purpose: they are part of emoji sequences and of Persian and
# Indic spelling, and removing them changes the text.
_ZERO_WIDTH = "\u200b\u2060\u180e\ufeff"
_NBSP = "\u00a0\u202f\u2007"
# C0/C1 control characters except tab and newline (CR is handled before this).
_CONTROL = "".join(chr(c) for c in (*range(0x00, 0x09), 0x0B, 0x0C, *range(0x0E, 0x20), 0x7F))
_CONTROL += "".join(chr(c) for c in range(0x80, 0xA0))
_TABLE = str.maketrans({**dict.fromkeys(_ZERO_WIDTH + _CONTROL, None), **dict.fromkeys(_NBSP, " ")})
_BOM = "\ufeff"
_ZW_RE = re.compile(f"[{_ZERO_WIDTH.replace(_BOM, '')}]")  # a BOM counts as "bom" only
_NBSP_RE = re.compile(f"[{_NBSP}]")
_CONTROL_RE = re.compile(f"[{re.escape(_CONTROL)}]")
# A JSON escape such as "\\ud800" decodes to a lone surrogate: not encodable as UTF-8.
_SURROGATE_RE = re.compile("[\ud800-\udfff]")


def _tick(counts: Counter[str] | None, kind: str) -> None:
    if counts is not None:
        counts[kind] += 1


def normalize_text(s: str, counts: Counter[str] | None = None) -> str:
    """CRLF/CR -> LF, drop BOM/zero-width/control characters, NBSP -> space, Unicode NFC,
    strip surrounding whitespace.

    ``counts`` (the report's ``normalisation``) gets one tick per kind of change this
    string needed, so it counts strings changed by kind, not characters: ``crlf``,
    ``control_chars``, ``bom`` (U+FEFF), ``zero_width`` (the other zero-width characters;
    a BOM is counted as ``bom`` only), ``nbsp``, ``nfc``, ``surrounding_whitespace``.
    """
    if "\r" in s:
        _tick(counts, "crlf")
        s = s.replace("\r\n", "\n").replace("\r", "\n")
    has_control = _CONTROL_RE.search(s) is not None
    if has_control:
        _tick(counts, "control_chars")
    if not s.isascii():
        if _SURROGATE_RE.search(s):
            raise Reject("invalid_utf8", "lone surrogate (an invalid \\u escape)")
        if _BOM in s:
            _tick(counts, "bom")
        if _ZW_RE.search(s):
            _tick(counts, "zero_width")
        if _NBSP_RE.search(s):
            _tick(counts, "nbsp")
        s = s.translate(_TABLE)
        if not unicodedata.is_normalized("NFC", s):
            _tick(counts, "nfc")
            s = unicodedata.normalize("NFC", s)
    elif has_control:  # this string's own control characters (ASCII ones)
        s = s.translate(_TABLE)
    stripped = s.strip()
    if len(stripped) != len(s):
        _tick(counts, "surrounding_whitespace")
    return stripped


# --------------------------------------------------------------------------- cleanliness

#: What one all-caps turn costs in :func:`dirtiness`: more than every fix one string can
#: need (7 kinds), because the normaliser repairs those but cannot undo shouting, which
#: therefore reaches the training data.
ALL_CAPS_WEIGHT = 8
_LETTER_RUN = re.compile(r"[^\W\d_]{2,}")


def shouting(s: str) -> bool:
    """All cased letters upper-case over at least two words (``"OK"`` or ``"NASA"`` alone
    is an answer or an acronym, not shouting)."""
    return s.isupper() and len(_LETTER_RUN.findall(s)) >= 2


def dirtiness(msgs: list[Message], fixes: Counter[str]) -> int:
    """How far a row was from clean: the normalisation fixes it needed (``fixes``: this
    row's ticks from :func:`normalize_text`, one per string and kind) plus
    :data:`ALL_CAPS_WEIGHT` per all-caps turn. The one definition of which member of a
    set of duplicates is kept: the lowest, the earliest of equals."""
    return sum(fixes.values()) + ALL_CAPS_WEIGHT * sum(shouting(m["content"]) for m in msgs)


# --------------------------------------------------------------------------- shape


def _text_field(obj: dict[str, Any], key: str, required: bool) -> str:
    v = obj.get(key)
    if v is None:
        if required:
            raise Reject("wrong_type", f"{key!r} is missing or null")
        return ""
    if not isinstance(v, str):
        raise Reject("wrong_type", f"{key!r} is {type(v).__name__}, expected a string")
    return v


def has_row_shape(value: dict[str, Any]) -> bool:
    """Chat (``messages``) or alpaca (``instruction``/``output``): an object to convert."""
    return "messages" in value or "instruction" in value or "output" in value


def to_messages(value: Any, counts: Counter[str] | None = None) -> list[Message]:
    """Chat messages of an alpaca or chat row, normalised and validated.

    Alpaca becomes ``[system?], user, assistant`` where user = instruction + blank line
    + input (input only when non-empty) and assistant = output.
    """
    if not isinstance(value, dict):
        raise Reject("not_an_object", f"got {type(value).__name__}")
    if not has_row_shape(value):
        keys = ", ".join(sorted(map(str, value))[:8])
        raise Reject("unknown_shape", f"keys: {keys}")
    if "messages" in value:
        raw = value["messages"]
        if not isinstance(raw, list):
            raise Reject("wrong_type", f"'messages' is {type(raw).__name__}, expected a list")
        msgs: list[Message] = []
        for i, m in enumerate(raw):
            if not isinstance(m, dict):
                raise Reject("wrong_type", f"message {i} is {type(m).__name__}, expected object")
            role, content = m.get("role"), m.get("content")
            if not isinstance(role, str) or not isinstance(content, str):
                raise Reject("wrong_type", f"message {i}: role and content must be strings")
            role = role.strip().lower()
            if role not in ROLES:
                raise Reject("bad_role", f"message {i} has role {role!r}")
            msgs.append({"role": role, "content": normalize_text(content, counts)})
    else:
        instruction = normalize_text(_text_field(value, "instruction", True), counts)
        extra = normalize_text(_text_field(value, "input", False), counts)
        output = normalize_text(_text_field(value, "output", True), counts)
        system = normalize_text(_text_field(value, "system", False), counts)
        user = f"{instruction}\n\n{extra}" if instruction and extra else instruction or extra
        msgs = [{"role": "system", "content": system}] if system else []
        msgs += [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    return validate(msgs)


def validate(msgs: list[Message]) -> list[Message]:
    """Role order and non-empty turns. An empty system message is dropped, not an error."""
    if msgs and msgs[0]["role"] == "system" and not msgs[0]["content"]:
        msgs = msgs[1:]
    body = msgs[1:] if msgs and msgs[0]["role"] == "system" else msgs
    roles = [m["role"] for m in body]
    expected = ["user", "assistant"] * (len(roles) // 2)
    if not roles or roles != expected:
        raise Reject("bad_role_order", "roles: " + ",".join(m["role"] for m in msgs))
    for m in body:
        if not m["content"]:
            raise Reject("empty_answer" if m["role"] == "assistant" else "empty_prompt")
    return msgs


# --------------------------------------------------------------------------- PII

EMAIL_RE = re.compile(
    r"[A-Za-z0-9._%+-]+@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}"
)
# Groups of digits with separators, optionally +country code and an area code in
# parentheses. Candidates are then kept only with 9-15 digits and not date-shaped, so
# years, prices and "3 of 4" never match.
PHONE_RE = re.compile(
    r"(?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{1,4}\)[ .-]?)?\d{2,4}(?:[ .-]\d{2,4}){1,4}(?![\w-])"
)
_DATE_RE = re.compile(r"^\d{4}-\d{2}-\d{2}$|^\d{2}[./-]\d{2}[./-]\d{4}$")
EMAIL_TOKEN = "<EMAIL>"
PHONE_TOKEN = "<PHONE>"


def scrub(text: str, counts: Counter[str]) -> str:
    """Replace e-mail addresses and phone numbers; ``counts`` gets ``emails``/``phones``."""
    if "@" in text:
        text, n = EMAIL_RE.subn(EMAIL_TOKEN, text)
        counts["emails"] += n

    def phone(m: re.Match[str]) -> str:
        s = m.group(0)
        digits = sum(ch.isdigit() for ch in s)
        if 9 <= digits <= 15 and not _DATE_RE.match(s):
            counts["phones"] += 1
            return PHONE_TOKEN
        return s

    return PHONE_RE.sub(phone, text)


def scrub_messages(msgs: list[Message], counts: Counter[str]) -> list[Message]:
    return [{"role": m["role"], "content": scrub(m["content"], counts)} for m in msgs]


# --------------------------------------------------------------------------- identity


def canonical(msgs: list[Message]) -> str:
    """The messages as compact JSON with sorted keys (what the row id hashes)."""
    return orjson.dumps(msgs, option=orjson.OPT_SORT_KEYS).decode("utf-8")


def row_id(msgs: list[Message]) -> str:
    """Stable id of a cleaned row: a content hash, so the same row has the same id in every
    run and exact duplicates share it."""
    return hashlib.sha256(orjson.dumps(msgs, option=orjson.OPT_SORT_KEYS)).hexdigest()[:32]


def content_text(msgs: list[Message]) -> str:
    """Every turn's content, joined by newlines: what the length filter counts when the
    tokenizer has no chat template (see :mod:`tasks.core.tokens`), in words when there is no
    tokenizer at all."""
    return "\n".join(m["content"] for m in msgs)


def prompt_and_answer(msgs: list[Message]) -> tuple[str, str]:
    """Everything before the final answer, and the final answer."""
    return "\n\n".join(m["content"] for m in msgs[:-1]), msgs[-1]["content"]
