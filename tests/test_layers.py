"""The package's layers point one way: each module imports only gb10exp modules of its own layer or the
layers above it (README, Layout), and no backend imports another. Read from the source (every import
statement, at module level or inside a function), so a shortcut that would tie two layers together fails here."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "gb10exp"
# Top to bottom: a module may import from its own layer and from the layers before it.
LAYERS = [
    {"config"},
    {"hardware", "utils", "isolation"},
    {"models"},
    {"data"},
    {"tracking"},
    {"quant"},
    {"evaluate"},
    {"bench"},
    {"backends"},
    {"report"},
    {"preflight", "runner"},
    {"__main__"},
]


def _top(module: str) -> str:
    return module.split(".")[1] if module.startswith("gb10exp.") else ""


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
    return {m for m in found if m.startswith("gb10exp.")}


def _layer(name: str) -> int:
    return next(i for i, layer in enumerate(LAYERS) if name in layer)


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        yield path, parts


def test_every_module_has_a_layer():
    assert {parts[0] for _, parts in _modules() if parts[0] != "__init__"} <= set().union(*LAYERS)


def test_imports_point_up_the_layers():
    wrong = []
    for path, parts in _modules():
        if parts[0] == "__init__":
            continue
        mine = _layer(parts[0])
        for target in _imports(path):
            top = _top(target)
            if top and top in set().union(*LAYERS) and _layer(top) > mine:
                wrong.append(f"{'/'.join(parts)}.py imports {target} (layer {_layer(top)} below its {mine})")
    assert wrong == [], "\n".join(sorted(set(wrong)))


def test_backends_do_not_import_each_other():
    names = {p.name for p in (PACKAGE / "backends").iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    wrong = []
    for path, parts in _modules():
        if parts[0] != "backends" or len(parts) < 3:
            continue
        for target in _imports(path):
            pieces = target.split(".")
            if len(pieces) > 2 and pieces[1] == "backends" and pieces[2] in names and pieces[2] != parts[1]:
                wrong.append(f"{'/'.join(parts)}.py imports {target}")
    assert names >= {"hf", "llamacpp", "openai", "trtllm"}
    assert wrong == [], "\n".join(sorted(set(wrong)))
