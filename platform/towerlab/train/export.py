"""Export a towerlab model to the ecosystem's formats: `towerlab export TARGET --format hf|open_clip --out DIR`.

- hf: a directory `transformers.CLIPModel.from_pretrained` loads (config.json, model.safetensors), with the run's
  Hugging Face tokenizer files and a CLIPImageProcessor holding the run's image size, mean and std. A run whose
  tokenizer is the data's word vocabulary is refused: it has no Hugging Face counterpart, and transformers' CLIP
  would read its end-of-text id 2 as OpenAI's "highest id" rule, so the text embeddings could not match.
  Towers in SigLIP's shape (model.vision.pool=map and the other SigLIP options, adapters.SIGLIP_SHAPE) export as a
  `transformers.SiglipModel` instead, with its logit scale and bias, the tokenizer and a SiglipImageProcessor.
  A sigmoid-loss run with CLIP-shaped towers exports as CLIPModel, with a warning; its logit bias is kept in
  config.json as `towerlab_logit_bias`.
- open_clip: open_clip_config.json ({"model_cfg", "preprocess_cfg"}) and open_clip_model.safetensors in OpenCLIP's
  names and shapes: `open_clip.create_model("local-dir:DIR")` loads it. The word vocabulary exports (OpenCLIP's
  eos pooling expresses it) with a warning that OpenCLIP has no tokenizer for it; a Hugging Face tokenizer's
  files are written beside the weights. SigLIP-shaped towers are refused (OpenCLIP's SigLIP models are timm
  towers, not its CLIP layout).

Weights come from `checkpoint.load_model` (ZeRO-3 shards consolidated by zero_to_fp32), mapped by
models/adapters.py. The output is written to a temporary sibling directory and renamed into place; an existing
non-empty DIR is replaced only when towerlab's own marker file (EXPORT_FILE) says towerlab wrote it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from towerlab.config import ConfigError, Recipe
from towerlab.data.pipeline import tokenizer_spec
from towerlab.models import ContrastiveModel
from towerlab.models import adapters

FORMATS = ("hf", "open_clip")
EXPORT_FILE = "towerlab_export.json"  # the marker: which format, from which checkpoint and step


def check_exportable(recipe: Recipe, fmt: str) -> None:
    """Refuse, in one line, a model whose towers or tokenizer have no counterpart in `fmt`."""
    m = recipe.model
    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt}: use one of {', '.join(FORMATS)}")
    for tower, spec in (("vision", m.vision.pretrained), ("text", m.text.pretrained)):
        if spec:
            raise ConfigError(f"model.{tower}.pretrained={spec}: a tower built by transformers/timm has no "
                              f"{fmt} CLIP layout; only towerlab's own ViT and text towers (model.pretrained "
                              "imports included) export")
    if m.signal.dim:
        raise ConfigError(f"model.signal.dim={m.signal.dim}: a signal tower has no counterpart in {fmt}'s "
                          "two-tower CLIP")
    if fmt == "hf" and not tokenizer_spec(recipe):
        raise ConfigError("--format hf: the run's tokenizer is the data's word vocabulary, which has no Hugging "
                          "Face counterpart (and transformers' CLIP reads its end-of-text id 2 as OpenAI's "
                          "'highest id' rule); export it with --format open_clip, or train with a Hugging Face "
                          "tokenizer (model.pretrained: hf:DIR)")
    if fmt == "hf":
        adapters.hf_siglip_config_dict(m) if adapters.is_siglip(m) else adapters.hf_config_dict(m)
    else:
        adapters.open_clip_config(m)


def _prepare_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: a file is there; give a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / EXPORT_FILE).is_file():
        raise ConfigError(f"--out {out}: a non-empty directory towerlab did not write (no {EXPORT_FILE}); give "
                          "a new or empty directory")


def export_model(model: ContrastiveModel, recipe: Recipe, fmt: str, out: str | os.PathLike,
                 source: dict | None = None, warn: Callable[[str], None] = print) -> Path:
    """Write `model` (fp32, towerlab's towers) in `fmt` to `out`; returns the directory."""
    check_exportable(recipe, fmt)
    out = Path(out).absolute()
    _prepare_out(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        (_write_hf if fmt == "hf" else _write_open_clip)(sd, recipe, tmp, warn)
        marker = {"format": fmt, "loss": getattr(recipe.loss, "name", None), **(source or {})}
        (tmp / EXPORT_FILE).write_text(json.dumps(marker, indent=1))
        if out.exists():  # towerlab's own earlier export (checked above): swap it out, then remove it
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _save_tokenizer(recipe: Recipe, path: Path, max_length: int | None = None):
    """The run's Hugging Face tokenizer, saved to `path` (None for the word vocabulary); with `max_length` as its
    model_max_length, so that padding="max_length" (SigLIP's) pads to the run's context length."""
    spec = tokenizer_spec(recipe)
    if not spec:
        return None
    from transformers import AutoTokenizer

    from towerlab.hub import hf_call, parse

    _, name = parse(spec, "tokenizer", ("hf",))
    tok = hf_call(AutoTokenizer, name, "model.pretrained" if recipe.model.pretrained else "model.text.pretrained")
    if max_length is not None:
        tok.model_max_length = max_length
    tok.save_pretrained(path)
    return tok


def _write_hf(sd: dict, recipe: Recipe, path: Path, warn) -> None:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    m = recipe.model
    if adapters.is_siglip(m):
        return _write_hf_siglip(sd, recipe, path, warn)
    kwargs = adapters.hf_config_dict(m)
    if "logit_bias" in sd:
        warn("warning: a sigmoid-loss run exports as transformers' CLIPModel (its towers are CLIP's: a class token, "
             "no attention-pooling head; SigLIP-shaped towers, model.vision.pool=map, export as a SiglipModel); its "
             "logit bias is in config.json as towerlab_logit_bias")
        kwargs["towerlab_logit_bias"] = float(sd["logit_bias"].reshape(()))
    tok = _save_tokenizer(recipe, path)
    if tok is not None and tok.pad_token_id is not None:
        kwargs["text_config"]["pad_token_id"] = int(tok.pad_token_id)
    hf = CLIPModel(CLIPConfig(**kwargs))
    result = hf.load_state_dict(adapters.to_hf_clip(sd), strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("position_ids")]
    if missing or result.unexpected_keys:  # the adapter and transformers disagree: a bug, not a user error
        raise RuntimeError(f"CLIPModel state dict mismatch: missing {missing}, unexpected {result.unexpected_keys}")
    hf.save_pretrained(path)
    s = m.vision.image_size
    CLIPImageProcessor(size={"shortest_edge": s}, crop_size={"height": s, "width": s}, resample=2,  # bilinear
                       image_mean=list(m.vision.mean), image_std=list(m.vision.std)).save_pretrained(path)


def _write_hf_siglip(sd: dict, recipe: Recipe, path: Path, warn) -> None:
    from transformers import SiglipConfig, SiglipImageProcessor, SiglipModel

    m = recipe.model
    kwargs = adapters.hf_siglip_config_dict(m)
    if "logit_bias" not in sd:
        warn("warning: the run has no logit bias (a softmax loss): the SiglipModel's logit_bias is written as 0")
    # SigLIP's text tower pools the last position: its tokenizer must pad to exactly the run's context length
    tok = _save_tokenizer(recipe, path, max_length=m.text.context_length)
    if tok is not None and tok.pad_token_id is not None:
        kwargs["text_config"]["pad_token_id"] = int(tok.pad_token_id)
    hf = SiglipModel(SiglipConfig(**kwargs))
    result = hf.load_state_dict(adapters.to_hf_siglip(sd), strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("position_ids")]
    if missing or result.unexpected_keys:  # the adapter and transformers disagree: a bug, not a user error
        raise RuntimeError(f"SiglipModel state dict mismatch: missing {missing}, unexpected {result.unexpected_keys}")
    hf.save_pretrained(path)
    s = m.vision.image_size
    SiglipImageProcessor(size={"height": s, "width": s}, resample=2,  # bilinear
                         image_mean=list(m.vision.mean), image_std=list(m.vision.std)).save_pretrained(path)


def _write_open_clip(sd: dict, recipe: Recipe, path: Path, warn) -> None:
    from safetensors.torch import save_file

    cfg = adapters.open_clip_config(recipe.model)
    save_file(adapters.to_open_clip(sd), str(path / "open_clip_model.safetensors"))
    (path / "open_clip_config.json").write_text(json.dumps(cfg, indent=1))
    if _save_tokenizer(recipe, path) is None:
        warn("warning: the run's tokenizer is the data's word vocabulary, which OpenCLIP has no tokenizer for: "
             "encode text with towerlab's (the vocabulary is in the dataset's manifest.json)")


def export(target: str, fmt: str, out: str | os.PathLike, tracking_uri: str | None = None,
           warn: Callable[[str], None] = print) -> Path:
    """Export a checkpoint, a run directory's latest checkpoint, or an MLflow run's (ZeRO-3 consolidated)."""
    from towerlab.train.checkpoint import load_model, resolve_target

    _prepare_out(Path(out))  # a destination that cannot be written is refused before anything is read
    t = resolve_target(target, tracking_uri)
    check_exportable(t.recipe, fmt)  # before the weights are read
    model, step = load_model(t.checkpoint, t.recipe)
    return export_model(model, t.recipe, fmt, out, {"checkpoint": str(t.checkpoint), "step": step,
                                                    "mlflow_run_id": t.run_id}, warn)



def model_format(recipe: Recipe) -> str:
    """The format a run's models are logged in: hf where it exports there (a Hugging Face tokenizer), else
    open_clip."""
    try:
        check_exportable(recipe, "hf")
        return "hf"
    except ConfigError:
        return "open_clip"


def log_run_models(run_dir: str | os.PathLike, uri: str, metric: str | None = None, mode: str = "max",
                   warn: Callable[[str], None] = print) -> dict[str, str]:
    """Log a run's last checkpoint, and its best by `metric` (the checkpoint whose step has the best value of it;
    mode max or min), as MLflow LoggedModels of the run, each with the run's eval metrics at its step and the tag
    towerlab.role = last | best (one model, tagged both, when they are the same checkpoint). Returns role -> model
    id. For the driver to call at the end of a run, where train.export_fp32 logs the raw state dict."""
    from towerlab.tracking.logged_models import log_model, metrics_at
    from towerlab.train.checkpoint import CKPT_TAG, load_model, resolve_target, states_file

    run_dir = Path(run_dir)
    t = resolve_target(str(run_dir), uri)
    if t.run_id is None:
        raise ConfigError(f"{run_dir}: no MLflow run recorded (towerlab_run.json): nothing to log the models to")
    steps = {}
    for ckpt in sorted(p for p in run_dir.glob("checkpoint_*") if (p / CKPT_TAG).is_dir()):
        steps[ckpt] = torch_load_step(states_file(ckpt))
    roles = {t.checkpoint: ["last"]}
    if metric:
        scored = {c: metrics_at(uri, t.run_id, s, prefix=metric).get(metric) for c, s in steps.items()}
        scored = {c: v for c, v in scored.items() if v is not None}
        if scored:
            best = (max if mode == "max" else min)(scored, key=scored.get)
            roles.setdefault(best, []).append("best")
        else:
            warn(f"warning: no checkpoint's step has a value of {metric}: only the last checkpoint is logged")
    fmt = model_format(t.recipe)
    ids = {}
    for ckpt, role in roles.items():
        model, step = load_model(ckpt, t.recipe)
        with tempfile.TemporaryDirectory(prefix="towerlab-model-") as d:
            out = export_model(model, t.recipe, fmt, Path(d) / "model", {"step": step}, warn)
            model_id = log_model(uri, t.run_id, out, name=f"{t.recipe.name}-step{step}", step=step,
                                 metrics=metrics_at(uri, t.run_id, step), params={"format": fmt},
                                 tags={"towerlab.role": ",".join(role)})
        ids.update({r: model_id for r in role})
    return ids


def torch_load_step(states_file: Path) -> int:
    """The step a DeepSpeed checkpoint was saved at (its client state), without building the model."""
    import torch

    return int(torch.load(states_file, map_location="cpu", weights_only=True).get("step", 0))
