"""The import layers hold: handlers > reconcile/resources > api; trainer, server and dev tools stay apart.

Like kopf's import-linter contract, but a few lines of ast: a layer may import only what sits below it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGES = {
    "kubelora.api": REPO / "operator/kubelora/api",
    "kubelora.resources": REPO / "operator/kubelora/resources",
    "kubelora.reconcile": REPO / "operator/kubelora/reconcile",
    "kubelora_trainer": REPO / "trainer_image/kubelora_trainer",
    "kubelora_server": REPO / "server_image/kubelora_server",
}
FORBIDDEN = {
    "kubelora.api": ("kubelora.resources", "kubelora.reconcile", "kubelora.handlers", "kubelora_", "kopf"),
    "kubelora.resources": ("kubelora.handlers", "kubelora.reconcile", "kubelora_", "kopf", "kubernetes"),
    "kubelora.reconcile": ("kubelora.handlers", "kubelora_", "kopf", "kubernetes"),
    "kubelora_trainer": (
        "kubelora.handlers",
        "kubelora.resources",
        "kubelora.reconcile",
        "kubelora_server",
        "kubelora_local",
        "kopf",
    ),
    "kubelora_server": (
        "kubelora.handlers",
        "kubelora.resources",
        "kubelora.reconcile",
        "kubelora_trainer",
        "kubelora_local",
        "kopf",
    ),
}


def imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("layer", list(PACKAGES))
def test_layer_imports_only_what_is_below_it(layer: str) -> None:
    offences = [
        f"{path.relative_to(REPO)} imports {name}"
        for path in sorted(PACKAGES[layer].rglob("*.py"))
        for name in sorted(imports(path))
        if name.startswith(FORBIDDEN[layer])
    ]
    assert not offences, "\n".join(offences)


def test_operator_never_knows_about_the_local_cluster() -> None:
    offences = [
        str(p.relative_to(REPO))
        for p in (REPO / "operator/kubelora").rglob("*.py")
        if any(n.startswith("kubelora_local") for n in imports(p))
    ]
    assert not offences
