"""The recipe's declared evaluators (`evals: {NAME: {type, every, data, ...}}`), run during training and on saved
checkpoints (`towerlab eval`). Each is logged as eval/NAME/METRIC.

Evaluator types live in the EVALUATORS registry: zeroshot (top-K with prompt ensembling), retrieval (both
directions, recall@K and median rank) and geometry (modality gap, alignment, uniformity, effective rank, logit
scale; plus a PNG plot at the end of the run). Evaluation data (a split of the run's data or another prepared
directory) is read and preprocessed once, when the evaluators are built. Within one evaluation, every embedding
(images, captions, class prompts) is computed once and shared by all evaluators that use the same data; nothing is
kept across evaluations, since the weights change.

Every rank runs the due evaluators (under ZeRO-3 each forward needs all ranks' parameter shards); rank 0 logs.
Evaluation data stays on the host; each chunk moves to the model's device as it is encoded (the model's encode), the
metrics are computed there as tensors and cross back to the host once per evaluation.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from towerlab.config import ConfigError, Recipe
from towerlab.config.schema import EvaluatorConfig
from towerlab.data import Manifest, read_manifest
from towerlab.data.pipeline import Preprocessor, split_columns
from towerlab.eval import as_floats, class_embeddings, geometry_tensors, recall_tensors, topk_tensors
from towerlab.eval.plot import geometry_plot
from towerlab.models import ContrastiveModel
from towerlab.registry import Registry

EVALUATORS: Registry[Callable[..., dict[str, torch.Tensor]]] = Registry("evaluator type")
DEFAULT_KS = {"zeroshot": [1, 5], "retrieval": [1, 5, 10]}


@dataclass
class EvalData:
    """One evaluation dataset, preprocessed (no augmentation)."""

    key: str
    image: torch.Tensor
    text: torch.Tensor
    labels: torch.Tensor
    groups: torch.Tensor  # one id per distinct caption: retrieval hits
    prompts: torch.Tensor  # tokenized class prompts, class-major
    prompts_per_class: int


class Embedder:
    """The embeddings of one evaluation: each (data, input) is encoded once, in chunks of eval.batch_size."""

    def __init__(self, model: ContrastiveModel, batch_size: int):
        self.model, self.batch_size, self._cache = model, batch_size, {}

    def __call__(self, data: EvalData, what: str) -> torch.Tensor:
        key = (data.key, what)
        if key not in self._cache:
            x = getattr(data, what)
            modality = "image" if what == "image" else "text"
            n = self.batch_size
            self._cache[key] = torch.cat([self.model.encode(modality, x[i : i + n]) for i in range(0, len(x), n)])
        return self._cache[key]


@EVALUATORS.register("zeroshot")
def zeroshot(cfg: EvaluatorConfig, data: EvalData, embed: Embedder, model: ContrastiveModel) -> dict[str, torch.Tensor]:
    """Zero-shot classification: top-K accuracy against prompt-ensembled class embeddings."""
    if not data.prompts_per_class:  # captioned images without labels: nothing to classify
        return {}
    classes = class_embeddings(embed(data, "prompts"), data.prompts_per_class)
    return topk_tensors(embed(data, "image"), classes, data.labels, tuple(cfg.ks or DEFAULT_KS["zeroshot"]),
                         cfg.chunk)


@EVALUATORS.register("retrieval")
def retrieval(cfg: EvaluatorConfig, data: EvalData, embed: Embedder, model: ContrastiveModel) -> dict[str, torch.Tensor]:
    """Image->text and text->image retrieval: recall@K and median rank."""
    return recall_tensors(embed(data, "image"), embed(data, "text"), data.groups,
                       tuple(cfg.ks or DEFAULT_KS["retrieval"]), cfg.chunk)


@EVALUATORS.register("geometry")
def geometry_eval(cfg: EvaluatorConfig, data: EvalData, embed: Embedder, model: ContrastiveModel) -> dict[str, torch.Tensor]:
    """Modality gap, alignment, uniformity and effective rank per modality, logit scale."""
    return geometry_tensors(embed(data, "image"), embed(data, "text"), model.logit_scale.detach().exp()[0],
                            cfg.chunk)


def validate_evals(recipe: Recipe) -> None:
    """Checks of the `evals` section that need no data: names and known types (the ranges of cadences and sizes
    are declared on EvaluatorConfig and checked by towerlab.config.checks)."""
    for name, cfg in recipe.evals.items():
        where = f"evals.{name}"
        if not name or "/" in name:
            raise ConfigError(f"{where}: an evaluator name is non-empty without '/' (it becomes eval/NAME/METRIC)")
        if cfg.type not in EVALUATORS:
            raise ConfigError(f"{where}.type: {EVALUATORS.unknown_message(cfg.type)}")


def check_eval_data(recipe, manifest: Manifest) -> None:
    """Each evaluator's `data` names a split of the run's data or a local directory of prepared shards: checked on
    the driver, before Ray starts (load_eval_data would refuse it only inside the workers)."""
    for name, cfg in recipe.evals.items():
        spec = cfg.data
        if spec in manifest.splits or "://" in spec or (Path(spec) / "manifest.json").is_file():
            continue
        raise ConfigError(f"evals.{name}.data={spec!r}: neither a split of {manifest.root} "
                          f"({', '.join(manifest.splits)}) nor a directory with a manifest.json "
                          "(make one with `towerlab data prepare`)")


def load_eval_data(spec: str, manifest: Manifest, pre: Preprocessor, max_samples: int | None) -> EvalData:
    """`spec` is a split of the run's data (e.g. heldout) or a directory of prepared shards (its heldout split)."""
    if spec in manifest.splits:
        source, split = manifest, spec
    elif (Path(spec) / "manifest.json").is_file():
        source, split = read_manifest(spec), "heldout"
    else:
        raise ConfigError(f"evaluation data '{spec}': neither a split of {manifest.root} "
                          f"({', '.join(manifest.splits)}) nor a directory with a manifest.json "
                          "(make one with `towerlab data prepare`)")
    # through the dataset's own reader: Parquet or WebDataset shards, a local path or a URI
    rows = split_columns(source, split, ["image", "caption", "label"])
    if max_samples is not None:
        rows = {k: v[:max_samples] for k, v in rows.items()}
    x = pre(rows)
    _, group = np.unique(np.asarray(rows["caption"]), return_inverse=True)
    prompts = source.classes["prompts"]
    return EvalData(
        key=f"{source.root}:{split}:{max_samples}", image=torch.from_numpy(x["image"]),
        text=torch.from_numpy(x["text"]), labels=torch.from_numpy(x["label"]), groups=torch.from_numpy(group),
        prompts=torch.from_numpy(pre.tokenizer.encode_batch([p for ps in prompts for p in ps])),
        prompts_per_class=len(prompts[0]) if prompts else 0)


class Evaluators:
    """All evaluators of a recipe. Call with the step: runs those due (and all at the last step)."""

    def __init__(self, recipe: Recipe, manifest: Manifest, pre: Preprocessor):
        validate_evals(recipe)
        self.recipe = recipe
        self.specs = dict(recipe.evals)
        loaded: dict[tuple, EvalData] = {}
        self.data: dict[str, EvalData] = {}
        for name, cfg in self.specs.items():
            key = (cfg.data, cfg.max_samples)
            if key not in loaded:
                loaded[key] = load_eval_data(cfg.data, manifest, pre, cfg.max_samples)
            self.data[name] = loaded[key]
        self.history: dict[str, list[tuple[int, float]]] = {}
        self.last_embeddings: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def every(self, name: str) -> int:
        return self.specs[name].every or self.recipe.eval.every

    def due(self, step: int, last: bool = False) -> list[str]:
        return [n for n in self.specs if last or step % self.every(n) == 0]

    @torch.no_grad()
    def __call__(self, model: ContrastiveModel, step: int, last: bool = False,
                 names: list[str] | None = None) -> dict[str, float]:
        names = self.due(step, last) if names is None else names
        if not names:
            return {}
        was_training = model.training
        model.eval()
        try:
            embed = Embedder(model, self.recipe.eval.batch_size)
            metrics: dict[str, torch.Tensor] = {}
            for name in names:
                cfg, data = self.specs[name], self.data[name]
                for metric, value in EVALUATORS.get(cfg.type)(cfg, data, embed, model).items():
                    metrics[f"eval/{name}/{metric}"] = value
                if cfg.type == "geometry":  # for the plot, on the host
                    self.last_embeddings[name] = (embed(data, "image").cpu(), embed(data, "text").cpu())
            out = as_floats(metrics)
            for key, value in out.items():
                self.history.setdefault(key, []).append((step, value))
            return out
        finally:
            model.train(was_training)

    def log_plots(self, run, title: str = "") -> list[str]:
        """One geometry PNG per geometry evaluator, logged to `run` (full history from MLflow when resumed)."""
        paths = []
        for name, cfg in self.specs.items():
            if cfg.type != "geometry":
                continue
            prefix = f"eval/{name}/"
            history: dict[str, dict[int, float]] = {}
            for key in run.metric_keys(prefix):
                history[key] = dict(run.history(key))
            for key, points in self.history.items():
                if key.startswith(prefix):
                    history.setdefault(key, {}).update(points)
            image, text = self.last_embeddings.get(name, (None, None))
            with tempfile.TemporaryDirectory(prefix="towerlab-plot-") as d:
                png = geometry_plot({k[len(prefix):]: sorted(v.items()) for k, v in history.items()}, image, text,
                                    Path(d) / f"geometry_{name}.png", title=title or name)
                run.log_artifact(str(png), "plots")
            paths.append(f"plots/geometry_{name}.png")
        return paths
