"""Evaluation metrics on embeddings: zero-shot classification, retrieval recall@K and median rank, embedding
geometry (modality gap, alignment, uniformity, effective rank), and the geometry plot. Tensors in, numbers out: the
evaluators that embed data with a model live in towerlab.train.evaluate."""

from towerlab.eval.geometry import alignment, effective_rank, geometry, geometry_tensors, modality_gap, uniformity
from towerlab.eval.numbers import as_floats
from towerlab.eval.retrieval import first_hit_ranks, recall_at_k, recall_tensors
from towerlab.eval.zeroshot import class_embeddings, topk_accuracy, topk_tensors

__all__ = ["alignment", "as_floats", "class_embeddings", "effective_rank", "first_hit_ranks", "geometry",
           "geometry_tensors", "modality_gap", "recall_at_k", "recall_tensors", "topk_accuracy", "topk_tensors",
           "uniformity"]
