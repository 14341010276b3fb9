"""The Ray Data pipeline: read_parquet or read_webdataset over a split's shards (a local directory or a URI, one
code path through the manifest's pyarrow filesystem), or for foreign WebDataset shards (img2dataset's layout, no
manifest.json) data/foreign.py's reader -> decode + augment + tokenize in map_batches (foreign rows: dirty samples
dropped and counted in a `skipped` column).

Two shapes of training dataset (`TrainData`):
- one pass holds every epoch of the run: small prepared datasets (raw rows read once by the driver; `EpochOrder`
  turns positions into the rows of each epoch's seeded permutation) and resampled foreign shards (each epoch's
  draws). Preprocessing then streams across epoch boundaries; a per-epoch restart would stall training at every
  epoch start while the first batches are decoded, which for a small dataset is every few steps;
- one epoch, iterated again per epoch: datasets streamed from their shards, each worker reseeding its local
  shuffle buffer every epoch (`epoch_batches`) so every epoch has a new order that a seed reproduces.
`skip_batches` starts part-way (a resumed run).

The same `Preprocessor` serves evaluation (without augmentation) on the worker, where the held-out split is small
enough to read directly. With captions_per_image = k > 1, `text` is [B, k, L] (k captions of each image) and `id`
identifies the image, so the training step can expand the batch into k positives per image (`expand_positives`).
"""

from __future__ import annotations

import itertools
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from towerlab.config.errors import ConfigError
from towerlab.config.schema import AugmentConfig, Recipe
from towerlab.data.formats import read_rows, read_table, wds_row
from towerlab.data.shards import Manifest
from towerlab.data.text_augment import TokenAugment, captions_of, choose
from towerlab.data.bpe import ClipBPETokenizer
from towerlab.data.tokenizer import HFTokenizer, Tokenizer


class Preprocessor:
    """Turns a batch of {image: encoded bytes, caption: str, [captions], label: int, [id]} into model inputs
    (numpy): image [B, 3, S, S], text [B, L] (or [B, k, L] with k captions per image), label, id."""

    def __init__(self, vocab: list[str], image_size: int, context_length: int, vocab_size: int,
                 augment: AugmentConfig | None, seed: int | None = None, captions_per_image: int = 1,
                 pretrained_text: str = "", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), tokenizer: str = "words"):
        if pretrained_text:  # a pretrained text tower reads its own tokenizer's ids, not the data's vocabulary
            self.tokenizer = HFTokenizer(pretrained_text, context_length)
        elif tokenizer == "clip_bpe":  # dataset-independent: the data's vocabulary is not read
            self.tokenizer = ClipBPETokenizer(context_length)
        else:
            self.tokenizer = Tokenizer(vocab, context_length, vocab_size)
        self.image_size = image_size
        self.mean, self.std = tuple(mean), tuple(std)
        self.augment = augment
        self.k = captions_per_image
        self.token_augment = TokenAugment(vocab[:vocab_size], augment)
        self.rng = np.random.default_rng(seed)

    def texts(self, batch: dict) -> list[str]:
        """k captions per row, flattened row-major."""
        extra = batch.get("captions")
        rows = [captions_of(c, None if extra is None else extra[i]) for i, c in enumerate(batch["caption"])]
        return [t for caps in rows for t in choose(caps, self.k, self.augment, self.rng)]

    def tokens(self, batch: dict) -> np.ndarray:
        """The batch's captions tokenized ([B * k, L], k per row, row-major), token augmentation applied."""
        return self.token_augment(self.tokenizer.encode_batch(self.texts(batch)), self.rng)

    def image(self, data: bytes) -> np.ndarray:
        """One encoded image as the model sees it in evaluation (resized, normalised; no augmentation)."""
        from towerlab.data.images import decode

        return decode(data, self.image_size, None, None, self.mean, self.std)

    def __call__(self, batch: dict) -> dict:
        from towerlab.data.images import decode

        if "problem" in batch:  # foreign (web) data: dirty samples are dropped and counted, never a crash
            return self.tolerant(batch)
        images = np.stack([decode(b, self.image_size, self.augment, self.rng, self.mean, self.std)
                           for b in batch["image"]])
        text = self.tokens(batch)
        n = len(images)
        out = {
            "image": images,
            "text": text.reshape(n, self.k, -1) if self.k > 1 else text,
            "label": np.asarray(batch["label"], dtype=np.int64),
        }
        if "id" in batch:
            out["id"] = np.asarray(batch["id"], dtype=np.int64)
        if "signal" in batch:  # a third modality's feature vectors (synthetic3): no preprocessing
            out["signal"] = np.stack([np.asarray(v, dtype=np.float32) for v in batch["signal"]])
        return out

    def tolerant(self, batch: dict) -> dict:
        """A batch of foreign rows (data/foreign.py): rows with a `problem` (no image, no caption, an unreadable
        shard) and images that do not decode are dropped; `skipped` carries how many (on the first kept row, so the
        training loop can sum it per epoch; a batch with no usable row at all goes uncounted)."""
        from towerlab.data.images import decode

        images, keep = [], []
        for i, (data, problem) in enumerate(zip(batch["image"], batch["problem"])):
            if problem:
                continue
            try:
                images.append(decode(data, self.image_size, self.augment, self.rng, self.mean, self.std))
            except Exception:  # PIL raises many types for undecodable bytes (OSError, SyntaxError, ValueError, ...)
                continue
            keep.append(i)
        kept = {k: [v[i] for i in keep] for k, v in batch.items() if k in ("caption", "captions", "label")}
        n, s, L = len(keep), self.image_size, self.tokenizer.context_length
        text = self.tokens(kept) if n else \
            np.zeros((0, self.k, L) if self.k > 1 else (0, L), dtype=np.int64)
        skipped = np.zeros(n, dtype=np.int64)
        if n:
            skipped[0] = len(batch["image"]) - n
        return {
            "image": np.stack(images) if n else np.zeros((0, 3, s, s), dtype=np.float32),
            "text": text.reshape(n, self.k, -1) if self.k > 1 else text,
            "label": np.asarray(kept["label"], dtype=np.int64),
            "skipped": skipped,
        }


def preprocessor(recipe: Recipe, manifest: Manifest, train: bool, captions_per_image: int = 1) -> Preprocessor:
    return Preprocessor(manifest.vocab, recipe.model.vision.image_size, recipe.model.text.context_length,
                        recipe.model.text.vocab_size, recipe.data.augment if train else None,
                        seed=None if train else 0, captions_per_image=captions_per_image if train else 1,
                        pretrained_text=tokenizer_spec(recipe), mean=recipe.model.vision.mean,
                        std=recipe.model.vision.std, tokenizer=recipe.model.text.tokenizer)


def tokenizer_spec(recipe: Recipe) -> str:
    """The Hugging Face tokenizer the run reads, "" for the data's word vocabulary: a pretrained text tower's, an
    imported two-tower model's (model.pretrained: hf:DIR), or the one `towerlab export --format open_clip` wrote
    beside an OpenCLIP state dict (model.pretrained: open_clip:ARCH:FILE, FILE's directory holding
    tokenizer_config.json)."""
    m = recipe.model
    if m.text.pretrained:
        return m.text.pretrained
    if m.pretrained.startswith("hf:"):
        return m.pretrained
    if m.pretrained.startswith("open_clip:"):
        folder = Path(m.pretrained.rpartition(":")[2]).expanduser().parent
        if (folder / "tokenizer_config.json").is_file():
            return f"hf:{folder}"
    return ""


# Below this many bytes of shards, the driver reads the raw rows itself (pyarrow, well under a second) and hands
# them to Ray's object store: every epoch then re-runs only decode + augment, not file listing and reading (which
# dominated small datasets' epochs). Reading them with Ray Data tasks and materialize() did the same in 6-24 s on a
# 2-core machine, most of it starting the tasks' worker processes: a fixed cost of every small run.
CACHE_RAW_BYTES = 256 << 20


def read_split(manifest: Manifest, split: str):
    """A split's shards as a lazy Ray Dataset of raw rows, whatever the shard format and wherever they live."""
    import ray.data

    files, fs = manifest.files(split), manifest.loc.fs
    if manifest.shard_format == "webdataset":
        return ray.data.read_webdataset(files, filesystem=fs, decoder=wds_row)
    return ray.data.read_parquet(files, filesystem=fs, columns=manifest.columns)


def _split_bytes(manifest: Manifest, split: str) -> int:
    known = manifest.nbytes(split)
    if known is not None:
        return known
    return sum(os.path.getsize(f) for f in manifest.files(split) if os.path.exists(f))


def read_train_tables(manifest: Manifest, bad_shards: str = "error") -> list:
    """Every training shard as an Arrow table, read here on the driver (small datasets). Shards are not hashed at
    launch unless data.verify_shards is on, so a truncated or overwritten shard shows up here: with
    bad_shards="error" it is one ConfigError naming it and the fix; with "skip" it is left out with a warning, and
    recorded in the manifest (`Manifest.skip`) like a shard that failed verification."""
    fs, fmt = manifest.loc.fs, manifest.shard_format
    tables = []
    for entry, path in zip(list(manifest.data["splits"]["train"]), manifest.files("train")):
        try:
            tables.append(read_table(fs, path, fmt, manifest.columns))
        except Exception as e:  # noqa: BLE001: tarfile, pyarrow, json and OS errors all mean "cannot read it"
            lines = str(e).strip().splitlines()
            problem = f"cannot be read ({type(e).__name__}: {(lines[-1] if lines else '')[:200]})"
            shown = manifest.loc.name(entry["file"])
            if bad_shards != "skip":
                raise ConfigError(f"shard {shown} {problem}: restore it (download or prepare the dataset again), "
                                  "or set data.bad_shards=skip to train without it") from None
            print(f"warning: skipping shard {shown} ({entry['rows']} rows): {problem} (data.bad_shards=skip)",
                  file=sys.stderr)
            manifest.skip("train", entry, problem)
    if not tables:
        raise ConfigError(f"no training shard of {manifest.uri} can be read: restore them, or prepare the dataset "
                          "again")
    return tables


@dataclass
class TrainData:
    """The training split as a lazy Ray Dataset of model inputs, and how it covers the run: `epoch_samples` > 0 when
    one pass holds every epoch (an epoch is that many samples of it), 0 when the dataset is one epoch; `start` is
    the run's sample count at the pass's first row (a resumed run's pass starts where its checkpoint stopped)."""

    dataset: Any
    epoch_samples: int = 0
    start: int = 0


# rows per block of a one-pass dataset: small enough that the first batches arrive soon after start
PASS_BLOCK_ROWS = 256


def train_dataset(recipe: Recipe, manifest: Manifest, captions_per_image: int = 1, start: int = 0) -> TrainData:
    """The training split, augmentation re-drawn every epoch. `start`: samples of the run already trained on (a
    resumed run's), where a one-pass dataset begins."""
    import ray.data

    from towerlab.config import resolve_batch
    from towerlab.data.foreign import epochs_needed

    pre = preprocessor(recipe, manifest, train=True, captions_per_image=captions_per_image)
    # tasks, at most preprocess_concurrency at once (Ray 2.51 deprecated map_batches' `concurrency` for this)
    compute = ray.data.TaskPoolStrategy(size=recipe.data.preprocess_concurrency)
    run_samples = recipe.train.steps * resolve_batch(recipe.data.global_batch, recipe.train.workers,
                                                     recipe.data.micro_batch).global_batch
    if manifest.foreign:  # shards towerlab did not write, read in place (data/foreign.py)
        from towerlab.data.foreign import read_train

        n = recipe.data.num_samples or manifest.count("train")
        # resampled: the draws of every epoch the run reaches, each epoch's seeded by (seed, epoch)
        ds = read_train(manifest, recipe.data, recipe.seed, epochs_needed(run_samples, n))
        return TrainData(ds.map_batches(pre, batch_size=256, compute=compute), n if recipe.data.resampled else 0)
    if _split_bytes(manifest, "train") < CACHE_RAW_BYTES:
        import pyarrow as pa

        table = pa.concat_tables(read_train_tables(manifest, recipe.data.bad_shards)).combine_chunks()
        n = table.num_rows
        start = start if start < run_samples else 0  # a finished run extended: its pass starts over
        rows = epochs_needed(run_samples, n) * n - start
        order = EpochOrder(ray.put(table), n, recipe.seed, start, pre)
        ds = ray.data.range(rows, override_num_blocks=max(1, min(-(-rows // PASS_BLOCK_ROWS), 4096)))
        return TrainData(ds.map_batches(order, batch_size=None, compute=compute), n, start)
    return TrainData(read_split(manifest, "train").map_batches(pre, batch_size=256, compute=compute))


class EpochOrder:
    """Positions in a pass over several epochs -> model inputs of the raw rows there: positions [e*n, (e+1)*n) are
    epoch e, which visits each of the n rows once, in the order of a permutation seeded by (seed, e). The rows
    live in Ray's object store (`table_ref`, an Arrow table), read without copying by every preprocessing task."""

    def __init__(self, table_ref, n: int, seed: int, start: int, pre: Preprocessor):
        self.ref, self.n, self.seed, self.start, self.pre = table_ref, n, seed, start, pre
        self._table, self._perms = None, {}

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_table": None, "_perms": {}}

    def order(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            self._perms = {epoch: np.random.default_rng((self.seed, 0x0EB0C, epoch)).permutation(self.n)}
        return self._perms[epoch]

    def rows(self, positions: np.ndarray) -> np.ndarray:
        """Row indices at these (absolute) positions."""
        epochs, within = np.divmod(positions, self.n)
        out = np.empty_like(positions)
        for e in np.unique(epochs):
            at = epochs == e
            out[at] = self.order(int(e))[within[at]]
        return out

    def __call__(self, batch: dict) -> dict:
        import ray

        if self._table is None:
            self._table = ray.get(self.ref)
        picked = self._table.take(self.rows(np.asarray(batch["id"], dtype=np.int64) + self.start))
        return self.pre({c: picked.column(c).to_numpy(zero_copy_only=False) for c in picked.column_names})


def epoch_batches(shard, recipe: Recipe, micro_batch: int, epoch: int, skip_batches: int = 0,
                  shuffle: bool = True) -> Iterator[dict]:
    """One epoch of torch batches from a worker's dataset shard, in an order seeded by (seed, epoch) (or the whole
    pass of a one-pass dataset, already in order: `shuffle=False`). With `skip_batches`, it starts after that many
    batches (a run resumed mid-epoch; the same seed gives the same local order, so the skipped batches are the ones
    already trained on up to Ray Data's block assignment)."""
    buffer = recipe.data.shuffle_buffer if shuffle else 0
    batches = shard.iter_torch_batches(
        batch_size=micro_batch,
        drop_last=True,
        local_shuffle_buffer_size=buffer or None,
        local_shuffle_seed=recipe.seed * 100_003 + epoch if buffer else None,
    )
    return itertools.islice(batches, skip_batches, None) if skip_batches else iter(batches)


class EarlyStart:
    """An iterator whose first item is fetched in a background thread from the moment it is made, so what that
    first item waits on (for Ray Data: the split coordinator actor, the preprocessing tasks and their processes)
    starts while the caller does other work (the worker builds its model and DeepSpeed engine). `take()` waits for
    that item and returns the whole iterator; an error met fetching it is raised there, as iteration would."""

    def __init__(self, it: Iterator):
        import threading

        self._it, self._first, self._error = it, [], None
        self._thread = threading.Thread(target=self._fetch, name="towerlab-first-batch", daemon=True)
        self._thread.start()

    def _fetch(self) -> None:
        try:
            self._first.append(next(self._it))
        except StopIteration:
            pass
        except BaseException as e:  # noqa: BLE001 - handed to the consuming thread
            self._error = e

    def take(self) -> Iterator:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return itertools.chain(self._first, self._it)


def split_columns(manifest: Manifest, split: str, columns: list[str]) -> dict[str, list]:
    """Some columns of a whole (small) split, read through the dataset's filesystem in either format (foreign
    shards through their own reader, dirty samples left out)."""
    if manifest.foreign:
        from towerlab.data.foreign import split_rows

        return split_rows(manifest, split, columns)
    out: dict[str, list] = {c: [] for c in columns}
    for f in manifest.files(split):
        part = read_rows(manifest.loc.fs, f, manifest.shard_format, columns)
        for c in columns:
            out[c].extend(part.get(c, [None] * len(part[columns[0]])))
    return out


def load_split(manifest: Manifest, split: str, pre: Preprocessor) -> dict[str, np.ndarray]:
    """A whole (small) split, preprocessed without augmentation: evaluation data."""
    return pre(split_columns(manifest, split, [c for c in manifest.columns if c != "id"]))


def expand_positives(batch: dict) -> dict:
    """A batch with k captions per image ([B, k, L] text) as B*k image-caption pairs: each image repeated k times,
    label = the image's id, so the multi_positive losses (loss_class(name).multi_positive) treat the k captions
    of an image as its positives. A batch with one caption per image is returned as it is."""
    text = batch["text"]
    if text.ndim != 3:
        return batch
    k = text.shape[1]
    return {"image": batch["image"].repeat_interleave(k, dim=0), "text": text.reshape(-1, text.shape[-1]),
            "label": batch["id"].repeat_interleave(k)}
