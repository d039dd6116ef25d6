"""The top-level lazy API: every advertised name resolves to the object its module owns."""

import importlib

import pytest

import ibpo_lab


@pytest.mark.parametrize("name", sorted(ibpo_lab._EXPORTS))
def test_export_resolves_to_module_attribute(name):
    mod = importlib.import_module(f"ibpo_lab.{ibpo_lab._EXPORTS[name]}")
    assert getattr(ibpo_lab, name) is getattr(mod, name)


@pytest.mark.parametrize("name", sorted(ibpo_lab._SUBMODULES))
def test_submodules_import(name):
    assert getattr(ibpo_lab, name).__name__ == f"ibpo_lab.{name}"


def test_unknown_attribute_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no_such_thing"):
        ibpo_lab.no_such_thing
