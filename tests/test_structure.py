"""The house's seams, checked from the source: where code runs is drawn by packages.

- Nothing under ``tpm_fed/`` imports the worker package ``functions``.
- The worker imports from ``tpm_fed`` only the contract, ``tpm_fed.protocol``.
- The contract imports no torch, numpy or transformers (a caller without them
  can build every request and read every result's metadata).
- No import circle among our modules.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "numpy", "transformers", "vllm", "safetensors")


def _modules(package: str) -> dict[str, Path]:
    found = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _imports(module: str, path: Path) -> list[tuple[str, int]]:
    """Every module ``path`` imports (lazy imports inside functions included), with its line."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.append((base, node.lineno))
            found += [(f"{base}.{alias.name}", node.lineno) for alias in node.names]
    return found


OURS = {**_modules("tpm_fed"), **_modules("functions")}


def _edges() -> dict[str, set[str]]:
    """Module -> our modules it imports (a package import counts as its ``__init__``)."""
    graph: dict[str, set[str]] = {}
    for module, path in OURS.items():
        targets = {name for name, _ in _imports(module, path) if name in OURS and name != module}
        graph[module] = targets
    return graph


def test_nothing_under_tpm_fed_imports_the_worker():
    offenders = [
        f"{path.relative_to(ROOT)}:{line} imports {name}"
        for module, path in _modules("tpm_fed").items()
        for name, line in _imports(module, path)
        if name == "functions" or name.startswith("functions.")
    ]
    assert offenders == []


def test_the_worker_imports_only_the_contract_from_tpm_fed():
    offenders = [
        f"{path.relative_to(ROOT)}:{line} imports {name}"
        for module, path in _modules("functions").items()
        for name, line in _imports(module, path)
        if name.split(".")[0] == "tpm_fed" and not name.startswith("tpm_fed.protocol")
    ]
    assert offenders == []


def test_the_contract_imports_no_heavy_library_at_import_time():
    contract = [module for module in _modules("tpm_fed") if module.startswith("tpm_fed.protocol")]
    assert len(contract) > 10  # the check below really walks the contract
    script = (
        "import importlib, json, sys\n"
        f"for name in {contract!r}: importlib.import_module(name)\n"
        f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r})))\n"
    )
    loaded = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=ROOT)
    assert json.loads(loaded.stdout) == []


def test_the_user_side_imports_no_heavy_library_at_import_time():
    script = (
        "import json, sys\nimport tpm_fed, tpm_fed.cli, tpm_fed.client, tpm_fed.parsl\n"
        # Commands load lazily: load every one, as running each would.
        "for name in tpm_fed.cli.main.list_commands(None): tpm_fed.cli.main.get_command(None, name)\n"
        f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY[:2] + ('vllm',)!r})))\n"
    )
    loaded = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=ROOT)
    assert json.loads(loaded.stdout) == []


def test_no_import_circle():
    graph = _edges()
    assert graph["tpm_fed.client"], "the graph must see real imports"
    cycles = []
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(module: str) -> None:
        state[module] = "open"
        stack.append(module)
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                cycles.append(stack[stack.index(target):] + [target])
            elif target not in state:
                visit(target)
        stack.pop()
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module)
    # A package's __init__ re-exporting its own modules is not a circle between ideas.
    real = [cycle for cycle in cycles if not _reexport_only(cycle)]
    assert real == [], "\n".join(" -> ".join(cycle) for cycle in real)


def _reexport_only(cycle: list[str]) -> bool:
    """A cycle through a package __init__ and its own submodule (``pkg`` -> ``pkg.mod`` -> ``pkg``)."""
    return any(b.startswith(a + ".") for a, b in zip(cycle, cycle[1:], strict=False) if a in OURS
               and OURS[a].name == "__init__.py")
