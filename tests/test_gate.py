"""The promotion gate: pure rules, and on real evaluations of the tiny model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tasks.core.config import EvalConfig
from tasks.evaluate import EvalRef
from tests import export_fixtures as fx
from tests.recording import RecordingTracker


def _ev(
    cand: float, base: float = 0.0, champ: float | None = None, n: int = 250, **kw: Any
) -> EvalRef:
    def s(em: float, ppl: float = 2.0) -> dict[str, float]:
        return {"exact_match": em, "f1": em, "answer_perplexity": ppl, "answer_nll": 0.7}

    scores = {"base": s(base, 1e5), "adapter": s(cand), "merged": s(cand)}
    if champ is not None:
        scores["champion"] = s(champ)
    scores.update(kw.pop("scores", {}))
    return EvalRef(
        stage="evaluate",
        path="/x",
        n_items=n,
        primary_metric="exact_match",
        candidate="merged",
        scores=scores,
        champion="m v1" if champ is not None else None,
        results_path="/x/r.json",
        table_path="/x/t.md",
        validation_fingerprint="f",
        **kw,
    )


CFG = EvalConfig()  # the embedded default: exact match >= 0.9 on >= 200 items, margin 0.2


@pytest.mark.parametrize(
    ("ev", "failed"),
    [
        (_ev(0.95), []),
        (_ev(0.85), ["threshold"]),
        (_ev(0.95, n=150), ["min_items"]),
        (_ev(0.95, base=0.8), ["beats_base"]),
        (_ev(0.95, champ=0.955), []),  # within champion_tolerance 0.01
        (_ev(0.92, champ=0.96), ["champion"]),
        (
            _ev(0.95, scores={"merged": {"exact_match": 0.95, "answer_perplexity": float("inf")}}),
            ["finite"],
        ),
        (_ev(0.95, train_metrics={"train.loss": float("nan")}), ["finite"]),
        (_ev(float("nan")), ["threshold", "beats_base"]),
    ],
)
def test_decide_applies_every_rule(ev: EvalRef, failed: list[str]) -> None:
    from tasks.gate import decide

    d = decide(CFG, ev)
    assert [c.name for c in d.checks if not c.passed] == failed
    assert d.passed is (not failed)
    assert len(d.reasons) == len(failed)


def test_gate_primary_metric_and_margins_are_configurable() -> None:
    from tasks.gate import decide

    cfg = EvalConfig(primary_metric="f1", threshold=0.5, base_margin=0.0, min_items=10)
    ev = _ev(0.6, base=0.6, n=10)
    assert decide(cfg, ev).passed
    assert not decide(cfg.model_copy(update={"base_margin": 0.01}), ev).passed


def test_failed_gate_is_logged_tagged_and_written(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from tasks.gate import TAG_GATE, gate

    tracker = RecordingTracker()
    ref = gate(fx.pipeline_cfg().eval, _ev(0.5, base=0.1), tmp_path, tracker)
    assert not ref.passed
    logged = caplog.text
    assert "gate FAILED: exact_match candidate 0.5000 vs base 0.1000" in logged
    assert "[FAIL] threshold" in logged
    assert tracker.tags[TAG_GATE] == "failed"
    assert "exact_match 0.5000 (need >= 0.9)" in tracker.tags[f"{TAG_GATE}.reasons"]
    saved = json.loads((tmp_path / "gate.json").read_text())
    assert saved["passed"] is False and saved["reasons"] == ref.reasons


def test_gate_tags_of_a_passed_and_a_failed_decision() -> None:
    """The stage run and the pipeline's parent run get these same tags."""
    from tasks.gate import TAG_GATE, gate_tags

    assert gate_tags(True, []) == {TAG_GATE: "passed", f"{TAG_GATE}.reasons": "all checks passed"}
    failed = gate_tags(False, ["a", "b" * 6000])
    assert failed[TAG_GATE] == "failed"
    assert failed[f"{TAG_GATE}.reasons"] == ("a; " + "b" * 6000)[:5000]  # a tag's length cap


@pytest.mark.slow
def test_gate_passes_for_the_trained_model(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from tasks.gate import gate

    caplog.set_level("INFO", logger="tasks.gate")
    ev = fx.evaluated("strong")
    ref = gate(fx.pipeline_cfg().eval, ev, tmp_path)  # default rules: >= 0.9 on >= 200, margin 0.2
    assert ref.passed, ref.reasons
    assert "gate PASSED" in caplog.text


@pytest.mark.slow
def test_gate_fails_for_a_model_below_threshold(tmp_path: Path) -> None:
    from tasks.gate import gate

    ev = fx.evaluated("weak")
    assert ev.scores["merged"]["exact_match"] < 0.9
    ref = gate(fx.pipeline_cfg().eval, ev, tmp_path)
    assert not ref.passed
    assert any("need >= 0.9" in r for r in ref.reasons)
