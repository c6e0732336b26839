"""Validating admission handlers: thin wiring around :mod:`kubelora.reconcile.admission`.

Imported only when the webhook is enabled (``Settings.webhook``, see ``handlers.configure``): kopf
refuses to start when validate handlers exist without an admission server. Each handler becomes its
own webhook in the ValidatingWebhookConfiguration ``kubelora.io`` (``settings.admission.managed``),
for CREATE and UPDATE only (deletion is never blocked):

* the spec checks use failurePolicy Fail: while the operator is unreachable, LoRAJobs and
  AdapterDeployments cannot be created or have their specs changed (the CRD schema alone would let
  through specs the operator can only mark Failed/InvalidSpec);
* the LoRAJob training-fields check uses failurePolicy Ignore: the reconciler reports such a change
  as Validated=False/SpecImmutable anyway, so an unreachable operator need not block the update.
"""

from __future__ import annotations

from typing import Any, Literal

import kopf

from kubelora.api.common import GROUP, VERSION
from kubelora.reconcile.admission import adapterdeployment_spec_error, lorajob_change_error, lorajob_spec_error

UNPROCESSABLE = 422
OPERATIONS: list[Literal["CREATE", "UPDATE"]] = ["CREATE", "UPDATE"]


def _reject(message: str | None) -> None:
    """kopf passes ``old`` among the kwargs on UPDATE; ``body`` is the new object."""
    if message:
        raise kopf.AdmissionError(message, code=UNPROCESSABLE)


@kopf.on.validate(GROUP, VERSION, "lorajobs", id="lorajob-spec", operations=OPERATIONS)
def lorajob_spec(body: kopf.Body, **kwargs: Any) -> None:
    _reject(lorajob_spec_error(body, kwargs.get("old")))


@kopf.on.validate(GROUP, VERSION, "lorajobs", id="lorajob-training-fields", operations=["UPDATE"],
                  ignore_failures=True)
def lorajob_training_fields(body: kopf.Body, **kwargs: Any) -> None:
    _reject(lorajob_change_error(kwargs.get("old"), body))


@kopf.on.validate(GROUP, VERSION, "adapterdeployments", id="adapterdeployment-spec", operations=OPERATIONS)
def adapterdeployment_spec(body: kopf.Body, **kwargs: Any) -> None:
    _reject(adapterdeployment_spec_error(body, kwargs.get("old")))
