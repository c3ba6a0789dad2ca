"""Benchmark: the data stage against the seed tutorial's approach, and near-dup detection.

    .venv/bin/python bench/data_clean.py [--rows 1000000] [--lib-rows 100000]

1. Generates ``--rows`` synthetic chat records (deterministic): normalisation noise
   (NBSP, zero-width, CRLF, padding), ~5% exact duplicates (after normalisation),
   ~5% planted near-duplicates (casing/punctuation changed and one word replaced in a
   45+ word prompt, same answer), ~1% rows over the length limit.
2. **Equal work** (normalise, exact dedup, token-length filter, write JSONL), each arm
   in a fresh process so peak RSS is its own:
   - ``slothflow``: ``tasks.data.clean`` with near-duplicates off (it also validates,
     splits and writes the manifest, quarantine and reports: strictly more work);
   - ``seed``: ``datasets`` ``load_dataset("json")`` + ``map`` (normalise) +
     ``filter`` (token length) + ``map``/``filter`` hash dedup + ``to_json``, batched
     where the operation allows it (the strongest form of that approach). Both arms
     call the same normalisation and hashing functions and the same tokenizer, so the
     ratio measures the pipeline around them.
3. **Near-duplicates** separately: the library comparison (rensa vs datasketch,
   permutations and bands) on the first ``--lib-rows`` prompts, then the full stage
   with near-dups on, on all rows: records/s, peak RSS, recall on planted pairs.

Prints a table and writes ``bench/results/data_clean-<UTC time>.json``. The machine's
load (``uptime``) is recorded with the numbers: on a shared machine absolute speed is
noisy, the ratio of two arms measured in the same run is what to read.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MAX_TOKENS = 1024
THRESHOLD = 0.85


# --------------------------------------------------------------------------- data


def _vocab(n: int = 20000) -> list[str]:
    import numpy as np

    rng = np.random.default_rng(0)
    syll = [c + v for c in "bcdfghjklmnprstvz" for v in "aeiou"]
    words = set()
    while len(words) < n:
        k = int(rng.integers(2, 4))
        words.add("".join(syll[int(i)] for i in rng.integers(0, len(syll), k)))
    return sorted(words)


def generate(path: Path, rows: int, seed: int = 0) -> list[dict[str, Any]]:
    """Write the data set; return the planted near-duplicate pairs (line numbers, texts)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    vocab = _vocab()
    v = np.array(vocab, dtype=object)
    noise = ["\u00a0", "\u200b", "  ", "\r\n"]
    bases: list[tuple[int, str, str]] = []  # long-prompt rows that near-dups copy
    recent: list[tuple[str, str]] = []  # rows exact duplicates copy
    planted: list[dict[str, Any]] = []
    with open(path, "w", encoding="utf-8", newline="") as f:
        for line in range(1, rows + 1):
            r = rng.random()
            if r < 0.05 and recent:
                prompt, answer = recent[int(rng.integers(len(recent)))]
                prompt = "  " + prompt.replace(" ", "\u00a0", 1) + "\r\n"  # same after cleaning
            elif r < 0.10 and bases:
                base_line, prompt0, answer = bases[int(rng.integers(len(bases)))]
                words = prompt0.split(" ")
                words[int(rng.integers(len(words)))] = str(v[int(rng.integers(len(v)))])
                prompt = " ".join(words).upper() if rng.random() < 0.5 else " ".join(words) + "!"
                planted.append({"line": line, "base": base_line, "a": prompt0, "b": prompt})
            else:
                # mostly short prompts; 30% long enough that one changed word keeps a
                # near-duplicate above the threshold (the planted ones copy those)
                n = int(rng.integers(45, 80)) if rng.random() < 0.3 else int(rng.integers(8, 30))
                prompt = " ".join(v[rng.integers(0, len(v), n)]) + "?"
                k = 1500 if rng.random() < 0.01 else int(rng.integers(3, 20))  # 1% too long
                answer = " ".join(v[rng.integers(0, len(v), k)]) + "."
                if rng.random() < 0.1:
                    prompt = prompt.replace(" ", noise[int(rng.integers(len(noise)))], 1)
                if n >= 45 and k < 1500:
                    bases.append((line, prompt, answer))
                    if len(bases) > 5000:
                        bases.pop(int(rng.integers(len(bases))))
                recent.append((prompt, answer))
                if len(recent) > 5000:
                    recent.pop(int(rng.integers(len(recent))))
            msgs = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
            f.write(json.dumps({"messages": msgs}, ensure_ascii=False) + "\n")
    return planted


def build_tokenizer(folder: Path, corpus_file: Path) -> str:
    """The embedded model's byte-level BPE tokenizer, trained on the spot (no download).

    Saved without its chat template: the data stage then counts each row's turns joined
    by newlines, the same text the seed approach below counts (equal work)."""
    from tasks.core.embedded import train_tokenizer

    texts = []
    with open(corpus_file, encoding="utf-8") as f:
        for i, line in enumerate(f):
            if i >= 5000:
                break
            texts.extend(m["content"] for m in json.loads(line)["messages"])
    tok = train_tokenizer(iter(texts), 8000)
    tok.chat_template = None
    tok.save_pretrained(folder)
    return str(folder)


# --------------------------------------------------------------------------- arms (child processes)


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def arm_slothflow(data: str, tok: str, out: str, near_dup: bool, extra: dict[str, Any]) -> dict:
    import matplotlib.pyplot  # noqa: F401  imports outside the timer, as in the seed arm
    import transformers  # noqa: F401

    from tasks.core.config import DataConfig
    from tasks.data import clean

    cfg = DataConfig(
        sources=[data],
        max_tokens=MAX_TOKENS,
        near_dup=near_dup,
        near_dup_threshold=THRESHOLD,
        **extra,
    )
    t = time.perf_counter()
    ref = clean(cfg, Path(out), tok)
    seconds = time.perf_counter() - t
    report = json.loads(Path(ref.report_path).read_text())
    return {
        "seconds": seconds,
        "input_records": report["input_records"],
        "kept": report["kept_records"],
        "rejected": report["rejected"],
        "timings_s": report["timings_s"],
        "peak_rss_mb": _rss_mb(),
    }


def arm_seed(data: str, tok: str, out: str) -> dict:
    """The seed tutorial's approach: datasets map + filter + hash dedup."""
    os.environ["HF_DATASETS_CACHE"] = str(Path(out) / "hf-cache")
    import datasets
    from transformers import AutoTokenizer

    from tasks.data.rows import content_text, normalize_text, row_id

    datasets.disable_progress_bars()
    tokenizer = AutoTokenizer.from_pretrained(tok)
    t = time.perf_counter()
    ds = datasets.load_dataset(
        "json", data_files=data, split="train", cache_dir=str(Path(out) / "hf-cache")
    )
    n_in = ds.num_rows

    def normalise(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        return {
            "messages": [
                [
                    {"role": m["role"].strip().lower(), "content": normalize_text(m["content"])}
                    for m in msgs
                ]
                for msgs in batch["messages"]
            ]
        }

    def length_ok(batch: dict[str, list[Any]]) -> list[bool]:
        ids = tokenizer(
            [content_text(m) for m in batch["messages"]],
            add_special_tokens=False,
            return_attention_mask=False,
        )["input_ids"]
        return [2 <= len(x) <= MAX_TOKENS for x in ids]

    ds = ds.map(normalise, batched=True)
    ds = ds.map(lambda b: {"hash": [row_id(m) for m in b["messages"]]}, batched=True)
    seen: set[str] = set()

    def first_copy(hashes: list[str]) -> list[bool]:
        keep = []
        for h in hashes:
            keep.append(h not in seen)
            seen.add(h)
        return keep

    ds = ds.filter(first_copy, input_columns="hash", batched=True)
    ds = ds.filter(length_ok, batched=True)
    ds.remove_columns("hash").to_json(str(Path(out) / "train.jsonl"))
    return {
        "seconds": time.perf_counter() - t,
        "input_records": n_in,
        "kept": ds.num_rows,
        "peak_rss_mb": _rss_mb(),
    }


def arm_lib(data: str, rows: int, lib: str, num_perm: int, bands: int | None) -> dict:
    """MinHash + LSH alone over the same shingles: candidates found for planted pairs."""
    from tasks.data.dedup import shingles
    from tasks.data.rows import normalize_text

    prompts = []
    with open(data, encoding="utf-8") as f:
        for i, line in enumerate(f):
            if i >= rows:
                break
            prompts.append(
                shingles(normalize_text(json.loads(line)["messages"][0]["content"]), set(), 3)
            )
    base_rss = _rss_mb()
    t = time.perf_counter()
    found: dict[int, list[int]] = {}
    if lib == "rensa":
        from rensa import RMinHash, RMinHashLSH

        lsh = RMinHashLSH(THRESHOLD, num_perm, bands)
        for i, sh in enumerate(prompts):
            m = RMinHash(num_perm, 42)
            m.update(sh)
            found[i + 1] = [k + 1 for k in lsh.query(m)]
            lsh.insert(i, m)
    else:
        from datasketch import MinHash, MinHashLSH

        params = (bands, num_perm // bands) if bands else None
        dlsh = MinHashLSH(threshold=THRESHOLD, num_perm=num_perm, params=params)
        bands = dlsh.b
        for i, sh in enumerate(prompts):
            dm = MinHash(num_perm=num_perm, seed=42)
            dm.update_batch([s.encode() for s in sh])
            found[i + 1] = [k + 1 for k in dlsh.query(dm)]
            dlsh.insert(i, dm)
    seconds = time.perf_counter() - t
    cands = sum(len(v) for v in found.values())
    return {
        "lib": lib,
        "num_perm": num_perm,
        "bands": bands,
        "rows": len(prompts),
        "seconds": seconds,
        "records_per_s": len(prompts) / seconds,
        "index_rss_mb": _rss_mb() - base_rss,
        "candidates_per_row": cands / len(prompts),
        "found": {str(k): v for k, v in found.items() if v},
    }


# --------------------------------------------------------------------------- driver


def _child(args: list[str], timeout: int = 3600) -> dict[str, Any]:
    r = subprocess.run(
        [sys.executable, __file__, *args], capture_output=True, text=True, timeout=timeout, cwd=REPO
    )
    if r.returncode != 0:
        raise RuntimeError(f"{args[:2]} failed:\n{r.stderr[-4000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def _recall(planted: list[dict[str, Any]], caught: set[int], upto: int | None = None) -> dict:
    from tasks.data.dedup import jaccard, shingles
    from tasks.data.rows import normalize_text

    pairs = [p for p in planted if upto is None or p["line"] <= upto]
    above = [
        p
        for p in pairs
        if jaccard(
            shingles(normalize_text(p["a"]), set(), 3), shingles(normalize_text(p["b"]), set(), 3)
        )
        >= THRESHOLD
    ]
    hit = [p for p in above if p["line"] in caught]
    return {
        "planted_pairs": len(pairs),
        "pairs_at_or_above_threshold": len(above),
        "caught": len(hit),
        "recall": len(hit) / len(above) if above else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--lib-rows", type=int, default=100_000)
    ap.add_argument("--arm")
    ap.add_argument("--data")
    ap.add_argument("--tok")
    ap.add_argument("--out")
    ap.add_argument("--lib")
    ap.add_argument("--num-perm", type=int, default=128)
    ap.add_argument("--bands", type=int, default=0)
    a = ap.parse_args()
    if a.arm == "slothflow":
        print(json.dumps(arm_slothflow(a.data, a.tok, a.out, False, {})))
        return
    if a.arm == "slothflow-neardup":
        extra = {"near_dup_num_perm": a.num_perm, "near_dup_bands": a.bands}
        print(json.dumps(arm_slothflow(a.data, a.tok, a.out, True, extra)))
        return
    if a.arm == "seed":
        print(json.dumps(arm_seed(a.data, a.tok, a.out)))
        return
    if a.arm == "lib":
        print(json.dumps(arm_lib(a.data, a.rows, a.lib, a.num_perm, a.bands or None)))
        return

    load = os.getloadavg()
    results: dict[str, Any] = {
        "benchmark": "data_clean",
        "when_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "loadavg_at_start": load,
        },
        "rows": a.rows,
        "max_tokens": MAX_TOKENS,
        "threshold": THRESHOLD,
    }
    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        tmpd = Path(tmp)
        data = tmpd / "data.jsonl"
        t = time.perf_counter()
        planted = generate(data, a.rows)
        results["generate_s"] = round(time.perf_counter() - t, 1)
        results["data_bytes"] = data.stat().st_size
        tok = build_tokenizer(tmpd / "tok", data)
        print(
            f"generated {a.rows} rows ({data.stat().st_size / 1e6:.0f} MB), {len(planted)} planted near-dups",
            flush=True,
        )

        # -- equal work
        ours = _child(
            ["--arm", "slothflow", "--data", str(data), "--tok", tok, "--out", str(tmpd / "ours")]
        )
        print("slothflow arm done", ours["seconds"], flush=True)
        seed = _child(
            ["--arm", "seed", "--data", str(data), "--tok", tok, "--out", str(tmpd / "seed")]
        )
        print("seed arm done", seed["seconds"], flush=True)
        for arm in (ours, seed):
            arm["records_per_s"] = arm["input_records"] / arm["seconds"]
        results["equal_work"] = {
            "slothflow": ours,
            "seed_datasets": seed,
            "ratio_records_per_s": ours["records_per_s"] / seed["records_per_s"],
        }

        # -- near-dup library/settings comparison on a prefix
        libs = []
        for lib, perm, bands in [
            ("rensa", 128, 16),
            ("rensa", 128, 8),
            ("rensa", 64, 16),
            ("rensa", 256, 32),
            ("datasketch", 128, 0),  # its own "optimal" (b, r) for the threshold
            ("datasketch", 128, 16),
        ]:
            res = _child(
                [
                    "--arm",
                    "lib",
                    "--data",
                    str(data),
                    "--rows",
                    str(a.lib_rows),
                    "--lib",
                    lib,
                    "--num-perm",
                    str(perm),
                    "--bands",
                    str(bands),
                ]
            )
            found = res.pop("found")
            caught = {p["line"] for p in planted if p["base"] in found.get(str(p["line"]), [])}
            res["candidate_recall"] = _recall(planted, caught, a.lib_rows)
            libs.append(res)
            print("lib", lib, perm, res["bands"], round(res["records_per_s"]), flush=True)
        results["near_dup_libraries"] = libs

        # -- the full stage with near-dups on
        nd = _child(
            [
                "--arm",
                "slothflow-neardup",
                "--data",
                str(data),
                "--tok",
                tok,
                "--out",
                str(tmpd / "nd"),
                "--num-perm",
                "128",
                "--bands",
                "16",
            ]
        )
        caught = set()
        with open(tmpd / "nd" / "rejected.jsonl", encoding="utf-8") as f:
            for line in f:
                row = json.loads(line)
                if row["reason"] == "near_duplicate":
                    caught.add(row["line"])
        nd["near_dup_records_per_s"] = nd["input_records"] / nd["timings_s"]["near_dup_s"]
        nd["records_per_s"] = nd["input_records"] / nd["seconds"]
        nd["recall"] = _recall(planted, caught)
        results["near_dup_stage"] = nd
    results["loadavg_at_end"] = os.getloadavg()

    _print_table(results)
    out_dir = REPO / "bench" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"data_clean-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json"
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {path}")


def _print_table(r: dict[str, Any]) -> None:
    ew = r["equal_work"]
    print(f"\nequal work on {r['rows']:,} records (normalise, exact dedup, length filter, write)")
    print(f"{'arm':<28}{'seconds':>9}{'records/s':>12}{'peak RSS MB':>13}{'kept':>10}")
    for name, arm in (
        ("slothflow (tasks.data)", ew["slothflow"]),
        ("seed (datasets map/filter)", ew["seed_datasets"]),
    ):
        print(
            f"{name:<28}{arm['seconds']:>9.1f}{arm['records_per_s']:>12,.0f}{arm['peak_rss_mb']:>13,.0f}{arm['kept']:>10,}"
        )
    print(f"ratio slothflow/seed records/s: {ew['ratio_records_per_s']:.2f}")
    print(
        "\nnear-dup libraries (MinHash + LSH only, first rows; recall of LSH candidates on planted pairs)"
    )
    print(
        f"{'library':<12}{'perm':>6}{'bands':>7}{'records/s':>11}{'index MB':>10}{'cand/row':>10}{'recall':>8}"
    )
    for x in r["near_dup_libraries"]:
        rec = x["candidate_recall"]["recall"]
        print(
            f"{x['lib']:<12}{x['num_perm']:>6}{x['bands']:>7}{x['records_per_s']:>11,.0f}{x['index_rss_mb']:>10,.0f}{x['candidates_per_row']:>10.2f}{rec:>8.3f}"
        )
    nd = r["near_dup_stage"]
    print(
        f"\nfull stage with near-dups (rensa 128/16): {nd['seconds']:.1f} s, {nd['records_per_s']:,.0f} records/s "
        f"overall, near-dup pass {nd['near_dup_records_per_s']:,.0f} records/s, peak RSS {nd['peak_rss_mb']:,.0f} MB, "
        f"recall {nd['recall']['recall']:.3f} ({nd['recall']['caught']}/{nd['recall']['pairs_at_or_above_threshold']})"
    )


if __name__ == "__main__":
    main()
