"""The pipeline flow: it only composes stage tasks.

One parameter, a ``PipelineConfig``, so the Prefect UI renders the whole recipe as a
form with every field's description as help text. Each stage issue adds its task
here; there is no other runner.
"""

from __future__ import annotations

import logging
from typing import Any

from prefect import flow, get_run_logger

from tasks import home as home_mod
from tasks import run as run_mod
from tasks import tracking
from tasks.config import PipelineConfig

log = logging.getLogger(__name__)

# Stages in pipeline order. Later issues append theirs (data, train, export,
# evaluate, gate, register, serve) and wire them in `pipeline` below.
STAGES: list[str] = []


@flow(name="slothflow-pipeline", log_prints=True, validate_parameters=True)
def pipeline(config: PipelineConfig, resume_run_id: str | None = None) -> dict[str, Any]:
    """Run the whole pipeline for one recipe.

    ``resume_run_id`` re-opens an earlier run of the *same* config: finished stages
    are skipped (their outputs are reused), the failed one runs again.
    """
    logger = get_run_logger()
    home = home_mod.resolve_home()
    ctx = run_mod.open_run(config, home, resume_run_id)
    logger.info("run %s (config %s) — %s", ctx.run_id, ctx.config_hash[:12], ctx.hardware["reason"])
    results: dict[str, Any] = {}
    try:
        # Stages plug in here in pipeline order, each a task taking `ctx` and the refs
        # of earlier stages:
        #   base -> data -> train -> export -> evaluate -> gate -> register -> serve
        pass
    except BaseException:
        run_mod.finish(ctx, "FAILED", {"completed_stages": sorted(results)})
        raise
    summary = {
        "run_id": ctx.run_id,
        "run_dir": ctx.run_dir,
        "config_hash": ctx.config_hash,
        "hardware": ctx.hardware["reason"],
        "stages": results,
    }
    if ctx.tracking:
        summary["mlflow"] = tracking.run_url(tracking.TrackingRef.model_validate(ctx.tracking))
    run_mod.finish(ctx, "FINISHED", summary)
    return summary
