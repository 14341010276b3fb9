"""The tokenizers of the data pipeline and the zero-shot prompts.

`Tokenizer`: a word-level tokenizer whose vocabulary is built from the captions at shard-writing time and stored in the
manifest, so training, evaluation and a reproduced run all map words to the same ids.

Ids: 0 pad, 1 unknown word, 2 end of text (the text tower pools there), then the words by decreasing frequency.

`HFTokenizer`: a pretrained text tower's own tokenizer (`model.text.pretrained: hf:NAME`), loaded through hub.py.

CLIP's BPE, the dataset-independent choice (`model.text.tokenizer: clip_bpe`), is in data/bpe.py.
"""

from __future__ import annotations

import functools
import re
from collections import Counter
from typing import Iterable, Sequence

import numpy as np

from towerlab.hub import hf_call, parse

PAD, UNK, EOT = 0, 1, 2
SPECIALS = ["<pad>", "<unk>", "<eot>"]
_WORD = re.compile(r"[a-z0-9]+")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def build_vocab(captions: Iterable[str], max_size: int | None = None) -> list[str]:
    counts = Counter(w for c in captions for w in words(c))
    ranked = sorted(counts, key=lambda w: (-counts[w], w))
    if max_size is not None:
        ranked = ranked[: max(0, max_size - len(SPECIALS))]
    return SPECIALS + ranked


class Tokenizer:
    def __init__(self, vocab: Sequence[str], context_length: int, vocab_size: int):
        if len(vocab) > vocab_size:
            # words past the model's embedding table become <unk>, deterministically (the rarest ones)
            vocab = list(vocab)[:vocab_size]
        self.ids = {w: i for i, w in enumerate(vocab)}
        self.context_length = context_length

    def encode(self, text: str) -> np.ndarray:
        ids = [self.ids.get(w, UNK) for w in words(text)][: self.context_length - 1] + [EOT]
        out = np.zeros(self.context_length, dtype=np.int64)
        out[: len(ids)] = ids
        return out

    def encode_batch(self, texts: Iterable[str]) -> np.ndarray:
        return np.stack([self.encode(t) for t in texts])

    def unknown_share(self, texts: Iterable[str]) -> float:
        """The share of the words of `texts` that map to <unk> (0 when there are no words)."""
        ws = [w for t in texts for w in words(t)]
        return sum(w not in self.ids for w in ws) / len(ws) if ws else 0.0


class HFTokenizer:
    """A pretrained text tower's own tokenizer, padded to the recipe's context_length; loaded on first use, so the
    pipeline's preprocessor stays cheap to pickle to Ray Data's workers."""

    def __init__(self, spec: str, context_length: int):
        _, self.name = parse(spec, "model.text.pretrained", ("hf",))
        self.context_length = context_length
        self._tok = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_tok": None}

    def encode_batch(self, texts) -> np.ndarray:
        if self._tok is None:
            self._tok = pretrained_tokenizer(self.name)
        out = self._tok(list(texts), padding="max_length", truncation=True, max_length=self.context_length,
                        return_tensors="np")
        return out["input_ids"].astype(np.int64)

    def encode(self, text: str) -> np.ndarray:
        return self.encode_batch([text])[0]


@functools.lru_cache(maxsize=4)
def pretrained_tokenizer(name: str):
    """A Hugging Face tokenizer, loaded once per process (Ray Data unpickles the preprocessor for every task)."""
    from transformers import AutoTokenizer

    return hf_call(AutoTokenizer, name, "model.text.pretrained")
