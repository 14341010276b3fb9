"""A run's training data as an MLflow dataset input: what the MLflow UI shows in its Datasets column and run page,
so two runs trained on different data (or on the same data under another name) are told apart at a glance.

The dataset is metadata only (MLflow's MetaDataset): its name (the built-in source, e.g. `digits`, or the corpus
directory's basename), its source (where the shards are, without credentials), its digest (the manifest's
fingerprint, shortened to what MLflow stores) and a profile with the counts (samples and shards per split, and the
full fingerprint). The rows themselves never go to MLflow.
"""

from __future__ import annotations

import json
import posixpath
import sys
import warnings
from typing import Any

from towerlab.config.secrets import redact_uri

CONTEXT_TRAINING = "training"
# MLflow stores a digest of at most 36 characters and advises about 8; 12 hex digits of the sha256 fingerprint keep
# distinct datasets distinct, and the profile carries the whole fingerprint
DIGEST_LEN = 12
# data.source values whose shards the user names by location (the others are built-in sources, named by themselves)
LOCATED = ("parquet", "webdataset")


def dataset_name(source: str, location: str) -> str:
    """The built-in source (digits, synthetic, ...), else the basename of where the shards are: a directory's own
    name, or the directory of a pattern or a single shard file (`/data/laion/{00000..00099}.tar` is `laion`)."""
    if source not in LOCATED:
        return source
    first = location.split(", ")[0].rstrip("/")  # several data.paths are shown joined (data/foreign.py)
    base = posixpath.basename(first)
    if "{" in base or "*" in base or base.endswith((".tar", ".parquet")):
        base = posixpath.basename(posixpath.dirname(first))
    return base or source


def profile(manifest: Any) -> dict:
    """The counts a comparison needs: samples and shards per split (the held-out split is what the evaluators use
    where they evaluate on the run's data), where a foreign corpus's count came from, and the whole fingerprint."""
    counts = manifest.counts
    out: dict[str, Any] = {"samples": counts.get("train")}
    shards = {split: len(entries) for split, entries in manifest.data.get("splits", {}).items()}
    out["shards"] = shards.get("train")
    for split in sorted(counts):
        if split != "train":
            out[f"{split}_samples"], out[f"{split}_shards"] = counts[split], shards.get(split)
    if manifest.skipped:
        out["skipped_shards"] = len(manifest.skipped)
    if "count_source" in manifest.data:
        out["count_source"] = manifest.data["count_source"]
    if len(manifest.data.get("sources", [])) > 1:  # a mixture (data.sources): one line per corpus
        out["mixture"] = [f"{c['path']} weight={c['weight']:g} share={c['share']:.3g} samples={c['samples']} "
                          f"({c['count_source']})" for c in manifest.data["sources"]]
    out["fingerprint"] = manifest.fingerprint
    if "fingerprint_of" in manifest.data:
        out["fingerprint_of"] = manifest.data["fingerprint_of"]
    return out


def _source(uri: str):
    """MLflow's own source for the URI (local, s3, gs, http, ...) so the UI shows it as such; a scheme MLflow does
    not know (hf://) still gets a source that records the URI."""
    from mlflow.data.dataset_source import DatasetSource
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.exceptions import MlflowException

    try:
        with warnings.catch_warnings():  # a local path matches two registered sources; MLflow warns and takes one
            warnings.simplefilter("ignore")
            return resolve_dataset_source(uri)
    except MlflowException:
        pass

    class URISource(DatasetSource):
        @staticmethod
        def _get_source_type() -> str:
            return "uri"

        def load(self, dst_path=None):
            raise NotImplementedError

        @staticmethod
        def _can_resolve(raw_source) -> bool:
            return False

        @classmethod
        def _resolve(cls, raw_source):
            raise NotImplementedError

        def to_dict(self) -> dict:
            return {"uri": uri}

        @classmethod
        def from_dict(cls, source_dict):
            raise NotImplementedError

    return URISource()


def training_dataset(source: str, manifest: Any):
    """The MLflow dataset (a MetaDataset with a profile) describing the run's training data: `source` is
    data.source, `manifest` the prepared or listed shards (data/shards.py Manifest)."""
    from mlflow.data.meta_dataset import MetaDataset

    class ShardDataset(MetaDataset):
        """MetaDataset has no profile; MLflow's own datasets (pandas, numpy) add theirs to to_dict like this."""

        def __init__(self, *args, profile: dict, **kwargs):
            self._profile = profile
            super().__init__(*args, **kwargs)

        @property
        def profile(self) -> dict:
            return self._profile

        def to_dict(self) -> dict:
            return {**super().to_dict(), "profile": json.dumps(self._profile)}

    location = redact_uri(manifest.uri)  # a user:password@ or ?token= in data.path stays out of the store
    return ShardDataset(_source(location), name=dataset_name(source, location),
                        digest=manifest.fingerprint[:DIGEST_LEN], profile=profile(manifest))


def log_training_dataset(client, run_id: str, source: str, manifest: Any) -> bool:
    """Log the training data as the run's dataset input (context "training"). A store that refuses it (an MLflow
    server too old for dataset inputs) is a warning: the data fingerprint tag and data.json still identify it."""
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    try:
        dataset = training_dataset(source, manifest)._to_mlflow_entity()
        client.log_inputs(run_id, datasets=[DatasetInput(dataset, [InputTag(MLFLOW_DATASET_CONTEXT,
                                                                            CONTEXT_TRAINING)])])
    except Exception as e:  # noqa: BLE001: the run trains the same without it
        lines = str(e).strip().splitlines() or [""]
        print(f"warning: the training data is not logged as an MLflow dataset input ({type(e).__name__}: "
              f"{lines[-1][:200]}); its fingerprint is the run's tag towerlab.data_fingerprint", file=sys.stderr)
        return False
    return True
