"""Evaluation of the model on the held-out split during training: zero-shot top-1/5 and retrieval recall@1/5.

Every rank runs it (under ZeRO-3 each forward needs all ranks' parameter shards); rank 0 logs the result. The
held-out split and the class prompts are encoded once per evaluation in chunks of eval.batch_size.
"""

from __future__ import annotations

import numpy as np
import torch

from towerlab.config import Recipe
from towerlab.data.pipeline import Preprocessor
from towerlab.eval import class_embeddings, recall_at_k, topk_accuracy
from towerlab.models import ContrastiveModel


class Evaluator:
    def __init__(self, recipe: Recipe, heldout: dict[str, np.ndarray], captions: list[str], classes: dict,
                 pre: Preprocessor):
        self.cfg = recipe.eval
        self.images = torch.from_numpy(heldout["image"])
        self.texts = torch.from_numpy(heldout["text"])
        self.labels = torch.from_numpy(heldout["label"])
        _, group = np.unique(np.asarray(captions), return_inverse=True)
        self.groups = torch.from_numpy(group)
        prompts = classes["prompts"]
        self.prompts_per_class = len(prompts[0]) if prompts else 0
        self.prompt_tokens = torch.from_numpy(pre.tokenizer.encode_batch([p for ps in prompts for p in ps]))

    def _encode(self, model: ContrastiveModel, modality: str, x: torch.Tensor) -> torch.Tensor:
        n = self.cfg.batch_size
        return torch.cat([model.encode(modality, x[i : i + n]) for i in range(0, x.shape[0], n)])

    @torch.no_grad()
    def __call__(self, model: ContrastiveModel) -> dict[str, float]:
        was_training = model.training
        model.eval()
        try:
            img = self._encode(model, "image", self.images)
            out: dict[str, float] = {}
            if self.cfg.zeroshot:
                cls = class_embeddings(self._encode(model, "text", self.prompt_tokens), self.prompts_per_class)
                out.update(topk_accuracy(img, cls, self.labels))
            if self.cfg.retrieval:
                out.update(recall_at_k(img, self._encode(model, "text", self.texts), self.groups))
            return out
        finally:
            model.train(was_training)
