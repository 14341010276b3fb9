"""Typed schema of a recipe: one dataclass per component, all fields with defaults.

Variants are chosen by a name key: `loss.name` picks a loss family (its dataclass comes from the loss registry) and
`model.arch` picks an architecture file in towerlab/models/archs/. The loader resolves those names first, then merges
the variant's schema, because OmegaConf cannot hold a union of dataclasses.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass
class AugmentConfig:
    random_resized_crop: bool = True
    crop_scale_min: float = 0.8  # lower bound of the crop's area fraction
    flip: bool = False  # off by default: a flipped digit or word is a different thing
    colour_jitter: bool = False
    colour_jitter_strength: float = 0.4  # brightness, contrast, saturation factors drawn from [1-s, 1+s]
    caption_choice: bool = True  # a record with several captions: a random one each epoch (off: the first)
    token_mask: bool = False
    token_mask_prob: float = 0.15  # each word becomes <unk> with this probability
    stopword_removal: bool = False
    stopword_prob: float = 0.5  # each English stop word is dropped with this probability


@dataclass
class DataConfig:
    source: str = "digits"  # digits | synthetic | parquet | webdataset (the last two: data.path from prepare)
    path: Optional[str] = None  # directory of prepared shards; digits/synthetic are prepared there on demand
    global_batch: int = 256  # samples per optimizer step, over all workers
    micro_batch: Optional[int] = None  # per worker and forward pass; default global_batch / workers
    shuffle_buffer: int = 2048  # rows in each worker's local shuffle buffer (reseeded every epoch)
    preprocess_concurrency: int = 1  # Ray Data actors/tasks decoding and augmenting
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    synthetic_size: int = 2048  # rows of the synthetic source
    captions_per_image: int = 1  # >1: k captions per image as positives (decoupled_softmax, sdm; others pick one)
    bad_shards: str = "error"  # a missing or corrupt shard: error (name it and stop) | skip (train without it)
    # Ray Data keeps the order of blocks (ExecutionOptions.preserve_order), so with one worker and no random
    # augmentation a rerun sees the same batches (`towerlab reproduce`); costs some ingest throughput
    deterministic: bool = False


@dataclass
class VisionConfig:
    image_size: int = 16
    patch_size: int = 4
    channels: int = 3
    width: int = 64
    layers: int = 2
    heads: int = 2
    mlp_ratio: float = 4.0
    # "" builds the ViT above; hf:NAME (a Hugging Face vision encoder: local dir or Hub id) or timm:NAME loads a
    # pretrained encoder instead (width/layers/heads then come from it; image_size still sizes the data)
    pretrained: str = ""
    patch_dropout: float = 0.0
    """Fraction of patch tokens each training image drops at random (FLIP), in [0, 1); 0 keeps all; eval keeps all."""


@dataclass
class TextConfig:
    vocab_size: int = 512
    context_length: int = 16
    width: int = 64
    layers: int = 2
    heads: int = 2
    mlp_ratio: float = 4.0
    # "" builds the transformer above over the data's word vocabulary; hf:NAME loads a pretrained encoder and its
    # own tokenizer (a local dir, a packaged model such as sentence-transformers/all-MiniLM-L6-v2, or a Hub id)
    pretrained: str = ""


@dataclass
class SignalConfig:
    """A third tower for a vector modality, "signal" (an MLP): the 3-modality losses (symile, gram) train on it."""

    dim: int = 0  # features per record; 0: no signal tower
    width: int = 64
    layers: int = 2


@dataclass
class ModelConfig:
    arch: str = "debug"  # an architecture file in towerlab/models/archs/ (see `towerlab recipes archs`)
    embed_dim: int = 32
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    signal: SignalConfig = field(default_factory=SignalConfig)
    grad_checkpointing: bool = False
    # parameter-name patterns (fnmatch) to freeze, e.g. "towers.text.encoder.*" locks a pretrained text tower but
    # trains its projection (LiT); `towerlab recipes params RECIPE` lists the names
    freeze: list[str] = field(default_factory=list)


@dataclass
class OptimConfig:
    lr: float = 1e-3
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-6
    warmup_steps: int = 20
    schedule: str = "cosine"  # cosine | constant
    min_lr_ratio: float = 0.0  # the cosine decays to lr * min_lr_ratio
    grad_clip: float = 1.0
    implementation: str = "auto"
    """AdamW kernel: auto (torch's default), foreach, fused or forloop; fused/foreach only where torch has them."""


@dataclass
class TrainConfig:
    workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: int = 1
    steps: int = 100  # optimizer steps in the whole run
    zero_stage: int = 2
    precision: str = "auto"  # auto (fp32 on CPU, bf16 on GPU) | fp32 | bf16
    log_every: int = 10
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    max_failures: int = 0
    storage_path: str = "results"  # Ray Train storage: <storage_path>/<name>/ holds checkpoints
    # Scale (towerlab plan; ZeRO-3 and offload). device_memory: what one worker may use, e.g. "80GiB"; None: the
    # GPU's memory, or on CPU the host's RAM shared by the workers. The planner refuses a plan that cannot fit it.
    device_memory: Optional[str] = None
    offload_optimizer: str = "none"  # none | cpu | nvme (ZeRO-Offload / ZeRO-Infinity; DeepSpeed's CPU Adam)
    offload_param: str = "none"  # none | cpu | nvme (ZeRO-3 only)
    nvme_path: str = "/tmp/towerlab-nvme"  # local disk for nvme offload (needs Debian's libaio-dev)
    # ZeRO-3 optimizer step granularity: the optimizer's temporaries (and with offload, its buffers) are one
    # sub-group's size. DeepSpeed's 1e9 made them a whole partition: +0.55 GiB per worker for a 151M model on 2
    # workers (benchmarks/zero_memory.py). 5e7 is what ZeRO-Infinity needs at 1B+ (part (a) there).
    sub_group_size: int = 5_000_000
    # elements per gradient bucket, and under ZeRO-3 the bound on gathered (live, prefetched) parameters. DeepSpeed's
    # 5e8 is a 2 GiB fp32 buffer; 5e7 cost 0.2 GiB per worker more than 5e6 there, at the same speed on CPU
    # (HF Transformers' "auto" uses hidden_size**2: 2M for ViT-g/14)
    reduce_bucket_size: int = 5_000_000
    export_fp32: bool = False  # at the end, log a consolidated fp32 state dict (zero_to_fp32) to MLflow
    compile: bool = False
    """torch.compile each tower (nn.Module.compile, in place); the first steps pay the compilation time."""


@dataclass
class EvalConfig:
    every: int = 50  # default steps between evaluations of every evaluator in `evals` (and one at the end)
    batch_size: int = 512  # samples per forward pass when embedding evaluation data


@dataclass
class EvaluatorConfig:
    """One entry of the recipe's `evals: {NAME: {...}}`; logged as eval/NAME/METRIC."""

    type: str = "zeroshot"  # zeroshot | retrieval | geometry (see towerlab.train.evaluate.EVALUATORS)
    every: Optional[int] = None  # steps between runs of this evaluator; default eval.every; always at the end
    data: str = "heldout"  # a split of the run's data, or a directory of prepared shards (its heldout split)
    max_samples: Optional[int] = None  # evaluate on the first N samples only
    ks: list[int] = field(default_factory=list)  # top-K / recall@K; empty: zeroshot [1, 5], retrieval [1, 5, 10]
    chunk: int = 1024  # queries per similarity block: memory O(chunk x N), not O(N x N)


@dataclass
class TrackingConfig:
    uri: Optional[str] = None  # else --tracking-uri, MLFLOW_TRACKING_URI, or sqlite:///<cwd>/mlruns.db
    experiment: str = "towerlab"


@dataclass
class Recipe:
    name: str = "run"  # the run name: launching the same name again resumes it
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: Any = None  # a losses.LossConfig subclass, chosen by loss.name
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    evals: dict[str, EvaluatorConfig] = field(default_factory=dict)  # empty in a recipe file: DEFAULT_EVALS
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    # named sets of overrides inside a recipe file, applied by the override preset=NAME (e.g. a `smoke` preset
    # that runs a cluster recipe tiny on one machine)
    presets: dict[str, Any] = field(default_factory=dict)


# The evaluators of a recipe whose file declares no `evals` section.
DEFAULT_EVALS = {"zeroshot": {"type": "zeroshot"}, "retrieval": {"type": "retrieval"},
                 "geometry": {"type": "geometry"}}
