"""Evaluation: zero-shot classification and retrieval recall@K on embeddings."""

from towerlab.eval.retrieval import recall_at_k
from towerlab.eval.zeroshot import class_embeddings, topk_accuracy

__all__ = ["class_embeddings", "recall_at_k", "topk_accuracy"]
