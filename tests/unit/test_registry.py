import pytest

from towerlab.registry import Registry, RegistryError


def test_register_and_build():
    reg = Registry("widget")

    @reg.register("square", help="x*x")
    def square(x):
        return x * x

    assert reg.build("square", 3) == 9
    assert reg.names() == ["square"]
    assert "square" in reg and "cube" not in reg
    assert reg.entry("square").help == "x*x"


def test_unknown_name_lists_valid_and_closest():
    reg = Registry("loss")
    for n in ("clip", "siglip", "dcl"):
        reg.register(n)(n)
    with pytest.raises(RegistryError) as e:
        reg.get("sigclip")
    msg = str(e.value)
    assert "unknown loss 'sigclip'" in msg
    assert "Did you mean 'siglip'?" in msg
    assert "clip, dcl, siglip" in msg


def test_duplicate_registration_refused():
    reg = Registry("x")
    reg.register("a")(1)
    with pytest.raises(RegistryError, match="twice"):
        reg.register("a")(2)
