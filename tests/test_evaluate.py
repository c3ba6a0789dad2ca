"""Evaluation with real lm-eval on the tiny model: tasks, scores, agreement, table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests import export_fixtures as fx

# --------------------------------------------------------------------------- pure parts


COMMIT = "0123456789abcdef0123456789abcdef01234567"


class _Loaded(Exception):
    """Raised by a stand-in loader once it has recorded its arguments."""


def _export_ref(tmp_path: Path, base: Any, merged: bool = False) -> Any:
    """An export reference whose artifact folders are the tiny base (only their tokenizer
    is read when the models are stand-ins)."""
    from tasks.export import ExportRef, load_tokenizer

    tok = load_tokenizer(str(fx.base_dir()))
    return ExportRef(
        stage="export",
        path=str(tmp_path),
        adapter_path=str(fx.base_dir()),
        merged_path=str(fx.base_dir()) if merged else None,
        base=base,
        data_fingerprint="d",
        config_hash="c",
        dtype="float32",
        eos_token_ids=[tok.eos_token_id],
        served_model_name="m",
        parity_max_abs_diff=None,
        parity_atol=1e-3,
        stop_fraction=1.0,
        metrics={},
    )


@pytest.mark.parametrize(
    ("hub", "want"), [(True, COMMIT), (False, None)], ids=["hub-base", "local-base"]
)
def test_the_candidate_base_loads_at_the_revision_it_was_trained_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, hub: bool, want: str | None
) -> None:
    """A hub base loads at the commit export pinned (the branch head may have moved); a
    local folder's revision is a content hash, so nothing is passed for it."""
    from tasks.core import models as core_models
    from tasks.evaluate import evaluate

    calls: list[tuple[Any, ...]] = []

    def recording_load(path: str, dtype: str, device: str, revision: str | None = None) -> Any:
        calls.append((path, revision))
        raise _Loaded

    monkeypatch.setattr(core_models, "load_causal_lm", recording_load)
    base = fx.base_ref()
    if hub:
        base = base.model_copy(update={"name_or_path": "acme/tiny", "revision": COMMIT})
    ref = _export_ref(tmp_path, base)
    with pytest.raises(_Loaded):
        evaluate(fx.pipeline_cfg().eval, *fx.heldout(), ref, tmp_path / "eval", fx.cpu())
    assert calls == [(base.name_or_path, want)]


@pytest.mark.parametrize("merged", [True, False], ids=["merged", "adapter-only"])
def test_extra_tasks_run_on_the_candidate_already_loaded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, merged: bool
) -> None:
    """No second load of the candidate for ``eval.extra_tasks``: they get the lm-eval
    model that scored it (models and lm-eval stand-ins: this is about who loads what)."""
    from types import SimpleNamespace

    import peft

    from tasks import evaluate as ev
    from tasks.core import models as core_models

    loads: list[Any] = []
    scored: dict[str, Any] = {}

    def fake_hflm(pretrained: Any, tokenizer: Any, cfg: Any, hw: Any, **kw: Any) -> Any:
        lm = SimpleNamespace(pretrained=pretrained, kw=kw)
        loads.append(lm)
        return lm

    def fake_run_tasks(lm: Any, task_dir: Path, names: list[str]) -> dict[str, Any]:
        scored[["base", "adapter", "merged"][len(scored)]] = lm
        gen, ll = names
        return {
            "results": {
                gen: {"exact_match,none": 1.0, "f1,none": 1.0},
                ll: {"perplexity,none": 1.5, "acc,none": 1.0},
            },
            "samples": {gen: [{"doc_id": 0, "filtered_resps": ["x"]}]},
        }

    extra_lms: list[Any] = []

    def fake_extra(lm: Any, names: list[str]) -> tuple[dict[str, str], dict[str, float]]:
        extra_lms.append(lm)
        return {n: "ran" for n in names}, {"arc_easy.acc": 0.5}

    class FakePeft:
        @staticmethod
        def from_pretrained(base: Any, path: str) -> Any:
            return SimpleNamespace(eval=lambda: SimpleNamespace(base=base, adapter=path))

    monkeypatch.setattr(core_models, "load_causal_lm", lambda *a, **kw: SimpleNamespace(base=a))
    monkeypatch.setattr(peft, "PeftModel", FakePeft)
    monkeypatch.setattr(ev, "_hflm", fake_hflm)
    monkeypatch.setattr(ev, "run_tasks", fake_run_tasks)
    monkeypatch.setattr(ev, "run_extra_tasks", fake_extra)
    ref = _export_ref(tmp_path, fx.base_ref(), merged=merged)
    cfg = fx.pipeline_cfg(eval={"extra_tasks": ["arc_easy"]})
    out = ev.evaluate(cfg.eval, *fx.heldout(), ref, tmp_path / "eval", fx.cpu())

    candidate = "merged" if merged else "adapter"
    assert out.candidate == candidate
    assert set(scored) == ({"base", "adapter", "merged"} if merged else {"base", "adapter"})
    assert len(loads) == len(scored)  # one lm-eval model per scored model, none for extras
    assert extra_lms == [scored[candidate]]
    assert out.scores[candidate]["extra.arc_easy.acc"] == 0.5
    assert out.extra_tasks == {"arc_easy": "ran"}


def test_a_champion_adapter_loads_its_base_at_the_recorded_revision(tmp_path: Path) -> None:
    from tasks.evaluate import champion_lm_args

    folder = tmp_path / "champion"

    def adapter(base: str, revision: str) -> dict[str, Any]:
        return {
            "kind": "adapter",
            "dtype": "bfloat16",
            "base_model": {"id": base, "revision": revision},
            "serving": {"model": base},
        }

    assert champion_lm_args(folder, adapter("acme/tiny", COMMIT)) == (
        "acme/tiny",
        {"peft": str(folder), "revision": COMMIT},
    )
    # A local base: its revision is a content hash, not a Hub revision.
    local = str(fx.base_dir())
    assert champion_lm_args(folder, adapter(local, "sha256:" + "0" * 64)) == (
        local,
        {"peft": str(folder)},
    )
    merged = {"kind": "merged", "dtype": "bfloat16", "base_model": {"id": "acme/tiny"}}
    assert champion_lm_args(folder, merged) == (str(folder), {"dtype": "bfloat16"})


def test_scoring_normalises_case_space_and_edge_punctuation() -> None:
    from tasks.core.eval_metrics import exact_match, process_results, token_f1

    assert exact_match("  Food.\n", "food") == 1.0
    assert exact_match("food and music", "food") == 0.0
    assert token_f1("food and music", "food") == pytest.approx(0.5)
    assert token_f1("", "") == 1.0 and token_f1("x", "") == 0.0
    assert process_results({"answer": "music"}, ["Music"]) == {"exact_match": 1.0, "f1": 1.0}


def test_agreement_is_absolute_for_rates_and_relative_for_perplexity() -> None:
    from tasks.evaluate import agreement

    a = {"exact_match": 0.9, "f1": 0.9, "answer_greedy_acc": 0.9, "answer_perplexity": 100.0}
    b = {**a, "answer_perplexity": 101.0}
    assert agreement(a, b) == pytest.approx(1 / 101)
    assert agreement(a, {**a, "exact_match": 0.85}) == pytest.approx(0.05)
    assert agreement(a, {**a, "answer_perplexity": float("nan")}) == float("inf")


def test_heldout_items_render_the_chat_template_with_generation_prompt(tmp_path: Path) -> None:
    from tasks.evaluate import heldout_items
    from tasks.export import load_tokenizer

    rows = [
        {
            "id": "a",
            "messages": [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"}],
        },
        {"id": "b", "messages": [{"role": "user", "content": "no answer"}]},
        {
            "id": "c",
            "messages": [
                {"role": "system", "content": "S"},
                {"role": "user", "content": "Q2"},
                {"role": "assistant", "content": "A2"},
            ],
        },
    ]
    path = tmp_path / "v.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok = load_tokenizer(str(fx.base_dir()))
    items = heldout_items(path, tok)
    assert [i["id"] for i in items] == ["a", "c"]  # a row without an answer is not scorable
    assert items[0]["prompt"] == "<|begin|><|user|>Q1<|end|><|assistant|>"
    assert items[1]["prompt"].startswith("<|begin|><|system|>S<|end|>")  # system turn kept
    assert items[0]["target"] == "A1<|end|>" and items[0]["answer"] == "A1"
    assert heldout_items(path, tok, limit=1)[0]["id"] == "a"


def test_generated_task_folder_loads_in_lm_eval_without_the_hub(tmp_path: Path) -> None:
    from lm_eval.tasks import TaskManager

    from tasks.evaluate import write_task_folder

    items = [{"id": "1", "prompt": "p", "question": "q", "answer": "a", "target": "a<|end|>"}]
    gen, ll = write_task_folder(tmp_path / "candidate", items, ["<|end|>"], 4)
    assert (tmp_path / "candidate" / "utils.py").exists()
    tm = TaskManager(include_path=str(tmp_path / "candidate"), include_defaults=False)
    tasks = tm.load([gen, ll])["tasks"]
    assert set(tasks) == {gen, ll}
    gtask = tasks[gen]
    assert gtask.config.generation_kwargs["until"] == ["<|end|>"]
    assert callable(gtask.config.process_results)  # the !function tag resolved to utils.py
    assert tasks[ll].config.target_delimiter == ""


# --------------------------------------------------------------------------- real runs


@pytest.mark.slow
def test_trained_adapter_and_merged_agree_and_beat_the_base() -> None:
    ev = fx.evaluated("strong")
    s = ev.scores
    assert ev.n_items == fx.N_VAL and ev.candidate == "merged"
    # The merged artifact behaves exactly like base + adapter, item for item.
    assert s["adapter"]["exact_match"] == s["merged"]["exact_match"]
    assert s["adapter"]["answer_perplexity"] == pytest.approx(
        s["merged"]["answer_perplexity"], rel=1e-4
    )
    assert ev.agreement_max_diff is not None and ev.agreement_max_diff < 1e-4
    assert s["merged"]["exact_match"] >= 0.9
    assert s["base"]["exact_match"] <= 0.05
    assert s["merged"]["answer_perplexity"] < s["base"]["answer_perplexity"]
    gens = [
        json.loads(line) for line in Path(ev.path, "generations.jsonl").read_text().splitlines()
    ]
    assert all(g["adapter"] == g["merged"] for g in gens)

    table = Path(ev.table_path).read_text()
    assert "| # | prompt (last user turn) | expected | base | merged | ok |" in table
    assert table.count("✅") + table.count("❌") == 10  # table_rows
    assert "<table>" in Path(ev.path, "side_by_side.html").read_text()
    results = json.loads(Path(ev.results_path).read_text())
    assert set(results["lm_eval"]) == {"base", "adapter", "merged"}


@pytest.mark.slow
def test_adapter_merged_mismatch_fails_the_stage(tmp_path: Path) -> None:
    from tasks.evaluate import EvalError, evaluate

    strong, weak = fx.exported("strong"), fx.exported("weak")
    # An export whose merged folder is not the merge of its adapter.
    swapped = strong.model_copy(update={"merged_path": weak.merged_path})
    with pytest.raises(EvalError, match="adapter and merged scores disagree"):
        evaluate(fx.pipeline_cfg().eval, *fx.heldout(), swapped, tmp_path, fx.cpu())


@pytest.mark.slow  # lm-eval indexes its ~10k built-in task files (~10 s)
def test_extra_task_without_offline_data_is_skipped_not_fatal() -> None:
    from tasks.evaluate import run_extra_tasks

    # arc_easy is a real lm-eval task whose data lives on the hub: offline, it is skipped
    # before any model is touched (so no model is needed here).
    status, metrics = run_extra_tasks(object(), ["arc_easy", "no_such_task_xyz"])
    assert status["arc_easy"].startswith("skipped: data not available offline")
    assert status["no_such_task_xyz"] == "skipped: no such lm-eval task"
    assert metrics == {}


@pytest.mark.slow
def test_slothflow_evaluate_runs_alone_on_an_export_folder(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from slothflow.cli import app
    from tasks.core.refs import record_ref

    exp = fx.exported("strong")
    record_ref(Path(exp.path), exp)  # what export_task leaves behind
    out = tmp_path / "eval"
    res = CliRunner().invoke(
        app,
        [
            "evaluate",
            "--export-dir",
            exp.path,
            "--validation",
            fx.data_ref().validation_path,
            "--out",
            str(out),
            "--set",
            "eval.max_new_tokens=4",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "gate PASSED" in res.output and "| merged |" in res.output
    assert json.loads((out / "results.json").read_text())["scores"]["merged"]["exact_match"] >= 0.9
