"""Running lm-eval: the champion's load arguments, one ``simple_evaluate`` over the
generated tasks, the scores and generations read back from its results, the
adapter/merged agreement, and ``eval.extra_tasks`` (lm-eval's built-in tasks)."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from tasks.core.revision import is_hub_id
from tasks.evaluate.errors import EvalError

log = logging.getLogger(__name__)


def revision_kwargs(revision: str | None) -> dict[str, str]:
    """``revision=`` for an lm-eval model whose base is a Hub id pinned to a commit;
    nothing otherwise (HFLM turns ``None`` into the string ``"None"``)."""
    return {"revision": revision} if revision else {}


def champion_lm_args(folder: Path, manifest: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """What lm-eval loads for a champion artifact: ``(pretrained, HFLM keyword arguments)``.

    A merged champion is its own folder. An adapter champion is its base (the manifest's
    ``serving.model``) plus ``peft=`` the adapter, the base pinned to the Hub commit the
    adapter was trained on (``base_model.revision``) when the base is a hub id: the
    branch head may have moved since. A local base's recorded revision is a content
    hash, not something to load by."""
    if manifest["kind"] == "merged":
        return str(folder), {"dtype": manifest["dtype"]}
    base = str(manifest["serving"]["model"])
    revision = manifest.get("base_model", {}).get("revision") if is_hub_id(base) else None
    return base, {"peft": str(folder), **revision_kwargs(revision)}


def run_tasks(lm: Any, task_dir: Path, task_names: list[str]) -> dict[str, Any]:
    """One lm-eval ``simple_evaluate`` over our generated tasks (built-ins not indexed)."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=str(task_dir), include_defaults=False)
    out = simple_evaluate(
        model=lm,
        tasks=task_names,
        task_manager=tm,
        log_samples=True,
        bootstrap_iters=0,  # stderr by bootstrap costs minutes; the gate uses point values
        random_seed=0,
        numpy_random_seed=0,
        torch_random_seed=0,
    )
    if out is None:  # only on non-zero ranks of a distributed run
        raise EvalError("lm-eval returned no results")
    return dict(out)


def scores_from(results: dict[str, Any], gen_task: str, ll_task: str) -> dict[str, float]:
    """Flat metric dict from lm-eval's results (keys ``metric,filter``)."""
    gen = results["results"][gen_task]
    ll = results["results"][ll_task]
    ppl = float(ll["perplexity,none"])
    return {
        "exact_match": float(gen["exact_match,none"]),
        "f1": float(gen["f1,none"]),
        "answer_perplexity": ppl,
        "answer_nll": math.log(ppl) if ppl > 0 and math.isfinite(ppl) else float("inf"),
        "answer_greedy_acc": float(ll["acc,none"]),
        "n_items": float(len(results["samples"][gen_task])),
    }


def generations(results: dict[str, Any], gen_task: str) -> dict[int, str]:
    """doc_id -> filtered generation."""
    out = {}
    for s in results["samples"][gen_task]:
        resp = s["filtered_resps"][0]
        out[int(s["doc_id"])] = resp if isinstance(resp, str) else str(resp)
    return out


def agreement(a: dict[str, float], b: dict[str, float]) -> float:
    """Worst disagreement between two models' scores: absolute for rates, relative for
    perplexity (its scale depends on the vocabulary)."""
    diffs = [abs(a[k] - b[k]) for k in ("exact_match", "f1", "answer_greedy_acc")]
    pa, pb = a["answer_perplexity"], b["answer_perplexity"]
    diffs.append(abs(pa - pb) / max(abs(pb), 1e-12) if math.isfinite(pa + pb) else float("inf"))
    return max(diffs)


# --------------------------------------------------------------------------- extra tasks


def run_extra_tasks(lm: Any, names: list[str]) -> tuple[dict[str, str], dict[str, float]]:
    """Standard lm-eval tasks by name, each only if it is known and its data loads
    offline; otherwise the reason is reported and evaluation goes on. Failures while
    *running* a task that did load are real errors and propagate."""
    if not names:
        return {}, {}
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    status: dict[str, str] = {}
    metrics: dict[str, float] = {}
    tm = TaskManager()  # indexes lm-eval's built-in task YAMLs (~10 s here)
    for name in names:
        if name not in tm.all_tasks:
            status[name] = "skipped: no such lm-eval task"
            log.warning("extra task %s %s", name, status[name])
            continue
        try:
            tm.load([name])  # builds the dataset: fails offline without a local copy
        except Exception as exc:
            status[name] = (
                f"skipped: data not available offline ({type(exc).__name__}: {str(exc)[:200]})"
            )
            log.warning("extra task %s %s", name, status[name])
            continue
        out = simple_evaluate(
            model=lm, tasks=[name], task_manager=tm, bootstrap_iters=0, log_samples=False
        )
        status[name] = "ran"
        for task, res in (out or {}).get("results", {}).items():
            for k, v in res.items():
                if isinstance(v, int | float) and "_stderr" not in k:
                    metrics[f"{task}.{k.replace(',none', '')}"] = float(v)
    return status, metrics
