"""A word-level tokenizer whose vocabulary is built from the captions at shard-writing time and stored in the
manifest, so training, evaluation and a reproduced run all map words to the same ids.

Ids: 0 pad, 1 unknown word, 2 end of text (the text tower pools there), then the words by decreasing frequency.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Iterable, Sequence

import numpy as np

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
