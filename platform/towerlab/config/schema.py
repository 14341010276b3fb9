"""Typed schema of a recipe: one dataclass per component, all fields with defaults.

Variants are chosen by a name key: `loss.name` picks a loss family (its dataclass comes from the loss registry) and
`model.arch` picks an architecture file in towerlab/models/archs/. The loader resolves those names first, then merges
the variant's schema, because OmegaConf cannot hold a union of dataclasses.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Optional

from towerlab.config.checks import INT64_MAX, num


# Fields with a fixed set of values are Enums: OmegaConf refuses any other value at load (config/load.py names the
# key and lists the values). Member names equal their values, because OmegaConf matches a string by member name.
class BadShards(StrEnum):
    error = "error"  # name the missing or corrupt shard and stop
    skip = "skip"  # train without it (a warning names it)


class Schedule(StrEnum):
    cosine = "cosine"
    constant = "constant"


class Precision(StrEnum):
    auto = "auto"  # fp32 on CPU, bf16 on GPU
    fp32 = "fp32"
    bf16 = "bf16"


class Offload(StrEnum):
    none = "none"
    cpu = "cpu"
    nvme = "nvme"


class Mode(StrEnum):
    max = "max"  # a larger value is better
    min = "min"


class Layout(StrEnum):
    """How an evaluator's `data` is laid out on disk (towerlab.eval.benchmarks reads the foreign ones)."""

    auto = "auto"  # recognised from the files
    towerlab = "towerlab"  # a split of the run's data or a prepared directory (manifest.json)
    imagefolder = "imagefolder"  # one folder of images per class
    clip_benchmark = "clip_benchmark"  # CLIP_benchmark's WebDataset export: SPLIT/*.tar, classnames.txt
    karpathy = "karpathy"  # COCO/Flickr30k Karpathy splits: dataset_*.json and its images


@dataclass
class AugmentConfig:
    """Training-time augmentation of images and captions (evaluation data is never augmented)."""

    random_resized_crop: bool = True
    """Crop a random area of each image (fraction in [crop_scale_min, 1]) and resize it back to model.vision.image_size.
    """
    crop_scale_min: float = num(0.8, gt=0, le=1)
    """Smallest area fraction of the image a random crop keeps, in (0, 1]."""
    flip: bool = False
    """Flip images horizontally at random; off by default because a flipped digit or word is a different thing."""
    colour_jitter: bool = False
    """Jitter brightness, contrast and saturation of each image by random factors (strength below)."""
    colour_jitter_strength: float = num(0.4, ge=0, le=1)
    """Colour jitter strength s: each factor is drawn from [1-s, 1+s]; s in [0, 1]."""
    caption_choice: bool = True
    """For a record with several captions, train on a random one each epoch (off: always the first)."""
    token_mask: bool = False
    """Replace words of a caption by <unk> at random (probability token_mask_prob)."""
    token_mask_prob: float = num(0.15, ge=0, le=1)
    """Probability that token masking replaces a word by <unk>, in [0, 1]."""
    stopword_removal: bool = False
    """Drop English stop words from captions at random (probability stopword_prob)."""
    stopword_prob: float = num(0.5, ge=0, le=1)
    """Probability that stop-word removal drops each English stop word, in [0, 1]."""


@dataclass
class SourceConfig:
    """One foreign corpus of a weighted mixture (`data.sources: [{path, weight}, ...]`)."""

    path: str = ""
    """Where the corpus's shards are, as data.path takes them: a directory of .tar (or .parquet) shards, a brace
    pattern (s3://bucket/laion/{00000..04095}.tar) or one shard file."""
    weight: float = num(1.0, gt=0)
    """The corpus's share of the training samples, relative to the other sources' weights, > 0 (OpenCLIP's
    --train-data-upsampling-factors, normalised by the corpus sizes); unequal weights need data.resampled=true."""
    num_samples: Optional[int] = num(None, ge=1)
    """Samples in this corpus when img2dataset's <shard>_stats.json files are not beside every shard (null: count
    them)."""


@dataclass
class DataConfig:
    """Where the training data comes from and how it is batched, shuffled and augmented."""

    source: str = "digits"
    """Data source: a registered one (digits, synthetic, synthetic3, ...) or parquet / webdataset (prepared shards in
    data.path)."""
    path: Optional[str] = None
    """Directory or URI of prepared shards (`towerlab data prepare`); built-in sources are prepared there on demand
    (null: data/<source>)."""
    global_batch: int = num(256, ge=2, why="a contrastive batch needs at least 2 samples")
    """Samples per optimizer step over all workers (each sees the other global_batch - 1 as negatives); at least 2,
    divisible by train.workers."""
    micro_batch: Optional[int] = num(None, ge=1)
    """Samples per worker per forward pass, at least 1 (null: global_batch / train.workers, no accumulation)."""
    shuffle_buffer: int = num(2048, ge=0)
    """Rows in each worker's local shuffle buffer, reseeded every epoch, for data streamed from its shards; 0 turns
    local shuffling off. Data under 256 MiB is read once and each epoch is a whole permutation of it instead."""
    preprocess_concurrency: int = num(1, ge=1)
    """Ray Data actors/tasks that decode and augment batches, at least 1."""
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    """Training-time augmentation of images and captions."""
    synthetic_size: int = num(2048, ge=2)
    """Rows generated for a synthetic source (synthetic, synthetic3), at least 2."""
    captions_per_image: int = num(1, ge=1)
    """Captions per image in a training batch, at least 1; above 1 only multi-positive losses
    (loss_class(name).multi_positive) use them, the others pick one."""
    bad_shards: BadShards = BadShards.error
    """What a missing or corrupt shard does: error (name it and stop) or skip (train without it, with a warning)."""
    verify_shards: bool = False
    """Check every prepared shard's sha256 against manifest.json before the run starts (reads the whole dataset on
    every launch, resume and sweep trial, so off by default; a shard that cannot be read still stops the run)."""
    paths: list[str] = field(default_factory=list)
    """Several shard locations for data.source=webdataset, read together instead of data.path: each a directory of
    .tar files, a brace pattern (/data/{00000..00099}.tar, s3://bucket/laion/{00000..04095}.tar) or one .tar."""
    num_samples: Optional[int] = num(None, ge=1)
    """Samples in foreign WebDataset shards (no towerlab manifest) when img2dataset's <shard>_stats.json files are
    not beside every tar; neither: the driver counts them (reads every shard's tar headers)."""
    image_keys: list[str] = field(default_factory=lambda: ["jpg", "jpeg", "png", "webp"])
    """Member suffixes that hold a foreign WebDataset sample's image, in order of preference (OpenCLIP's defaults)."""
    caption_key: str = "txt"
    """Member suffix that holds a foreign WebDataset sample's caption; without it, the `caption` field of the sample's
    .json (img2dataset writes both)."""
    image_column: str = ""
    """Column of foreign image-bytes Parquet (data.source=parquet without a manifest.json) holding the encoded image:
    binary, or a struct with a `bytes` field (Hugging Face datasets' Image); "": the first of jpg (img2dataset),
    image (Hugging Face), png, webp, jpeg."""
    caption_column: str = ""
    """Column of foreign image-bytes Parquet holding the caption; "": the first of caption, txt, text."""
    resampled: bool = False
    """Foreign shards drawn with replacement (OpenCLIP's --dataset-resampled): an epoch is data.num_samples samples
    (default: the corpus's count) from shards drawn at random, epoch e's draws seeded by (seed, e)."""
    sources: list[SourceConfig] = field(default_factory=list)
    """A weighted mixture of foreign corpora (data.source=webdataset or parquet), instead of data.path/data.paths:
    [{path, weight, num_samples}, ...]; each source's share of the samples is its weight (equal weights without
    data.resampled: the corpora one after the other)."""
    heldout_shards: float = num(0.0, ge=0, lt=1)
    """Fraction of the listed foreign shards kept out of training as the split `heldout` (evaluators with
    `data: heldout` read it), in [0, 1); chosen by `seed`, at least one shard; 0: none held out."""
    # Ray Data keeps the order of blocks (ExecutionOptions.preserve_order), so with one worker and no random
    # augmentation a rerun sees the same batches (`towerlab reproduce`); costs some ingest throughput
    deterministic: bool = False
    """Keep Ray Data's block order so a one-worker run without random augmentation sees the same batches again."""


@dataclass
class VisionConfig:
    """The image tower: a ViT of these sizes, or a pretrained encoder."""

    image_size: int = num(16, ge=1)
    """Side of the (square) input image in pixels, at least 1 and a multiple of patch_size."""
    patch_size: int = num(4, ge=1)
    """Side of one ViT patch in pixels, at least 1."""
    channels: int = num(3, ge=1)
    """Colour channels of the input image (3 for RGB), at least 1."""
    width: int = num(64, ge=1)
    """Hidden size of the ViT, at least 1 and divisible by heads."""
    layers: int = num(2, ge=0)
    """Transformer blocks of the ViT, at least 0."""
    heads: int = num(2, ge=1)
    """Attention heads per block, at least 1 (a divisor of width)."""
    mlp_ratio: float = num(4.0, gt=0)
    """Hidden size of each block's MLP as a multiple of width, > 0."""
    pretrained: str = ""
    """Empty: build the ViT above; hf:NAME (Hugging Face encoder: local dir or Hub id) or timm:NAME loads a pretrained
    encoder whose own sizes then apply (image_size still sizes the data)."""
    act: str = "gelu"
    """The MLP activation of the ViT's blocks: gelu | quick_gelu (OpenAI's CLIP weights) | gelu_tanh."""
    mean: list[float] = num(default_factory=lambda: [0.5, 0.5, 0.5])
    """Per-channel mean subtracted from pixels scaled to [0, 1] (with std: [0.5]*3 maps them to [-1, 1]); an
    imported model (model.pretrained) sets its own."""
    std: list[float] = num(default_factory=lambda: [0.5, 0.5, 0.5], gt=0)
    """Per-channel standard deviation the centred pixels are divided by."""
    patch_dropout: float = num(0.0, ge=0, lt=1)
    """Fraction of patch tokens each training image drops at random (FLIP), in [0, 1); 0 keeps all; eval keeps all."""
    pool: str = "token"
    """How the ViT pools its tokens into one vector: token (the class token, CLIP/OpenCLIP) | map (SigLIP's
    multi-head attention pooling head: a learned probe attends over all tokens, then LayerNorm and a residual MLP;
    needs class_token=false)."""
    class_token: bool = True
    """Prepend a learned class token (CLIP); false: the sequence is the patch tokens only (SigLIP)."""
    ln_pre: bool = True
    """A LayerNorm on the embedded tokens before the first block (CLIP's pre_layrnorm); false: none (SigLIP)."""
    patch_bias: bool = False
    """Give the patch embedding (a convolution) a bias: false as in CLIP, true as in SigLIP."""
    proj: bool = True
    """A bias-free projection from width to model.embed_dim (CLIP); false: the pooled vector is the embedding
    (SigLIP), so model.embed_dim must equal width."""
    ln_eps: float = num(1e-5, gt=0, le=1e-2)
    """The epsilon of the ViT's LayerNorms, > 0: 1e-5 (torch's default, CLIP's), SigLIP uses 1e-6."""


@dataclass
class TextConfig:
    """The text tower: a transformer over the data's word vocabulary, or a pretrained encoder."""

    vocab_size: int = num(512, ge=2)
    """Words in the tokenizer's vocabulary including special tokens, at least 2."""
    context_length: int = num(16, ge=1)
    """Tokens per caption (longer ones are cut, shorter ones padded), at least 1."""
    width: int = num(64, ge=1)
    """Hidden size of the text transformer, at least 1 and divisible by heads."""
    layers: int = num(2, ge=0)
    """Transformer blocks of the text tower, at least 0."""
    heads: int = num(2, ge=1)
    """Attention heads per block, at least 1 (a divisor of width)."""
    mlp_ratio: float = num(4.0, gt=0)
    """Hidden size of each block's MLP as a multiple of width, > 0."""
    pretrained: str = ""
    """Empty: build the transformer above; hf:NAME loads a pretrained encoder with its own tokenizer (local dir,
    packaged model such as sentence-transformers/all-MiniLM-L6-v2, or Hub id)."""
    act: str = "gelu"
    """The MLP activation of the text transformer's blocks: gelu | quick_gelu (OpenAI's CLIP weights) | gelu_tanh."""
    pool: str = "auto"
    """Where the text tower pools: auto (argmax for the clip_bpe tokenizer, else last) | last (the last non-padding
    token, id 0 pads: the word vocabulary's EOT) | eos
    (the first eos_id: CLIP tokenizers, which may pad with their end-of-text token) | argmax (the highest id:
    OpenAI's CLIP vocabulary) | end (the sequence's last position, padding included: SigLIP, whose tokenizer pads
    every caption to context_length)."""
    eos_id: int = num(2, ge=0)
    """The end-of-text id that pool=eos looks for."""
    causal: bool = True
    """A causal attention mask (CLIP: each token sees the ones before it); false: bidirectional attention over the
    whole padded sequence, no mask at all (SigLIP)."""
    proj_bias: bool = False
    """Give the projection to model.embed_dim a bias: false as in CLIP, true as in SigLIP's text head (a Linear)."""
    ln_eps: float = num(1e-5, gt=0, le=1e-2)
    """The epsilon of the text tower's LayerNorms, > 0: 1e-5 (torch's default, CLIP's), SigLIP uses 1e-6."""
    tokenizer: str = "words"
    """How captions become ids for a text tower trained from scratch: words (a word vocabulary built from the training
    captions; prepared towerlab data only) | clip_bpe (CLIP's 49,408-token byte-level BPE from the open-clip-torch
    wheel: dataset-independent, no unknown tokens; needs model.text.vocab_size >= 49408). Pretrained text towers
    use their own tokenizer."""


@dataclass
class SignalConfig:
    """A third tower for a vector modality, "signal" (an MLP): the 3-modality losses (symile, gram) train on it."""

    dim: int = num(0, ge=0)
    """Features per record of the signal modality, at least 0; 0 means the model has no signal tower."""
    width: int = num(64, ge=1)
    """Hidden size of the signal MLP, at least 1."""
    layers: int = num(2, ge=0)
    """Linear + GELU layers of the signal MLP before its projection, at least 0."""


@dataclass
class ModelConfig:
    """The towers, their shared embedding size and what to freeze."""

    arch: str = "debug"
    """Architecture file in towerlab/models/archs/ whose sizes are the defaults of this section (an unknown name is
    refused with the list)."""
    embed_dim: int = num(32, ge=1)
    """Size of the shared embedding every tower projects to, at least 1."""
    vision: VisionConfig = field(default_factory=VisionConfig)
    """The image tower."""
    text: TextConfig = field(default_factory=TextConfig)
    """The text tower."""
    signal: SignalConfig = field(default_factory=SignalConfig)
    """The optional signal tower (off while dim is 0)."""
    grad_checkpointing: bool = False
    """Recompute each transformer block's activations in backward instead of storing them (less memory, more compute).
    """
    freeze: list[str] = field(default_factory=list)
    """Parameter-name patterns (fnmatch) whose gradients are switched off, e.g. "towers.text.encoder.*" for LiT; each
    must match (`towerlab recipes params RECIPE` lists the names)."""
    pretrained: str = ""
    """A whole two-tower checkpoint to start from: hf:DIR or hf:HUB_ID (a transformers CLIPModel), or
    open_clip:ARCH:FILE (an OpenCLIP state dict and its model config). Its architecture, tokenizer and image
    preprocessing replace the recipe's arch, vision and text sizes; towerlab's own towers hold its weights."""


@dataclass
class OptimConfig:
    """AdamW and its learning-rate schedule."""

    lr: float = num(1e-3, gt=0)
    """Peak learning rate of AdamW (after warmup), > 0."""
    weight_decay: float = num(0.1, ge=0)
    """AdamW's decoupled weight decay, at least 0 (norms, biases, embeddings and the logit scale are not decayed)."""
    betas: list[float] = num(default_factory=lambda: [0.9, 0.98], ge=0, lt=1)
    """AdamW's two moment decay rates [beta1, beta2], each in [0, 1)."""
    eps: float = num(1e-6, gt=0)
    """AdamW's epsilon added to the denominator, > 0."""
    warmup_steps: int = num(20, ge=0)
    """Optimizer steps of linear warmup to lr, at least 0."""
    schedule: Schedule = Schedule.cosine
    """Learning rate after warmup: cosine (decays to lr * min_lr_ratio at the last step) or constant."""
    min_lr_ratio: float = num(0.0, ge=0, le=1)
    """Where the cosine schedule ends, as a fraction of lr, in [0, 1]."""
    grad_clip: float = num(1.0, ge=0)
    """Largest global gradient norm (larger gradients are scaled down), at least 0; 0 turns clipping off."""
    implementation: str = "auto"
    """AdamW kernel: auto (torch's default), foreach, fused or forloop; fused/foreach only where torch has them."""


@dataclass
class TrainConfig:
    """The run: workers, steps, precision, checkpoints, DeepSpeed ZeRO and offload."""

    workers: int = num(2, ge=1)
    """Ray Train workers (data-parallel ranks), at least 1."""
    use_gpu: bool = False
    """Give each worker a GPU (else workers run on CPU)."""
    cpus_per_worker: int = num(1, ge=1)
    """CPU cores reserved per worker (and torch threads on CPU), at least 1."""
    steps: int = num(100, ge=1)
    """Optimizer steps in the whole run, at least 1 (set from train.samples when that is given)."""
    samples: Optional[int] = num(None, ge=1)
    """Samples seen in the whole run (null: train.steps decides): train.steps becomes ceil(samples / data.global_batch),
    so runs of different batch sizes see the same data (a compute-matched budget)."""
    zero_stage: int = num(2, ge=0, le=3, why="DeepSpeed ZeRO stages are 0, 1, 2, 3")
    """DeepSpeed ZeRO stage: 0 (plain data parallel), 1 (optimizer state sharded), 2 (+ gradients) or 3 (+ parameters).
    """
    precision: Precision = Precision.auto
    """Compute precision: auto (fp32 on CPU, bf16 on GPU), fp32, or bf16 (GPU only)."""
    log_every: int = num(10, ge=1)
    """Optimizer steps between training-metric logs, at least 1."""
    checkpoint_every: int = num(50, ge=1)
    """Optimizer steps between checkpoints (one is also written at the end), at least 1."""
    keep_checkpoints: int = num(2, ge=1)
    """Checkpoints kept in storage (older ones are deleted), at least 1."""
    max_failures: int = num(0, ge=-1)
    """Times Ray Train restarts the run from its latest checkpoint after a worker failure, at least 0; -1 retries
    without limit."""
    storage_path: str = "results"
    """Ray Train storage directory or URI: <storage_path>/<name>/ holds the run's checkpoints."""
    # Scale (towerlab plan; ZeRO-3 and offload): the planner refuses a plan that cannot fit device_memory.
    device_memory: Optional[str] = None
    """Memory one worker may use, e.g. "80GiB" or "24GB" (null: the GPU's memory, or on CPU the host's RAM shared by the
    workers)."""
    offload_optimizer: Offload = Offload.none
    """Where ZeRO keeps optimizer state: none (on the device), cpu (ZeRO-Offload, DeepSpeed's CPU Adam) or nvme
    (ZeRO-Infinity); needs zero_stage >= 1."""
    offload_param: Offload = Offload.none
    """Where ZeRO-3 keeps parameters: none (on the device), cpu or nvme; needs zero_stage 3."""
    nvme_path: str = "/tmp/towerlab-nvme"
    """Directory on a local disk for nvme offload (needs Debian's libaio-dev)."""
    # ZeRO-3 optimizer step granularity: the optimizer's temporaries (and with offload, its buffers) are one
    # sub-group's size. DeepSpeed's 1e9 made them a whole partition: +0.55 GiB per worker for a 151M model on 2
    # workers (benchmarks/zero_memory.py). 5e7 is what ZeRO-Infinity needs at 1B+ (part (a) there).
    sub_group_size: int = num(5_000_000, ge=1)
    """Parameters per ZeRO-3 optimizer sub-group (the size of the optimizer step's temporaries), at least 1."""
    # DeepSpeed's 5e8 is a 2 GiB fp32 buffer; 5e7 cost 0.2 GiB per worker more than 5e6 there, at the same speed on
    # CPU (HF Transformers' "auto" uses hidden_size**2: 2M for ViT-g/14)
    reduce_bucket_size: int = num(5_000_000, ge=1)
    """Elements per gradient reduction bucket, and under ZeRO-3 the bound on gathered (live, prefetched) parameters, at
    least 1."""
    export_fp32: bool = False
    """At the end, log a consolidated fp32 state dict (zero_to_fp32) to MLflow; needs zero_stage >= 1."""
    compile: bool = False
    """torch.compile each tower (nn.Module.compile, in place); the first steps pay the compilation time."""


@dataclass
class EvalConfig:
    """Defaults of every evaluator in `evals`."""

    every: int = num(50, ge=1)
    """Optimizer steps between evaluations of every evaluator that sets no `every` of its own (one also runs at the
    end), at least 1."""
    batch_size: int = num(512, ge=1)
    """Samples per forward pass when embedding evaluation data, at least 1."""


@dataclass
class EvaluatorConfig:
    """One entry of the recipe's `evals: {NAME: {...}}`; logged as eval/NAME/METRIC."""

    type: str = "zeroshot"
    """Evaluator: zeroshot, retrieval, geometry or linear_probe (the names registered in
    towerlab.train.evaluate.EVALUATORS)."""
    every: Optional[int] = num(None, ge=1)
    """Optimizer steps between runs of this evaluator, at least 1 (null: eval.every); it always runs at the end."""
    data: str = "heldout"
    """A split of the run's data, or a directory of prepared shards (its heldout split is used)."""
    max_samples: Optional[int] = num(None, ge=1)
    """Evaluate on the first N samples only, at least 1 (null: all)."""
    ks: list[int] = num(default_factory=list, ge=1)
    """The K of top-K accuracy / recall@K, each at least 1 (empty: zeroshot [1, 5], retrieval [1, 5, 10])."""
    chunk: int = num(1024, ge=1)
    """Queries per similarity block, at least 1: memory grows as chunk x N, not N x N."""
    layout: Layout = Layout.auto
    """How `data` is laid out: towerlab (a split or prepared directory), imagefolder (a folder of images per class,
    class name = folder name with _ as space), clip_benchmark (CLIP_benchmark's WebDataset export: SPLIT/*.tar with
    .cls or .txt per image, classnames.txt, zeroshot_classification_templates.txt), karpathy (a
    dataset_coco.json/dataset_flickr30k.json and its images) or auto (recognised from the files)."""
    split: str = "test"
    """The split of a clip_benchmark (its subfolder) or karpathy (the images' `split`) dataset; Karpathy's
    `restval` counts as train."""
    classnames: str = ""
    """Class names of a zeroshot benchmark: a file with one per line, `imagenet` (the ImageNet-1k names shipped with
    towerlab), or empty (the dataset's classnames.txt, else an imagefolder's folder names)."""
    templates: str = ""
    """Prompt templates of a zeroshot benchmark, `{c}` standing for the class name: a file with one per line, `openai`
    (the CLIP paper's 80 ImageNet templates shipped with towerlab), one template (e.g. `a photo of a {c}.`), or empty
    (the dataset's zeroshot_classification_templates.txt, else openai)."""
    images: str = ""
    """The image directory of a karpathy dataset (empty: beside the JSON, under each image's `filepath`)."""
    train_split: str = "train"
    """The split a linear_probe fits on (`split`, or the `data` split of towerlab data, is scored): a clip_benchmark
    subfolder, an imagefolder's subfolder (DATA/TRAIN_SPLIT/CLASS/...; the test images in DATA/SPLIT/CLASS/...), or a
    split of the run's data (e.g. train)."""
    probe_heldout: float = num(0.2, gt=0, lt=1)
    """Share of the linear_probe's train images held out to choose the regularisation C, in (0, 1); the probe is then
    refit on all of them."""


@dataclass
class TrackingConfig:
    """Where MLflow records the run."""

    uri: Optional[str] = None
    """MLflow tracking URI (null: --tracking-uri, else MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlruns.db)."""
    experiment: str = "towerlab"
    """MLflow experiment the run is recorded under."""
    log_models: bool = True
    """At the end, log the last checkpoint, and the best by best_metric, as MLflow LoggedModels (in the hf format where
    the model exports there, else open_clip); a model with no counterpart in either is skipped with a warning."""
    best_metric: Optional[str] = None
    """Metric that picks the best checkpoint, as logged (e.g. eval/zeroshot/top1); null: top1 of the recipe's first
    zeroshot evaluator (none: only the last checkpoint is logged)."""
    best_mode: Mode = Mode.max
    """Whether a larger (max) or smaller (min) best_metric is better."""
    system_metrics_every: float = num(10.0, ge=0, le=3600)
    """Seconds between samples of each node's CPU, memory, disk, network and (with pynvml and a GPU) GPU use, logged
    as system/<node>/... metrics of the run by the first worker on each node, in [0, 3600]; 0: none."""


@dataclass
class Recipe:
    """A whole training recipe: one section per component."""

    name: str = "run"
    """Run name, non-empty without '/': launching the same name again resumes it."""
    seed: int = num(0, ge=0, le=INT64_MAX)
    """Seed of the initial weights, shuffling and augmentation, in [0, 2**63 - 1]."""
    data: DataConfig = field(default_factory=DataConfig)
    """Training data, batching and augmentation."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The towers and the shared embedding."""
    loss: Any = None
    """The loss family and its parameters (a losses.LossConfig subclass, chosen by loss.name)."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """AdamW and the learning-rate schedule."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Workers, steps, precision, checkpoints and DeepSpeed settings."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Defaults of every evaluator."""
    evals: dict[str, EvaluatorConfig] = field(default_factory=dict)
    """Evaluators by name, logged as eval/NAME/METRIC (a recipe file without this section gets DEFAULT_EVALS)."""
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    """MLflow tracking."""
    presets: dict[str, Any] = field(default_factory=dict)
    """Named sets of overrides inside a recipe file, applied by the override preset=NAME (e.g. `smoke`: a cluster recipe
    run tiny on one machine)."""


# The evaluators of a recipe whose file declares no `evals` section.
DEFAULT_EVALS = {"zeroshot": {"type": "zeroshot"}, "retrieval": {"type": "retrieval"},
                 "geometry": {"type": "geometry"}}
