"""The ``rollout`` deployment (prefect.yaml), beside ``finetune``: a registered version
rolled out behind the stable endpoint and made champion, started from the Prefect UI, by
the retraining flow or by a webhook.

The same rollout as the pipeline's serve stage and ``slothflow models promote``
(:func:`tasks.serve.release`): the version starts beside the serving one, passes the
serving checks on its own port, the endpoint switches, the old version drains and stops,
and only then do the aliases move. The endpoint (host, port, commands, key) is the
worker's own setting, never a parameter.
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows import events
from flows.pipeline import DEFAULT_FORM
from tasks.core import home as home_mod
from tasks.core import settings
from tasks.core.config import PipelineForm
from tasks.core.interrupt import signals_as_interrupt
from tasks.core.tracking import resolve_tracking_uri
from tasks.serve import check_release_spec, release_task
from tasks.serve.canary import CanaryError


@flow(name="slothflow-rollout", validate_parameters=True)
def rollout(model: str, config: PipelineForm = DEFAULT_FORM) -> Any:
    """Roll ``model`` out behind this worker's stable endpoint and make it the champion.

    ``model``: ``NAME/VERSION`` or ``NAME@alias`` of a registered version whose gate
    passed (never a path: a form may not name files to serve). ``config``: the recipe's
    form, for its serving checks (``deploy.smoke``, ``deploy.load_test``) and tracking
    names; the worker adds its own settings (endpoint port, commands, API key)."""
    check_release_spec(model)  # before anything: a path or a typo fails in an instant
    home = home_mod.resolve_home()
    full = settings.complete(config, settings.from_env())
    settings.require_shared_tracking(full, home, "this rollout was started from a deployment")
    uri = resolve_tracking_uri(full.tracking, home)
    # A cancel from the UI reaches this process as SIGTERM: the new server is stopped and
    # the old one keeps serving.
    try:
        with signals_as_interrupt():
            return release_task(full.deploy, model, uri)
    except CanaryError as exc:
        # Traffic is back on the serving version and the aliases are unchanged: say so to
        # the notification automation, and end as a failed rollout that was rolled back.
        events.emit_from_flow(
            events.ROLLED_BACK,
            events.model_resource(full.tracking.registered_model),
            {"model": model, "reason": str(exc)},
        )
        from prefect.states import Failed

        return Failed(name="RolledBack", message=str(exc))
