"""The package's shape: imports flow one way between the subpackages of
`mdu_cli`, no module imports itself back through a cycle, and the command line
starts without torch.

Every import counts, at module level or inside a function alike; only the
annotations under `if TYPE_CHECKING:` are left out, since they never run."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "mdu_cli"

# Lowest first: a subpackage may import from its own layer and those before it,
# never from one after it. (`mdu_cli/__init__.py` holds the version alone.)
LAYERS = ["errors", "methods", "config", "io", "data", "model", "diff", "evaluation", "hub", "train",
          "commands", "cli"]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    return skipped


def imports_of(path: Path) -> set[str]:
    """The mdu_cli modules a file imports (`from mdu_cli.x import y` counts y
    when y is itself a module)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skipped, found = _type_checking_nodes(tree), set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.split(".")[0] == "mdu_cli"}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 \
                and node.module.split(".")[0] == "mdu_cli":
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                found.add(candidate if _is_module(candidate) else node.module)
    return found


def _is_module(name: str) -> bool:
    relative = Path(*name.split(".")[1:])
    return (PACKAGE / relative).with_suffix(".py").is_file() or (PACKAGE / relative / "__init__.py").is_file()


def layer_of(module: str) -> int | None:
    parts = module.split(".")
    if len(parts) == 1 or parts[1] in ("__main__",):
        return None  # the package root and `python -m mdu_cli` sit outside the layers
    return LAYERS.index(parts[1])


def graph() -> dict[str, set[str]]:
    return {module_name(path): imports_of(path) for path in sorted(PACKAGE.rglob("*.py"))}


def test_every_subpackage_has_a_layer():
    tops = {module_name(p).split(".")[1] for p in PACKAGE.rglob("*.py") if module_name(p).count(".") >= 1}
    assert tops - {"__main__"} <= set(LAYERS), f"add {sorted(tops - set(LAYERS) - {'__main__'})} to LAYERS"


def test_imports_flow_one_way():
    upward = []
    for module, imported in graph().items():
        own = layer_of(module)
        for target in imported:
            theirs = layer_of(target)
            if own is not None and theirs is not None and theirs > own:
                upward.append(f"{module} -> {target} ({LAYERS[own]} may not import {LAYERS[theirs]})")
    assert not upward, "upward imports:\n" + "\n".join(sorted(upward))


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle among the modules, or None (a depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if nxt == node:
                continue
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycles():
    # A package's __init__ is imported by each of its modules; only the edges
    # written in the code count.
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_checks_can_fail():
    """The two checks above, on graphs that break them."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    assert layer_of("mdu_cli.config.training") < layer_of("mdu_cli.train.loop")


@pytest.mark.parametrize("command", [None, "unlearn", "finetune", "eval", "generate", "diff", "push"])
def test_help_does_not_import_torch(command):
    """`mdu --help` and each command's --help build their options without
    importing torch (seconds of start-up on every call)."""
    code = ("import sys\nfrom mdu_cli.cli import cli\n"
            f"args = {([command] if command else []) + ['--help']!r}\n"
            "try:\n    cli.main(args=args, prog_name='mdu')\nexcept SystemExit:\n    pass\n"
            "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().endswith("NO-TORCH"), out[-400:]


def test_every_imported_name_exists():
    """Each `from mdu_cli.x import y` in the package names something x holds,
    the imports inside functions included (they run only when the function
    does, so a stale one would fail in the middle of a user's run)."""
    import importlib

    missing = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module \
                    and node.module.split(".")[0] == "mdu_cli":
                module = importlib.import_module(node.module)
                for alias in node.names:
                    if not hasattr(module, alias.name) and not _is_module(f"{node.module}.{alias.name}"):
                        missing.append(f"{module_name(path)}: from {node.module} import {alias.name}")
    assert not missing, "\n".join(missing)
