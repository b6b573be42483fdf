"""The module boundaries, checked by reading every import (static: no module is run).

- ``mm`` is a library: it imports nothing of ``vmm``.
- ``vmm/kvm_abi.py`` mirrors <linux/kvm.h>: it imports nothing of the project.
- Nothing imports the command line (``vmm.cli``); only entry points call it.
- Imports sit at the top of a module. The CLI's table of per-command modules
  defers whole commands (so ``vmm run`` loads only what it uses); the few
  modules below defer one heavy import each, for the reason given, and no
  other module may.
- No ``except ImportError`` around in-tree modules: the tree is always whole.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("mm", "vmm")
#: module -> why it may import inside a function (nothing else may).
DEFERRED_IMPORTS_ALLOWED = {
    "mm.physmem": "numpy only when someone reads tables or gathers words: guest RAM is this class, and a "
                  "plain `vmm run` only reads and writes bytes (fast start)",
    "vmm.bench.child": "it times the imports of a fresh `vmm run` process",
    "vmm.boot": "mm and numpy build a boot plan only on a kernel-cache miss (fast start)",
    "vmm.guest_build": "subprocess only when cargo or rustup must run (fast start)",
    "vmm.commands.memmap": "rich and the snapshot reader only when asked (`vmm memmap --json` stays light)",
    "vmm.vm": "mm decodes a restored guest's memory map only when something inspects it (fast start)",
    "vmm.diagnostics": "capstone and mm's walker (numpy) only when a fault is reported (fast start)",
    "vmm.commands.run_full": "the inspector (numpy, rich) and the PNG writer only with --inspect, --control or "
                             "--screenshot: `vmm run --save/--restore` starts as light as a plain run",
    "vmm.gdbstub.cli": "the debugger (mm's walker, numpy, the inspector's views) only with --gdb: every run with "
                       "a feature option checks the gdb options",
    "vmm.cli": "each command's option modules only when that command is parsed; importlib.metadata only "
               "for --version (fast start)",
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def _resolve(module: str, path: Path, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    base = package[: len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


class _Imports(ast.NodeVisitor):
    """(imported module, line, at top level?, inside a try that catches ImportError?)."""

    def __init__(self, module: str, path: Path):
        self.module, self.path = module, path
        self.found: list[tuple[str, int, bool, bool]] = []
        self._depth = 0
        self._guarded = 0

    def _add(self, name: str, node: ast.AST) -> None:
        self.found.append((name, node.lineno, self._depth == 0, self._guarded > 0))

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(alias.name, node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = _resolve(self.module, self.path, node)
        if base == "__future__":
            return
        self._add(base, node)
        for alias in node.names:  # `from . import kvm_abi` imports a module
            self._add(f"{base}.{alias.name}", node)

    def _scope(self, node: ast.AST) -> None:
        self._depth += 1
        self.generic_visit(node)
        self._depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_ClassDef = visit_Lambda = _scope

    def visit_If(self, node: ast.If) -> None:
        if isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            return  # annotations only
        self.generic_visit(node)

    def visit_Try(self, node: ast.Try) -> None:
        catches = any(
            h.type is not None and any(
                isinstance(n, ast.Name) and n.id in ("ImportError", "ModuleNotFoundError") for n in ast.walk(h.type))
            for h in node.handlers
        )
        self._guarded += catches
        for stmt in node.body:
            self.visit(stmt)
        self._guarded -= catches
        for part in (*node.handlers, *node.orelse, *node.finalbody):
            self.visit(part)


def _imports() -> dict[str, list[tuple[str, int, bool, bool]]]:
    out = {}
    for module, path in _modules().items():
        v = _Imports(module, path)
        v.visit(ast.parse(path.read_text(), str(path)))
        out[module] = v.found
    return out


IMPORTS = _imports()


def _in_tree(name: str) -> bool:
    return name.split(".")[0] in PACKAGES


def _is(name: str, target: str) -> bool:
    return name == target or name.startswith(target + ".")


def test_the_checker_sees_the_tree():
    # A checker that finds nothing passes everything: make sure it reads real imports.
    assert len(IMPORTS) > 50
    assert any(_is(n, "vmm.kvm_abi") for n, *_ in IMPORTS["vmm.kvm"])
    assert any(_is(n, "mm.mapper") for n, *_ in IMPORTS["vmm.boot_plan"])
    assert any(not top for _n, _line, top, _g in IMPORTS["vmm.bench.child"])  # the allowed exception


def test_mm_imports_nothing_of_vmm():
    bad = [f"{m}:{line} imports {n}" for m, found in IMPORTS.items() if _is(m, "mm")
           for n, line, _top, _g in found if _is(n, "vmm")]
    assert not bad, bad


def test_kvm_mirror_imports_nothing_of_the_project():
    bad = [f"vmm.kvm_abi:{line} imports {n}" for n, line, _top, _g in IMPORTS["vmm.kvm_abi"] if _in_tree(n)]
    assert not bad, bad


def test_nothing_imports_the_cli():
    bad = [f"{m}:{line} imports {n}" for m, found in IMPORTS.items() if m != "vmm.cli"
           for n, line, _top, _g in found if _is(n, "vmm.cli")]
    assert not bad, bad


def test_imports_are_at_the_top():
    bad = [f"{m}:{line} imports {n} inside a function" for m, found in IMPORTS.items()
           if m not in DEFERRED_IMPORTS_ALLOWED for n, line, top, _g in found if not top]
    assert not bad, bad


def test_no_import_guards_around_the_tree():
    bad = [f"{m}:{line} guards the import of {n}" for m, found in IMPORTS.items()
           for n, line, _top, guarded in found if guarded and _in_tree(n)]
    assert not bad, bad


@pytest.mark.parametrize("source,expected", [
    ("def f():\n    import os\n", [("os", 2, False, False)]),
    ("try:\n    from mm import walker\nexcept ImportError:\n    pass\n", [("mm", 2, True, True), ("mm.walker", 2, True, True)]),
    ("from . import kvm_abi\n", [("vmm", 1, True, False), ("vmm.kvm_abi", 1, True, False)]),
    ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .x import Y\n", [("typing", 1, True, False), ("typing.TYPE_CHECKING", 1, True, False)]),
])
def test_checker_on_examples(source, expected):
    v = _Imports("vmm.kvm", ROOT / "vmm" / "kvm.py")
    v.visit(ast.parse(source))
    assert v.found == expected
