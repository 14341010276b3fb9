"""The recipe's declared evaluators (`evals: {NAME: {type, every, data, ...}}`), run during training and on saved
checkpoints (`towerlab eval`). Each is logged as eval/NAME/METRIC.

Evaluator types live in the EVALUATORS registry: zeroshot (top-K with prompt ensembling), retrieval (both
directions, recall@K and median rank), geometry (modality gap, alignment, uniformity, effective rank, logit
scale; plus a PNG plot at the end of the run) and linear_probe (logistic regression on frozen image features).
Evaluation data (a split of the run's data, another prepared directory, or a standard benchmark's files: ImageFolder,
CLIP_benchmark, Karpathy; see eval/benchmarks.py) is read once, when the evaluators are built, and kept as read:
encoded images (or their files' paths) and tokenized texts; images are preprocessed (no augmentation) a chunk at a
time as they are embedded (eval/sharding.py EncodedImages), so the host holds one chunk of pixels, not the set's.
Within one evaluation, every embedding (images, captions, class prompts) is computed once and shared by all
evaluators that use the same data; nothing is kept across evaluations, since the weights change.

How an evaluation is split over ranks (eval/sharding.py): every rank runs the due evaluators, but each (data, input)
is embedded in shares, rank r of W taking a contiguous block of ceil(N / W) rows in chunks of eval.batch_size, and
the blocks are gathered once (all_gather) into the full N x d matrix on every rank, which then computes the metrics
(rank 0 logs them; every rank reports them to Ray Train, so all hold the same metrics). Every rank runs the same
number of forwards, ceil(N / (W x eval.batch_size)), padding with a dropped dummy chunk where its block is used up:
under ZeRO-3 each forward all-gathers the parameter shards, so a rank that stopped early would leave the others
waiting. Memory per rank: O(batch x image + N x d); time: 1/W of the forwards. Without a process group
(`towerlab eval`) one process embeds everything in chunks.

Each chunk moves to the model's device as it is encoded (the model's encode), the metrics are computed there as
tensors and cross back to the host once per evaluation.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from towerlab.config import ConfigError, Recipe
from towerlab.config.schema import EvaluatorConfig
from towerlab.data import Manifest, read_manifest
from towerlab.data.pipeline import Preprocessor, split_columns
from towerlab.eval import as_floats, class_embeddings, geometry_tensors, recall_tensors, topk_tensors
from towerlab.eval.benchmarks import (check_towerlab_keys, classification_tensors, load_benchmark, resolve_layout,
                                     write_results)
from towerlab.eval.linear_probe import linear_probe
from towerlab.eval.plot import geometry_plot
from towerlab.eval.retrieval import recall_tensors_multi
from towerlab.eval.sharding import EncodedImages, embed_sharded, rank_world, share
from towerlab.models import ContrastiveModel
from towerlab.registry import Registry

EVALUATORS: Registry[Callable[..., dict[str, torch.Tensor]]] = Registry("evaluator type")
DEFAULT_KS = {"zeroshot": [1, 5], "retrieval": [1, 5, 10], "linear_probe": [1, 5]}


def ks(cfg: EvaluatorConfig) -> tuple[int, ...]:
    """The K of an evaluator's top-K / recall@K metrics: its own, else its type's defaults."""
    return tuple(cfg.ks or DEFAULT_KS[cfg.type])


def declares(metrics: Callable[[EvaluatorConfig], tuple[str, ...]]):
    """Decorator: the metric names (without eval/NAME/) an evaluator type returns for a config, declared beside it
    so what a run logs is known before it starts (a sweep's metric is checked against it; tests check that each
    evaluator returns exactly what it declares)."""

    def deco(fn):
        fn.metrics = metrics
        return fn

    return deco


def metric_names(cfg: EvaluatorConfig) -> tuple[str, ...]:
    """What an evaluator of config `cfg` logs, as its type declares (without the eval/NAME/ prefix)."""
    return EVALUATORS.get(cfg.type).metrics(cfg)


@dataclass
class EvalData:
    """One evaluation dataset: images as read (EncodedImages, preprocessed chunk by chunk when embedded; or an
    already preprocessed [N, 3, S, S] tensor), tokenized texts and prompts, labels."""

    key: str
    image: EncodedImages | torch.Tensor
    text: torch.Tensor
    labels: torch.Tensor
    groups: torch.Tensor  # one id per distinct caption: retrieval hits
    prompts: torch.Tensor  # tokenized class prompts, class-major
    prompts_per_class: int
    layout: str = "towerlab"  # a foreign layout (eval/benchmarks.py) adds mean_per_class_recall
    text_image: torch.Tensor | None = None  # several captions per image: caption j belongs to image text_image[j]
    classnames: list[str] = field(default_factory=list)
    train: EvalData | None = None  # a linear probe's train split


class Embedder:
    """The embeddings of one evaluation: each (data, input) is encoded once, in chunks of eval.batch_size, each rank
    its share, gathered once on every rank (eval/sharding.py embed_sharded; one process without a process group).
    Every rank must ask for the same (data, input)s in the same order: each is a collective."""

    def __init__(self, model: ContrastiveModel, batch_size: int):
        self.model, self.batch_size, self._cache = model, batch_size, {}

    def __call__(self, data: EvalData, what: str) -> torch.Tensor:
        key = (data.key, what)
        if key not in self._cache:
            modality = "image" if what == "image" else "text"
            self._cache[key] = embed_sharded(lambda chunk: self.model.encode(modality, chunk), getattr(data, what),
                                             self.batch_size)
        return self._cache[key]


def _benchmark(cfg: EvaluatorConfig) -> bool:
    """Whether an evaluator reads a standard benchmark's files (not towerlab data, whose splits have manifests)."""
    return resolve_layout(cfg.layout, cfg.data, ()) != "towerlab"


@EVALUATORS.register("zeroshot")
@declares(lambda cfg: tuple(f"top{k}" for k in ks(cfg)) + (("mean_per_class_recall",) if _benchmark(cfg) else ()))
def zeroshot(cfg: EvaluatorConfig, data: EvalData, embed: Embedder, model: ContrastiveModel) -> dict[str, torch.Tensor]:
    """Zero-shot classification: top-K accuracy against prompt-ensembled class embeddings."""
    if not data.prompts_per_class:  # captioned images without labels: nothing to classify
        return {}
    classes = class_embeddings(embed(data, "prompts"), data.prompts_per_class)
    if data.layout != "towerlab":  # a standard benchmark: also mean_per_class_recall, as CLIP_benchmark reports
        return classification_tensors(embed(data, "image"), classes, data.labels, ks(cfg), cfg.chunk)
    return topk_tensors(embed(data, "image"), classes, data.labels, ks(cfg), cfg.chunk)


@EVALUATORS.register("retrieval")
@declares(lambda cfg: tuple(f"{m}_{d}" for d in ("i2t", "t2i")
                            for m in (*(f"recall_at_{k}" for k in ks(cfg)), "median_rank")))
def retrieval(cfg: EvaluatorConfig, data: EvalData, embed: Embedder, model: ContrastiveModel) -> dict[str, torch.Tensor]:
    """Image->text and text->image retrieval: recall@K and median rank."""
    if data.text_image is not None:
        return recall_tensors_multi(embed(data, "image"), embed(data, "text"), data.text_image, ks(cfg), cfg.chunk)
    return recall_tensors(embed(data, "image"), embed(data, "text"), data.groups, ks(cfg), cfg.chunk)


@EVALUATORS.register("linear_probe")
@declares(lambda cfg: (*(f"top{k}" for k in ks(cfg)), "mean_per_class_recall"))
def linear_probe_eval(cfg: EvaluatorConfig, data: EvalData, embed: Embedder,
                      model: ContrastiveModel) -> dict[str, torch.Tensor]:
    """Logistic regression on frozen image features of the train split, scored on the evaluated one."""
    train = data.train
    metrics, _ = linear_probe(embed(train, "image").float().cpu().numpy(), train.labels.numpy(),
                              embed(data, "image").float().cpu().numpy(), data.labels.numpy(),
                              ks(cfg), cfg.probe_heldout)
    return {k: torch.tensor(v, dtype=torch.float64) for k, v in metrics.items()}


linear_probe_eval.on_host = True  # scikit-learn fits on host copies of the features


@EVALUATORS.register("geometry")
@declares(lambda cfg: ("modality_gap", "alignment", "uniformity_image", "uniformity_text", "effective_rank_image",
                       "effective_rank_text", "logit_scale"))
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
    # the Preprocessor's text and label columns, as its __call__ makes them (no augmentation in evaluation: the
    # token augmentation is inactive); its images are decoded chunk by chunk when embedded (EncodedImages)
    text = pre.tokens(rows)
    _, group = np.unique(np.asarray(rows["caption"]), return_inverse=True)
    prompts = source.classes.get("prompts", [])  # foreign shards (data.heldout_shards) have no classes
    return EvalData(
        key=f"{source.root}:{split}:{max_samples}",
        image=EncodedImages(rows["image"], pre, f"evaluation data '{spec}' ({split} split)"),
        text=torch.from_numpy(text), labels=torch.from_numpy(np.asarray(rows["label"], dtype=np.int64)),
        groups=torch.from_numpy(group),
        prompts=torch.from_numpy(pre.tokenizer.encode_batch([p for ps in prompts for p in ps])),
        prompts_per_class=len(prompts[0]) if prompts else 0)


class Evaluators:
    """All evaluators of a recipe. Call with the step: runs those due (and all at the last step).

    `check_images`: decode this rank's share of the images once now, so that an undecodable one is a ConfigError
    before training starts; off where an evaluation follows at once (`towerlab eval`), which reports it as well."""

    def __init__(self, recipe: Recipe, manifest: Manifest, pre: Preprocessor, check_images: bool = True):
        validate_evals(recipe)
        self.recipe = recipe
        self.specs = dict(recipe.evals)
        loaded: dict[tuple, EvalData] = {}
        self.data: dict[str, EvalData] = {}
        for name, cfg in self.specs.items():
            layout = resolve_layout(cfg.layout, cfg.data, manifest.splits)
            if layout != "towerlab":  # a standard benchmark's files (eval/benchmarks.py)
                key = (layout, cfg.data, cfg.split, cfg.max_samples, cfg.type, cfg.classnames, cfg.templates,
                       cfg.images)
                if key not in loaded:
                    fields = load_benchmark(name, cfg, layout, pre)
                    train = fields.pop("train", None)
                    loaded[key] = EvalData(**fields, train=None if train is None else EvalData(**train))
                self.data[name] = loaded[key]
                continue
            check_towerlab_keys(name, cfg)
            key = (cfg.data, cfg.max_samples)
            if key not in loaded:
                loaded[key] = load_eval_data(cfg.data, manifest, pre, cfg.max_samples)
            self.data[name] = loaded[key]
            if cfg.type == "linear_probe":  # the run's own splits: fit on train_split, score on data
                if cfg.train_split not in manifest.splits:
                    raise ConfigError(f"evals.{name}.train_split: '{cfg.train_split}' is not a split of "
                                      f"{manifest.root} ({', '.join(manifest.splits)})")
                self.data[name] = replace(loaded[key], train=load_eval_data(cfg.train_split, manifest, pre,
                                                                            cfg.max_samples))
        # an undecodable image is a ConfigError now, not at the first evaluation: each rank decodes once the rows
        # it will embed (its share, as Embedder splits them)
        rank, world = rank_world()
        checked: set[int] = set()
        for data in self.data.values() if check_images else ():
            for part in (data, data.train):
                if part is not None and isinstance(part.image, EncodedImages) and id(part.image) not in checked:
                    checked.add(id(part.image))
                    part.image.check(share(len(part.image), rank, world))
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

    def log_results(self, run, model: str, pretrained: str) -> list[str]:
        """The last evaluation of each zeroshot/retrieval/linear_probe evaluator as a CLIP_benchmark result JSON,
        logged to `run` under results/ (eval/benchmarks.py write_results)."""
        latest = {k: points[-1][1] for k, points in self.history.items() if points}
        with tempfile.TemporaryDirectory(prefix="towerlab-results-") as d:
            paths = write_results(d, self.recipe, latest, model, pretrained)
            for path in paths:
                run.log_artifact(str(path), "results")
        return [f"results/{p.name}" for p in paths]

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
