"""Whole two-tower checkpoints as a starting point: `model.pretrained: hf:DIR | hf:HUB_ID | open_clip:ARCH:FILE`
(an hf: folder holds a transformers CLIPModel or SiglipModel).

Two steps, because the recipe must know the architecture before anything is built (the data pipeline sizes images
and picks the tokenizer from it, the planner counts parameters): `configure` rewrites the recipe's model section
from the checkpoint's own configuration (sizes, activation, text pooling, image mean/std), and `load_into` copies
the weights, mapped by models/adapters.py, into the ContrastiveModel built from that section. The model's own
tokenizer is data/tokenizer.py's HFTokenizer on the same `hf:` name.

An OpenCLIP ARCH is a model config JSON file, or the name of one shipped with the `open_clip` package
(model_configs/ARCH.json, read as a file: importing open_clip needs torchvision, which towerlab does not install).
FILE is a state dict (.safetensors, or a torch file read with weights_only=True). OpenCLIP's tokenizers are not
Hugging Face ones, so an open_clip import trains with the data's word vocabulary unless model.text.pretrained names
one (`text_cfg.hf_tokenizer_name` is refused as an unknown option).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch
from torch import nn

from towerlab.config.errors import ConfigError
from towerlab.config.schema import ModelConfig
from towerlab.hub import hf_call, parse, resolve_hf
from towerlab.models import adapters

KEY = "model.pretrained"
LOADERS = ("hf", "open_clip")


def _hf_preprocessor(name: str) -> dict | None:
    """The image processor's settings (preprocessor_config.json) read as JSON: transformers' processor classes may
    want torchvision."""
    from transformers.utils import cached_file

    try:
        path = cached_file(resolve_hf(name), "preprocessor_config.json", _raise_exceptions_for_missing_entries=False)
    except OSError:
        return None
    return json.loads(Path(path).read_text()) if path else None


def _hf_config(name: str):
    from transformers import AutoConfig

    cfg = hf_call(AutoConfig, name, KEY)
    adapters.check_hf_config(cfg, f"{KEY}=hf:{name}")
    return cfg


def _open_clip_parts(name: str) -> tuple[str, Path]:
    arch, sep, file = name.partition(":")
    if not sep or not arch or not file:
        raise ConfigError(f"{KEY}=open_clip:{name}: write open_clip:ARCH:FILE (ARCH an OpenCLIP model config name "
                          "or JSON file, FILE its state dict)")
    if not Path(file).expanduser().is_file():
        raise ConfigError(f"{KEY}=open_clip:{name}: no file {file}")
    return arch, Path(file).expanduser()


def open_clip_model_config(arch: str) -> dict:
    """An OpenCLIP model config: a JSON file, or open_clip's own model_configs/ARCH.json."""
    p = Path(arch).expanduser()
    if p.suffix == ".json":
        if not p.is_file():
            raise ConfigError(f"{KEY}: no OpenCLIP model config {p}")
        return json.loads(p.read_text())
    spec = importlib.util.find_spec("open_clip")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"{KEY}: OpenCLIP model config '{arch}' needs `pip install --no-deps open-clip-torch`, "
                          "or give the config's JSON file")
    f = Path(list(spec.submodule_search_locations)[0]) / "model_configs" / f"{arch}.json"
    if not f.is_file():
        raise ConfigError(f"{KEY}: OpenCLIP has no model config '{arch}' (see open_clip's model_configs/)")
    return json.loads(f.read_text())


def configure(model: ModelConfig) -> None:
    """Rewrite `model`'s sizes and options from the checkpoint `model.pretrained` names."""
    loader, name = parse(model.pretrained, KEY, LOADERS)
    if model.vision.pretrained or model.text.pretrained:
        raise ConfigError(f"{KEY} with model.vision.pretrained or model.text.pretrained: a whole checkpoint "
                          "already holds both towers; set one or the other")
    if loader == "hf":
        adapters.model_config_from_hf(_hf_config(name), _hf_preprocessor(name), model)
    else:
        arch, _ = _open_clip_parts(name)
        adapters.model_config_from_open_clip(open_clip_model_config(arch), model, f"{KEY}=open_clip:{name}")


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    sd = torch.load(path, map_location="cpu", weights_only=True)
    return sd.get("state_dict", sd) if isinstance(sd, dict) else sd


def _hf_file(name: str, filename: str) -> str | None:
    from transformers.utils import cached_file

    try:
        return cached_file(resolve_hf(name), filename, _raise_exceptions_for_missing_entries=False)
    except OSError as e:
        raise ConfigError(f"{KEY}=hf:{name}: cannot read {filename} ({str(e).splitlines()[0]})") from None


def hf_state_dict(name: str) -> dict[str, torch.Tensor]:
    """A save_pretrained folder's (or Hub model's) weights, read from its files: model.safetensors, its sharded
    index, or pytorch_model.bin. Not through CLIPModel.from_pretrained: under ZeRO-3 this runs inside
    deepspeed.zero.Init, which would partition a transformers model built there, and whose patched tensor
    constructors break transformers' first import of its modelling code (torch._dynamo's polyfills)."""
    path = _hf_file(name, "model.safetensors")
    if path:
        return _read_state_dict(Path(path))
    index = _hf_file(name, "model.safetensors.index.json")
    if index:
        sd: dict[str, torch.Tensor] = {}
        for shard in sorted(set(json.loads(Path(index).read_text())["weight_map"].values())):
            sd.update(_read_state_dict(Path(_hf_file(name, shard) or shard)))
        return sd
    path = _hf_file(name, "pytorch_model.bin")
    if path:
        return _read_state_dict(Path(path))
    raise ConfigError(f"{KEY}=hf:{name}: no model.safetensors or pytorch_model.bin: not a save_pretrained folder")


def load_into(model: nn.Module, spec: str) -> None:
    """Copy the checkpoint's weights into `model` (a ContrastiveModel built from the configured section)."""
    loader, name = parse(spec, KEY, LOADERS)
    if loader == "hf":
        cfg = _hf_config(name)  # refuses a checkpoint towerlab cannot express before its weights are read
        from_hf = adapters.from_hf_siglip if cfg.model_type == "siglip" else adapters.from_hf_clip
        sd = from_hf(hf_state_dict(name))
    else:
        _, file = _open_clip_parts(name)
        sd = adapters.from_open_clip(_read_state_dict(file))
    adapters.load_mapped(model, sd, f"{KEY}={spec}")


def spec_of(target: str) -> str | None:
    """The `model.pretrained` spec of a model (not a run) that `towerlab eval` was given: hf:NAME or
    open_clip:ARCH:FILE as written, or a directory holding an OpenCLIP export (open_clip_config.json and its
    weights) or a transformers save_pretrained folder (config.json); None for anything else (a run or checkpoint)."""
    if target.startswith(tuple(f"{loader}:" for loader in LOADERS)):
        return target
    p = Path(target).expanduser()
    if not p.is_dir():
        return None
    if (p / "open_clip_config.json").is_file():
        for name in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin", "open_clip_pytorch_model.pth"):
            if (p / name).is_file():
                return f"open_clip:{p.absolute() / 'open_clip_config.json'}:{p.absolute() / name}"
        raise ConfigError(f"{p}: open_clip_config.json but no open_clip_model.safetensors beside it")
    if (p / "config.json").is_file():
        return f"hf:{p.absolute()}"
    return None
