"""The package's modules import each other without a cycle, and the two LoRA modules keep their rooms.

A cycle hidden behind an import inside a function still counts: the graph is read with ``ast`` from every
``import`` statement in a module, wherever it sits. The library never loads code from ``scripts/`` or ``tests/``,
by import or by file path.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "jsd"


def module_name(path: Path, root: Path = PACKAGE.parent) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, modules: set[str], root: Path = PACKAGE.parent) -> set[str]:
    """The ``jsd`` modules that ``path`` imports anywhere in its text (``from a import b``: ``a.b`` if a module)."""
    found = set()
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}".rstrip(".")
            names = [f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in modules] or [base]
        else:
            continue
        found |= {name for name in names if name in modules}
    return found


def import_graph() -> dict[str, set[str]]:
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(p) for p in paths}
    return {module_name(p): imported_modules(p, modules) - {module_name(p)} for p in paths}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path ``[a, b, ..., a]``, or None (depth-first search with colours)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_finds_a_cycle_behind_a_function_level_import(tmp_path):
    """The checker itself: a cycle through an import inside a function is found, an acyclic graph passes."""
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "a.py").write_text("from pkg import b\n")
    (tmp_path / "pkg" / "b.py").write_text("def f():\n    from pkg.a import x\n")
    modules = {"pkg.a", "pkg.b"}
    graph = {
        "pkg.a": imported_modules(tmp_path / "pkg" / "a.py", modules, tmp_path),
        "pkg.b": imported_modules(tmp_path / "pkg" / "b.py", modules, tmp_path),
    }
    assert graph == {"pkg.a": {"pkg.b"}, "pkg.b": {"pkg.a"}}
    assert find_cycle(graph) == ["pkg.a", "pkg.b", "pkg.a"]
    assert find_cycle({"pkg.a": {"pkg.b"}, "pkg.b": set()}) is None


def test_the_jsd_modules_import_each_other_without_a_cycle():
    graph = import_graph()
    assert graph.get("jsd.training.trainer"), "the graph was not read"
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"


def test_the_lora_run_sits_above_the_trainer_and_the_adapters_below_it():
    graph = import_graph()
    assert "jsd.training.adapters" in graph["jsd.training.trainer"]
    assert "jsd.training.trainer" in graph["jsd.training.lora_run"]
    assert "jsd.training.trainer" not in graph["jsd.training.adapters"]
    # prediction-time LoRA loading knows nothing of training
    assert not {m for m in graph["jsd.lora_weights"] if m.startswith("jsd.training")}


# ---- the library never loads code from scripts/ or tests/ ---------------------------------------------------

REPO = PACKAGE.parent
PATH_LOADERS = {"spec_from_file_location", "run_path", "run_module", "SourceFileLoader", "load_source", "exec"}
# The one module that loads files by path: Cog's contract is a predictor named by file (``predict.py:Predictor``).
LOADS_THE_MODEL_BY_PATH = {"jsd.coghttp.local"}
OUTSIDE = ("scripts", "tests")


def _string_parts(node: ast.AST) -> list[str]:
    """The literal text of a string constant or an f-string."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, ast.JoinedStr):
        return ["".join(v.value for v in node.values if isinstance(v, ast.Constant) and isinstance(v.value, str))]
    return []


def _names_outside(text: str) -> bool:
    """A path that starts in scripts/ or tests/ (``"scripts"``, ``"tests/x.py"``, ``"./scripts/y.py"``)."""
    parts = [part for part in text.replace("\\", "/").split("/") if part not in ("", ".")]
    return bool(parts) and parts[0] in OUTSIDE


def loads_from_outside(path: Path, modules_outside: set[str], module: str) -> list[str]:
    """What ``path`` (a module of the library) loads from scripts/ or tests/: imports, loads by path, paths there."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import | ast.ImportFrom):
            if isinstance(node, ast.ImportFrom) and node.level:  # relative: inside the package
                continue
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            found += [f"import {n}" for n in names if n.split(".")[0] in modules_outside]
        elif isinstance(node, ast.Call):
            func = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if func in PATH_LOADERS and module not in LOADS_THE_MODEL_BY_PATH:
                found.append(f"{func}(...) at line {node.lineno}")
            texts = [t for arg in node.args for t in _string_parts(arg)]
            found += [f"{func}({t!r}) at line {node.lineno}" for t in texts if _names_outside(t)]
        elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
            texts = _string_parts(node.left) + _string_parts(node.right)
            found += [f"/ {t!r} at line {node.lineno}" for t in texts if _names_outside(t)]
    return found


def _modules_outside(repo: Path = REPO) -> set[str]:
    return {p.stem for folder in OUTSIDE for p in (repo / folder).rglob("*.py")} - {"__init__", "conftest"}


def test_the_checker_sees_imports_loads_by_path_and_paths_into_scripts(tmp_path):
    (tmp_path / "scripts").mkdir()
    (tmp_path / "scripts" / "helper.py").write_text("")
    cases = {
        "import helper\n": "import helper",
        "def f():\n    from helper import x\n": "import helper",
        "import importlib.util\nimportlib.util.spec_from_file_location('h', 'x.py')\n": "spec_from_file_location",
        "import runpy\nrunpy.run_path(str(ROOT / 'scripts' / 'h.py'))\n": "run_path",
        "from pathlib import Path\nsource = (Path('.') / 'scripts/helper.py').read_text()\n": "'scripts/helper.py'",
        "from pathlib import Path\nPath(f'./tests/{1}.py').read_text()\n": "'./tests/.py'",
    }
    for text, needle in cases.items():
        (tmp_path / "mod.py").write_text(text)
        found = loads_from_outside(tmp_path / "mod.py", _modules_outside(tmp_path), "pkg.mod")
        assert any(needle in line for line in found), (text, found)
    (tmp_path / "mod.py").write_text("from jsd.coghttp import client\nMESSAGE = 'run scripts/demo.py'\n")
    assert loads_from_outside(tmp_path / "mod.py", _modules_outside(tmp_path), "pkg.mod") == []


def test_the_library_loads_nothing_from_scripts_or_tests():
    outside = _modules_outside()
    assert {"cog_local", "repofiles"} <= outside, "the scripts and tests were not read"
    found = {
        module_name(p): lines
        for p in sorted(PACKAGE.rglob("*.py"))
        if (lines := loads_from_outside(p, outside, module_name(p)))
    }
    assert found == {}
