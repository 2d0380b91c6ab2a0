"""The house's seams, checked from the source: where code runs is drawn by packages.

- Nothing under ``tpm_fed/`` imports the worker package ``functions``.
- The worker imports from ``tpm_fed`` only the contract, ``tpm_fed.protocol``, and the storage both ends
  share, ``tpm_fed.storage`` (which imports nothing of ``tpm_fed`` but the contract).
- The contract and the storage import no torch, numpy or transformers (a caller without them
  can build every request and read every result's metadata).
- No import circle among our modules, nor among our packages (tpm_fed's top-level packages and modules,
  and ``functions``, as the nodes).
- No import of another of our packages inside a function, unless that module pulls an optional dependency
  (:data:`OPTIONAL_DEPENDENCIES`): a lazy import is how a circle hides.
- No parameter ``runtime: Any``: a callee names what it needs of the engine.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

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


WORKER_MAY_IMPORT = ("tpm_fed.protocol", "tpm_fed.storage")
"""What of tpm_fed runs inside an endpoint worker: the contract, and the storage both ends share."""


def test_the_worker_imports_only_the_contract_and_the_storage_from_tpm_fed():
    offenders = [
        f"{path.relative_to(ROOT)}:{line} imports {name}"
        for module, path in _modules("functions").items()
        for name, line in _imports(module, path)
        if name.split(".")[0] == "tpm_fed" and name != "tpm_fed" and _package(name) not in WORKER_MAY_IMPORT
    ]
    assert offenders == []


def test_the_storage_imports_only_the_contract_from_tpm_fed():
    offenders = [
        f"{path.relative_to(ROOT)}:{line} imports {name}"
        for module, path in _modules("tpm_fed/storage").items()
        for name, line in _imports(module, path)
        if name.split(".")[0] == "tpm_fed" and _package(name) not in WORKER_MAY_IMPORT
    ]
    assert len(_modules("tpm_fed/storage")) > 5 and offenders == []


def test_the_serving_code_version_covers_what_the_worker_imports():
    from tpm_fed.protocol.code_version import SERVING_PACKAGES

    assert set(WORKER_MAY_IMPORT) | {"functions"} == set(SERVING_PACKAGES)


def test_the_contract_imports_no_heavy_library_at_import_time():
    contract = [module for module in _modules("tpm_fed") if module.startswith(WORKER_MAY_IMPORT)]
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


# --- Packages: the rooms of the house, and how code may cross between them ---

OPTIONAL_DEPENDENCIES = (
    "torch", "numpy", "transformers", "vllm", "safetensors",  # the model stack: a caller may lack it
    "globus_compute_sdk", "globus_compute_endpoint", "parsl", "globus_sdk",  # sites: slow to import, site-only
    "fastapi", "starlette", "uvicorn", "sqlalchemy",  # the service's stack: the CLI and Client need none of it
    "proxystore",
)
"""What a module may import inside a function: these libraries, and our modules that pull one in when
imported (importing them lazily keeps them off a caller's or a command's path). Our cheap modules are
imported at the top, where the package graph below sees them."""


def _package(module: str) -> str:
    """The room a module lives in: ``tpm_fed.X`` (a top-level package or module of tpm_fed), or ``functions``."""
    parts = module.split(".")
    return parts[0] if parts[0] != "tpm_fed" else ".".join(parts[:2])


def _resolved(module: str, path: Path, node: ast.ImportFrom) -> str:
    base = node.module or ""
    if node.level:
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
        base = ".".join(anchor + ([base] if base else []))
    return base


def _top_level_imports(module: str, path: Path) -> list[str]:
    """What importing ``module`` imports (not what its functions import later, nor ``if TYPE_CHECKING``)."""
    found: list[str] = []

    def walk(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue
            if isinstance(node, ast.Import):
                found.extend(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = _resolved(module, path, node)
                found.append(base)
                found.extend(f"{base}.{alias.name}" for alias in node.names)
            for field in ("body", "orelse", "finalbody", "handlers"):
                walk(getattr(node, field, None) or [])

    walk(ast.parse(path.read_text(), str(path)).body)
    return found


def _pulls_optional(module: str, seen: frozenset[str] = frozenset()) -> bool:
    """Whether importing our ``module`` imports an optional dependency (through our other modules too)."""
    if module in seen:
        return False
    parts = module.split(".")
    parents = [".".join(parts[:i]) for i in range(1, len(parts)) if ".".join(parts[:i]) in OURS]
    for name in _top_level_imports(module, OURS[module]) + parents:
        if name.split(".")[0] in OPTIONAL_DEPENDENCIES:
            return True
        if name in OURS and name != module and _pulls_optional(name, seen | {module}):
            return True
    return False


def _package_edges() -> dict[tuple[str, str], list[str]]:
    """(package, package it imports) -> where, for every import between two rooms (lazy ones included)."""
    edges: dict[tuple[str, str], list[str]] = {}
    for module, path in OURS.items():
        for name, line in _imports(module, path):
            if name in OURS and _package(name) != _package(module):
                edges.setdefault((_package(module), _package(name)), []).append(f"{path.relative_to(ROOT)}:{line}")
    return edges


def test_no_circle_between_packages():
    edges = _package_edges()
    assert ("tpm_fed.service", "tpm_fed.protocol") in edges, "the graph must see real imports"
    graph: dict[str, set[str]] = {}
    for source, target in edges:
        graph.setdefault(source, set()).add(target)
    # Each import that closes a circle, with the path back and where each step is written.
    circles: list[str] = []
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(package: str) -> None:
        state[package] = "open"
        stack.append(package)
        for target in sorted(graph.get(package, ())):
            if state.get(target) == "open":
                cycle = stack[stack.index(target):] + [target]
                circles.append(" -> ".join(cycle) + "  [" + "; ".join(
                    f"{a}->{b}: {', '.join(edges[(a, b)][:2])}" for a, b in zip(cycle, cycle[1:])) + "]")
            elif target not in state:
                visit(target)
        stack.pop()
        state[package] = "done"

    for package in sorted(graph):
        if package not in state:
            visit(package)
    assert circles == [], "\n".join(circles)


def _lazy_imports(module: str, path: Path) -> list[tuple[str, int]]:
    """Imports inside functions (a function's body, nested ones included), with their line."""
    found = []
    for function in ast.walk(ast.parse(path.read_text(), str(path))):
        if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(function):
            if isinstance(node, ast.Import):
                found += [(alias.name, node.lineno) for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                found.append((_resolved(module, path, node), node.lineno))
    return sorted(set(found), key=lambda item: item[1])


def _lazy_offenders() -> list[str]:
    offenders = []
    for module, path in _modules("tpm_fed").items():
        for name, line in _lazy_imports(module, path):
            target = name if name in OURS else name.rpartition(".")[0]
            if target in OURS and _package(target) != _package(module) and not _pulls_optional(target):
                offenders.append(f"{path.relative_to(ROOT)}:{line} imports {name} inside a function")
    return offenders


def test_no_lazy_import_of_another_package():
    """An import inside a function hides an edge of the package graph from whoever reads the top of the
    file (it is how circles hid): import another room at the top, unless it pulls an optional dependency."""
    assert _pulls_optional("tpm_fed.service.app") and not _pulls_optional("tpm_fed.protocol.errors")
    offenders = _lazy_offenders()
    assert offenders == [], "\n".join(offenders)


def _runtime_any() -> list[str]:
    offenders = []
    for module, path in OURS.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                arguments = node.args.posonlyargs + node.args.args + node.args.kwonlyargs
                offenders += [f"{path.relative_to(ROOT)}:{node.lineno} {node.name}({argument.arg}: Any)"
                              for argument in arguments if argument.arg == "runtime"
                              and argument.annotation is not None and ast.unparse(argument.annotation) == "Any"]
    return offenders


def test_no_parameter_typed_runtime_any():
    """The runtime is passed by the interface it is used through (what the callee needs of it), not as ``Any``."""
    offenders = _runtime_any()
    assert offenders == [], "\n".join(offenders)


# --- Kinds: the table is the one place a kind is described ---


def _kind_branches() -> list[str]:
    """Comparisons with a kind's name and ``isinstance`` checks against a kind's request or result class,
    outside the contract (which defines them)."""
    from tpm_fed.protocol.kinds import KINDS

    names = set(KINDS)
    classes = {cls.__name__ for kind in KINDS.values() for cls in (kind.request, kind.result)}
    found = []
    for module, path in OURS.items():
        if module.startswith("tpm_fed.protocol"):
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Compare) and any(isinstance(op, (ast.Eq, ast.NotEq, ast.In, ast.NotIn))
                                                     for op in node.ops):
                sides = [node.left, *node.comparators]
                constants = {side.value for side in sides if isinstance(side, ast.Constant)}
                constants |= {element.value for side in sides if isinstance(side, (ast.Set, ast.Tuple, ast.List))
                              for element in side.elts if isinstance(element, ast.Constant)}
                if constants & names:
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno} compares with a kind's name")
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "isinstance" \
                    and len(node.args) == 2 and {n.id for n in ast.walk(node.args[1]) if isinstance(n, ast.Name)} & classes:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} branches on a kind's class")
            elif isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("frozenset", "set") \
                    and any(isinstance(e, ast.Constant) and e.value in names
                            for arg in node.args if isinstance(arg, (ast.Set, ast.Tuple, ast.List)) for e in arg.elts):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} lists kinds by name")
    return found


def test_nothing_branches_on_a_kinds_name_outside_the_table():
    """Whether a kind joins, streams, how it is billed, which backends serve it: columns of the kinds table
    (``tpm_fed.protocol.kinds``), looked up, never ``name == "generate"`` or ``isinstance(result, ...)``."""
    offenders = _kind_branches()
    assert offenders == [], "\n".join(offenders)


def test_the_kinds_table_is_consistent():
    from typing import get_args

    from tpm_fed.protocol.kinds import KINDS, KindName
    from tpm_fed.protocol.model import BACKENDS

    for kind in KINDS.values():
        assert set(kind.joins_on) <= set(kind.backends) <= set(BACKENDS), kind.name
        assert kind.family in get_args(KindName) and KINDS[kind.family].family == kind.family, kind.name
        assert kind.request.model_fields["kind"].default == kind.name, kind.name
        assert not kind.streams or kind.capability == "generate", kind.name  # only generated text streams


# --- Names: one meaning per word ---

SAME_MEANING = {"Observer": "told of every request that ends; written where each caller needs it (the serving "
                            "classes, the batch runner), neither package importing the other"}
"""Public class names defined twice on purpose, because both definitions mean the same thing."""


def test_no_two_public_classes_share_a_name():
    """Two classes of one name were two meanings of one word (``Listener``, ``Runtime``, ``StoreReader``):
    a reader of either had to find out which one a line meant."""
    defined: dict[str, list[str]] = {}
    for module, path in OURS.items():
        for node in ast.parse(path.read_text(), str(path)).body:
            if isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
                defined.setdefault(node.name, []).append(str(path.relative_to(ROOT)))
    shared = {name: paths for name, paths in defined.items() if len(paths) > 1 and name not in SAME_MEANING}
    assert shared == {}
