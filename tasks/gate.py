"""The promotion gate: may this candidate be registered (and so deployed)?

Rules, all from ``EvalConfig`` and all must hold:

1. **enough items** — the held-out set has at least ``min_items`` scored items;
2. **threshold** — the candidate's primary metric is at least ``threshold``;
3. **beats base** — it beats the untuned base by at least ``base_margin``;
4. **no regression** — when a champion exists, the candidate is not worse than the
   champion by more than ``champion_tolerance``; the champion was re-evaluated on the
   *current* held-out set by the evaluate stage (the set grows with new data, so a
   score recorded at the champion's own registration is not comparable);
5. **finite** — training losses and the answer perplexities are finite numbers.

:func:`decide` is pure. The stage function logs the decision, writes it to
``gate.json``, and tags the run (``slothflow.gate = passed|failed``); ``slothflow run``
and ``slothflow evaluate`` print it in their summaries. A failed gate is
an outcome, not an error: the stage finishes, every artifact stays, and the returned
``GateRef.passed`` is false, which stops registration (``register`` refuses it) and
so deployment.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

from pydantic import BaseModel

from tasks.core.config import EvalConfig
from tasks.core.orchestration import stage_task
from tasks.core.refs import (
    FINITE_METRICS,
    EvalRef,
    GateRef,
    RunContext,
    record_ref,
    write_json_atomic,
)
from tasks.core.tracking import NullTracker, Tracker

log = logging.getLogger(__name__)

TAG_GATE = "slothflow.gate"


class Check(BaseModel):
    name: str
    passed: bool
    detail: str


class GateDecision(BaseModel):
    passed: bool
    checks: list[Check]
    primary_metric: str
    candidate: float
    base: float
    champion: float | None

    @property
    def reasons(self) -> list[str]:
        """The failed checks' details (empty when the gate passed)."""
        return [c.detail for c in self.checks if not c.passed]

    def summary(self) -> str:
        verdict = "PASSED" if self.passed else "FAILED"
        champ = f", champion {self.champion:.4f}" if self.champion is not None else ""
        lines = [
            f"gate {verdict}: {self.primary_metric} candidate {self.candidate:.4f} vs "
            f"base {self.base:.4f}{champ}"
        ]
        lines += [f"  [{'ok' if c.passed else 'FAIL'}] {c.name}: {c.detail}" for c in self.checks]
        return "\n".join(lines)


def gate_tags(passed: bool, reasons: list[str]) -> dict[str, str]:
    """The run tags of a decision: ``slothflow.gate`` and its reasons (MLflow caps a tag
    value's length)."""
    return {
        TAG_GATE: "passed" if passed else "failed",
        f"{TAG_GATE}.reasons": "; ".join(reasons)[:5000] or "all checks passed",
    }


def _finite_check(ev: EvalRef) -> Check:
    bad = [
        f"{model}.{k}={v}"
        for model, s in ev.scores.items()
        for k, v in s.items()
        if k in FINITE_METRICS and model != "base" and not math.isfinite(v)
    ]
    bad += [
        f"train.{k}={v}"
        for k, v in ev.train_metrics.items()
        if ("loss" in k or "perplexity" in k) and not math.isfinite(v)
    ]
    if bad:
        return Check(name="finite", passed=False, detail="non-finite: " + ", ".join(bad))
    return Check(name="finite", passed=True, detail="losses and perplexities are finite")


def decide(cfg: EvalConfig, ev: EvalRef) -> GateDecision:
    """Pure: the evaluation's numbers + the rules -> the decision with every check."""
    m = cfg.primary_metric
    cand = ev.scores[ev.candidate][m]
    base = ev.scores["base"][m]
    champ = ev.scores["champion"][m] if "champion" in ev.scores else None
    checks = [
        Check(
            name="min_items",
            passed=ev.n_items >= cfg.min_items,
            detail=f"{ev.n_items} held-out items (need >= {cfg.min_items})",
        ),
        Check(
            name="threshold",
            passed=cand >= cfg.threshold,
            detail=f"{m} {cand:.4f} (need >= {cfg.threshold:g})",
        ),
        Check(
            name="beats_base",
            passed=cand >= base + cfg.base_margin,
            detail=f"{m} {cand:.4f} vs base {base:.4f} (need a margin >= {cfg.base_margin:g})",
        ),
    ]
    if champ is None:
        checks.append(Check(name="champion", passed=True, detail="no champion yet"))
    else:
        checks.append(
            Check(
                name="champion",
                passed=cand >= champ - cfg.champion_tolerance,
                detail=f"{m} {cand:.4f} vs champion {ev.champion or ''} {champ:.4f} re-evaluated "
                f"on the current held-out set (tolerance {cfg.champion_tolerance:g})",
            )
        )
    checks.append(_finite_check(ev))
    # A NaN metric compares False everywhere above, so it can only fail the gate.
    return GateDecision(
        passed=all(c.passed for c in checks),
        checks=checks,
        primary_metric=m,
        candidate=cand,
        base=base,
        champion=champ,
    )


def gate(cfg: EvalConfig, ev: EvalRef, out_dir: Path, tracker: Tracker | None = None) -> GateRef:
    """Decide, log, write ``gate.json`` and tag the stage run."""
    tracker = tracker or NullTracker()
    decision = decide(cfg, ev)
    text = decision.summary()
    # Logged (terminal, Prefect UI, log files); `slothflow run` and `slothflow evaluate`
    # also print the decision with its reasons in their summaries.
    (log.info if decision.passed else log.warning)("%s", text)
    path = Path(out_dir) / "gate.json"
    write_json_atomic(path, {**decision.model_dump(mode="json"), "reasons": decision.reasons})
    tracker.set_tags(gate_tags(decision.passed, decision.reasons))
    tracker.log_metrics({"gate.passed": float(decision.passed)})
    tracker.log_dict(decision.model_dump(mode="json"), "gate/decision.json")
    return GateRef(
        stage="gate",
        path=str(out_dir),
        passed=decision.passed,
        reasons=decision.reasons,
        decision_path=str(path),
        primary_metric=decision.primary_metric,
        candidate=decision.candidate,
        base=decision.base,
        champion=decision.champion,
    )


@stage_task(name="gate", retries=0)
def gate_task(ctx: RunContext, cfg: EvalConfig, ev: EvalRef) -> GateRef:
    """Prefect task: the decision under ``<run>/gate``; also tags the pipeline's parent
    MLflow run, so a failed gate is visible in the run list."""
    from tasks.core import tracking
    from tasks.core.run import stage

    # Not cached: the decision takes milliseconds, and a run served from the cache still
    # gets its own gate record and tags.
    out = ctx.stage_dir("gate")
    with stage(ctx, "gate") as tracker:
        done = gate(cfg, ev, out, tracker)
    record_ref(out, done)
    if ctx.tracking is not None:
        parent = tracking.pipeline_tracker(tracking.TrackingRef.model_validate(ctx.tracking))
        parent.set_tags(gate_tags(done.passed, done.reasons))
    return done
