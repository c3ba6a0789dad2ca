"""slothflow's own Prefect events: what automations (infra/automations/) and deployment
triggers (prefect.yaml) react to.

* ``slothflow.data.updated`` (resource ``slothflow.data.<hash of the location>``): new
  data is at a location; the ``retrain`` deployment's ``on-new-data`` trigger starts a run.
* ``slothflow.gate.blocked`` (resource ``slothflow.model.<registered model>``): the gate
  blocked a candidate; payload: run id, reasons.
* ``slothflow.rollout.rolled-back`` (same resource): a canary failed and traffic went
  back; payload: the version, the reason.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any

log = logging.getLogger(__name__)

DATA_UPDATED = "slothflow.data.updated"
GATE_BLOCKED = "slothflow.gate.blocked"
ROLLED_BACK = "slothflow.rollout.rolled-back"


def data_resource(location: str) -> dict[str, str]:
    digest = hashlib.sha256(location.encode()).hexdigest()[:16]
    return {"prefect.resource.id": f"slothflow.data.{digest}", "prefect.resource.name": location}


def model_resource(name: str) -> dict[str, str]:
    return {"prefect.resource.id": f"slothflow.model.{name}", "prefect.resource.name": name}


def emit_from_flow(event: str, resource: dict[str, str], payload: dict[str, Any]) -> None:
    """Emit ``event`` from inside a flow run (Prefect relates it to the run and sends it
    before the run ends). A notification must never fail the run it reports on."""
    try:
        from prefect.events import emit_event

        emit_event(event=event, resource=resource, payload=payload)
    except Exception as exc:
        log.warning("could not emit %s: %s", event, exc)


def emit_now(event: str, resource: dict[str, str], payload: dict[str, Any]) -> str:
    """Send ``event`` to the Prefect server (``PREFECT_API_URL``) and wait until it is
    sent, outside any flow run (``slothflow data notify``). Returns the event's id."""
    from prefect.events import Event
    from prefect.events.clients import get_events_client
    from prefect.utilities.asyncutils import run_coro_as_sync

    ev = Event(event=event, resource=resource, payload=payload)

    async def send() -> None:
        async with get_events_client() as client:
            await client.emit(ev)

    run_coro_as_sync(send())
    return str(ev.id)
