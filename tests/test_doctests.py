"""The docstring examples of every packlora module, one test per docstring.

Each module is imported by its installed name (``packlora.training.config``). pytest's own
``--doctest-modules`` would import a file of the repository by its folder (``training.config``),
a second copy of the module under the generic top-level name that packlora no longer installs.
The flags are pytest's default for doctests (``ELLIPSIS``).
"""
from __future__ import annotations

import configparser
import doctest
import importlib
import pkgutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _modules() -> list[str]:
    """Every module of the packages that ``setup.cfg`` installs, by installed name (not ``__main__``,
    which runs its command when imported)."""
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    packages = cfg["options"]["packages"].split()
    names = []
    for package in packages:
        names.append(package)
        path = importlib.import_module(package).__path__
        names += [m.name for m in pkgutil.iter_modules(path, package + ".") if not m.ispkg and m.name.rpartition(".")[2] != "__main__"]
    return sorted(set(names))


def _doctests() -> list[doctest.DocTest]:
    finder = doctest.DocTestFinder()
    tests = []
    for name in _modules():
        tests += [t for t in finder.find(importlib.import_module(name), name) if t.examples]
    return sorted(tests, key=lambda t: t.name)


DOCTESTS = _doctests()


@pytest.mark.parametrize("test", DOCTESTS, ids=[t.name for t in DOCTESTS])
def test_docstring_example(test: doctest.DocTest):
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    report: list[str] = []
    runner.run(test, out=report.append)
    assert runner.failures == 0, "".join(report)
