"""The recipe reference (docs/recipes.md): current with the schema, complete, and its meanings read correctly."""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field
from typing import Literal, Optional

from omegaconf import DictConfig, OmegaConf

from towerlab.config import Recipe, Variant
from towerlab.cli import main
from towerlab.cli.train import recipe_reference
from towerlab.config.reference import field_doc, render, type_text, value_text
from towerlab.registry import Registry


def test_docs_recipes_md_is_current(repo_root):
    written = (repo_root / "docs" / "recipes.md").read_text()
    if written != recipe_reference():
        import difflib

        diff = difflib.unified_diff(written.splitlines(), recipe_reference().splitlines(), "docs/recipes.md", "recipe_reference()", n=0,
                                    lineterm="")
        raise AssertionError("docs/recipes.md is stale: run `make docs`\n" + "\n".join(list(diff)[:40]))


def _leaf_keys(node: DictConfig, prefix: str = "") -> set[str]:
    """Every leaf key of a structured config, walked with OmegaConf (not with the reference's own walk)."""
    keys = set()
    for key in node.keys():
        child = node._get_node(key)
        element = getattr(child._metadata, "element_type", None)
        if isinstance(child, DictConfig) and OmegaConf.get_type(child) not in (dict, None):
            keys |= _leaf_keys(child, f"{prefix}{key}.")  # a nested dataclass
        elif isinstance(child, DictConfig) and dataclasses.is_dataclass(element):
            keys |= _leaf_keys(OmegaConf.structured(element), f"{prefix}{key}.<NAME>.")  # e.g. evals.NAME
        else:
            keys.add(f"{prefix}{key}")
    return keys


def test_every_schema_key_is_in_the_reference():
    from towerlab.losses import LOSSES

    keys = _leaf_keys(OmegaConf.structured(Recipe))
    assert {"data.augment.flip", "evals.<NAME>.chunk", "train.zero_stage", "presets"} <= keys  # the walk reaches
    keys.discard("loss")  # a variant section: its keys are each loss family's
    for entry in LOSSES:
        keys |= _leaf_keys(OmegaConf.structured(entry.config), "loss.")
    assert "loss.label_smoothing" in keys and "loss.temperature_init" in keys
    text = recipe_reference()
    missing = sorted(k for k in keys if f"| `{k}` |" not in text)
    assert not missing, f"keys of the schema missing from the reference: {missing}"


def test_each_loss_family_lists_its_own_keys_in_its_section():
    from towerlab.losses import LOSSES
    from towerlab.losses.base import LossConfig

    base = {f.name for f in dataclasses.fields(LossConfig)}
    sections = recipe_reference().split("\n### `loss.name: ")
    by_name = {s.split("`", 1)[0]: s.split("\n## ", 1)[0] for s in sections[1:]}
    assert sorted(by_name) == LOSSES.names()
    for entry in LOSSES:
        own = {f.name for f in dataclasses.fields(entry.config)} - base
        missing = [k for k in own if f"| `loss.{k}` |" not in by_name[entry.name]]
        assert not missing, f"loss {entry.name}: {missing} not in its section"
    # a family that only changes a default lists it with the new default
    assert "| `loss.temperature_init` | float | `0.02` |" in by_name["sdm"]
    assert "`loss.bias_init`" in by_name["siglip"] and "`loss.bias_init`" not in by_name["clip"]


def test_name_keys_list_their_choices():
    from towerlab.losses import LOSSES
    from towerlab.models import archs
    from towerlab.train.evaluate import EVALUATORS

    rows = {line.split("`")[1]: line for line in recipe_reference().splitlines() if line.startswith("| `")}
    for key, names in (("loss.name", LOSSES.names()), ("model.arch", archs().names()),
                       ("evals.<NAME>.type", EVALUATORS.names())):
        assert "one of " + ", ".join(f"`{n}`" for n in names) in rows[key]


# A schema of its own, to check what the reference reads from source: docstrings, trailing comments, inheritance,
# enums, nested and named sections, and a variant section.

class Colour(enum.Enum):
    red = "red"
    blue = "blue"


class Stage(enum.Enum):
    LOW = "low"  # a recipe writes the value
    HIGH = 2  # a value that is not a string: the name


@dataclass
class Inner:
    depth: int = 3
    """How deep | it goes, in <levels>."""


@dataclass
class ToyLoss:
    name: str = "a"
    lr: float = 1e-3
    """Peak learning rate.

    A second paragraph."""
    warm: int = 5  # steps of warm-up
    bare: str = ""
    # a comment line above a field belongs to no field
    colour: Colour = Colour.blue
    sizes: list[int] = field(default_factory=lambda: [1, 2])
    limit: Optional[float] = None  # no limit: null


@dataclass
class ToyA(ToyLoss):
    lr: float = 2e-3


@dataclass
class ToyB(ToyLoss):
    name: str = "b"
    extra: bool = True
    """Only B has it."""


@dataclass
class Toy:
    title: str = "t"  # what it is called
    inner: Inner = field(default_factory=Inner)
    loss: object = None
    named: dict[str, Inner] = field(default_factory=dict)
    """Entries by name."""


def test_meanings_docstring_then_trailing_comment_then_empty():
    assert field_doc(ToyLoss, "lr") == "Peak learning rate.\n\nA second paragraph."
    assert field_doc(ToyLoss, "warm") == "steps of warm-up"
    assert field_doc(ToyLoss, "bare") == ""
    assert field_doc(ToyLoss, "colour") == ""  # the comment line above it is not its meaning
    assert field_doc(ToyA, "lr") == "Peak learning rate.\n\nA second paragraph."  # inherited along the MRO
    assert field_doc(ToyB, "extra") == "Only B has it."


def test_types_and_defaults_as_a_recipe_writes_them():
    assert type_text(Colour) == "one of `red`, `blue`"
    assert type_text(Stage) == "one of `low`, `HIGH`" and value_text(Stage.LOW) == "low"
    assert type_text(Literal["x", 2]) == "one of `x`, `2`"
    assert type_text(Optional[float]) == "float or null"
    assert type_text(list[int]) == "list of int"
    assert type_text(dict[str, Inner]) == "mapping of str to section"
    assert [value_text(v) for v in (Colour.blue, None, True, "", [1, 2], {})] == ["blue", "null", "true", '""',
                                                                                 "[1, 2]", "{}"]


def test_render_of_a_toy_schema():
    reg: Registry = Registry("toy loss")
    reg.register("a", config=ToyA)(lambda cfg: None)
    reg.register("b", config=ToyB)(lambda cfg: None)
    text = render(Toy, [Variant("loss", "name", registry=reg)], {"loss.name": ["a", "b"]})
    lines = text.splitlines()
    assert "| `title` | str | `t` | what it is called |" in lines
    assert "| `inner.depth` | int | `3` | How deep \\| it goes, in \\<levels>. |" in lines
    assert "| `named.<NAME>.depth` | int | `3` | How deep \\| it goes, in \\<levels>. |" in lines
    assert "Entries by name." in lines
    common, a, b = text.split("### `loss.name: ")[0], *text.split("### `loss.name: ")[1:]
    assert "| `loss.name` | str: one of `a`, `b` | `a` |  |" in common
    assert "| `loss.lr` | float | `0.001` | Peak learning rate. A second paragraph. |" in common
    assert "| `loss.colour` | one of `red`, `blue` | `blue` |  |" in common
    assert "| `loss.sizes` | list of int | `[1, 2]` |  |" in common
    assert "| `loss.limit` | float or null | `null` | no limit: null |" in common
    assert "| `loss.lr` | float | `0.002` | Peak learning rate. A second paragraph. |" in a  # a changed default
    assert "`loss.extra`" not in a and "| `loss.extra` | bool | `true` | Only B has it. |" in b
    assert "`loss.lr`" not in b and "`loss.name`" not in b


def test_write_replaces_the_file(tmp_path, capsys):
    out = tmp_path / "recipes.md"
    out.write_text("old")
    assert main(["recipes", "reference", "--write", str(out)]) == 0
    assert out.read_text() == recipe_reference()
    assert [p.name for p in tmp_path.iterdir()] == ["recipes.md"]  # no temporary file left behind
