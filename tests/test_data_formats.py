"""The data stage's readers: every input format, remote URLs, hostile bytes, huge lines,
and `slothflow data clean` as a user runs it."""

from __future__ import annotations

import csv
import gzip
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import fsspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tasks.data import DataError, SourceError, clean
from tasks.data.read import lines, read, resolve
from tests.conftest import run_slothflow
from tests.test_data import cfg_for, good_rows, read_jsonl, report_of, write_jsonl


def _as_alpaca(rows: list[dict[str, Any]]) -> list[dict[str, str]]:
    out = []
    for r in rows:
        if "messages" in r:
            out.append(
                {
                    "instruction": r["messages"][0]["content"],
                    "input": "",
                    "output": r["messages"][1]["content"],
                }
            )
        else:
            out.append(r)
    return out


def _ids(out: Path) -> set[str]:
    return {r["id"] for r in read_jsonl(out / "manifest.jsonl")}


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    """Row ids of the JSONL original; every other format must give the same ones."""
    d = tmp_path_factory.mktemp("ref")
    src = write_jsonl(d / "rows.jsonl", _as_alpaca(good_rows(40)))
    clean(cfg_for(src, val_fraction=0.3), d / "out")
    return _ids(d / "out")


def test_parquet(tmp_path: Path, reference: set[str]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(_as_alpaca(good_rows(40))), tmp_path / "rows.parquet")
    clean(cfg_for(tmp_path / "rows.parquet", val_fraction=0.3), tmp_path / "out")
    assert _ids(tmp_path / "out") == reference


def test_csv_alpaca_and_chat_columns(tmp_path: Path, reference: set[str]) -> None:
    rows = _as_alpaca(good_rows(40))
    with open(tmp_path / "rows.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["instruction", "input", "output"])
        w.writeheader()
        w.writerows(rows)
        f.write('"unterminated,quote\n')  # malformed: swallows the rest as one field
    clean(cfg_for(tmp_path / "rows.csv", val_fraction=0.3), tmp_path / "out")
    assert _ids(tmp_path / "out") == reference
    r = report_of(tmp_path / "out")
    assert r["rejected"] == {"malformed_csv": 1}

    chat = [
        {
            "messages": json.dumps(
                [
                    {"role": "user", "content": x["instruction"]},
                    {"role": "assistant", "content": x["output"]},
                ]
            )
        }
        for x in rows
    ]
    with open(tmp_path / "chat.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["messages"])
        w.writeheader()
        w.writerows(chat)
    clean(cfg_for(tmp_path / "chat.csv", val_fraction=0.3), tmp_path / "out2")
    assert _ids(tmp_path / "out2") == reference


def test_json_array_and_json_lines_named_json(tmp_path: Path, reference: set[str]) -> None:
    rows = _as_alpaca(good_rows(40))
    (tmp_path / "array.json").write_text(json.dumps(rows, indent=2), encoding="utf-8")
    clean(cfg_for(tmp_path / "array.json", val_fraction=0.3), tmp_path / "a")
    assert _ids(tmp_path / "a") == reference
    # `datasets` writes JSON Lines to .json files by default
    write_jsonl(tmp_path / "lines.json", rows)
    clean(cfg_for(tmp_path / "lines.json", val_fraction=0.3), tmp_path / "b")
    assert _ids(tmp_path / "b") == reference


@pytest.mark.parametrize("name", ["rows.tsv", "rows.tsv.bz2", "rows.TSV.xz"])
def test_tsv_compressed_or_not_is_tab_separated(
    tmp_path: Path, reference: set[str], name: str
) -> None:
    import bz2
    import io
    import lzma

    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=["instruction", "input", "output"], delimiter="\t")
    w.writeheader()
    w.writerows(_as_alpaca(good_rows(40)))
    data = buf.getvalue().encode("utf-8")
    compress = {"bz2": bz2.compress, "xz": lzma.compress}.get(name.rsplit(".", 1)[-1])
    (tmp_path / name).write_bytes(compress(data) if compress else data)
    clean(cfg_for(tmp_path / name, val_fraction=0.3), tmp_path / "out")
    assert report_of(tmp_path / "out")["rejected"] == {}
    assert _ids(tmp_path / "out") == reference


def test_deep_nesting_is_malformed_json_not_a_crash(tmp_path: Path, reference: set[str]) -> None:
    """JSON nested deeper than the parser's recursion limit: a quarantined row (a reader
    never raises for bad content), in a CSV ``messages`` cell and in a JSON array."""
    deep = "[" * 50000
    rows = _as_alpaca(good_rows(40))
    with open(tmp_path / "chat.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["messages"])
        w.writeheader()
        for x in rows:
            turns = [
                {"role": "user", "content": x["instruction"]},
                {"role": "assistant", "content": x["output"]},
            ]
            w.writerow({"messages": json.dumps(turns)})
        w.writerow({"messages": deep})
    (tmp_path / "array.json").write_text(json.dumps(rows)[:-1] + ", " + deep, encoding="utf-8")
    for name in ("chat.csv", "array.json"):
        out = tmp_path / name.replace(".", "-")
        clean(cfg_for(tmp_path / name, val_fraction=0.3), out)
        assert _ids(out) == reference, name
        assert report_of(out)["rejected"] == {"malformed_json": 1}, name
        (rej,) = read_jsonl(out / "rejected.jsonl")
        assert rej["line"] == (42 if name == "chat.csv" else 41), name
        assert rej["text"].startswith("[[[["), name
    (tmp_path / "only.json").write_text(deep, encoding="utf-8")
    (got,) = read(resolve(str(tmp_path / "only.json")), 1_000_000)
    assert got.reason == "malformed_json" and "recursion" in got.detail


def test_saved_datasets_folder(tmp_path: Path, reference: set[str]) -> None:
    import datasets

    ds = datasets.Dataset.from_list(_as_alpaca(good_rows(40)))
    ds.save_to_disk(str(tmp_path / "saved"))
    clean(cfg_for(tmp_path / "saved", val_fraction=0.3), tmp_path / "out")
    assert _ids(tmp_path / "out") == reference
    datasets.DatasetDict({"a": ds.select(range(20)), "b": ds.select(range(20, 40))}).save_to_disk(
        str(tmp_path / "dict")
    )
    clean(cfg_for(tmp_path / "dict", val_fraction=0.3), tmp_path / "out2")
    assert _ids(tmp_path / "out2") == reference


def test_fsspec_urls_and_compression(tmp_path: Path, reference: set[str]) -> None:
    rows = _as_alpaca(good_rows(40))
    src = write_jsonl(tmp_path / "rows.jsonl", rows)
    clean(cfg_for(src.as_uri(), val_fraction=0.3), tmp_path / "file")  # file://
    assert _ids(tmp_path / "file") == reference
    # fsspec's in-memory filesystem stands in for s3:// (the same fsspec code path:
    # url_to_fs -> open); the CI machine cannot reach an object store.
    with fsspec.open("memory://bucket/rows.jsonl.gz", "wb", compression="gzip") as f:
        f.write(src.read_bytes())
    clean(cfg_for("memory://bucket/rows.jsonl.gz", val_fraction=0.3), tmp_path / "mem")
    assert _ids(tmp_path / "mem") == reference
    with gzip.open(tmp_path / "rows.jsonl.gz", "wb") as g:
        g.write(src.read_bytes())
    clean(cfg_for(tmp_path / "rows.jsonl.gz", val_fraction=0.3), tmp_path / "gz")
    assert _ids(tmp_path / "gz") == reference


def test_a_remote_source_is_downloaded_once_per_run_and_again_when_it_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stage hashes every source (to decide whether a finished clean can be reused)
    and then cleans it: for a remote file that must be one download, not two. fsspec's
    in-memory filesystem stands in for s3:// (its opens are counted); a changed remote
    file is fetched again and changes the stage's input hash."""
    from fsspec.implementations.memory import MemoryFileSystem

    from tasks.data.clean import inputs_hash

    url = "memory://bucket/once/rows.jsonl"
    with fsspec.open(url, "wb") as f:
        f.write("".join(json.dumps(r) + "\n" for r in _as_alpaca(good_rows(40))).encode())
    opened: list[str] = []
    real_open = MemoryFileSystem._open

    def counting_open(self: Any, path: str, *args: Any, **kwargs: Any) -> Any:
        if "once/rows" in path and "r" in kwargs.get("mode", args[0] if args else "rb"):
            opened.append(path)
        return real_open(self, path, *args, **kwargs)

    monkeypatch.setattr(MemoryFileSystem, "_open", counting_open)
    cfg = cfg_for(url, val_fraction=0.3)
    first = inputs_hash(cfg, None)
    clean(cfg, tmp_path / "a")
    assert report_of(tmp_path / "a")["input_records"] == 40
    assert len(opened) == 1, opened  # hashed and cleaned from one download

    with fsspec.open(url, "wb") as f:  # the remote file changes
        f.write("".join(json.dumps(r) + "\n" for r in _as_alpaca(good_rows(30))).encode())
    second = inputs_hash(cfg, None)
    assert second != first
    clean(cfg, tmp_path / "b")
    assert report_of(tmp_path / "b")["input_records"] == 30
    assert len(opened) == 2, opened  # fetched again once, for both passes


def test_relative_sources_fall_back_to_the_repository(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert resolve("data/sample/topics_alpaca.jsonl").url.endswith(
        "data/sample/topics_alpaca.jsonl"
    )
    (tmp_path / "data" / "sample").mkdir(parents=True)
    local = write_jsonl(tmp_path / "data" / "sample" / "topics_alpaca.jsonl", good_rows(1))
    assert resolve("data/sample/topics_alpaca.jsonl").url == str(local)  # cwd first


# --------------------------------------------------------------------------- hostile input


@settings(
    # No example database (.hypothesis/ in the repo) and a fixed seed: CI sees the same
    # 60 byte soups every run, and a failure reproduces.
    max_examples=60,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    data=st.lists(
        st.one_of(
            st.binary(max_size=120),
            st.sampled_from(
                [
                    b'{"instruction": "q", "output": "a"}',
                    b'{"messages": [{"role": "user", "content": "\\ud800"}]}',
                    b"\xef\xbb\xbf{}",
                    b"\r",
                    b"[" * 2000,  # deep nesting
                    b'{"instruction": "caf\xc3\xa9", "output": "\xff"}',
                ]
            ),
        ),
        max_size=30,
    ).map(lambda parts: b"\n".join(parts))
)
def test_arbitrary_bytes_never_crash_and_counts_add_up(tmp_path: Path, data: bytes) -> None:
    src = tmp_path / "fuzz.jsonl"
    src.write_bytes(data)
    cfg = cfg_for(src, max_line_bytes=64, val_fraction=0.5)
    if not data or data.isspace():
        with pytest.raises(SourceError, match="the file is empty"):
            list(read(resolve(str(src)), 64))
        return
    records = list(read(resolve(str(src)), 64))
    # Every non-blank line is one record (an over-long one too: it is not read to check).
    assert len(records) == sum(1 for x in data.split(b"\n") if x.strip() or len(x) > 64)
    out = tmp_path / "out"
    # Nothing or too little left is a clear DataError; the reports are written anyway,
    # next to the output folder.
    try:
        clean(cfg, out)
        r = report_of(out)
    except DataError:
        r = report_of(tmp_path / "out.failed")
    assert r["input_records"] == len(records)


def test_line_reader_splits_exactly() -> None:
    import io

    data = b"a\n\nbbbbbbbbbb\ncc"
    got = list(lines(io.BytesIO(data), max_bytes=5, chunk=3))
    assert got == [(1, b"a", b""), (2, b"", b""), (3, None, b"bbbbbbbbbb"), (4, b"cc", b"")]


def test_a_huge_line_is_rejected_in_bounded_memory(tmp_path: Path) -> None:
    """A 100 MB line among good rows: quarantined, and peak memory grows by far less than
    the line (measured in a fresh process, so other tests' allocations do not count)."""
    src = tmp_path / "huge.jsonl"
    with open(src, "wb") as f:
        for row in good_rows(30):
            f.write(json.dumps(row).encode() + b"\n")
        f.write(b'{"instruction": "')
        block = b"x" * (1 << 20)
        for _ in range(100):
            f.write(block)
        f.write(b'", "output": "y"}\n')
        for row in good_rows(30, seed=9):
            f.write(json.dumps(row).encode() + b"\n")
    script = textwrap.dedent(
        f"""
        import json, resource, sys
        from pathlib import Path
        from tasks.core.config import DataConfig
        from tasks.data import clean
        import matplotlib.pyplot  # imported before the baseline: not the line's cost
        cfg = DataConfig(sources=[{str(src)!r}], val_fraction=0.3)
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        clean(cfg, Path({str(tmp_path / "out")!r}))
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(json.dumps({{"growth_mb": (peak - base) / 1024}}))
        """
    )
    r = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert r.returncode == 0, r.stderr[-3000:]
    growth = json.loads(r.stdout.strip().splitlines()[-1])["growth_mb"]
    assert growth < 40, f"peak RSS grew by {growth:.0f} MB for a 100 MB line"
    rep = report_of(tmp_path / "out")
    assert rep["rejected"] == {"line_too_long": 1} and rep["kept_records"] == 60
    (rej,) = read_jsonl(tmp_path / "out" / "rejected.jsonl")
    assert rej["line"] == 31 and len(rej["text"]) <= 1000


# --------------------------------------------------------------------------- messages


@pytest.mark.parametrize(
    ("name", "data"),
    [
        ("e.jsonl", b""),
        ("e.json", b""),
        ("e.csv", b""),
        ("e.parquet", b""),
        ("blank.jsonl", b"\n  \r\n\t\n"),
        ("e.jsonl.gz", gzip.compress(b"", mtime=0)),
    ],
)
def test_an_empty_file_says_so(tmp_path: Path, name: str, data: bytes) -> None:
    src = tmp_path / name
    src.write_bytes(data)
    with pytest.raises(SourceError, match=rf"{re.escape(name)}: the file is empty"):
        clean(cfg_for(src), tmp_path / "out")


@pytest.mark.parametrize("indent", [None, 2])
def test_a_json_object_holding_the_rows_names_the_accepted_shapes(
    tmp_path: Path, indent: int | None
) -> None:
    src = tmp_path / "wrapped.json"
    src.write_text(json.dumps({"data": _as_alpaca(good_rows(5))}, indent=indent))
    with pytest.raises(SourceError) as err:
        clean(cfg_for(src), tmp_path / "out")
    msg = str(err.value)
    assert "wrapped.json" in msg and "keys: data" in msg
    assert "JSON array of rows" in msg and "JSON Lines" in msg


def test_an_unresolvable_host_is_not_a_missing_input() -> None:
    # .invalid is reserved (RFC 6761): the lookup fails, and no request is ever sent.
    url = "https://nonexistent.invalid/x.jsonl"
    with pytest.raises(SourceError) as err:
        resolve(url)
    msg = str(err.value)
    assert "input not found" not in msg
    assert url in msg and "nonexistent.invalid could not be resolved" in msg


# --------------------------------------------------------------------------- the command


def test_cli_cleans_a_messy_file(tmp_path: Path) -> None:
    from tests.test_data import build_tokenizer

    tok = build_tokenizer(tmp_path / "tok")
    messy = tmp_path / "messy.jsonl"
    with open(messy, "wb") as f:
        f.write(b"\xef\xbb\xbf")  # a BOM at the start of the file
        for row in good_rows(60):
            f.write(json.dumps(row).encode() + b"\r\n")  # Windows line endings
        f.write(b"\n   \n")
        f.write(b'{"instruction": "dup", "output": "\xe2\x80\x8bx\xc2\xa0y"}\n' * 2)
        f.write(b'{"instruction": "oops"\n')
        f.write(b'{"instruction": "q", "output": ""}\n')
        f.write(b"\xff\xfe garbage\n")
        f.write(b'{"instruction": "mail me at a@b.example", "output": "ok then"}\n')
    r = run_slothflow(
        [
            "data",
            "clean",
            str(messy),
            "--out",
            "out",
            "--tokenizer",
            tok,
            "--set",
            "data.pii_scrub=true",
            "--set",
            "data.val_fraction=0.3",
        ],
        tmp_path,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    assert "66 rows in, 62 kept" in r.stdout
    rep = report_of(tmp_path / "out")
    assert rep["rejected"] == {
        "empty_answer": 1,
        "exact_duplicate": 1,
        "invalid_utf8": 1,
        "malformed_json": 1,
    }
    assert rep["normalisation"]["zero_width"] >= 1 and rep["normalisation"]["nbsp"] >= 1
    assert rep["pii"]["emails"] == 1
    assert (tmp_path / "out" / "report.md").exists()
    assert (tmp_path / "out" / "token_lengths.png").exists()
    kept = read_jsonl(tmp_path / "out" / "train.jsonl") + read_jsonl(
        tmp_path / "out" / "validation.jsonl"
    )
    assert any(m["messages"][-1]["content"] == "x y" for m in kept)


def test_cli_names_the_cause_when_nothing_is_left(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "bad.jsonl", ["{nope", '{"instruction": "q", "output": ""}'])
    r = run_slothflow(["data", "clean", "bad.jsonl", "--out", "out"], tmp_path)
    assert r.returncode == 2
    assert "no rows left" in r.stderr and "Traceback" not in r.stderr
    r = run_slothflow(["data", "clean", "missing.jsonl", "--out", "out"], tmp_path)
    assert r.returncode == 2 and "input not found: missing.jsonl" in r.stderr
    r = run_slothflow(["data", "clean", "--help"], tmp_path)
    assert r.returncode == 0 and "--tokenizer" in r.stdout
