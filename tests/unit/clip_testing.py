"""Tiny random CLIP and SigLIP checkpoints made by transformers (and a word-level Hugging Face tokenizer made by
`tokenizers`), shared by the import and export tests: an implementation towerlab did not write, saved to disk."""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import sys
import types
from pathlib import Path

import torch

EOS = 5  # the tiny tokenizer's end-of-text id (not 2: transformers reads 2 as the legacy "highest id" rule)
WORDS = ["<pad>", "<unk>", "<bos>", "x", "y", "<eos>", "a", "photo", "of", "digit", "seven", "three", "the"]
MEAN, STD = [0.48, 0.46, 0.41], [0.27, 0.26, 0.28]


def tiny_tokenizer(model_max_length: int | None = None):
    """A word-level Hugging Face tokenizer (tokenizers' own classes) that ends every text with <eos>; with
    `model_max_length`, padding="max_length" pads to it (SigLIP's tokenizers pad so)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A <eos>", special_tokens=[("<eos>", EOS)])
    extra = {"model_max_length": model_max_length} if model_max_length else {}
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>",
                                   **extra)


def clip_config(act: str = "quick_gelu", eos: int = EOS):
    from transformers import CLIPConfig

    common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, hidden_act=act)
    return CLIPConfig(text_config=dict(vocab_size=len(WORDS), max_position_embeddings=10, eos_token_id=eos,
                                       pad_token_id=0, bos_token_id=2, **common),
                      vision_config=dict(image_size=16, patch_size=4, **common), projection_dim=16,
                      logit_scale_init_value=3.0)


def randomise_norms_and_biases(model) -> None:
    """Random LayerNorm affines and biases (transformers initialises them to 1 and 0), so a swapped or dropped one
    shows in the embeddings."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.normal_(0, 0.5).add_(1.0 if name.endswith("weight") else 0.0)


def save_clip(path, act: str = "quick_gelu", eos: int = EOS):
    from transformers import CLIPImageProcessor, CLIPModel

    torch.manual_seed(0)
    model = CLIPModel(clip_config(act, eos)).eval()
    randomise_norms_and_biases(model)
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}, image_mean=MEAN,
                       image_std=STD).save_pretrained(path)
    return model


SIGLIP_CONTEXT = 10  # the tiny SigLIP's max_position_embeddings: its tokenizer pads every text to it
SIGLIP_BIAS, SIGLIP_SCALE = -2.5, 2.0


def siglip_config():
    from transformers import SiglipConfig

    common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    return SiglipConfig(text_config=dict(vocab_size=len(WORDS), max_position_embeddings=SIGLIP_CONTEXT,
                                         pad_token_id=0, eos_token_id=EOS, bos_token_id=2, **common),
                        vision_config=dict(image_size=16, patch_size=4, **common))


def save_siglip(path):
    """A tiny random SiglipModel (gelu_pytorch_tanh, LayerNorm eps 1e-6: SiglipConfig's defaults) saved with a
    tokenizer padding to max_length and a SiglipImageProcessor; its logit scale and bias are SIGLIP_SCALE/_BIAS."""
    from transformers import SiglipImageProcessor, SiglipModel

    torch.manual_seed(0)
    model = SiglipModel(siglip_config()).eval()
    randomise_norms_and_biases(model)
    with torch.no_grad():
        model.logit_scale.fill_(SIGLIP_SCALE)
        model.logit_bias.fill_(SIGLIP_BIAS)
        model.vision_model.head.probe.normal_()
    model.save_pretrained(path)
    tiny_tokenizer(model_max_length=SIGLIP_CONTEXT).save_pretrained(path)
    SiglipImageProcessor(size={"height": 16, "width": 16}, image_mean=MEAN, image_std=STD).save_pretrained(path)
    return model


def features(out):
    # transformers 5 returns a model output whose pooler_output holds the projected features; 4.x a tensor
    return out if isinstance(out, torch.Tensor) else out.pooler_output


@contextlib.contextmanager
def open_clip_model():
    """OpenCLIP's own `open_clip.model` module, imported without torchvision: open_clip/__init__ imports its
    torchvision transforms, and utils.py one torchvision class (FrozenBatchNorm2d, for ResNet towers only), so the
    package is entered without running __init__ and utils.py is read with that one import removed. Every open_clip
    module is removed from sys.modules afterwards."""
    spec = importlib.util.find_spec("open_clip")
    assert spec is not None, "open-clip-torch is not installed (`pip install --no-deps open-clip-torch`)"
    root = Path(list(spec.submodule_search_locations)[0])
    saved = {k: v for k, v in sys.modules.items() if k == "open_clip" or k.startswith("open_clip.")}
    pkg = types.ModuleType("open_clip")
    pkg.__path__ = [str(root)]
    sys.modules["open_clip"] = pkg
    src = (root / "utils.py").read_text()
    line = "from torchvision.ops.misc import FrozenBatchNorm2d"
    assert line in src, "open_clip/utils.py changed its torchvision import: update this helper"
    utils = types.ModuleType("open_clip.utils")
    utils.__file__, utils.__package__ = str(root / "utils.py"), "open_clip"
    exec(compile(src.replace(line, "FrozenBatchNorm2d = None"), utils.__file__, "exec"), utils.__dict__)
    sys.modules["open_clip.utils"] = utils
    try:
        yield importlib.import_module("open_clip.model")
    finally:
        for k in [k for k in sys.modules if k == "open_clip" or k.startswith("open_clip.")]:
            del sys.modules[k]
        sys.modules.update(saved)
