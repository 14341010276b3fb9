"""A tiny random transformers CLIPModel folder, for smoke runs of the fine-tuning recipes offline
(`towerlab recipes tiny-clip DIR`): transformers' own CLIPModel saved with save_pretrained, a word-level Hugging
Face tokenizer over the given words (built with `tokenizers`, ending every text with its end-of-text token) and a
CLIPImageProcessor. Its weights are random: it exercises `model.pretrained: hf:DIR` end to end (import, tokenizer,
image statistics, freezing, export) without a download, not transfer learning.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

SPECIALS = ["<pad>", "<unk>", "<bos>", "<eos>"]  # ids 0-3; eos 3, not 2 (transformers' legacy "highest id" rule)


def make_tiny_clip(out: str | os.PathLike, words: Sequence[str], image_size: int = 16, patch_size: int = 4,
                   width: int = 64, layers: int = 2, heads: int = 4, embed_dim: int = 64,
                   context_length: int = 12, seed: int = 0) -> Path:
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, PreTrainedTokenizerFast

    vocab = SPECIALS + sorted(set(words) - set(SPECIALS))
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A <eos>", special_tokens=[("<eos>", 3)])
    common = dict(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers, num_attention_heads=heads,
                  hidden_act="quick_gelu")
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), max_position_embeddings=context_length, eos_token_id=3,
                         pad_token_id=0, bos_token_id=2, **common),
        vision_config=dict(image_size=image_size, patch_size=patch_size, **common), projection_dim=embed_dim)
    torch.manual_seed(seed)
    out = Path(out)
    CLIPModel(config).save_pretrained(out)
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<bos>",
                            eos_token="<eos>").save_pretrained(out)
    CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
                       resample=2).save_pretrained(out)
    return out
