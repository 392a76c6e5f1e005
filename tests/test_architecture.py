"""The structure ARCHITECTURE.md describes, checked: imports go only downward (the import-linter
contracts of pyproject.toml), no module import cycle, no function-level `moe_lm` import, thin entry
points, small files, a MoE layer that asks its backend nothing, no test doubles in the package."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parents[1]
SOURCE_DIRS = (ROOT / "moe_lm", ROOT / "kernels")
ENTRY_MAX_LINES = 60


def source_files() -> list[Path]:
    """Every .py file of the package and of kernels/ (moe_lm/kernels and moe_lm/conf are links)."""
    files = []
    for top in SOURCE_DIRS:
        for dirpath, dirnames, filenames in os.walk(top):  # os.walk does not follow the links
            dirnames[:] = [d for d in dirnames if d != "__pycache__"]
            files += [Path(dirpath) / f for f in filenames if f.endswith(".py")]
    return sorted(files)


def layers_contract() -> dict:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    return next(c for c in config["contracts"] if c["type"] == "layers")


def entry_modules() -> list[Path]:
    """The top layer of the contract (`moe_lm/<command>.py`) and `python -m moe_lm.launch`."""
    names = [n.strip() for n in layers_contract()["layers"][0].split("|")]
    return [ROOT / "moe_lm" / f"{n}.py" for n in names] + [ROOT / "moe_lm/launch/__main__.py"]


def test_import_linter_contracts_hold():
    """`lint-imports` in the repository root reads the contracts of pyproject.toml."""
    lint = Path(sys.executable).with_name("lint-imports")
    # import-linter reads the package from the source tree, where kernels/ and conf/ sit beside
    # moe_lm/ (they install inside it): the links (gitignored) give it the installed layout
    for name in ("kernels", "conf"):
        link = ROOT / "moe_lm" / name
        if not link.exists():
            link.symlink_to(Path("..") / name)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([str(lint), "--no-cache"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    assert "0 broken" in proc.stdout


def test_the_contract_names_every_entry_point():
    """A `moe_lm/<x>.py` runnable with `python -m` belongs in the top layer, so it stays thin."""
    runnable = [p for p in (ROOT / "moe_lm").glob("*.py")
                if 'if __name__ == "__main__":' in p.read_text()]
    assert sorted(runnable) == sorted(entry_modules()[:-1])


def test_entry_modules_are_thin():
    long = {p.relative_to(ROOT).as_posix(): n for p in entry_modules()
            if (n := len(p.read_text().splitlines())) >= ENTRY_MAX_LINES}
    assert not long, f"entry modules of {ENTRY_MAX_LINES} lines or more: {long}; move the logic " \
                     "into the package that holds it"


def function_level_imports(path: Path, root: Path = ROOT) -> list[str]:
    """`file:line import` for each import of moe_lm (or a relative one) inside a def or class."""
    found = []

    def visit(node: ast.AST, nested: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = nested or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda,
                                                 ast.ClassDef))
            names = []
            if isinstance(child, ast.ImportFrom):
                if child.level or (child.module or "").split(".")[0] == "moe_lm":
                    names = ["." * child.level + (child.module or "")]
            elif isinstance(child, ast.Import):
                names = [a.name for a in child.names if a.name.split(".")[0] == "moe_lm"]
            if nested and names:
                found.append(f"{path.relative_to(root)}:{child.lineno} {names[0]}")
            visit(child, inner)

    visit(ast.parse(path.read_text()), False)
    return found


def test_no_function_level_moe_lm_imports():
    found = [hit for path in source_files() for hit in function_level_imports(path)]
    assert not found, "function-level moe_lm imports (they hide cycles): " + ", ".join(found)


def test_the_ast_check_sees_a_nested_import(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("import moe_lm.config\n\ndef f():\n    if True:\n"
                   "        from moe_lm.data import prepare\n\nclass C:\n    from . import x\n")
    hits = function_level_imports(src, tmp_path)
    assert [h.split(" ", 1)[1] for h in hits] == ["moe_lm.data", "."]


def test_no_module_import_cycles():
    """Strongly connected components of the module import graph (function-level imports count)."""
    graph = grimp.build_graph("moe_lm", cache_dir=None)
    edges = {m: graph.find_modules_directly_imported_by(m) for m in graph.modules}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def connect(v: str) -> None:  # Tarjan; the package is small enough for recursion
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for module in sorted(edges):
        if module not in index:
            connect(module)
    assert not cycles, f"import cycles: {cycles}"


MAX_FILE_LINES = 400


def test_no_source_file_over_400_lines():
    long = [f"{p.relative_to(ROOT)} ({n})" for p in source_files()
            if (n := len(p.read_text().splitlines())) > MAX_FILE_LINES]
    assert not long, f"split these files (over {MAX_FILE_LINES} lines): {', '.join(long)}"


def calls_named(path: Path, name: str) -> list[int]:
    """Lines of `path` that call the builtin `name` (e.g. hasattr)."""
    tree = ast.parse(path.read_text())
    return [node.lineno for node in ast.walk(tree)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
            and node.func.id == name]


def test_the_moe_layer_asks_its_backend_and_dispatcher_nothing():
    # every backend implements ExpertBackend in full: capabilities are methods, not probes
    for name in ("hasattr", "getattr"):
        assert not calls_named(ROOT / "moe_lm/model/moe.py", name), name


def test_no_test_doubles_in_the_package():
    found = []
    for path in source_files():
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            found += [f"{path.relative_to(ROOT)}:{node.lineno}" for n in names
                      if n == "unittest" or n.startswith("unittest.")]
    assert not found, f"unittest.mock belongs in tests, not the package: {found}"
