"""Every example in a public docstring runs as written, on its own (an empty namespace), and prints
what it shows: the examples are the documentation users copy, so they are tested like code."""

from __future__ import annotations

import doctest
import importlib
import importlib.util
import inspect
import pkgutil

import pytest

OPTIONAL = {"bayesflow.integrations.lightning": "lightning", "bayesflow.integrations.pyro": "pyro",
            "bayesflow.integrations.transformers": "transformers"}
"""Modules whose examples need an optional package (the ``integrations`` extra, installed in CI)."""

MODULES = ("bayesflow", "bayesflow.engine", "bayesflow.sgmcmc", "bayesflow.optim", "bayesflow.ensemble")
"""Packages whose public names are collected first (then every module's ``__all__``)."""


def _public_docstrings():
    """(name, object) for each module of the package, each public object and each preset ``build``
    whose docstring has examples."""
    import bayesflow

    finder = doctest.DocTestFinder(recurse=False)
    seen, found, names = set(), [], list(MODULES)
    for info in pkgutil.walk_packages(bayesflow.__path__, "bayesflow."):
        if info.name == "bayesflow.demo":  # a script: it runs when imported as __main__ only
            continue
        module = importlib.import_module(info.name)
        seen.add(id(module))
        names.append(info.name)
        if any(test.examples for test in finder.find(module, info.name, globs={})):
            found.append((info.name, module))
    for module_name in dict.fromkeys(names):  # every module's public names, the packages' first
        module = importlib.import_module(module_name)
        objects = [(module_name, module)]
        objects += [(f"{module_name}.{name}", getattr(module, name)) for name in getattr(module, "__all__", [])]
        for name, obj in objects:
            if id(obj) in seen:
                continue
            seen.add(id(obj))
            targets = [(name, obj)]
            if inspect.ismodule(obj) and hasattr(obj, "build"):
                targets.append((f"{name}.build", obj.build))
            for target_name, target in targets:
                if any(test.examples for test in finder.find(target, target_name, globs={})):
                    found.append((target_name, target))
    return found


DOCSTRINGS = _public_docstrings()


def test_the_public_api_is_documented_with_examples():
    assert len(DOCSTRINGS) >= 70, [name for name, _ in DOCSTRINGS]


@pytest.mark.parametrize(("name", "obj"), DOCSTRINGS, ids=[name for name, _ in DOCSTRINGS])
def test_docstring_example_runs(name, obj, tmp_path, monkeypatch):
    package = next((pkg for module, pkg in OPTIONAL.items() if name.startswith(module)), None)
    if package is not None and importlib.util.find_spec(package) is None:
        pytest.skip(f"{name} needs {package} (pip install -e '.[integrations]')")
    monkeypatch.chdir(tmp_path)  # examples that save a checkpoint write here
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    report = []
    for test in doctest.DocTestFinder(recurse=False).find(obj, name, globs={}):
        runner.run(test, out=report.append)
    assert runner.failures == 0, "".join(report)
