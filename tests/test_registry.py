"""The shared name → function registry behind estimators, losses, operators and backends."""

import pytest

from ibpo_lab.advantages import ESTIMATORS
from ibpo_lab.correct import OPERATORS, get_operator
from ibpo_lab.losses import LOSSES
from ibpo_lab.registry import Registry
from ibpo_lab.sampling import SAMPLERS


def test_register_get_and_names():
    reg = Registry("widget")

    @reg.register("b")
    def b():
        return 2

    reg.register("a")(len)
    assert reg.get_registered("b") is b and reg.names() == ["a", "b"]
    reg.register("b")(b)  # the same object again is fine
    with pytest.raises(ValueError, match="widget 'b' registered twice"):
        reg.register("b")(len)
    with pytest.raises(ValueError, match="unknown widget 'c'; known widgets: a, b"):
        reg.get_registered("c")
    with pytest.raises(ValueError, match="widget name must be a non-empty string"):
        reg.register("")


def test_library_registries_share_it():
    for reg, name in ((ESTIMATORS, "ibpo"), (LOSSES, "gspo"), (OPERATORS, "splice"), (SAMPLERS, "hf")):
        assert isinstance(reg, Registry) and name in reg.names()
    with pytest.raises(ValueError, match="unknown operator 'nope'; known operators: .*oracle"):
        get_operator("nope")
