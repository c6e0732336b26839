"""CEL validation rules (``x-kubernetes-validations``) declared next to the pydantic rules they mirror.

The API server checks these at create/update time, so a spec the operator would mark
Failed/InvalidSpec is refused at ``kubectl apply`` with the same meaning; no admission webhook is
involved (nothing to run, nothing left behind by ``helm uninstall``). Each model validator in
``api/`` declares its CEL twin with :func:`cel` and raises the twin's message; ``crdgen`` copies them
into the CRDs. ``tests/unit/test_crds.py`` fails on a validator without a twin, and
``tests/e2e/test_cel_rules.py`` checks on the real API server that each bad spec is refused with the
models' message. What CEL cannot say (the URI grammar beyond its pattern, a dataset's contents, a base
model's existence) stays with the reconciler and pre-flight, reported as InvalidSpec/InvalidDataset
conditions; so does every rule for objects stored before it existed.

Kubernetes estimates the cost of every rule from the schema, so strings and lists a rule reads
carry ``maxLength``/``maxItems`` (the models enforce the same bounds).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

Reason = Literal["FieldValueInvalid", "FieldValueForbidden", "FieldValueRequired", "FieldValueDuplicate"]
KEY = "x-kubernetes-validations"


@dataclass(frozen=True)
class Rule:
    """One ``x-kubernetes-validations`` entry; ``message_expression`` (CEL) wins over ``message`` when set."""

    rule: str
    message: str
    message_expression: str | None = None
    field_path: str | None = None
    reason: Reason | None = None

    def wire(self) -> dict[str, str]:
        out = {"rule": self.rule, "message": self.message}
        if self.message_expression:
            out["messageExpression"] = self.message_expression
        if self.field_path:
            out["fieldPath"] = self.field_path
        if self.reason:
            out["reason"] = self.reason
        return out


def cel(*rules: Rule, **schema: Any) -> dict[str, Any]:
    """``json_schema_extra`` carrying ``rules`` (plus any other schema keywords, e.g. ``maxLength``)."""
    return {**schema, KEY: [r.wire() for r in rules]}


def quote(text: str) -> str:
    """A CEL string literal."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"

