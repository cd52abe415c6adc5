"""The package's tiers (docs/architecture.md), checked from the source: every import of one of our
modules is parsed, and a module may import only its own tier and the tiers below it. Top-level
imports must not form a cycle, and the golden models must import without amaranth or cocotb."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# folder on disk -> import package (pyproject.toml [tool.setuptools.package-dir])
FOLDERS = {
    "tandem": "tandem",
    "golden": "tandem.golden",
    "rtl": "tandem.rtl",
    "sim": "tandem.sim",
    "gpu": "tandem.gpu",
    "host": "tandem.host",
}

# The tier of each part, and what it may import (besides itself). `defs` are the shared
# definitions in tandem/ (config, checkpoint, tokenizer, numerics, geometry, ISA, layout, register
# map, driver, checks); the compiler lives in tandem/ but sits one tier up.
ALLOWED = {
    "defs": set(),
    "compiler": {"defs"},
    "golden": {"defs"},
    "rtl": {"defs"},
    "gpu": {"defs", "golden"},
    "sim": {"defs", "compiler", "golden", "rtl"},
    "host": {"defs", "compiler", "golden", "rtl", "gpu", "sim"},
}

# Third-party packages a part must not import at all (anywhere in the file).
FORBIDDEN_THIRD_PARTY = {
    "defs": {"amaranth", "cocotb", "cocotbext"},
    "compiler": {"amaranth", "cocotb", "cocotbext", "torch"},
    "golden": {"amaranth", "cocotb", "cocotbext", "torch"},
    "rtl": {"cocotb", "cocotbext", "torch"},
    "gpu": {"amaranth", "cocotb", "cocotbext"},
}


def part_of(module: str) -> str | None:
    """Which part a ``tandem...`` module name belongs to (None: not ours)."""
    if module == "tandem.compiler" or module.startswith("tandem.compiler."):
        return "compiler"
    for pkg, part in (
        ("tandem.golden", "golden"),
        ("tandem.rtl", "rtl"),
        ("tandem.sim", "sim"),
        ("tandem.gpu", "gpu"),
        ("tandem.host", "host"),
    ):
        if module == pkg or module.startswith(pkg + "."):
            return part
    if module == "tandem" or module.startswith("tandem."):
        return "defs"
    return None


def modules() -> dict[str, Path]:
    """Every module of the package: import name -> file."""
    found = {}
    for folder, pkg in FOLDERS.items():
        for path in sorted((ROOT / folder).glob("*.py")):
            name = pkg if path.stem == "__init__" else f"{pkg}.{path.stem}"
            found[name] = path
    return found


def imports(name: str, path: Path) -> list[tuple[str, int, bool]]:
    """(imported module, line, at top level) for every import in the file; relative imports and
    ``from pkg import module`` are resolved to module names."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = name if path.stem == "__init__" else name.rpartition(".")[0]
    top = {id(node) for node in tree.body}
    # imports under `if TYPE_CHECKING:` at top level count as top level for tiers, not for cycles
    out = []
    known = modules()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno, id(node) in top) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join([*base, node.module] if node.module else base)
            else:
                mod = node.module or ""
            for a in node.names:
                sub = f"{mod}.{a.name}"
                out.append((sub if sub in known else mod, node.lineno, id(node) in top))
    return out


def violations() -> list[str]:
    bad = []
    for name, path in modules().items():
        part = part_of(name)
        rel = path.relative_to(ROOT)
        for mod, line, _ in imports(name, path):
            other = part_of(mod)
            if other is None:
                root = mod.split(".")[0]
                if root in FORBIDDEN_THIRD_PARTY.get(part, ()):
                    bad.append(f"{rel}:{line}: {part} imports {root}")
                continue
            if other != part and other not in ALLOWED[part]:
                bad.append(f"{rel}:{line}: {part} ({name}) imports {other} ({mod})")
    return bad


def cycles() -> list[list[str]]:
    """Cycles among our modules through top-level imports (each reported once)."""
    known = modules()
    graph = {
        name: sorted({m for m, _, top in imports(name, path) if top and m in known and m != name})
        for name, path in known.items()
    }
    # a package's submodule imports the package's __init__ implicitly; only explicit edges here
    found, state, stack = [], {}, []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in graph[n]:
            if state.get(m) == 1:
                found.append([*stack[stack.index(m) :], m])
            elif m not in state:
                visit(m)
        stack.pop()
        state[n] = 2

    for n in graph:
        if n not in state:
            visit(n)
    return found


def private_reaches(root: Path | None = None) -> list[str]:
    """``from <our module> import _name`` in any file of the package, scripts/ or tests/, where the
    module is another one: what a second module needs becomes public where it lives."""
    root = root or ROOT
    bad = []
    files = [p for f in [*FOLDERS, "scripts", "tests"] for p in sorted((root / f).rglob("*.py"))]
    for path in files:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if not isinstance(node, ast.ImportFrom):
                continue
            ours = node.level > 0 or (node.module or "").split(".")[0] == "tandem"
            for a in node.names:
                if ours and a.name.startswith("_") and not a.name.startswith("__"):
                    rel = path.relative_to(root)
                    bad.append(f"{rel}:{node.lineno}: imports {a.name} from {node.module}")
    return bad


def test_every_module_has_a_tier():
    mods = modules()
    assert len(mods) > 40
    assert all(part_of(n) in ALLOWED for n in mods)


def test_imports_follow_the_tiers():
    assert violations() == []


def test_no_top_level_import_cycle():
    assert cycles() == []


def test_no_private_imports_across_modules():
    assert private_reaches() == []


def test_the_checker_sees_a_violation_and_a_cycle(tmp_path, monkeypatch):
    """The checks above can fail: a planted upward import and a planted cycle are found."""
    fake = tmp_path / "repo"
    for folder in FOLDERS:
        (fake / folder).mkdir(parents=True)
        (fake / folder / "__init__.py").write_text("")
    (fake / "golden" / "bad.py").write_text("from tandem.host import cli\nimport amaranth\n")
    (fake / "host" / "cli.py").write_text("from . import a\n")
    (fake / "host" / "a.py").write_text("from tandem.host import cli\nfrom .cli import _x\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", fake)
    bad = violations()
    assert any("golden (tandem.golden.bad) imports host" in b for b in bad)
    assert any("golden imports amaranth" in b for b in bad)
    assert cycles() == [["tandem.host.cli", "tandem.host.a", "tandem.host.cli"]]
    (fake / "scripts").mkdir()
    (fake / "tests").mkdir()
    assert private_reaches(fake) == ["host/a.py:2: imports _x from cli"]


@pytest.mark.parametrize("blocked", [("amaranth", "cocotb", "cocotbext", "torch")])
def test_golden_models_import_without_hdl_tools(blocked):
    """tandem.golden and the definitions load in a process where amaranth, cocotb and torch
    cannot be imported."""
    code = (
        "import sys\n"
        f"for m in {blocked!r}: sys.modules[m] = None\n"
        "import tandem.golden.reference, tandem.golden.faithful, tandem.golden.isasim\n"
        "import tandem.compiler, tandem.driver, tandem.layout, tandem.regmap\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
