"""The data stage: normalisation, quarantine, deduplication, splits, PII, reports."""

from __future__ import annotations

import json
import logging
import os
import random
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest

from tasks.core.config import DataConfig, load_config
from tasks.core.refs import sha256_file
from tasks.data import REASONS, DataError, SourceError, clean, split_of
from tasks.data.dedup import answer_key, jaccard, shingles
from tasks.data.rows import Reject, normalize_text, to_messages
from tests.recording import RecordingTracker

# --------------------------------------------------------------------------- helpers

_VOCAB = [
    f"{a}{b}"
    for a in ("ka", "lo", "mi", "ne", "po", "ru", "si", "ta")
    for b in ("bar", "cen", "dul", "fim", "gor", "hep", "jat", "kov", "lun", "mes", "nor", "pid")
]


def sentence(rng: random.Random, n: int = 14) -> str:
    return " ".join(rng.choice(_VOCAB) for _ in range(n)).capitalize() + "."


def good_rows(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """Distinct rows that share nothing beyond chance (no near-duplicates among them)."""
    rng = random.Random(seed)
    rows: list[dict[str, Any]] = []
    for i in range(n):
        if i % 2:
            rows.append({"instruction": sentence(rng), "input": "", "output": sentence(rng, 6)})
        else:
            rows.append(
                {
                    "messages": [
                        {"role": "user", "content": sentence(rng)},
                        {"role": "assistant", "content": sentence(rng, 6)},
                    ]
                }
            )
    return rows


def write_jsonl(path: Path, rows: Iterable[Any]) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n")
    return path


def cfg_for(*sources: Path | str, **kw: Any) -> DataConfig:
    return DataConfig(sources=[str(s) for s in sources], **kw)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def report_of(out: Path) -> dict[str, Any]:
    r = json.loads((out / "report.json").read_text())
    # The contract every run must meet, whatever the data.
    assert r["input_records"] == r["kept_records"] + sum(r["rejected"].values())
    assert r["kept_records"] == r["splits"]["train"] + r["splits"]["validation"]
    assert len(read_jsonl(out / "rejected.jsonl")) == sum(r["rejected"].values())
    return r


def prompt_shingles(row: dict[str, Any]) -> list[str]:
    prompt = "\n\n".join(m["content"] for m in row["messages"][:-1])
    return shingles(prompt, set(), 3)


def build_tokenizer(folder: Path) -> str:
    """The embedded model's byte-level BPE tokenizer (with its chat template), trained on
    the spot on a small corpus and saved like a hub one."""
    from tasks.core.embedded import train_tokenizer

    rng = random.Random(1)
    train_tokenizer(iter([sentence(rng) for _ in range(400)]), 300).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return build_tokenizer(tmp_path_factory.mktemp("tokenizer"))


# --------------------------------------------------------------------------- normalisation


@pytest.mark.parametrize(
    ("raw", "expected", "kind"),
    [
        ("cafe\u0301", "café", "nfc"),  # decomposed e + combining acute -> one code point
        ("\ufeffhello", "hello", "bom"),
        ("zero\u200bwidth", "zerowidth", "zero_width"),
        ("a\u00a0b\u202fc", "a b c", "nbsp"),
        ("line1\r\nline2\rline3", "line1\nline2\nline3", "crlf"),
        ("  \t padded \n ", "padded", "surrounding_whitespace"),
        ("bell\x07 and nul\x00", "bell and nul", "control_chars"),
    ],
)
def test_each_normalisation(raw: str, expected: str, kind: str) -> None:
    from collections import Counter

    counts: Counter[str] = Counter()
    assert normalize_text(raw, counts) == expected
    assert counts == Counter({kind: 1})  # one tick, of one kind (a BOM is not zero_width)
    assert normalize_text(raw) == expected  # no counter: the same text


def test_normalisation_counts_strings_per_kind() -> None:
    from collections import Counter

    counts: Counter[str] = Counter()
    assert normalize_text("\ufeffa\u200bb\u2060c\ufeff", counts) == "abc"
    assert counts == Counter({"bom": 1, "zero_width": 1})  # one string, two kinds
    assert normalize_text("nul\x00 here", counts) == "nul here"
    assert normalize_text("tab\tstays", counts) == "tab\tstays"  # no control char of its own
    assert counts == Counter({"bom": 1, "zero_width": 1, "control_chars": 1})


def test_zero_width_joiner_is_kept() -> None:
    # ZWJ builds emoji sequences and Indic spellings: removing it would change the text.
    family = "\U0001f468\u200d\U0001f469\u200d\U0001f467"
    assert normalize_text(family) == family


def test_alpaca_becomes_chat() -> None:
    assert to_messages({"instruction": "Translate", "input": "hola", "output": "hello"}) == [
        {"role": "user", "content": "Translate\n\nhola"},
        {"role": "assistant", "content": "hello"},
    ]
    assert to_messages({"instruction": " Say hi ", "input": "", "output": "hi"})[0] == {
        "role": "user",
        "content": "Say hi",
    }
    with_system = to_messages({"system": "Be brief.", "instruction": "Q", "output": "A"})
    assert with_system[0] == {"role": "system", "content": "Be brief."}


def test_chat_roles_are_normalised_and_system_kept() -> None:
    msgs = to_messages(
        {
            "messages": [
                {"role": "System", "content": "sys"},
                {"role": " USER ", "content": "q"},
                {"role": "assistant", "content": "a"},
            ]
        }
    )
    assert [m["role"] for m in msgs] == ["system", "user", "assistant"]


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ([1, 2], "not_an_object"),
        ({"text": "hi"}, "unknown_shape"),
        ({"messages": "hi"}, "wrong_type"),
        ({"messages": [{"role": "user", "content": 3}]}, "wrong_type"),
        ({"instruction": "q", "output": 42}, "wrong_type"),
        ({"messages": [{"role": "bot", "content": "x"}]}, "bad_role"),
        ({"messages": [{"role": "assistant", "content": "a"}]}, "bad_role_order"),
        (
            {"messages": [{"role": "user", "content": "q"}, {"role": "user", "content": "q"}]},
            "bad_role_order",
        ),
        ({"instruction": "  ", "input": "", "output": "a"}, "empty_prompt"),
        ({"instruction": "q", "output": " \u200b "}, "empty_answer"),
        ({"instruction": "q", "output": "\ud800"}, "invalid_utf8"),  # lone surrogate
    ],
)
def test_row_rejections(value: Any, reason: str) -> None:
    with pytest.raises(Reject) as exc:
        to_messages(value)
    assert exc.value.reason == reason


# --------------------------------------------------------------------------- quarantine


def test_every_rejection_reason_is_quarantined_with_source_and_line(
    tmp_path: Path, tokenizer_dir: str
) -> None:
    good = good_rows(40)
    dup_source = {"instruction": sentence(random.Random(9), 30), "output": "Nefim pogor"}
    near = dict(dup_source, instruction=dup_source["instruction"] + " rujat")
    lines: list[Any] = [
        *good,
        "x" * 3000,  # line_too_long (max_line_bytes=2000)
        "{not json",  # malformed_json
        "[1, 2]",  # not_an_object
        {"text": "no shape"},  # unknown_shape
        {"messages": [{"role": "user", "content": 5}]},  # wrong_type
        {"messages": [{"role": "robot", "content": "x"}]},  # bad_role
        {"messages": [{"role": "assistant", "content": "x"}]},  # bad_role_order
        {"instruction": "", "input": "", "output": "x"},  # empty_prompt
        {"instruction": "Kabar", "output": ""},  # empty_answer
        {"instruction": "Ok", "output": "Ok"},  # too_few_tokens: 9 with the template, min 12
        {"instruction": "Kabar " * 200, "output": "x"},  # too_many_tokens (max 300)
        dup_source,
        dup_source,  # exact_duplicate
        near,  # near_duplicate (one extra word, same answer)
        "",  # blank: not a record
    ]
    src = write_jsonl(tmp_path / "in.jsonl", lines)
    with open(src, "ab") as f:
        f.write(b'{"instruction": "caf\xe9", "output": "x"}\n')  # invalid_utf8 (latin-1 byte)
    cfg = cfg_for(src, max_line_bytes=2000, min_tokens=12, max_tokens=300, val_fraction=0.3)
    clean(cfg, tmp_path / "out", tokenizer_dir)
    r = report_of(tmp_path / "out")
    rows = read_jsonl(tmp_path / "out" / "rejected.jsonl")
    by_reason = {row["reason"]: row for row in rows}
    expected_line = {
        "line_too_long": 41,
        "malformed_json": 42,
        "not_an_object": 43,
        "unknown_shape": 44,
        "wrong_type": 45,
        "bad_role": 46,
        "bad_role_order": 47,
        "empty_prompt": 48,
        "empty_answer": 49,
        "too_few_tokens": 50,
        "too_many_tokens": 51,
        "exact_duplicate": 53,
        "near_duplicate": 54,
        "invalid_utf8": 56,
    }
    for reason, line in expected_line.items():
        assert by_reason[reason]["line"] == line, reason
        assert by_reason[reason]["source"] == str(src)
        assert r["rejected"][reason] == 1, reason
    assert set(r["rejected"]) == set(expected_line)
    assert set(expected_line) | {"malformed_csv"} == set(REASONS)  # CSV: test_data_formats
    assert r["input_records"] == 55  # every non-blank line
    assert r["kept_records"] == 41  # 40 good rows + the first copy of dup_source
    assert "x" * 100 in by_reason["line_too_long"]["text"]  # a preview, not the whole line
    assert len(by_reason["line_too_long"]["text"]) <= 1000
    assert "rujat" in by_reason["near_duplicate"]["text"]


def test_blank_input_is_a_clear_error(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", ["{broken", "[]", ""])
    with pytest.raises(DataError, match=r"no rows left.*malformed_json=1"):
        clean(cfg_for(src), tmp_path / "out")
    # The reports are written before the error, so the cause can be inspected, in a
    # folder named for what it is (nothing is left under the output's name).
    failed = tmp_path / "out.failed"
    r = report_of(failed)
    assert r["kept_records"] == 0 and not (tmp_path / "out").exists()
    for split in ("train", "validation"):  # empty files, hashed as written
        assert r["splits"][f"{split}_sha256"] == sha256_file(failed / f"{split}.jsonl")


def test_empty_validation_split_is_a_clear_error(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", good_rows(3))
    with pytest.raises(DataError, match="validation split is empty"):
        clean(cfg_for(src, val_fraction=0.001), tmp_path / "out")


def test_missing_tokenizer_is_reported_not_silent(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", good_rows(30))
    with caplog.at_level(logging.WARNING):
        clean(cfg_for(src, val_fraction=0.5), tmp_path / "out")
    assert "token-length filter" in caplog.text and "SKIPPED" in caplog.text
    r = report_of(tmp_path / "out")
    assert r["length_filter"]["applied"] is False
    assert "skipped" in r["length_filter"]["note"]
    assert "skipped" in (tmp_path / "out" / "report.md").read_text()


def _chat_rows(n: int, seed: int = 3) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    return [
        {
            "messages": [
                {"role": "user", "content": sentence(rng, rng.randint(3, 20))},
                {"role": "assistant", "content": sentence(rng, 4)},
            ]
        }
        for _ in range(n)
    ]


def test_length_filter_counts_the_chat_template_the_trainer_sees(
    tmp_path: Path, tokenizer_dir: str
) -> None:
    from transformers import AutoTokenizer

    rows = _chat_rows(80)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    assert tok.chat_template
    msgs = [r["messages"] for r in rows]
    templated = [len(tok.apply_chat_template(m, tokenize=True, return_dict=False)) for m in msgs]
    joined = [
        len(tok("\n".join(t["content"] for t in m), add_special_tokens=False).input_ids)
        for m in msgs
    ]
    limit = sorted(templated)[len(templated) // 2]
    # the template's tokens matter: some rows fit by their text alone but not as trained
    assert sum(n > limit for n in templated) > sum(n > limit for n in joined)
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    cfg = cfg_for(src, max_tokens=limit, min_tokens=1, val_fraction=0.3, near_dup=False)
    clean(cfg, tmp_path / "out", tokenizer_dir)
    r = report_of(tmp_path / "out")
    assert r["rejected"]["too_many_tokens"] == sum(n > limit for n in templated)
    assert r["length_filter"]["chat_template"] is True
    assert "chat template" in r["length_filter"]["counted_text"]
    assert r["lengths"]["max"] <= limit

    # A tokenizer without a template: the turns joined by newlines, and the report says so.
    plain = tmp_path / "plain-tok"
    tok.chat_template = None
    tok.save_pretrained(plain)
    (plain / "chat_template.jinja").unlink(missing_ok=True)
    clean(cfg, tmp_path / "out2", str(plain))
    r2 = report_of(tmp_path / "out2")
    assert r2["rejected"].get("too_many_tokens", 0) == sum(n > limit for n in joined)
    assert r2["length_filter"]["chat_template"] is False
    assert "no chat template" in r2["length_filter"]["counted_text"]


def test_tokenizer_identity_covers_every_tokenizer_file(tmp_path: Path, tokenizer_dir: str) -> None:
    import shutil

    from tasks.data.clean import tokenizer_identity

    d = tmp_path / "tok"
    shutil.copytree(tokenizer_dir, d)
    seen = {tokenizer_identity(str(d))}
    (d / "README.md").write_text("notes")  # not a tokenizer file: no change
    assert tokenizer_identity(str(d)) in seen
    for name in ("vocab.json", "merges.txt", "chat_template.jinja", "tokenizer_config.json"):
        with open(d / name, "a", encoding="utf-8") as f:
            f.write("\n")
        now = tokenizer_identity(str(d))
        assert now not in seen, name
        seen.add(now)
    assert tokenizer_identity("org/hub-tokenizer") == "org/hub-tokenizer"


def test_missing_filesystem_backend_names_the_source_and_the_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import fsspec

    from tasks.data import SourceError, inputs_hash

    # fsspec raises ImportError for a protocol whose package (s3fs, gcsfs) is missing;
    # made so here, whatever this machine has installed.
    real_url_to_fs = fsspec.core.url_to_fs

    def no_backend(url: str, **options: Any) -> Any:
        protocol = url.split("://", 1)[0] if "://" in url else "file"
        if protocol in ("s3", "gcs"):
            raise ImportError(f"Install {protocol}fs to access {protocol}://")
        return real_url_to_fs(url, **options)

    monkeypatch.setattr(fsspec.core, "url_to_fs", no_backend)
    local = write_jsonl(tmp_path / "in.jsonl", good_rows(10))
    cfg = cfg_for(local, "s3://bucket/rows.jsonl")
    want = r"data\.sources\[1\]: s3://bucket/rows\.jsonl: .*pip install 'slothflow\[s3\]'"
    with pytest.raises(SourceError, match=want):
        clean(cfg, tmp_path / "out")
    with pytest.raises(SourceError, match=want):
        inputs_hash(cfg, None)
    # a protocol slothflow ships no extra for
    with pytest.raises(SourceError, match=r"data\.sources\[0\]: .*backend for gcs://"):
        clean(cfg_for("gcs://bucket/rows.jsonl"), tmp_path / "out")


def test_content_hashes_are_unchanged_by_the_shared_chunk_loop(tmp_path: Path) -> None:
    """``sha256_file`` and ``source_sha256`` (stage cache keys) hash what they always did:
    a file's bytes; a saved ``datasets`` folder's relative path + NUL + bytes per file."""
    import hashlib
    import os

    import datasets

    from tasks.data.read import resolve, source_sha256

    big = tmp_path / "big.jsonl"  # over one 1 MiB chunk, not a multiple of it
    write_jsonl(big, [{"instruction": "x" * 1000, "output": str(i)} for i in range(1500)])
    assert big.stat().st_size > (1 << 20) and big.stat().st_size % (1 << 20)
    whole = hashlib.sha256(big.read_bytes()).hexdigest()
    assert sha256_file(big) == sha256_file(big, chunk=7) == whole
    assert source_sha256(resolve(str(big))) == whole

    folder = tmp_path / "saved"
    datasets.Dataset.from_list(good_rows(20)).save_to_disk(str(folder))
    old = hashlib.sha256()
    for f in sorted(str(p) for p in folder.rglob("*") if p.is_file()):
        old.update(os.path.relpath(f, folder).encode() + b"\0")
        old.update(Path(f).read_bytes())
    assert source_sha256(resolve(str(folder))) == old.hexdigest()


def test_data_and_train_retry_the_same_failures() -> None:
    from tasks.core.orchestration import HAVE_PREFECT, is_transient, retry_transient
    from tasks.data import SourceError, clean_task
    from tasks.train import train_task

    if HAVE_PREFECT:
        for t in (clean_task, train_task):
            assert t.retry_condition_fn is retry_transient  # type: ignore[attr-defined]
    assert is_transient(ConnectionResetError("object store hiccup"))
    assert not is_transient(SourceError("input not found"))
    assert not is_transient(DataError("no rows left"))
    assert not is_transient(FileNotFoundError("gone"))


# --------------------------------------------------------------------------- duplicates


def test_exact_duplicates_after_normalisation(tmp_path: Path) -> None:
    base = {"instruction": "Kabar locen midul nefim", "output": "Pogor rujat"}
    variants = [
        base,
        {"instruction": "\ufeffKabar locen midul nefim  ", "output": "Pogor rujat\r\n"},
        {
            "messages": [
                {"role": "user", "content": "Kabar\u00a0locen midul nefim"},
                {"role": "assistant", "content": "Pogor rujat"},
            ]
        },
    ]
    src = write_jsonl(tmp_path / "in.jsonl", [*good_rows(20), *variants])
    clean(cfg_for(src, val_fraction=0.3), tmp_path / "out")
    r = report_of(tmp_path / "out")
    assert r["rejected"] == {"exact_duplicate": 2}


def test_exact_duplicate_keeps_the_cleanest_copy(tmp_path: Path) -> None:
    """Copies that are identical after normalisation: the one that needed no fixes is the
    kept one, so the quarantine names the sloppy copy's line, not the clean one's."""
    sloppy = {"instruction": "\ufeffKabar\u00a0locen midul nefim  ", "output": "Pogor rujat"}
    clean_copy = {"instruction": "Kabar locen midul nefim", "output": "Pogor rujat"}
    src = write_jsonl(tmp_path / "in.jsonl", [*good_rows(20), sloppy, clean_copy])
    clean(cfg_for(src, val_fraction=0.3), tmp_path / "out")
    assert report_of(tmp_path / "out")["rejected"] == {"exact_duplicate": 1}
    (rej,) = read_jsonl(tmp_path / "out" / "rejected.jsonl")
    assert rej["line"] == 21  # the sloppy copy, though it came first


def _near_dup_cluster(seed: int) -> dict[str, dict[str, Any]]:
    """Four members of one near-duplicate cluster, from sloppiest to cleanest."""
    prompt = sentence(random.Random(seed), 30)
    return {
        # all caps and no-break spaces: the normaliser fixes the spaces, not the case
        "shouting": {"instruction": prompt.upper().replace(" ", "\u00a0", 5), "output": "YES"},
        "padded": {"instruction": "  " + prompt.replace(".", " kabar.") + " ", "output": "Yes"},
        "clean": {"instruction": prompt.replace(".", " lofim."), "output": "Yes"},
        "clean_later": {"instruction": prompt.replace(".", " rujat."), "output": "Yes"},
    }


def _kept_by_answer_prompt(out: Path) -> list[str]:
    rows = read_jsonl(out / "train.jsonl") + read_jsonl(out / "validation.jsonl")
    return [
        r["messages"][0]["content"]
        for r in rows
        if answer_key(r["messages"][-1]["content"]) == answer_key("yes")
    ]


def test_near_duplicate_cluster_keeps_its_cleanest_member(tmp_path: Path) -> None:
    members = _near_dup_cluster(11)
    order = ["shouting", "padded", "clean", "clean_later"]  # file lines 21..24
    src = write_jsonl(tmp_path / "in.jsonl", [*good_rows(20), *(members[k] for k in order)])
    clean(cfg_for(src, val_fraction=0.3), tmp_path / "out")
    r = report_of(tmp_path / "out")
    assert r["rejected"] == {"near_duplicate": 3}
    # The member that needed no fix wins; between two clean ones, the earlier.
    assert _kept_by_answer_prompt(tmp_path / "out") == [members["clean"]["instruction"]]
    rejected = read_jsonl(tmp_path / "out" / "rejected.jsonl")
    assert sorted(x["line"] for x in rejected) == [21, 22, 24]
    assert len({x["duplicate_of"] for x in rejected}) == 1


def test_previous_manifest_beats_a_cleaner_near_duplicate(tmp_path: Path) -> None:
    members = _near_dup_cluster(12)
    old = write_jsonl(tmp_path / "old.jsonl", [*good_rows(20), members["shouting"]])
    old_out = tmp_path / "run1"
    clean(cfg_for(old, val_fraction=0.3), old_out)
    new = write_jsonl(tmp_path / "new.jsonl", [members["clean"]])
    # The accepted row wins even over a cleaner one that comes first.
    clean(cfg_for(new, old, val_fraction=0.3), tmp_path / "run2", previous_manifest=old_out)
    kept = _kept_by_answer_prompt(tmp_path / "run2")
    assert kept == [normalize_text(members["shouting"]["instruction"])]
    # Without the manifest the cleaner row wins, though it comes later.
    clean(cfg_for(old, new, val_fraction=0.3), tmp_path / "run3")
    assert _kept_by_answer_prompt(tmp_path / "run3") == [members["clean"]["instruction"]]


def test_dirtiness_counts_the_fixes_a_row_needed_and_shouting() -> None:
    from collections import Counter

    from tasks.data.rows import ALL_CAPS_WEIGHT, dirtiness

    def d(text: str, **fixes: int) -> int:
        return dirtiness([{"role": "user", "content": text}], Counter(fixes))

    assert d("What is the capital of France?") == 0
    assert d("NASA and the ESA") == 0  # acronyms are not shouting
    assert d("OK") == 0 and d("USA") == 0  # one word is not shouting
    assert d("padded", surrounding_whitespace=1, nbsp=1) == 2
    assert d("WHAT IS THE CAPITAL?") == ALL_CAPS_WEIGHT
    # Shouting outweighs every fix one string can need: the normaliser cannot undo it.
    kinds = ("crlf", "control_chars", "bom", "zero_width", "nbsp", "nfc", "surrounding_whitespace")
    assert d("WHAT IS THE CAPITAL?") > d("x", **dict.fromkeys(kinds, 1))


def test_near_duplicates_need_the_same_answer(tmp_path: Path) -> None:
    rng = random.Random(5)
    prompt = sentence(rng, 30)
    tweaked = prompt.replace(".", " kabar.")  # one extra word: Jaccard ~0.94
    rows = [
        *good_rows(20),
        {"instruction": prompt, "output": "Yes"},
        {"instruction": tweaked, "output": "yes!"},  # same answer (case/punctuation): dup
        {"instruction": tweaked + " lofim", "output": "No"},  # different answer: conflict
    ]
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    clean(cfg_for(src, val_fraction=0.3), tmp_path / "out")
    r = report_of(tmp_path / "out")
    assert r["rejected"] == {"near_duplicate": 1}
    assert r["near_dup"]["conflicting_answers"] == 1
    (rej,) = read_jsonl(tmp_path / "out" / "rejected.jsonl")
    assert rej["line"] == 22


def test_sample_has_no_near_duplicates_despite_shared_instruction(tmp_path: Path) -> None:
    """The shipped sample shares one long instruction; that paragraph is boilerplate and
    must not make distinct sentences near-duplicates."""
    ref = clean(load_config("default").data, tmp_path / "out")
    r = report_of(tmp_path / "out")
    assert r["input_records"] == 3000
    assert r["kept_records"] >= 2700
    assert ref.validation_rows >= 250
    assert r["near_dup"]["boilerplate_paragraphs"] == 1
    # A whole-row check would have flagged templated rows; count what is really there:
    rows = read_jsonl(tmp_path / "out" / "train.jsonl")[:400]
    sentences = [shingles(x["messages"][0]["content"].split("\n\n")[1], set(), 3) for x in rows]
    whole = [prompt_shingles(x) for x in rows]
    pairs = [(i, j) for i in range(len(rows)) for j in range(i)]
    assert sum(jaccard(whole[i], whole[j]) >= 0.85 for i, j in pairs) > 0
    assert all(jaccard(sentences[i], sentences[j]) < 0.85 for i, j in pairs)


def _clusters(n: int, copies: int, seed: int) -> list[dict[str, Any]]:
    """``n`` base rows, each with ``copies`` near-duplicates (one word changed)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = sentence(rng, 120).rstrip(".").split()
        answer = sentence(rng, 5)
        for c in range(copies + 1):
            w = list(words)
            if c:
                w[rng.randrange(len(w))] = rng.choice(_VOCAB)
            rows.append({"instruction": " ".join(w) + ".", "output": answer})
    rng.shuffle(rows)
    return rows


def test_no_near_duplicate_pair_straddles_the_split(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", _clusters(60, 3, seed=7))
    clean(cfg_for(src, val_fraction=0.3), tmp_path / "out")
    r = report_of(tmp_path / "out")
    assert r["rejected"].get("near_duplicate", 0) >= 170  # nearly all 180 planted copies
    train = read_jsonl(tmp_path / "out" / "train.jsonl")
    val = read_jsonl(tmp_path / "out" / "validation.jsonl")
    for v in val:
        for t in train:
            same_answer = answer_key(v["messages"][-1]["content"]) == answer_key(
                t["messages"][-1]["content"]
            )
            assert not (same_answer and jaccard(prompt_shingles(v), prompt_shingles(t)) >= 0.85)


# --------------------------------------------------------------------------- output folder


def test_a_failed_clean_leaves_no_complete_looking_folder(tmp_path: Path) -> None:
    good = write_jsonl(tmp_path / "good.jsonl", [*good_rows(40), "{broken"])
    out = tmp_path / "out"
    clean(cfg_for(good, val_fraction=0.3), out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    # A source that breaks after another one has been read: the earlier output stays
    # as it was, and nothing half-written is left next to it.
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"not a parquet file")
    more = write_jsonl(tmp_path / "more.jsonl", good_rows(10, seed=4))
    with pytest.raises(SourceError, match=r"broken\.parquet"):
        clean(cfg_for(more, broken, val_fraction=0.3), out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    inputs = ["broken.parquet", "good.jsonl", "more.jsonl"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [*inputs, "out"]
    # Nothing usable: no folder at the target; the reports are kept for inspection
    # under a name that says what they are.
    bad = write_jsonl(tmp_path / "bad.jsonl", ["{broken"])
    fresh = tmp_path / "fresh"
    with pytest.raises(DataError, match=r"fresh\.failed"):
        clean(cfg_for(bad), fresh)
    assert not fresh.exists()
    assert report_of(tmp_path / "fresh.failed")["kept_records"] == 0
    # A re-run works, after a failure and after a crash that left its staging folder.
    (tmp_path / "fresh.staging").mkdir()
    (tmp_path / "fresh.staging" / "train.jsonl").write_text("half a row")
    ref = clean(cfg_for(good, val_fraction=0.3), fresh)
    assert Path(ref.train_path) == fresh / "train.jsonl" and ref.train_rows > 0
    assert report_of(fresh)["kept_records"] == 40
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted([*inputs, "bad.jsonl", "fresh", "out"])


def test_every_output_file_has_the_same_permissions(tmp_path: Path) -> None:
    """report.json (written atomically, through a temporary file) is as readable as the
    files written in place: 0644 under the usual umask, never owner-only."""
    src = write_jsonl(tmp_path / "in.jsonl", good_rows(40))
    clean(cfg_for(src, val_fraction=0.3), tmp_path / "out")
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "out").iterdir()}
    umask = os.umask(0)
    os.umask(umask)
    assert modes == dict.fromkeys(modes, 0o666 & ~umask)


def test_clean_refuses_an_output_folder_holding_other_files(tmp_path: Path) -> None:
    """The output folder is replaced as a whole, so it must hold nothing but a clean's
    output: never the inputs or a user's files."""
    src = write_jsonl(tmp_path / "in.jsonl", good_rows(40))
    with pytest.raises(DataError, match=r"in\.jsonl"):
        clean(cfg_for(src, val_fraction=0.3), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]


def test_check_output_names_an_empty_failed_or_incomplete_folder(tmp_path: Path) -> None:
    from tasks.data import check_output

    src = write_jsonl(tmp_path / "in.jsonl", good_rows(40))
    ok = tmp_path / "ok"
    clean(cfg_for(src, val_fraction=0.3), ok)
    check_output(ok)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="is empty"):
        check_output(tmp_path / "empty")
    with pytest.raises(DataError, match="failed"):
        clean(cfg_for(write_jsonl(tmp_path / "bad.jsonl", ["{x"])), tmp_path / "bad")
    with pytest.raises(DataError, match=r"data clean that failed"):
        check_output(tmp_path / "bad.failed")
    # What a clean interrupted half-way used to leave: splits but no report yet.
    partial = tmp_path / "partial"
    partial.mkdir()
    for name in ("train.jsonl", "validation.jsonl", "rejected.jsonl", "manifest.jsonl"):
        (partial / name).write_bytes((ok / name).read_bytes())
    with pytest.raises(DataError, match="incomplete"):
        check_output(partial)
    # train.jsonl and validation.jsonl alone, not written by the data stage: fine.
    (partial / "rejected.jsonl").unlink()
    (partial / "manifest.jsonl").unlink()
    check_output(partial)
    (partial / "validation.jsonl").write_text("\n")
    with pytest.raises(DataError, match=r"validation\.jsonl has no rows"):
        check_output(partial)


# --------------------------------------------------------------------------- splits


def test_split_is_stable_when_rows_are_added(tmp_path: Path) -> None:
    old = good_rows(300, seed=1)
    new = good_rows(300, seed=2)
    a = write_jsonl(tmp_path / "a.jsonl", old)
    b = write_jsonl(tmp_path / "b.jsonl", new)
    clean(cfg_for(a), tmp_path / "one")
    clean(cfg_for(b, a), tmp_path / "two")  # new data first: order must not matter
    before = {r["id"]: r["split"] for r in read_jsonl(tmp_path / "one" / "manifest.jsonl")}
    after = {r["id"]: r["split"] for r in read_jsonl(tmp_path / "two" / "manifest.jsonl")}
    assert set(before) <= set(after)
    assert all(after[i] == s for i, s in before.items())
    val = sum(s == "validation" for s in after.values()) / len(after)
    assert 0.05 < val < 0.15  # val_fraction 0.1
    # Pinned: a change to the hash would move rows of existing datasets between splits.
    val = [i for i in range(40) if split_of(f"row-{i}", "slothflow-v1", 0.1) == "validation"]
    assert val == [9, 18, 20, 30, 33]
    val2 = [i for i in range(40) if split_of(f"row-{i}", "slothflow-v2", 0.1) == "validation"]
    assert val2 == [1, 3, 5, 10, 13, 21, 33, 39]  # another salt, another split


def test_previous_manifest_rows_survive_later_near_duplicates(tmp_path: Path) -> None:
    rng = random.Random(3)
    words = sentence(rng, 40)
    old_row = {"instruction": words, "output": "Kabar"}
    new_row = {"instruction": words.replace(".", " lobar."), "output": "Kabar"}
    first = write_jsonl(tmp_path / "old.jsonl", [*good_rows(30), old_row])
    clean(cfg_for(first, val_fraction=0.3), tmp_path / "run1")
    (old_id,) = [
        r["id"]
        for r in read_jsonl(tmp_path / "run1" / "train.jsonl")
        + read_jsonl(tmp_path / "run1" / "validation.jsonl")
        if r["messages"][-1]["content"] == "Kabar"
    ]
    # The later file puts the new near-duplicate *before* the old row.
    second = write_jsonl(tmp_path / "new.jsonl", [new_row])
    cfg = cfg_for(second, first, val_fraction=0.3)
    clean(cfg, tmp_path / "run2", previous_manifest=tmp_path / "run1" / "manifest.jsonl")
    (rej,) = read_jsonl(tmp_path / "run2" / "rejected.jsonl")
    assert rej["reason"] == "near_duplicate" and rej["duplicate_of"] == old_id
    assert report_of(tmp_path / "run2")["previous_manifest"]["kept"] == 31
    # Without the manifest the first arrival wins: the manifest is what protects old rows.
    clean(cfg, tmp_path / "run3")
    (rej,) = read_jsonl(tmp_path / "run3" / "rejected.jsonl")
    assert rej["source"] == str(first)


# --------------------------------------------------------------------------- PII


def test_pii_is_scrubbed_in_outputs_and_quarantine(tmp_path: Path) -> None:
    secret_rows = [
        {"instruction": "Mail jane.doe@example.com about it", "output": "Call +44 20 7946 0958"},
        {"instruction": "Mail jane.doe@example.com about it", "output": "Call +44 20 7946 0958"},
        '{"instruction": "broken bob@corp.io (555) 123-4567',
    ]
    harmless = {"instruction": "On 2024-01-15 we sold 3 of 4 items for 12.50", "output": "Ok fine"}
    # An over-long line whose 1000-byte preview cuts an address in half ("...@exa"):
    prefix = '{"instruction": "' + "a " * 486
    assert len(prefix) == 989
    cut = prefix + "cut.off@example.com " + "b " * 1000 + '", "output": "x"}'
    src = write_jsonl(tmp_path / "in.jsonl", [*good_rows(30), *secret_rows, harmless, cut])
    cfg = cfg_for(src, pii_scrub=True, val_fraction=0.3, max_line_bytes=2000)
    clean(cfg, tmp_path / "out")
    r = report_of(tmp_path / "out")
    everything = "".join(
        (tmp_path / "out" / f).read_text()
        for f in ("train.jsonl", "validation.jsonl", "rejected.jsonl")
    )
    for secret in ("jane.doe@example.com", "bob@corp.io", "7946 0958", "123-4567", "cut.off"):
        assert secret not in everything
    assert "<EMAIL>" in everything and "<PHONE>" in everything
    assert "2024-01-15" in everything and "12.50" in everything  # not phone numbers
    # Counted in every valid row (both copies: scrubbing runs before deduplication).
    assert r["pii"]["emails"] == 2 and r["pii"]["phones"] == 2
    assert r["pii"]["in_rejected"] == {"emails": 1, "phones": 1}  # the broken line
    assert r["rejected"] == {"exact_duplicate": 1, "line_too_long": 1, "malformed_json": 1}


def test_only_a_cut_off_quarantine_text_loses_its_partial_tail(
    tmp_path: Path, tokenizer_dir: str
) -> None:
    """With PII scrubbing, a preview cut mid-token drops that token; a whole row's text
    (here one rejected as too_many_tokens, far longer than a preview) stays intact JSON."""
    from tasks.data.read import PREVIEW_BYTES, clip

    long_row = {"instruction": "Kabar locen " * 300, "output": "Pogor rujat"}
    src = write_jsonl(tmp_path / "in.jsonl", [*good_rows(30), long_row])
    cfg = cfg_for(src, pii_scrub=True, val_fraction=0.3, min_tokens=1, max_tokens=300)
    clean(cfg, tmp_path / "out", tokenizer_dir)
    assert report_of(tmp_path / "out")["rejected"] == {"too_many_tokens": 1}
    (rej,) = read_jsonl(tmp_path / "out" / "rejected.jsonl")
    assert len(rej["text"]) > PREVIEW_BYTES
    assert json.loads(rej["text"]) == to_messages(long_row)

    assert clip("abc def", 7) == ("abc def", False)
    assert clip("abc defg", 7) == ("abc def", True)
    assert clip(b"caf\xc3\xa9!", 4) == ("caf\ufffd", True)


# --------------------------------------------------------------------------- outputs


def test_outputs_load_in_datasets_and_are_logged(tmp_path: Path, tokenizer_dir: str) -> None:
    import datasets

    src = write_jsonl(tmp_path / "in.jsonl", good_rows(60))
    tracker = RecordingTracker()
    ref = clean(cfg_for(src, val_fraction=0.3), tmp_path / "out", tokenizer_dir, tracker=tracker)
    ds = datasets.load_dataset(
        "json",
        data_files={"train": ref.train_path, "validation": ref.validation_path},
        cache_dir=str(tmp_path / "hf"),
    )
    assert (
        ds["train"].num_rows == ref.train_rows and ds["validation"].num_rows == ref.validation_rows
    )
    assert set(ds["train"].column_names) == {"id", "messages"}
    assert tracker.input("train").sha256 == sha256_file(Path(ref.train_path))
    assert tracker.input("validation").sha256 == sha256_file(Path(ref.validation_path))
    # hashed while written, equal to hashing the files afterwards
    splits = json.loads((tmp_path / "out" / "report.json").read_text())["splits"]
    assert splits["train_sha256"] == sha256_file(Path(ref.train_path))
    assert splits["validation_sha256"] == sha256_file(Path(ref.validation_path))
    artifacts = {p.name for p, _ in tracker.artifacts}
    assert artifacts == {"report.json", "report.md", "token_lengths.png", "rejected.jsonl"}
    png = (tmp_path / "out" / "token_lengths.png").read_bytes()
    assert png.startswith(b"\x89PNG")
    r = report_of(tmp_path / "out")
    assert r["length_filter"]["applied"] and r["length_filter"]["unit"] == "tokens"
    assert r["fingerprint"] == ref.fingerprint and len(ref.fingerprint) == 64
    # Same input, same fingerprint; one changed row, a new one.
    again = clean(cfg_for(src, val_fraction=0.3), tmp_path / "again", tokenizer_dir)
    assert again.fingerprint == ref.fingerprint
    write_jsonl(src, good_rows(61))
    assert clean(cfg_for(src, val_fraction=0.3), tmp_path / "more").fingerprint != ref.fingerprint


def test_data_clean_then_train_keeps_the_reports_fingerprint(
    tmp_path: Path, tokenizer_dir: str
) -> None:
    """``slothflow data clean --out D`` writes no ref.json; ``slothflow train --data D``
    must still record the fingerprint report.json carries (one lineage)."""
    from tasks.train import data_ref_from_folder

    src = write_jsonl(tmp_path / "in.jsonl", good_rows(40))
    ref = clean(cfg_for(src, val_fraction=0.3), tmp_path / "out", tokenizer_dir)
    assert not (tmp_path / "out" / "ref.json").exists()
    again = data_ref_from_folder(tmp_path / "out")
    assert again.fingerprint == report_of(tmp_path / "out")["fingerprint"] == ref.fingerprint
    assert (again.train_rows, again.validation_rows) == (ref.train_rows, ref.validation_rows)


def test_clean_task_records_the_stage_in_mlflow(tmp_path: Path, tokenizer_dir: str) -> None:
    """The task as the flow runs it, against a real MLflow store (SQLite): params,
    metrics, report artifacts, and both splits as dataset inputs with full-content
    hashes. A FAILED stage run when the data is unusable."""
    from mlflow.tracking import MlflowClient

    from tasks.core import tracking
    from tasks.core.config import TrackingConfig
    from tasks.core.home import Home
    from tasks.core.refs import RunContext
    from tasks.data import clean_task

    tcfg = TrackingConfig(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", experiment="d")
    tref = tracking.open_pipeline_run(tcfg, Home(tmp_path / "home"), run_id="r1")
    ctx = RunContext(
        run_id="r1",
        run_dir=str(tmp_path / "run"),
        config_hash="x",
        code_version="x",
        hardware={},
        tracking=tref.model_dump(),
    )
    src = write_jsonl(tmp_path / "in.jsonl", [*good_rows(40), "{broken"])
    fn = getattr(clean_task, "fn", clean_task)
    ref = fn(ctx, cfg_for(src, val_fraction=0.3), tokenizer_dir)
    client = MlflowClient(tcfg.tracking_uri)
    query = "tags.`slothflow.stage` = 'data' and tags.`slothflow.run_id` = 'r1'"
    (run,) = client.search_runs([tref.experiment_id], query)
    assert run.info.status == "FINISHED"
    assert run.data.metrics["data.input_records"] == 41
    assert run.data.metrics["data.rejected.malformed_json"] == 1
    assert run.data.params["data.val_fraction"] == "0.3"
    assert run.data.params["data.train.sha256"] == sha256_file(Path(ref.train_path))
    assert run.data.tags["slothflow.data_fingerprint"] == ref.fingerprint
    inputs = {i.dataset.name: i for i in run.inputs.dataset_inputs}
    assert inputs["validation"].dataset.digest == sha256_file(Path(ref.validation_path))[:16]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "data")}
    assert {"data/report.json", "data/report.md", "data/token_lengths.png"} <= artifacts

    bad = write_jsonl(tmp_path / "bad.jsonl", ["{broken"])
    tref2 = tracking.open_pipeline_run(tcfg, Home(tmp_path / "home"), run_id="r2")
    ctx2 = ctx.model_copy(
        update={"run_id": "r2", "run_dir": str(tmp_path / "run2"), "tracking": tref2.model_dump()}
    )
    with pytest.raises(DataError):
        fn(ctx2, cfg_for(bad), tokenizer_dir)
    # The stage's folder holds no output; the failed one's reports sit next to it.
    assert not any((tmp_path / "run2" / "data").iterdir())
    assert report_of(tmp_path / "run2" / "data.failed")["kept_records"] == 0
    query = "tags.`slothflow.stage` = 'data' and tags.`slothflow.run_id` = 'r2'"
    (run,) = client.search_runs([tref.experiment_id], query)
    assert run.info.status == "FAILED"
