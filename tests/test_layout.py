"""The layout of the code: packages by concern, no import cycles, no private names across modules.

Read from the source with `ast`, every import counts: at the top, inside functions and
under `TYPE_CHECKING` alike.
"""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("bot", "handlers", "policies")
FAKES = ("bot.sandbox.github_fake", "bot.sandbox.gitlab_fake", "bot.sandbox.local_forge", "bot.sandbox.forges")
# Where modules lived before `bot/` was split by concern: nothing may import them by those names.
OLD_MODULES = (
    "bot.vcs", "bot.github_webhook", "bot.github_client", "bot.github_app_setup", "bot.gitlab_webhook",
    "bot.gitlab_client", "bot.trigger_api", "bot.api_runs", "bot.ci_auth", "bot.slack", "bot.run_cli",
    "bot.dispatcher", "bot.worker", "bot.apply_gate", "bot.terraform", "bot.git", "bot.repo_guard",
    "bot.aws_credentials", "bot.comments", "bot.statuses", "bot.sandbox_forges", "bot.github_fake",
    "bot.gitlab_fake", "bot.local_forge",
)


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def source_files(*tops: str) -> list[Path]:
    return sorted(p for top in tops for p in (ROOT / top).rglob("*.py"))


MODULES = {module_name(p): p for p in source_files(*PACKAGES)}


def imports(path: Path) -> list[tuple[str, str | None]]:
    """(module, name) for every `from module import name`, and (module, None) for `import module`."""
    found: list[tuple[str, str | None]] = []
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            found += [(base, alias.name) for alias in node.names]
    return found


def project_targets(path: Path) -> set[str]:
    """The project modules a file imports (a `from package import module` counts as the module)."""
    targets = set()
    for module, name in imports(path):
        if name and f"{module}.{name}" in MODULES:
            targets.add(f"{module}.{name}")
        elif module in MODULES:
            targets.add(module)
    return targets


def test_no_import_cycles():
    graph = {name: project_targets(path) - {name} for name, path in MODULES.items()}
    # A package's __init__ is imported with any of its modules; only its own imports count.
    cycles = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                cycles.append(stack[stack.index(target):] + [target])
            elif target not in state:
                visit(target)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert cycles == []


@pytest.mark.parametrize("top", [*PACKAGES, "tests", "bench"])
def test_no_private_name_is_imported_from_another_module(top: str):
    private = [
        f"{path.relative_to(ROOT)}: from {module} import {name}"
        for path in source_files(top)
        for module, name in imports(path)
        if name and name.startswith("_") and not name.startswith("__") and module.split(".")[0] in PACKAGES
    ]
    assert private == []


def test_only_the_sandbox_imports_the_local_fakes():
    outside = [
        f"{path.relative_to(ROOT)} imports {target}"
        for name, path in MODULES.items() if not name.startswith("bot.sandbox")
        for target in project_targets(path) if target in FAKES
    ]
    assert outside == []


@pytest.mark.parametrize("old", OLD_MODULES)
def test_old_module_paths_are_gone(old: str):
    assert importlib.util.find_spec(old) is None
    users = [str(p.relative_to(ROOT)) for p in source_files(*PACKAGES, "tests", "bench")
             if any(module == old or f"{module}.{name}" == old for module, name in imports(p))]
    assert users == []


def test_bot_is_split_by_concern():
    top_level = sorted(p.name for p in (ROOT / "bot").glob("*.py"))
    assert top_level == ["__init__.py", "app.py", "cli.py", "config.py", "logs.py", "metrics.py", "models.py"]
    concerns = sorted(p.name for p in (ROOT / "bot").iterdir() if (p / "__init__.py").is_file())
    assert concerns == ["ci", "forges", "jobs", "report", "runners", "sandbox", "store", "web"]
