"""Text augmentations of the training pipeline, each behind a switch and a strength in `data.augment`:

- caption choice: a record with several captions contributes a random one each time it is read (off: the first);
  with data.captions_per_image = k, k distinct captions when it has that many (else with repeats).
- token masking: each word becomes <unk> with probability token_mask_prob (as in "Improved baselines for
  vision-language pre-training": masking/removing words regularises the text tower).
- stop-word removal: each English stop word is dropped with probability stopword_prob (never all the words).

They work on token ids after tokenisation (word level), so they cost a few numpy operations per caption.
"""

from __future__ import annotations

import json

import numpy as np

from towerlab.config.schema import AugmentConfig
from towerlab.data.tokenizer import EOT, PAD, UNK

# A short English stop-word list (NLTK's most frequent ones); enough for captions.
STOPWORDS = frozenset(
    "a an the of in on at to for with by from and or but is are was were be been being it its this that these "
    "those there here as into onto over under up down out off than then so such very too can will just".split()
)


def captions_of(caption: str, captions) -> list[str]:
    """All captions of a row: the `captions` column (a list, a numpy array, or JSON text from webdataset rows), or
    the single `caption` when the dataset has no such column."""
    if captions is None:
        return [caption]
    if isinstance(captions, str):
        captions = json.loads(captions)
    out = [c for c in list(captions) if c]
    return out or [caption]


def choose(captions: list[str], k: int, augment: AugmentConfig | None, rng: np.random.Generator) -> list[str]:
    """k captions of one record: random (distinct while there are enough) when caption_choice is on and this is
    training, else the first k in order (cycling)."""
    if augment is None or not augment.caption_choice:
        return [captions[i % len(captions)] for i in range(k)]
    if k <= len(captions):
        return [captions[i] for i in rng.choice(len(captions), size=k, replace=False)]
    order = list(rng.permutation(len(captions)))
    return [captions[order[i % len(order)]] for i in range(k)]


class TokenAugment:
    """Token masking and stop-word removal over encoded [.., L] id arrays (pad 0, end-of-text 2)."""

    def __init__(self, vocab: list[str], augment: AugmentConfig | None):
        self.augment = augment
        self.stop_ids = np.array(sorted(i for i, w in enumerate(vocab) if w in STOPWORDS), dtype=np.int64)

    @property
    def active(self) -> bool:
        a = self.augment
        return a is not None and ((a.token_mask and a.token_mask_prob > 0) or
                                  (a.stopword_removal and a.stopword_prob > 0))

    def __call__(self, ids: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if not self.active:
            return ids
        flat = ids.reshape(-1, ids.shape[-1])
        out = np.zeros_like(flat)
        for n, row in enumerate(flat):
            out[n] = self._one(row, rng)
        return out.reshape(ids.shape)

    def _one(self, row: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        a = self.augment
        words = row[(row != PAD) & (row != EOT)]
        if a.stopword_removal and a.stopword_prob > 0 and len(words) > 1:
            drop = np.isin(words, self.stop_ids) & (rng.random(len(words)) < a.stopword_prob)
            if not drop.all():
                words = words[~drop]
        if a.token_mask and a.token_mask_prob > 0:
            words = np.where(rng.random(len(words)) < a.token_mask_prob, UNK, words)
        out = np.zeros_like(row)
        out[: len(words)] = words
        out[len(words)] = EOT
        return out
