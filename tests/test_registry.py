"""The one generic registry: decorator registration, collisions, and the unknown-name message."""

from __future__ import annotations

import pytest

from persona_core.registry import Registry, UnknownName


def test_decorator_registers_in_order_and_returns_the_entry():
    reg: Registry = Registry("widget")

    @reg.register("b")
    def b():
        return 2

    reg.add("a", 1)
    assert b() == 2 and reg["b"] is b and reg["a"] == 1
    assert list(reg) == ["b", "a"] and len(reg) == 2 and "a" in reg and "c" not in reg


def test_a_name_registered_twice_is_refused():
    reg: Registry = Registry("widget")
    reg.add("x", 1)
    with pytest.raises(ValueError, match="widget 'x' is registered twice"):
        reg.add("x", 2)
    assert reg["x"] == 1


def test_unknown_name_suggests_and_lists_what_is_available():
    reg: Registry = Registry("mask method")
    reg.add("wanda", 1)
    reg.add("magnitude", 2)
    with pytest.raises(UnknownName) as err:
        reg["wandda"]
    msg = str(err.value)
    assert msg == "unknown mask method 'wandda' (did you mean 'wanda'?); available: wanda, magnitude"
    assert isinstance(err.value, KeyError) and isinstance(err.value, ValueError)
    assert reg.check(["wanda", "zzz"]) == ["unknown mask method 'zzz'; available: wanda, magnitude"]


def test_remove_takes_an_entry_out_and_frees_its_name():
    reg: Registry = Registry("widget")
    reg.add("x", 1)
    assert reg.remove("x") == 1 and "x" not in reg
    reg.add("x", 2)
    with pytest.raises(UnknownName, match="unknown widget 'y'"):
        reg.remove("y")
