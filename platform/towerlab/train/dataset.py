"""A run's data, checked before any process starts: the prepared shards (`ensure_data`: built-in sources are prepared
on first use), what the recipe expects of them (`check_prepared`), and how many captions per image a batch takes.
The rows themselves stream through data/pipeline.py's Ray Data path."""

from __future__ import annotations

from pathlib import Path

from towerlab.config import ConfigError, Recipe, resolve_batch
from towerlab.data import Manifest, prepare, read_manifest
from towerlab.data.foreign import is_foreign, shard_manifest
from towerlab.losses import loss_class
from towerlab.train.recipe import data_dir

PREPARED = ("parquet", "webdataset")  # data.source values that read data.path as prepared by `towerlab data prepare`

def ensure_data(recipe: Recipe) -> Manifest:
    """The run's shards: prepared ones through their manifest (built-in sources are prepared on first use into a
    local directory, never into a URI; checksums verified with data.verify_shards), foreign WebDataset or Parquet
    shards listed in place (data/foreign.py)."""
    path = data_dir(recipe)
    if is_foreign(recipe.data):
        manifest = shard_manifest(recipe.data, seed=recipe.seed)
        check_foreign(recipe, manifest)
        check_positives(recipe, *positives_of(manifest), manifest.uri)
    else:
        if recipe.data.source not in PREPARED and isinstance(path, Path) and not (path / "manifest.json").exists():
            prepare(recipe.data.source, path, seed=0, key="data.path",
                    size=recipe.data.synthetic_size if recipe.data.source.startswith("synthetic") else None)
        if recipe.data.heldout_shards:
            raise ConfigError(f"data.heldout_shards={recipe.data.heldout_shards} holds out foreign shards, but "
                              f"{path} is a prepared dataset with its own held-out split: set data.heldout_shards=0")
        manifest = read_manifest(path, verify=recipe.data.verify_shards, bad_shards=recipe.data.bad_shards)
        check_prepared(recipe, manifest)
        check_positives(recipe, *positives_of(manifest), manifest.uri)
    plan = resolve_batch(recipe.data.global_batch, recipe.train.workers, recipe.data.micro_batch)
    per_worker = manifest.count("train") // plan.world_size
    if per_worker < plan.per_worker:
        raise ConfigError(f"data.global_batch={plan.global_batch} needs {plan.per_worker} training samples per "
                          f"worker per step but {path} gives each of {plan.world_size} workers only {per_worker}: "
                          "lower data.global_batch")
    return manifest


def check_foreign(recipe: Recipe, manifest: Manifest) -> None:
    """What foreign shards cannot give: a word vocabulary (none was built from their captions) and class labels;
    evaluators read their held-out shards (data.heldout_shards, captions only) or a prepared directory."""
    t = recipe.model.text
    if not t.pretrained and t.tokenizer == "words":
        raise ConfigError(f"data.source={recipe.data.source} over {manifest.uri} (shards without a towerlab manifest) has no "
                          "word vocabulary: set model.text.tokenizer=clip_bpe model.text.vocab_size=49408 "
                          "(or a pretrained text tower)")
    for name, ev in recipe.evals.items():
        if ev.data in manifest.splits:
            if ev.type in ("zeroshot", "linear_probe"):
                raise ConfigError(f"evals.{name} ({ev.type}) needs class labels, which the foreign shards of "
                                  f"{manifest.uri} have not: give it a prepared directory as data, or drop it "
                                  "(e.g. evals: {retrieval: {type: retrieval}})")
        elif not (Path(ev.data) / "manifest.json").is_file():
            fix = "hold some shards out with data.heldout_shards (e.g. 0.05), " if ev.data == "heldout" else ""
            raise ConfigError(f"evals.{name}.data={ev.data}: foreign shards have no held-out split or "
                              f"labels to evaluate on: {fix}point it at a prepared directory (`towerlab data "
                              "prepare`), or train without evaluators (evals={})")


def check_prepared(recipe: Recipe, manifest: Manifest) -> None:
    """What the recipe expects of a prepared dataset agrees with its manifest."""
    if recipe.data.source in PREPARED and manifest.shard_format != recipe.data.source:
        raise ConfigError(f"data.source={recipe.data.source} but {manifest.uri} holds {manifest.shard_format} shards: "
                          f"set data.source={manifest.shard_format}")
    if recipe.model.signal.dim and recipe.model.signal.dim != manifest.signal_dim:
        raise ConfigError(f"model.signal.dim={recipe.model.signal.dim} but {manifest.uri} has "
                          + (f"signals of {manifest.signal_dim} features: set model.signal.dim="
                             f"{manifest.signal_dim}" if manifest.signal_dim is not None else
                             "no 'signal' column: use data.source=synthetic3, or set model.signal.dim=0"))
    for name, ev in recipe.evals.items():
        if ev.type == "zeroshot" and ev.data in manifest.splits and not manifest.classes.get("prompts"):
            raise ConfigError(f"evals.{name} is a zero-shot evaluator but {manifest.uri} has no class labels: give the "
                              "recipe an `evals:` section without it (e.g. evals: {retrieval: {type: retrieval}}) "
                              "or prepare the data with a 'label' column in the captions file")
    if any(ev.data == "heldout" for ev in recipe.evals.values()) and not manifest.counts.get("heldout"):
        raise ConfigError(f"{manifest.uri} has no held-out records to evaluate on: prepare it again with --heldout "
                          "above 0 (e.g. 0.1)")
    for s in manifest.skipped:
        print(f"warning: skipping shard {s['file']} ({s['rows']} rows): {s['problem']} (data.bad_shards=skip)")


def positives_of(manifest: Manifest) -> tuple[bool, int]:
    """(whether the data has class labels, the most captions one record has) from its manifest: class names are
    written only for labelled data (foreign shards have none); `data prepare images` reports its records'
    captions, the built-in sources have one each."""
    report = manifest.data.get("report") or {}
    return bool(manifest.classes.get("names")), max(int(report.get("max_captions") or 1), 1)


def peek_positives(recipe: Recipe) -> tuple[bool, int, str] | None:
    """positives_of for the recipe's data as far as it is known without preparing, listing or downloading anything
    (a sweep checks every trial's recipe this way before Ray starts): a local prepared directory's manifest, a
    built-in source not prepared yet (each has class labels and one caption per record), local shards without a
    towerlab manifest (foreign: no labels). None when it cannot be known here (a URI, data.paths, a path that does
    not exist yet); the driver checks again with the manifest in hand."""
    if recipe.data.sources:  # a mixture of foreign corpora: no class labels, one caption per sample
        return False, 1, "data.sources"
    path = data_dir(recipe)
    if recipe.data.paths or not isinstance(path, Path):
        return None
    if (path / "manifest.json").is_file():
        try:
            return (*positives_of(read_manifest(path)), str(path))
        except ConfigError:
            return None  # a corrupt manifest: the driver names it
    if recipe.data.source not in PREPARED:
        return True, 1, f"data.source={recipe.data.source}"
    return (False, 1, str(path)) if path.exists() else None


def check_positives(recipe: Recipe, labelled: bool, captions: int, where: str) -> None:
    """A loss that takes its positives from labels (loss_class(name).needs_labels) gets them: from class labels,
    or, for a multi-positive loss, from image ids when each image brings several captions (data.captions_per_image
    > 1 over records that have them: captions of one image are positives). Otherwise every row would be labelled
    -1 and all pairs positive (a zero loss), so refuse before launch, in one line naming the loss and the fix."""
    name = recipe.loss.name
    cls = loss_class(name)
    if not cls.needs_labels or labelled:
        return
    k = recipe.data.captions_per_image
    if cls.multi_positive and k > 1 and captions > 1:
        return
    fix = "use a labelled dataset (`towerlab data prepare images` with a 'label' column) or loss.name=clip"
    if not cls.multi_positive:
        raise ConfigError(f"loss.name={name} takes its positives from class labels; data {where} has none: {fix}")
    head = f"loss.name={name} needs class labels or several captions per image; data {where} has no class labels"
    if captions > 1:
        raise ConfigError(f"{head}: set data.captions_per_image={captions} (an image's captions are its "
                          f"positives), or {fix}")
    repeats = f" (data.captions_per_image={k} repeats it)" if k > 1 else ""
    raise ConfigError(f"{head} and one caption per record{repeats}: {fix}")


def captions_per_image(recipe: Recipe) -> int:
    """Captions per image in a training batch: data.captions_per_image for losses that take several positives,
    else one (chosen at random among the record's captions when data.augment.caption_choice is on)."""
    return recipe.data.captions_per_image if loss_class(recipe.loss.name).multi_positive else 1


# above this share of unknown words in the zero-shot prompts, zero-shot accuracy mostly measures <unk>
UNKNOWN_WARN = 0.5


def prompt_unknown_share(recipe: Recipe, manifest: Manifest) -> float | None:
    """The share of the zero-shot evaluators' prompt words that the run's word vocabulary maps to <unk>; None when
    the run has no zero-shot prompts or its tokenizer is not the word vocabulary (BPE has no unknown token; a
    pretrained tower's tokenizer is its own). Warns on the console when most words are unknown."""
    from towerlab.data.tokenizer import Tokenizer

    if recipe.model.text.pretrained or recipe.model.text.tokenizer != "words":
        return None
    prompts: list[str] = []
    for ev in recipe.evals.values():
        if ev.type != "zeroshot":
            continue
        source = manifest if ev.data in manifest.splits else None
        if source is None and (Path(ev.data) / "manifest.json").is_file():
            source = read_manifest(ev.data)
        if source is not None:
            prompts += [p for ps in source.classes.get("prompts", []) for p in ps]
    if not prompts:
        return None
    t = recipe.model.text
    share = Tokenizer(manifest.vocab, t.context_length, t.vocab_size).unknown_share(prompts)
    if share > UNKNOWN_WARN:
        print(f"warning: {share:.0%} of the zero-shot prompts' words are unknown to the training captions' word "
              "vocabulary (<unk>): zero-shot accuracy will mostly measure <unk>; set model.text.tokenizer=clip_bpe "
              "(and model.text.vocab_size=49408)")
    return share
