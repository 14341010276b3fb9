"""State-dict adapters: the one place where checkpoints cross towerlab's border, in both directions (torchtitan's
state_dict_adapter idea). A foreign checkpoint is mapped onto towerlab's own towers (models/towers.py), so ZeRO,
per-block checkpointing, the tiled losses and the feature cache apply to it unchanged; a towerlab model is mapped
back out by the same tables.

Formats:
- transformers' CLIPModel (`hf`): towerlab's ViT and text tower are OpenCLIP's layout, which is CLIP's: pre-LN
  blocks, a class token, learned positions, a causal text mask pooled at the end-of-text token, a final LayerNorm
  and bias-free projections. What CLIP checkpoints differ in is expressed by recipe options: the MLP activation
  (`act`: OpenAI's weights use quick_gelu), where the text is pooled (`text.pool`/`text.eos_id`: transformers reads
  eos_token_id=2 as "the highest id") and the image mean/std. Attention differs only in layout (q, k, v apart in
  transformers, one in_proj here).
- transformers' SiglipModel (`hf` too): its blocks are CLIP's; what differs is expressed by the towers' SigLIP
  options (SIGLIP_SHAPE: no class token and no pre-LayerNorm, a biased patch embedding, the attention-pooling
  head and no projection in the ViT; a bidirectional text tower pooled at its last position through a biased
  head) and the LayerNorms' epsilon (`ln_eps`). The logit scale and bias travel both ways. Towers in SigLIP's
  shape (vision.pool=map) export as a SiglipModel, all others as a CLIPModel.
- OpenCLIP (`open_clip`): a state dict in OpenCLIP's CLIP names and a model config JSON as its model_configs/ hold.

Every mismatch is a ConfigError naming the first option or parameter that differs.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from towerlab.config.errors import ConfigError
from towerlab.config.schema import ModelConfig
from towerlab.models.towers import resolved_pool

# towerlab's per-block names (under towers.{image,text}.transformer.blocks.N.) <-> transformers' CLIP encoder layer
# names (under {vision,text}_model.encoder.layers.N.); attention's q/k/v are handled apart (split/concatenated)
_HF_BLOCK = {
    "ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
    "mlp.0": "mlp.fc1", "mlp.2": "mlp.fc2",
}
# towerlab's per-block names <-> OpenCLIP's (under [visual.]transformer.resblocks.N.)
_OC_BLOCK = {"ln_1": "ln_1", "ln_2": "ln_2", "attn.out_proj": "attn.out_proj", "attn.in_proj_weight": "attn.in_proj_weight",
             "attn.in_proj_bias": "attn.in_proj_bias", "mlp.0": "mlp.c_fc", "mlp.2": "mlp.c_proj"}
ACTS = ("gelu", "quick_gelu", "gelu_tanh")
HF_ACTS = {"gelu": "gelu", "quick_gelu": "quick_gelu", "gelu_tanh": "gelu_pytorch_tanh"}  # towerlab -> hidden_act
LN_EPS = 1e-5  # towerlab's LayerNorms (torch's default), as CLIP's


def refuse(what: str, why: str) -> ConfigError:
    return ConfigError(f"{what}: {why}")


# ---------------------------------------------------------------------------------------------------------------
# transformers CLIPModel
# ---------------------------------------------------------------------------------------------------------------

def check_hf_config(cfg: Any, where: str) -> None:
    """Refuse a transformers config that towerlab's towers cannot express, naming the first option that differs."""
    kind = getattr(cfg, "model_type", None)
    if kind == "siglip":
        return check_hf_siglip_config(cfg, where)
    if kind != "clip":
        raise refuse(where, f"model_type={kind!r}: only transformers' CLIPModel and SiglipModel (model_type clip, "
                            "siglip) map onto towerlab's towers; load other encoders per tower with "
                            "model.{vision,text}.pretrained")
    for tower, c in (("vision_config", cfg.vision_config), ("text_config", cfg.text_config)):
        if c.hidden_act not in HF_ACTS.values():
            raise refuse(where, f"{tower}.hidden_act={c.hidden_act!r}: towerlab's towers have "
                                f"{', '.join(HF_ACTS.values())}")
        if abs(c.layer_norm_eps - LN_EPS) > 1e-12:
            raise refuse(where, f"{tower}.layer_norm_eps={c.layer_norm_eps}: towerlab's LayerNorms use {LN_EPS}")
        if c.hidden_size % c.num_attention_heads:
            raise refuse(where, f"{tower}.hidden_size={c.hidden_size} is not divisible by num_attention_heads")


def model_config_from_hf(cfg: Any, preprocessor: dict | None, model: ModelConfig) -> None:
    """Set `model`'s sizes, options and image statistics from a transformers CLIPConfig or SiglipConfig (and its
    image processor's preprocessor_config.json, when there is one)."""
    if cfg.model_type == "siglip":
        return model_config_from_hf_siglip(cfg, preprocessor, model)
    v, t = cfg.vision_config, cfg.text_config
    set_shape(model, CLIP_SHAPE)  # the checkpoint decides the architecture, whatever the recipe said
    model.embed_dim = cfg.projection_dim
    mv, mt = model.vision, model.text
    mv.image_size, mv.patch_size, mv.channels = v.image_size, v.patch_size, v.num_channels
    mv.width, mv.layers, mv.heads = v.hidden_size, v.num_hidden_layers, v.num_attention_heads
    mv.mlp_ratio = v.intermediate_size / v.hidden_size
    mv.act = _act_from_hf(v.hidden_act)
    mt.vocab_size, mt.context_length = t.vocab_size, t.max_position_embeddings
    mt.width, mt.layers, mt.heads = t.hidden_size, t.num_hidden_layers, t.num_attention_heads
    mt.mlp_ratio = t.intermediate_size / t.hidden_size
    mt.act = _act_from_hf(t.hidden_act)
    # transformers pools at the first eos_token_id, except that eos_token_id == 2 (configs written before its
    # PR #24773) means the highest id, OpenAI's end-of-text
    mt.pool, mt.eos_id = ("argmax", 2) if t.eos_token_id == 2 else ("eos", int(t.eos_token_id))
    for tower, c, m in (("vision_config", v, mv), ("text_config", t, mt)):
        if int(m.width * m.mlp_ratio) != c.intermediate_size:  # the towers size their MLP as int(width * ratio)
            raise refuse("model.pretrained", f"{tower}.intermediate_size={c.intermediate_size} is not expressible "
                                             f"as int(hidden_size x mlp_ratio)")
    if preprocessor:
        mv.mean = [float(x) for x in preprocessor.get("image_mean", mv.mean)]
        mv.std = [float(x) for x in preprocessor.get("image_std", mv.std)]


def _act_from_hf(act: str) -> str:
    return {hf: tl for tl, hf in HF_ACTS.items()}[act]


def hf_config_dict(model: ModelConfig) -> dict:
    """The CLIPConfig arguments of a towerlab model (refused where transformers' CLIP cannot express it)."""
    v, t = model.vision, model.text
    check_shape(model, CLIP_SHAPE, "transformers' CLIPModel")
    pool = resolved_pool(t)
    if pool == "end":
        raise refuse("model.text.pool=end", "transformers' CLIPModel pools at the first eos_token_id, not at the "
                     "last position (SigLIP's pooling: export SigLIP-shaped towers, vision.pool=map, as a SiglipModel)")
    if pool == "last":
        raise refuse("text.pool=last", "transformers' CLIP pools at the first eos_token_id, and reads "
                     "eos_token_id=2 (the word vocabulary's end of text) as OpenAI's 'highest id' rule; a model "
                     "pooling at the last non-padding token has no CLIP counterpart (use a subword tokenizer whose "
                     "end-of-text id is not 2, with text.pool=eos)")
    if pool == "eos" and t.eos_id == 2:
        raise refuse("text.eos_id=2", "transformers' CLIP reads eos_token_id=2 as OpenAI's 'highest id' rule")
    eos = t.eos_id if pool == "eos" else 2  # argmax: the legacy id 2 is what makes transformers take the argmax
    common = dict(layer_norm_eps=LN_EPS, attention_dropout=0.0)
    return dict(
        projection_dim=model.embed_dim,
        vision_config=dict(image_size=v.image_size, patch_size=v.patch_size, num_channels=v.channels,
                           hidden_size=v.width, num_hidden_layers=v.layers, num_attention_heads=v.heads,
                           intermediate_size=int(v.width * v.mlp_ratio), hidden_act=HF_ACTS[v.act],
                           projection_dim=model.embed_dim, **common),
        text_config=dict(vocab_size=t.vocab_size, max_position_embeddings=t.context_length, hidden_size=t.width,
                         num_hidden_layers=t.layers, num_attention_heads=t.heads,
                         intermediate_size=int(t.width * t.mlp_ratio), hidden_act=HF_ACTS[t.act],
                         eos_token_id=eos, pad_token_id=0 if pool != "eos" else t.eos_id,
                         bos_token_id=None, projection_dim=model.embed_dim, **common),
    )


def _split_qkv(prefix_out: str, w: torch.Tensor, b: torch.Tensor) -> dict[str, torch.Tensor]:
    out = {}
    for name, wi, bi in zip(("q_proj", "k_proj", "v_proj"), w.chunk(3, dim=0), b.chunk(3, dim=0)):
        out[f"{prefix_out}self_attn.{name}.weight"] = wi
        out[f"{prefix_out}self_attn.{name}.bias"] = bi
    return out


def _n_blocks(sd: dict, prefix: str) -> int:
    pat = re.compile(re.escape(prefix) + r"(\d+)\.")
    return 1 + max((int(m.group(1)) for k in sd if (m := pat.match(k))), default=-1)


def to_hf_clip(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """towerlab's ContrastiveModel state dict (image and text towers, logit scale) in CLIPModel's names and shapes."""
    out: dict[str, torch.Tensor] = {}
    for tl, hf in (("towers.image.", "vision_model."), ("towers.text.", "text_model.")):
        for i in range(_n_blocks(sd, f"{tl}transformer.blocks.")):
            src, dst = f"{tl}transformer.blocks.{i}.", f"{hf}encoder.layers.{i}."
            out.update(_split_qkv(dst, sd[src + "attn.in_proj_weight"], sd[src + "attn.in_proj_bias"]))
            for a, b in _HF_BLOCK.items():
                for p in ("weight", "bias"):
                    out[f"{dst}{b}.{p}"] = sd[f"{src}{a}.{p}"]
    img, txt = "towers.image.", "towers.text."
    out.update({
        "vision_model.embeddings.patch_embedding.weight": sd[img + "conv1.weight"],
        "vision_model.embeddings.class_embedding": sd[img + "class_embedding"],
        "vision_model.embeddings.position_embedding.weight": sd[img + "positional_embedding"],
        "vision_model.pre_layrnorm.weight": sd[img + "ln_pre.weight"],
        "vision_model.pre_layrnorm.bias": sd[img + "ln_pre.bias"],
        "vision_model.post_layernorm.weight": sd[img + "ln_post.weight"],
        "vision_model.post_layernorm.bias": sd[img + "ln_post.bias"],
        "visual_projection.weight": sd[img + "proj"].t(),
        "text_model.embeddings.token_embedding.weight": sd[txt + "token_embedding.weight"],
        "text_model.embeddings.position_embedding.weight": sd[txt + "positional_embedding"],
        "text_model.final_layer_norm.weight": sd[txt + "ln_final.weight"],
        "text_model.final_layer_norm.bias": sd[txt + "ln_final.bias"],
        "text_projection.weight": sd[txt + "text_projection"].t(),
        "logit_scale": sd["logit_scale"].reshape(()),
    })
    return {k: v.detach().clone().contiguous() for k, v in out.items()}


def _blocks_from_hf(hf: dict[str, torch.Tensor], get) -> dict[str, torch.Tensor]:
    """Both towers' transformer blocks of a CLIPModel or SiglipModel state dict (the same block layout) in
    towerlab's names: q, k and v packed into one in-projection. `get` reads a parameter and marks it used."""
    out: dict[str, torch.Tensor] = {}
    for tl, pre in (("towers.image.", "vision_model."), ("towers.text.", "text_model.")):
        for i in range(_n_blocks(hf, f"{pre}encoder.layers.")):
            src, dst = f"{pre}encoder.layers.{i}.", f"{tl}transformer.blocks.{i}."
            a = src + "self_attn."
            out[dst + "attn.in_proj_weight"] = torch.cat([get(f"{a}{x}_proj.weight") for x in "qkv"])
            out[dst + "attn.in_proj_bias"] = torch.cat([get(f"{a}{x}_proj.bias") for x in "qkv"])
            for t, h in _HF_BLOCK.items():
                for p in ("weight", "bias"):
                    out[f"{dst}{t}.{p}"] = get(f"{src}{h}.{p}")
    return out


def from_hf_clip(hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A CLIPModel state dict in towerlab's ContrastiveModel names (the inverse of `to_hf_clip`); a parameter it
    has no place for is refused by name."""
    hf = {k: v for k, v in hf.items() if not k.endswith("position_ids")}  # a buffer in older checkpoints
    used: set[str] = set()

    def get(name: str) -> torch.Tensor:
        if name not in hf:
            raise refuse("model.pretrained", f"parameter {name} is missing: not a CLIPModel checkpoint")
        used.add(name)
        return hf[name]

    out = _blocks_from_hf(hf, get)
    names = {
        "towers.image.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
        "towers.image.class_embedding": "vision_model.embeddings.class_embedding",
        "towers.image.positional_embedding": "vision_model.embeddings.position_embedding.weight",
        "towers.image.ln_pre.weight": "vision_model.pre_layrnorm.weight",
        "towers.image.ln_pre.bias": "vision_model.pre_layrnorm.bias",
        "towers.image.ln_post.weight": "vision_model.post_layernorm.weight",
        "towers.image.ln_post.bias": "vision_model.post_layernorm.bias",
        "towers.text.token_embedding.weight": "text_model.embeddings.token_embedding.weight",
        "towers.text.positional_embedding": "text_model.embeddings.position_embedding.weight",
        "towers.text.ln_final.weight": "text_model.final_layer_norm.weight",
        "towers.text.ln_final.bias": "text_model.final_layer_norm.bias",
    }
    out.update({t: get(h) for t, h in names.items()})
    out["towers.image.proj"] = get("visual_projection.weight").t()
    out["towers.text.text_projection"] = get("text_projection.weight").t()
    out["logit_scale"] = get("logit_scale").reshape(1)
    extra = sorted(set(hf) - used)
    if extra:
        raise refuse("model.pretrained", f"parameter {extra[0]} has no place in towerlab's towers "
                                         "(the checkpoint's architecture differs from CLIP's)")
    return {k: v.detach().clone().contiguous() for k, v in out.items()}


# ---------------------------------------------------------------------------------------------------------------
# transformers SiglipModel
# ---------------------------------------------------------------------------------------------------------------

# the tower options (model.KEY) that make towerlab's towers CLIP's or SigLIP's; an export checks every one
CLIP_SHAPE = {"vision.pool": "token", "vision.class_token": True, "vision.ln_pre": True, "vision.patch_bias": False,
              "vision.proj": True, "vision.ln_eps": LN_EPS, "text.causal": True, "text.proj_bias": False,
              "text.ln_eps": LN_EPS}
SIGLIP_SHAPE = {"vision.pool": "map", "vision.class_token": False, "vision.ln_pre": False, "vision.patch_bias": True,
                "vision.proj": False, "text.causal": False, "text.pool": "end", "text.proj_bias": True}
# towerlab's names (under towers.image.) <-> SiglipModel's (under vision_model.) of the attention-pooling head
_HF_MAP_HEAD = {"attn_pool.ln": "head.layernorm", "attn_pool.mlp.0": "head.mlp.fc1", "attn_pool.mlp.2": "head.mlp.fc2",
                "attn_pool.attn.out_proj": "head.attention.out_proj"}


def _option(model: ModelConfig, key: str) -> Any:
    tower, name = key.split(".")
    return getattr(getattr(model, tower), name)


def _shown(x: Any) -> str:
    return str(x).lower() if isinstance(x, bool) else str(x)


def check_shape(model: ModelConfig, shape: dict[str, Any], what: str) -> None:
    """Refuse, naming the first option, a model whose towers are not in `shape` (CLIP_SHAPE, SIGLIP_SHAPE)."""
    for key, want in shape.items():
        got = _option(model, key)
        if got != want:
            raise refuse(f"model.{key}={_shown(got)}", f"{what} needs {_shown(want)}"
                         + (" (a SiglipModel export needs every SigLIP option: vision.pool=map and "
                            + ", ".join(f"{k}={_shown(v)}" for k, v in SIGLIP_SHAPE.items() if k != "vision.pool")
                            + ")" if "SiglipModel" in what else ""))


def set_shape(model: ModelConfig, shape: dict[str, Any]) -> None:
    """Set the tower options of `shape` (CLIP_SHAPE, SIGLIP_SHAPE) in `model`."""
    for key, value in shape.items():
        tower, name = key.split(".")
        setattr(getattr(model, tower), name, value)


def is_siglip(model: ModelConfig) -> bool:
    """Whether `model`'s towers are meant as SigLIP's (an attention-pooling ViT): they export as a SiglipModel."""
    return model.vision.pool == "map"


def check_hf_siglip_config(cfg: Any, where: str) -> None:
    """Refuse a SiglipConfig that towerlab's towers cannot express, naming the first option that differs."""
    v, t = cfg.vision_config, cfg.text_config
    if not getattr(v, "vision_use_head", True):
        raise refuse(where, "vision_config.vision_use_head=false: a SigLIP ViT without its pooling head has no "
                            "image embedding for towerlab to train")
    for tower, c in (("vision_config", v), ("text_config", t)):
        if c.hidden_act not in HF_ACTS.values():
            raise refuse(where, f"{tower}.hidden_act={c.hidden_act!r}: towerlab's towers have "
                                f"{', '.join(HF_ACTS.values())}")
        if c.hidden_size % c.num_attention_heads:
            raise refuse(where, f"{tower}.hidden_size={c.hidden_size} is not divisible by num_attention_heads")
    if t.projection_size != v.hidden_size:
        raise refuse(where, f"text_config.projection_size={t.projection_size}: the image embedding is the vision "
                            f"tower's width, {v.hidden_size}; the two must be equal")


def model_config_from_hf_siglip(cfg: Any, preprocessor: dict | None, model: ModelConfig) -> None:
    """Set `model`'s sizes, SigLIP options and image statistics from a transformers SiglipConfig (and its image
    processor's settings: mean and std; its size must be the vision config's image_size)."""
    v, t = cfg.vision_config, cfg.text_config
    mv, mt = model.vision, model.text
    set_shape(model, SIGLIP_SHAPE)
    model.embed_dim = v.hidden_size
    mv.image_size, mv.patch_size, mv.channels = v.image_size, v.patch_size, v.num_channels
    mv.width, mv.layers, mv.heads = v.hidden_size, v.num_hidden_layers, v.num_attention_heads
    mv.mlp_ratio, mv.act, mv.ln_eps = v.intermediate_size / v.hidden_size, _act_from_hf(v.hidden_act), v.layer_norm_eps
    mt.vocab_size, mt.context_length = t.vocab_size, t.max_position_embeddings
    mt.width, mt.layers, mt.heads = t.hidden_size, t.num_hidden_layers, t.num_attention_heads
    mt.mlp_ratio, mt.act, mt.ln_eps = t.intermediate_size / t.hidden_size, _act_from_hf(t.hidden_act), t.layer_norm_eps
    for tower, c, m in (("vision_config", v, mv), ("text_config", t, mt)):
        if int(m.width * m.mlp_ratio) != c.intermediate_size:
            raise refuse("model.pretrained", f"{tower}.intermediate_size={c.intermediate_size} is not expressible "
                                             f"as int(hidden_size x mlp_ratio)")
    if preprocessor:
        size = preprocessor.get("size") or {}
        side = {size.get("height"), size.get("width")} - {None}
        if side and side != {v.image_size}:
            raise refuse("model.pretrained", f"preprocessor_config.json size={size}: the vision config's "
                                             f"image_size is {v.image_size}; towerlab sizes images by the latter")
        mv.mean = [float(x) for x in preprocessor.get("image_mean", mv.mean)]
        mv.std = [float(x) for x in preprocessor.get("image_std", mv.std)]


def hf_siglip_config_dict(model: ModelConfig) -> dict:
    """The SiglipConfig arguments of a towerlab model whose towers are SigLIP's (refused, naming the first option,
    where they are not)."""
    check_shape(model, SIGLIP_SHAPE, "transformers' SiglipModel")
    v, t = model.vision, model.text
    return dict(
        vision_config=dict(image_size=v.image_size, patch_size=v.patch_size, num_channels=v.channels,
                           hidden_size=v.width, num_hidden_layers=v.layers, num_attention_heads=v.heads,
                           intermediate_size=int(v.width * v.mlp_ratio), hidden_act=HF_ACTS[v.act],
                           layer_norm_eps=v.ln_eps, attention_dropout=0.0, vision_use_head=True),
        text_config=dict(vocab_size=t.vocab_size, max_position_embeddings=t.context_length, hidden_size=t.width,
                         num_hidden_layers=t.layers, num_attention_heads=t.heads,
                         intermediate_size=int(t.width * t.mlp_ratio), hidden_act=HF_ACTS[t.act],
                         layer_norm_eps=t.ln_eps, attention_dropout=0.0, projection_size=model.embed_dim),
    )


def _siglip_names() -> dict[str, str]:
    """towerlab's names -> SiglipModel's for everything but the blocks, the attention's packed in_proj aside (both
    keep it packed in the pooling head: nn.MultiheadAttention's layout), and the transposed text projection."""
    names = {
        "towers.image.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
        "towers.image.conv1.bias": "vision_model.embeddings.patch_embedding.bias",
        "towers.image.positional_embedding": "vision_model.embeddings.position_embedding.weight",
        "towers.image.ln_post.weight": "vision_model.post_layernorm.weight",
        "towers.image.ln_post.bias": "vision_model.post_layernorm.bias",
        "towers.image.attn_pool.probe": "vision_model.head.probe",
        "towers.image.attn_pool.attn.in_proj_weight": "vision_model.head.attention.in_proj_weight",
        "towers.image.attn_pool.attn.in_proj_bias": "vision_model.head.attention.in_proj_bias",
        "towers.text.token_embedding.weight": "text_model.embeddings.token_embedding.weight",
        "towers.text.positional_embedding": "text_model.embeddings.position_embedding.weight",
        "towers.text.ln_final.weight": "text_model.final_layer_norm.weight",
        "towers.text.ln_final.bias": "text_model.final_layer_norm.bias",
        "towers.text.text_projection_bias": "text_model.head.bias",
    }
    for a, b in _HF_MAP_HEAD.items():
        for p in ("weight", "bias"):
            names[f"towers.image.{a}.{p}"] = f"vision_model.{b}.{p}"
    return names


def to_hf_siglip(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """towerlab's ContrastiveModel state dict (SigLIP-shaped towers, logit scale and bias) in SiglipModel's names and
    shapes; a model trained without a logit bias (a softmax loss) gets SiglipModel's a zero one."""
    out: dict[str, torch.Tensor] = {}
    for tl, hf in (("towers.image.", "vision_model."), ("towers.text.", "text_model.")):
        for i in range(_n_blocks(sd, f"{tl}transformer.blocks.")):
            src, dst = f"{tl}transformer.blocks.{i}.", f"{hf}encoder.layers.{i}."
            out.update(_split_qkv(dst, sd[src + "attn.in_proj_weight"], sd[src + "attn.in_proj_bias"]))
            for a, b in _HF_BLOCK.items():
                for p in ("weight", "bias"):
                    out[f"{dst}{b}.{p}"] = sd[f"{src}{a}.{p}"]
    out.update({h: sd[t] for t, h in _siglip_names().items()})
    out["text_model.head.weight"] = sd["towers.text.text_projection"].t()
    out["logit_scale"] = sd["logit_scale"].reshape(1)
    out["logit_bias"] = sd["logit_bias"].reshape(1) if "logit_bias" in sd else torch.zeros(1)
    return {k: v.detach().clone().contiguous() for k, v in out.items()}


def from_hf_siglip(hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A SiglipModel state dict in towerlab's ContrastiveModel names (the inverse of `to_hf_siglip`); a parameter it
    has no place for is refused by name."""
    hf = {k: v for k, v in hf.items() if not k.endswith("position_ids")}
    used: set[str] = set()

    def get(name: str) -> torch.Tensor:
        if name not in hf:
            raise refuse("model.pretrained", f"parameter {name} is missing: not a SiglipModel checkpoint")
        used.add(name)
        return hf[name]

    out = _blocks_from_hf(hf, get)
    out.update({t: get(h) for t, h in _siglip_names().items()})
    out["towers.text.text_projection"] = get("text_model.head.weight").t()
    out["logit_scale"] = get("logit_scale").reshape(1)
    out["logit_bias"] = get("logit_bias").reshape(1)
    extra = sorted(set(hf) - used)
    if extra:
        raise refuse("model.pretrained", f"parameter {extra[0]} has no place in towerlab's towers "
                                         "(the checkpoint's architecture differs from SigLIP's)")
    return {k: v.detach().clone().contiguous() for k, v in out.items()}


# ---------------------------------------------------------------------------------------------------------------
# OpenCLIP
# ---------------------------------------------------------------------------------------------------------------

def _oc_rename(name: str, table: dict[str, str], towers: tuple[tuple[str, str], ...]) -> str | None:
    for src, dst in towers:
        if name.startswith(src):
            rest = name[len(src):]
            m = re.match(r"transformer\.(blocks|resblocks)\.(\d+)\.(.+)$", rest)
            if m:
                inner, p = m.group(3), ""
                for a, b in table.items():
                    if inner == a or inner.startswith(a + "."):
                        p = b + inner[len(a):]
                        break
                else:
                    return None
                return f"{dst}transformer.{'resblocks' if 'towers' in src else 'blocks'}.{m.group(2)}.{p}"
            return dst + rest
    return None


def to_open_clip(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """towerlab's ContrastiveModel state dict in OpenCLIP's CLIP names and shapes (the logit scale a 0-d tensor)."""
    out = {}
    for k, v in sd.items():
        if k == "logit_scale":
            out[k] = v.reshape(())
        elif k == "logit_bias":
            out[k] = v.reshape(1)
        else:
            name = _oc_rename(k, _OC_BLOCK, (("towers.image.", "visual."), ("towers.text.", "")))
            if name is None:
                raise refuse(k, "has no OpenCLIP counterpart (only towerlab's ViT and text towers export)")
            out[name] = v
    return {k: v.detach().clone().contiguous() for k, v in out.items()}


def from_open_clip(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An OpenCLIP CLIP state dict in towerlab's names (the inverse of `to_open_clip`)."""
    inverse = {b: a for a, b in _OC_BLOCK.items()}
    out = {}
    for k, v in sd.items():
        if k in ("logit_scale", "logit_bias"):
            out[k] = v.reshape(1)
            continue
        if k == "attn_mask" or k.endswith(".attn_mask"):
            continue  # a buffer OpenCLIP rebuilds
        src = "visual." if k.startswith("visual.") else ""
        name = _oc_rename(k, inverse, ((src, "towers.image." if src else "towers.text."),))
        if name is None:
            raise refuse("model.pretrained", f"parameter {k} has no place in towerlab's towers")
        out[name] = v
    return out


def open_clip_config(model: ModelConfig) -> dict:
    """OpenCLIP's open_clip_config.json for a towerlab model: {"model_cfg": as in its model_configs/*.json,
    "preprocess_cfg": image size, mean and std}."""
    v, t = model.vision, model.text
    if is_siglip(model):
        raise refuse("model.vision.pool=map", "SigLIP-shaped towers have no OpenCLIP CLIP layout (OpenCLIP's SigLIP "
                     "models are timm towers); export them with --format hf (a SiglipModel)")
    check_shape(model, CLIP_SHAPE, "OpenCLIP's CLIP")
    if t.pool == "end":
        raise refuse("model.text.pool=end", "OpenCLIP's CLIP text tower pools by argmax or eos")
    if v.act != t.act:
        raise refuse(f"vision.act={v.act}, text.act={t.act}", "OpenCLIP has one activation for both towers")
    if v.act == "gelu_tanh":
        raise refuse("act=gelu_tanh", "OpenCLIP's CLIP towers have gelu and quick_gelu only")
    # towerlab's pool=last (the last non-padding token) is OpenCLIP's eos with the word vocabulary's EOT id: the
    # word tokenizer ends every caption with exactly one EOT
    pool = {"last": ("eos", 2), "eos": ("eos", t.eos_id), "argmax": ("argmax", t.eos_id)}[resolved_pool(t)]
    cfg = {
        "embed_dim": model.embed_dim,
        "quick_gelu": v.act == "quick_gelu",
        "vision_cfg": {"image_size": v.image_size, "layers": v.layers, "width": v.width,
                       "head_width": v.width // v.heads, "mlp_ratio": v.mlp_ratio, "patch_size": v.patch_size},
        "text_cfg": {"context_length": t.context_length, "vocab_size": t.vocab_size, "width": t.width,
                     "heads": t.heads, "layers": t.layers, "mlp_ratio": t.mlp_ratio, "pool_type": pool[0],
                     "eos_id": pool[1], "pad_id": 0},
    }
    return {"model_cfg": cfg, "preprocess_cfg": {"size": v.image_size, "mean": list(v.mean), "std": list(v.std),
                                                 "interpolation": "bilinear", "resize_mode": "squash"}}


def model_config_from_open_clip(oc: dict, model: ModelConfig, where: str) -> None:
    """Set `model`'s sizes and options from an OpenCLIP model config (or an open_clip_config.json holding one as
    model_cfg, beside its preprocess_cfg), refusing what towerlab cannot express."""
    pre = oc.get("preprocess_cfg", {})
    oc = oc.get("model_cfg", oc)
    pre = {**oc.get("preprocess_cfg", {}), **pre}
    vc, tc = oc.get("vision_cfg", {}), oc.get("text_cfg", {})
    for key, cfg, allowed in (("vision_cfg", vc, {"image_size", "layers", "width", "head_width", "mlp_ratio",
                                                  "patch_size"}),
                              ("text_cfg", tc, {"context_length", "vocab_size", "width", "heads", "layers",
                                                "mlp_ratio", "pool_type", "eos_id", "pad_id"})):
        other = sorted(set(cfg) - allowed)
        if other:
            raise refuse(where, f"{key}.{other[0]}={cfg[other[0]]!r}: towerlab's towers have no such option")
    if isinstance(vc.get("layers"), (list, tuple)):
        raise refuse(where, "vision_cfg.layers is a list: a ResNet image tower, not a ViT")
    act = "quick_gelu" if oc.get("quick_gelu") else "gelu"
    m, v, t = model, model.vision, model.text
    set_shape(model, CLIP_SHAPE)
    m.embed_dim = oc["embed_dim"]
    v.image_size, v.patch_size, v.width, v.layers = vc["image_size"], vc["patch_size"], vc["width"], vc["layers"]
    v.heads, v.mlp_ratio, v.act = vc["width"] // vc.get("head_width", 64), float(vc.get("mlp_ratio", 4.0)), act
    t.context_length, t.vocab_size = tc.get("context_length", 77), tc.get("vocab_size", 49408)
    t.width, t.heads, t.layers = tc.get("width", 512), tc.get("heads", 8), tc.get("layers", 12)
    t.mlp_ratio, t.act = float(tc.get("mlp_ratio", 4.0)), act
    pool = tc.get("pool_type", "argmax")
    if pool not in ("argmax", "eos"):
        raise refuse(where, f"text_cfg.pool_type={pool!r}: towerlab's text tower pools by argmax or eos")
    t.pool, t.eos_id = pool, int(tc.get("eos_id", 2))
    v.mean, v.std = list(pre.get("mean", (0.48145466, 0.4578275, 0.40821073))), \
        list(pre.get("std", (0.26862954, 0.26130258, 0.27577711)))  # OpenCLIP's defaults (OpenAI's statistics)


# ---------------------------------------------------------------------------------------------------------------
# loading into a model
# ---------------------------------------------------------------------------------------------------------------

def load_mapped(model: torch.nn.Module, sd: dict[str, torch.Tensor], where: str) -> None:
    """Copy a mapped state dict into `model`'s image and text towers and logit scale (and bias, when both have
    one), naming the first parameter whose name or shape differs. Under ZeRO-3 (deepspeed.zero.Init) a
    partitioned parameter is gathered for its copy, one at a time (the whole model never is), and re-partitioned
    from rank 0's values; every rank reads the same checkpoint, so every rank walks the same parameters."""
    params = dict(model.named_parameters())

    def shape(p: torch.Tensor) -> tuple:
        return tuple(getattr(p, "ds_shape", p.shape))  # ZeRO-3 leaves an empty placeholder in p itself

    for k, v in sd.items():
        if k == "logit_bias" and k not in params:
            continue  # a SigLIP bias into a model trained with a softmax loss: not used
        if k not in params:
            raise refuse(where, f"parameter {k} has no counterpart in the recipe's model")
        if shape(params[k]) != tuple(v.shape):
            raise refuse(where, f"parameter {k} has shape {tuple(v.shape)}, the recipe's model "
                                f"{shape(params[k])}")
    expected = {k for k in params if k.startswith(("towers.image.", "towers.text.")) or k == "logit_scale"}
    missing = sorted(expected - set(sd))
    if missing:
        raise refuse(where, f"parameter {missing[0]} is missing from the checkpoint")
    with torch.no_grad():
        for k, v in sd.items():
            p = params.get(k)
            if p is None:
                continue
            if hasattr(p, "ds_id"):
                import deepspeed

                with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                    p.copy_(v.to(p.dtype))
            else:
                p.copy_(v.to(p.dtype))
