"""Everything about a run that can be checked before the first long stage, in seconds.

Run by ``slothflow run`` (and ``slothflow train``) before the flow starts Prefect and
before a run folder or an MLflow run exists: a failure here leaves nothing that
``--resume last`` could pick up, costs no retries, and prints one line. The stages
check again when they run (state can change in between); this is the early warning,
not the only guard. No Prefect here: it must run before Prefect is imported.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from tasks.base_model import check_base
from tasks.core import hardware, tracking
from tasks.core.config import ConfigError, PipelineConfig
from tasks.core.home import Home
from tasks.core.run import resume_config, resume_target

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Plan:
    """What preflight settled: the config to run (on resume, with the run's own serving
    and tracking settings), the run to resume, and lines worth telling the user."""

    config: PipelineConfig
    resume_run_id: str | None
    hardware: hardware.HardwareDecision
    notes: list[str] = field(default_factory=list)


def preflight(
    cfg: PipelineConfig,
    home: Home,
    resume: str | None = None,
    overrides: list[str] | None = None,
    *,
    serving: bool = True,
    registering: bool = True,
) -> Plan:
    """Check ``cfg`` (and ``--resume``) against this machine; raise a ``ConfigError``
    (or ``TrackingUnavailableError``) naming what is wrong. ``serving=False`` and
    ``registering=False`` for commands that never serve or register (``slothflow train``)."""
    # A run with a gpu pool trains there: this machine needs no GPU for it.
    decision = hardware.decide(cfg, hardware.probe(), trains_here=not cfg.orchestration.gpu_pool)
    notes: list[str] = []
    run_id = None
    if resume is not None:
        run_id = resume_target(home, cfg, resume)
        cfg, kept = resume_config(home, cfg, run_id, list(overrides or []))
        notes += [f"resuming {run_id} with its own {line}" for line in kept]
    check_base(cfg.model)
    if serving and cfg.deploy.enabled:
        from tasks.serve import ServeError, check_endpoint_plan

        try:
            check_endpoint_plan(cfg.deploy, home)
        except ServeError as exc:  # a setting to change, so a config error here
            raise ConfigError(str(exc)) from None
    uri = tracking.resolve_tracking_uri(cfg.tracking, home)
    tracking.check_reachable(uri, cfg.tracking.connect_timeout_s)
    if registering:
        from tasks.core.refs import GateBar
        from tasks.registry import check_can_register

        check_can_register(cfg.tracking.registered_model, GateBar.of(cfg.eval), uri)
    return Plan(config=cfg, resume_run_id=run_id, hardware=decision, notes=notes)
