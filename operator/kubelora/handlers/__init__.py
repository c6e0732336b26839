"""Thin kopf handlers. Importing this package registers them; ``configure`` holds every kopf setting."""

from __future__ import annotations

import logging
from typing import Any

import kopf

from kubelora.resources.pods import MANAGED_BY, MANAGER
from kubelora.settings import Settings

SETTINGS = Settings()


def configure(settings: Settings) -> None:
    """Called once before kopf starts: the handlers read ``SETTINGS`` instead of the environment."""
    global SETTINGS
    SETTINGS = settings


@kopf.on.startup()
def _startup(settings: kopf.OperatorSettings, **_: Any) -> None:
    # Our own names, so two operators of different projects never fight over annotations.
    settings.persistence.finalizer = "kubelora.io/finalizer"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="kubelora.io")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix="kubelora.io", key="last-handled-configuration")
    # What kopf turns into Events by itself: its per-object log lines and kopf.info at WARNING and above
    # only (its INFO lines, "Handler ... succeeded", would be noise). Our own Events do not depend on it:
    # one Normal Event per phase transition (kopf.event, which this level does not filter) and a Warning
    # per distinct problem (lorajob_runner.post_transition, adapterdeployment_loop.Supervisor._announce).
    settings.posting.level = logging.WARNING
    settings.watching.server_timeout = 300
    settings.batching.error_delays = [1, 2, 5, 10, 30, 60]
    # One Pod watch serves both kinds' indexes, so its server-side selector is the label they share.
    settings.watching.label_selectors["", "v1", "pods"] = f"{MANAGED_BY}={MANAGER}"
    if SETTINGS.peering:
        settings.peering.name = SETTINGS.peering
        settings.peering.mandatory = True


from kubelora.handlers import adapterdeployment as adapterdeployment  # noqa: E402  (registers handlers)
from kubelora.handlers import lorajob as lorajob  # noqa: E402
