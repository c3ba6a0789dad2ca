"""The train stage called the way the flow calls it: its own sections of the recipe plus
the values the flow passes from other sections (shared by the CPU and GPU train tests)."""

from __future__ import annotations

from pathlib import Path

from tasks.core.artifacts import InitAdapter
from tasks.core.config import PipelineConfig, config_hash, dump_config
from tasks.core.hardware import HardwareDecision
from tasks.core.refs import BaseModelRef, DataRef, TrainRef
from tasks.core.tracking import NullTracker, Tracker


def run_train(
    cfg: PipelineConfig,
    base: BaseModelRef,
    data: DataRef,
    out_dir: Path,
    hw: HardwareDecision,
    tracker: Tracker | None = None,
    init_adapter: InitAdapter | None = None,
) -> TrainRef:
    from tasks.train import train

    return train(
        cfg.train,
        cfg.model,
        base,
        data,
        out_dir,
        hw,
        tracker or NullTracker(),
        max_new_tokens=cfg.eval.max_new_tokens,
        config_hash=config_hash(cfg),
        resolved_config=dump_config(cfg),
        system_metrics=cfg.tracking.system_metrics,
        init_adapter=init_adapter,
    )
