"""The layers point one way (docs/architecture.md, "Layers"): an application (agents/,
serving/, training/) never imports another application's modules, and the shared layers
(recstream/, streams/) import no application; what two applications share gets its own
module in recstream/. Only the command line starts the applications.

Every import counts, wherever it stands: one inside a function or under
``TYPE_CHECKING`` is a dependency all the same (it runs when the function does, and
mypy follows it)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

FORBIDDEN: dict[str, frozenset[str]] = {
    "serving": frozenset({"agents", "training"}),
    "training": frozenset({"agents", "serving"}),
    "streams": frozenset({"agents", "serving", "training"}),
    "recstream": frozenset({"agents", "serving", "training"}),
}
"""Package -> the top-level packages none of its modules may import."""

COMMAND_LINE = frozenset({"recstream/cli.py", "recstream/commands.py"})
"""The command line sits on top of every layer: it starts the agents, the API and
training, so it imports them (lazily, on the command that runs them)."""


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every absolute import in ``path``, wherever it stands."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
    return sorted(found)


def crossings(package: str) -> list[str]:
    """``file:line imports module`` for each import of ``package`` that crosses a layer."""
    out = []
    for path in sorted((ROOT / package).rglob("*.py")):
        name = path.relative_to(ROOT).as_posix()
        if name in COMMAND_LINE:
            continue
        for line, module in imports(path):
            if module.split(".")[0] in FORBIDDEN[package]:
                out.append(f"{name}:{line} imports {module}")
    return out


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_layer_imports_an_application_it_does_not_own(package: str) -> None:
    found = crossings(package)
    assert not found, (
        f"{package}/ must not import {', '.join(sorted(FORBIDDEN[package]))}:\n  "
        + "\n  ".join(found)
        + "\nMove what both sides need into a module of recstream/ and import it from there."
    )


def test_the_check_sees_imports_inside_functions() -> None:
    # The command line imports every application inside its functions: were those not
    # found, the check above would pass on anything.
    found = {m.split(".")[0] for name in COMMAND_LINE for _, m in imports(ROOT / name)}
    assert {"agents", "serving", "training"} <= found
    assert all(any((ROOT / package).rglob("*.py")) for package in FORBIDDEN)
