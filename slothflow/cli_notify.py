"""``slothflow data notify`` (new data is here: retrain) and ``slothflow notifications``
(the automations that tell people about failed runs, blocked gates and rolled-back
rollouts). Both talk to the Prefect server of ``PREFECT_API_URL``."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any

import typer

from slothflow.common import console, friendly_errors, out
from tasks.core.config import REPO_ROOT, ConfigError

notifications_app = typer.Typer(
    help="Notifications: Prefect automations sending to a webhook.", no_args_is_help=True
)

#: The notification block the automations send to.
BLOCK_NAME = "slothflow-notify"
AUTOMATIONS = REPO_ROOT / "infra" / "automations" / "notifications.yaml"


def _require_server() -> str:
    url = os.environ.get("PREFECT_API_URL", "").strip()
    if not url:
        raise ConfigError(
            "PREFECT_API_URL is not set: this command talks to the Prefect server that runs "
            "the deployments (README, Operations)"
        )
    return url


def data_notify(
    location: Annotated[
        str,
        typer.Argument(
            help="Where the new data is: a file, folder, glob or fsspec URL (s3://bucket/"
            "prefix/); the retrain deployment reads its recipe's data.sources."
        ),
    ],
) -> None:
    """Tell the Prefect server that new data landed: emits a slothflow.data.updated event,
    which the retrain deployment's on-new-data trigger turns into a retrain run."""
    from flows.events import DATA_UPDATED, data_resource, emit_now

    with friendly_errors():
        api = _require_server()
        if "://" not in location and not any(c in location for c in "*?["):
            location = str(Path(location).expanduser().resolve())
        event_id = emit_now(DATA_UPDATED, data_resource(location), {"location": location})
    console.print(f"[bold green]notified[/] {api}: {DATA_UPDATED} for {location}")
    out.print(event_id)


def _block_id(url: str, token: str | None) -> str:
    """Save the webhook block (the URL and token as its secrets) and return its id."""
    from prefect.blocks.notifications import CustomWebhookNotificationBlock

    secrets: dict[str, Any] = {"url": url}
    headers = {"content-type": "application/json"}
    if token:
        secrets["token"] = token
        headers["authorization"] = "Bearer {{token}}"
    block = CustomWebhookNotificationBlock(
        name=BLOCK_NAME,
        url="{{url}}",
        method="POST",
        headers=headers,
        json_data={"subject": "{{subject}}", "body": "{{body}}", "source": "slothflow"},
        secrets=secrets,
    )
    return str(block.save(BLOCK_NAME, overwrite=True))


def automation_specs(block_id: str, path: Path = AUTOMATIONS) -> list[dict[str, Any]]:
    """The automations of ``path`` with ``block_id`` in place of ``{{ block }}``."""
    import yaml

    specs: list[dict[str, Any]] = yaml.safe_load(path.read_text())["automations"]
    for spec in specs:
        for action in spec["actions"]:
            if re.fullmatch(r"\{\{\s*block\s*\}\}", str(action.get("block_document_id", ""))):
                action["block_document_id"] = block_id
    return specs


@notifications_app.command("apply")
def notifications_apply() -> None:
    """Create (or replace) the notification automations of
    infra/automations/notifications.yaml and the webhook block they send to. The URL
    comes from SLOTHFLOW_NOTIFY_URL and an optional bearer token from
    SLOTHFLOW_NOTIFY_TOKEN (both kept as the block's secrets, never printed)."""
    with friendly_errors():
        _require_server()
        url = os.environ.get("SLOTHFLOW_NOTIFY_URL", "").strip()
        if not url.startswith(("http://", "https://")):
            raise ConfigError(
                "SLOTHFLOW_NOTIFY_URL: set it to the webhook (http:// or https://) the "
                "notifications go to"
            )
        from prefect.automations import Automation

        block_id = _block_id(url, os.environ.get("SLOTHFLOW_NOTIFY_TOKEN") or None)
        for spec in automation_specs(block_id):
            automation = Automation.model_validate(spec)
            while True:  # replace every earlier copy of it
                try:
                    Automation.read(name=automation.name).delete()
                except ValueError:
                    break  # none left
            created = automation.create()
            out.print(f"{created.name}  {created.id}")
    console.print(f"[bold green]notifications[/] go to the webhook block {BLOCK_NAME!r}")
