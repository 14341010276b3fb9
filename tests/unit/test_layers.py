"""Who may import whom (docs/architecture.md): every `towerlab` import in the package, function-level ones too,
points down the layers. A new arrow up or sideways fails here with the file and line."""

from __future__ import annotations

import ast
from pathlib import Path

import towerlab

ROOT = Path(towerlab.__file__).parent
ALLOWED = {
    "util": set(),
    "registry": {"util"},
    "config": {"registry", "util"},
    "hub": {"config", "util"},
    "data": {"config", "hub", "registry", "util"},  # data knows no model
    "models": {"config", "hub", "registry", "util"},
    "losses": {"config", "registry", "util"},  # tensors in, named terms out
    "eval": {"config", "util"},
    "tracking": {"config", "util"},  # a sink: nothing below the loop imports it
    "train": {"config", "hub", "registry", "util", "data", "models", "losses", "eval", "tracking"},
    "sweep": {"config", "hub", "registry", "util", "data", "models", "losses", "eval", "tracking", "train"},
    "cluster": {"config", "util"},
    "cli": {"config", "hub", "registry", "util", "data", "models", "losses", "eval", "tracking", "train", "sweep",
            "cluster"},
}


def _imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "towerlab":
            parts = node.module.split(".")
            for alias in node.names:  # `from towerlab import losses` names the layer in the alias
                yield node.lineno, parts[1] if len(parts) > 1 else alias.name
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "towerlab" and len(parts) > 1:
                    yield node.lineno, parts[1]


def _layer(path: Path) -> str:
    return path.relative_to(ROOT).parts[0].removesuffix(".py")


def test_every_module_belongs_to_a_layer():
    layers = {_layer(p) for p in ROOT.rglob("*.py")} - {"__init__"}
    assert layers <= set(ALLOWED), f"new top-level module(s) {layers - set(ALLOWED)}: give them a place in ALLOWED"


def test_imports_point_down():
    wrong = []
    for path in sorted(ROOT.rglob("*.py")):
        layer = _layer(path)
        if layer == "__init__":
            continue
        for line, target in _imports(path):
            if target != layer and target not in ALLOWED[layer]:
                wrong.append(f"{path.relative_to(ROOT)}:{line} imports towerlab.{target}")
    assert not wrong, "imports that point up or sideways:\n" + "\n".join(wrong)


def test_the_checker_sees_function_level_imports(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from towerlab.cli import main\n    import towerlab.train.driver\n")
    assert list(_imports(f)) == [(2, "cli"), (3, "train")]
