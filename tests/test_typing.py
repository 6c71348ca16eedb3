"""The type hints of the public API (the package ships py.typed, so they are part of it): every name that
dit8, dit8.kernels and dit8.converters export resolves its hints at run time, and every public function
and method says what it returns and has a docstring."""

import importlib
import inspect
import typing

import pytest

pytestmark = pytest.mark.cpu_only  # introspection only: the same on any machine

PACKAGES = ("dit8", "dit8.kernels", "dit8.converters")


def _public_names(package: str) -> list[str]:
    return [name for name in importlib.import_module(package).__all__ if name != "__version__"]


def _functions(obj: object) -> list[tuple[str, typing.Callable]]:
    """(name, function) of a function, or of a class's own public methods, properties, __init__ and __call__."""
    if not inspect.isclass(obj):
        return [("", obj)] if inspect.isfunction(obj) else []
    found = []
    for name, member in vars(obj).items():
        if name.startswith("_") and name not in ("__init__", "__call__"):
            continue
        if isinstance(member, (staticmethod, classmethod)):
            member = member.__func__
        elif isinstance(member, property):
            member = member.fget
        if inspect.isfunction(member):
            found.append((f".{name}", member))
    return found


EXPORTED = [(package, name) for package in PACKAGES for name in _public_names(package)]


def test_the_packages_export_functions_and_classes():
    # (The checks below would pass vacuously over an empty export list.)
    kinds = {package: {inspect.isclass(getattr(importlib.import_module(package), name))
                       for name in _public_names(package)} for package in PACKAGES}
    assert all(kinds[package] == {True, False} for package in PACKAGES), kinds


@pytest.mark.parametrize("package, name", EXPORTED, ids=[f"{p}.{n}" for p, n in EXPORTED])
def test_each_public_name_has_resolvable_hints_a_return_type_and_a_docstring(package, name):
    obj = getattr(importlib.import_module(package), name)
    if inspect.isclass(obj):
        assert inspect.getdoc(obj), f"{package}.{name} has no docstring"
        typing.get_type_hints(obj)  # fields and class attributes (NameError for a name not imported)
    checked = _functions(obj)
    if not inspect.isclass(obj):
        assert checked or not callable(obj), f"{package}.{name} is callable but not a function"
    for suffix, function in checked:
        where = f"{package}.{name}{suffix}"
        hints = typing.get_type_hints(function)
        parameters = [p for p in inspect.signature(function).parameters.values() if p.name not in ("self", "cls")]
        assert [p.name for p in parameters if p.name not in hints] == [], f"{where}: parameters without a type"
        if function.__name__ != "__init__":  # (a type checker takes __init__ as returning None)
            assert "return" in hints, f"{where} has no return annotation"
            assert function.__doc__, f"{where} has no docstring"
