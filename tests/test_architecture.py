"""Which package may import which (``docs/architecture.md``), checked on the source itself.

Every ``import`` and ``from ... import`` statement of the packages is read with ``ast``, lazy ones
inside functions included, so a shortcut taken in a function body counts as much as one at the top.
"""
from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("core", "presets", "data_utils", "decoding", "training", "launcher", "packlora")
# A package may import these of the others (the layers of docs/architecture.md), nothing else.
ALLOWED = {
    "core": set(),
    "presets": {"core"},
    "data_utils": {"core", "presets"},
    "decoding": {"core", "data_utils", "presets"},
    "training": {"core", "data_utils", "presets"},
    "launcher": {"core", "data_utils", "training"},
    "packlora": {"core", "presets", "data_utils", "decoding", "training", "launcher"},
}


def _package_name(name: str) -> str:
    """``packlora.training.model`` -> ``training.model``: the folder a subpackage of packlora lives in.
    ``packlora``'s own modules (``packlora.cli``) keep their name."""
    parts = name.split(".")
    return ".".join(parts[1:]) if len(parts) > 1 and parts[0] == "packlora" and parts[1] in PACKAGES else name


def _imports(raw: bool = False):
    """``{module: [(imported module, [names]), ...]}`` for every module of the packages, by folder
    (``training.model``); the imported names too, unless ``raw`` (then as written in the source)."""
    out = defaultdict(list)
    name = (lambda n: n) if raw else _package_name
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            module = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Import):
                    out[module] += [(name(alias.name), []) for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    out[module].append((name(node.module), [alias.name for alias in node.names]))
    return out


IMPORTS = _imports()


def test_every_import_of_packlora_code_goes_through_the_one_import_name():
    """``setup.cfg`` installs only ``packlora``: an import of a folder's own name (``training``)
    would find a user's package of that name, or nothing."""
    folders = set(PACKAGES) - {"packlora"} | {"ds_configs"}
    bare = [f"{m}: {t}" for m, imports in _imports(raw=True).items() for t, _ in imports if t.split(".")[0] in folders]
    assert bare == []


def _ours(name: str) -> bool:
    return name.split(".")[0] in PACKAGES


def test_each_package_imports_only_the_layers_below_it():
    wrong = []
    for module, imports in IMPORTS.items():
        package = module.split(".")[0]
        for target, names in imports:
            top = target.split(".")[0]
            if not _ours(target) or top == package:
                continue
            targets = [target] + [f"{target}.{n}" for n in names]  # `from decoding import checkpoint`
            if not any(t == a or t.startswith(a + ".") or a == top for t in targets for a in ALLOWED[package]):
                wrong.append(f"{module} imports {target} {names}")
    assert wrong == []


def test_training_imports_nothing_of_decoding():
    """The checkpoint format both sides share is ``core.checkpoint``; what a training process decodes
    (held-out replies, runaway metrics) is handed to the recipe by the entry point."""
    found = sorted({(m, t) for m, imports in IMPORTS.items() if m.startswith("training")
                    for t, _ in imports if t == "decoding" or t.startswith("decoding.")})
    assert found == []


def test_no_private_name_crosses_a_package():
    crossing = [f"{m}: from {t} import {n}" for m, imports in IMPORTS.items() for t, names in imports
                if _ours(t) and t.split(".")[0] != m.split(".")[0] for n in names if n.startswith("_")]
    assert crossing == []


def test_no_two_modules_import_each_other():
    edges = {(m, t) for m, imports in IMPORTS.items() for t, _ in imports if _ours(t)}
    edges |= {(m, f"{t}.{n}") for m, imports in IMPORTS.items() for t, names in imports if _ours(t) for n in names}
    assert sorted((a, b) for a, b in edges if (b, a) in edges and a < b) == []


@pytest.mark.parametrize("package", PACKAGES)
def test_no_package_imports_another_in_a_circle(package):
    graph = defaultdict(set)
    for m, imports in IMPORTS.items():
        for t, _ in imports:
            if _ours(t) and t.split(".")[0] != m.split(".")[0]:
                graph[m.split(".")[0]].add(t.split(".")[0])
    seen, stack = set(), list(graph[package])
    while stack:
        p = stack.pop()
        if p not in seen:
            seen.add(p)
            stack += graph[p]
    assert package not in seen, f"{package} reaches itself through {sorted(seen)}"
