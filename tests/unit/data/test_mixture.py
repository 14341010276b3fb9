"""Weighted mixtures of foreign corpora (`data.sources`), per-epoch resampled draws and held-out shards
(`data.heldout_shards`), on real tars in img2dataset's layout written by the webdataset library: the recipe's
checks, each corpus's listing and count, the draw shares (checked against the weights by an independent numpy
computation of the samples drawn), draws that differ per epoch and repeat per seed, and the held-out split."""

from __future__ import annotations

import json

import numpy as np
import pytest

from towerlab.config import ConfigError
from towerlab.data.foreign import epochs_needed, heldout_choice, resample, shard_manifest
from towerlab.train.recipe import load_recipe

BPE = ["model.text.tokenizer=clip_bpe", "model.text.vocab_size=49408"]
QUIET = dict(say=lambda s: None)


@pytest.fixture
def corpora(tmp_path, make_wds_shards):
    """Two corpora of different sizes: 4 shards of 6 samples (a) and 2 shards of 10 (b), all with stats files."""
    a = make_wds_shards(tmp_path / "a", shards=4, per_shard=6, dirty=False, corrupt_shard=False)
    b = make_wds_shards(tmp_path / "b", shards=2, per_shard=10, seed=1, dirty=False, corrupt_shard=False)
    return a["root"], b["root"]


def recipe(*overrides):
    return load_recipe(None, ["data.source=webdataset", *BPE, "evals={}", "data.global_batch=4", "train.workers=1",
                              *overrides])


def mixture(a, b, wa=1, wb=1, *extra):
    return recipe(f"data.sources=[{{path: {a}, weight: {wa}}}, {{path: {b}, weight: {wb}}}]", *extra)


def test_each_corpus_is_listed_and_counted_and_the_console_says_where_from(corpora, tmp_path, capsys):
    a, b = corpora
    (b / "00001_stats.json").unlink()  # b's count: its num_samples, since not every shard has a stats file
    r = recipe(f"data.sources=[{{path: {a}, weight: 3}}, {{path: {b}, weight: 1, num_samples: 20}}]",
               "data.resampled=true")
    m = shard_manifest(r.data)
    out = capsys.readouterr().out
    assert "a mixture of 2 WebDataset corpora, 6 shard(s), 44 samples" in out
    assert (f"{a}: weight 3 (75% of the training samples), 4 shard(s), 24 samples (from img2dataset's _stats.json "
            "files)") in out
    assert (f"{b}: weight 1 (25% of the training samples), 2 shard(s), 20 samples (from "
            "data.sources[].num_samples)") in out
    assert m.count("train") == 44 and m.splits == ["train"]
    assert [e["source"] for e in m.data["splits"]["train"]] == [0, 0, 0, 0, 1, 1]
    assert [(s["weight"], s["samples"], s["shards"]) for s in m.data["sources"]] == [(3.0, 24, 4), (1.0, 20, 2)]
    # equal weights without resampling: the plain concatenation of the corpora
    plain = shard_manifest(mixture(a, b).data, **QUIET)
    assert plain.files("train") == sorted(map(str, a.glob("*.tar"))) + sorted(map(str, b.glob("*.tar")))
    assert [s["share"] for s in plain.data["sources"]] == [24 / 44, 20 / 44]  # read once each: their sizes
    # the weights are part of the data's identity
    assert shard_manifest(mixture(a, b, 1, 2, "data.resampled=true").data, **QUIET).fingerprint != plain.fingerprint


def test_credentials_in_a_source_path_are_not_recorded(corpora):
    """A user:password@ in a corpus's URI stays out of the params and the mixture record (the MLflow run's
    data_mixture.json and dataset profile); fsspec's memory filesystem stands in for an object store."""
    import fsspec

    from towerlab.config import flatten, to_dict
    from towerlab.config.secrets import redact_params
    from towerlab.tracking.dataset_input import profile

    a, b = corpora
    mem = fsspec.filesystem("memory")
    mem.put(str(a), "/AKIDEXAMPLE:wJalrXUtnFEMI@mixbucket/laion", recursive=True)
    try:
        secret = "memory://AKIDEXAMPLE:wJalrXUtnFEMI@mixbucket/laion/{00000..00003}.tar"
        r = recipe(f"data.sources=[{{path: '{secret}', weight: 2}}, {{path: 'memory://AKIDEXAMPLE:wJalrXUtnFEMI"
                   "@mixbucket/laion/00003.tar'}]", "data.resampled=true")
        with pytest.raises(ConfigError, match="in two corpora"):  # 00003.tar is in both
            shard_manifest(r.data, **QUIET)
        r.data.sources[0].path = secret.replace("00003", "00002")
        m = shard_manifest(r.data, **QUIET)
    finally:
        mem.rm("/AKIDEXAMPLE:wJalrXUtnFEMI@mixbucket", recursive=True)
    assert m.count("train") == 24  # stats files read through the same filesystem
    recorded = json.dumps([m.data["sources"], profile(m), redact_params(flatten(to_dict(r)))], default=str)
    assert "wJalrXUtnFEMI" not in recorded
    assert m.data["sources"][0]["path"] == "memory://***@mixbucket/laion/{00000..00002}.tar"
    assert profile(m)["mixture"][1].startswith("memory://***@mixbucket/laion/00003.tar weight=1 share=0.333 "
                                               "samples=6 (img2dataset's _stats.json files)")


def _samples_per_source(m, drawn: list[str]) -> np.ndarray:
    """Samples drawn from each corpus: the drawn shards' own row counts summed per corpus (independent of the
    draw function's probabilities)."""
    rows = {f: e["rows"] for f, e in zip(m.files("train"), m.data["splits"]["train"])}
    source = {f: e["source"] for f, e in zip(m.files("train"), m.data["splits"]["train"])}
    return np.bincount([source[f] for f in drawn], weights=[rows[f] for f in drawn], minlength=2)


@pytest.mark.parametrize("wa, wb", [(1, 1), (3, 1), (1, 4)])
def test_draw_shares_match_the_weights(corpora, wa, wb):
    a, b = corpora
    m = shard_manifest(mixture(a, b, wa, wb, "data.resampled=true").data, **QUIET)
    drawn = [f for e in range(400) for f in resample(m, None, seed=7, epoch=e)]
    share = _samples_per_source(m, drawn) / _samples_per_source(m, drawn).sum()
    assert share == pytest.approx([wa / (wa + wb), wb / (wa + wb)], abs=0.02)
    # an epoch covers the corpus's count (44 samples) in expectation, not the shard count
    per_epoch = [_samples_per_source(m, resample(m, None, seed=7, epoch=e)).sum() for e in range(200)]
    assert np.mean(per_epoch) == pytest.approx(44, rel=0.1)


def test_draws_differ_per_epoch_and_repeat_per_seed(corpora):
    a, b = corpora
    m = shard_manifest(mixture(a, b, 2, 1, "data.resampled=true").data, **QUIET)
    epochs = [resample(m, 200, seed=3, epoch=e) for e in range(3)]
    assert epochs[0] != epochs[1] and epochs[1] != epochs[2]
    assert epochs == [resample(m, 200, seed=3, epoch=e) for e in range(3)]  # a rerun draws the same
    assert resample(m, 200, seed=4, epoch=0) != epochs[0]
    assert epochs_needed(100, 44) == 4  # 3 epochs cover the run's samples, one spare for dirty samples


def test_the_training_dataset_holds_each_epochs_draws(corpora, monkeypatch):
    """The one dataset Ray Train takes holds the draws of every epoch the run reaches, one epoch after the other
    (ray.data replaced by a recorder: no Ray here)."""
    import sys
    import types

    from towerlab.data.pipeline import train_dataset

    seen = {}

    class DS:
        def flat_map(self, fn):
            return self

        def map_batches(self, fn, **kw):
            return self

    def from_items(items, **kw):
        seen["items"] = items
        return DS()

    fake = types.SimpleNamespace(from_items=from_items, TaskPoolStrategy=lambda size: None)
    monkeypatch.setitem(sys.modules, "ray.data", fake)
    monkeypatch.setitem(sys.modules, "ray", types.SimpleNamespace(data=fake))
    a, b = corpora
    r = mixture(a, b, 1, 1, "data.resampled=true", "train.steps=20", "seed=5")  # 80 samples: 2 epochs of 44
    m = shard_manifest(r.data, **QUIET)
    train_dataset(r, m)
    assert [i["shard"] for i in seen["items"]] == [f for e in range(3) for f in resample(m, None, 5, e)]
    r.data.resampled = False
    train_dataset(r, m)
    assert [i["shard"] for i in seen["items"]] == m.files("train")  # each shard once


def test_heldout_shards_become_the_heldout_split(corpora, capsys):
    from towerlab.data.pipeline import split_columns

    a, b = corpora
    r = recipe(f"data.path={a}", "data.heldout_shards=0.25", "seed=11")
    m = shard_manifest(r.data, seed=11)
    assert "1 shard(s) held out (data.heldout_shards=0.25), 6 samples: the split `heldout`" in capsys.readouterr().out
    assert m.splits == ["train", "heldout"] and m.count("train") == 18 and m.count("heldout") == 6
    assert set(m.files("train")).isdisjoint(m.files("heldout"))
    assert sorted(m.files("train") + m.files("heldout")) == sorted(map(str, a.glob("*.tar")))
    assert shard_manifest(r.data, seed=11, **QUIET).files("heldout") == m.files("heldout")  # by seed: the same
    chosen = {tuple(heldout_choice(20, 0.25, s)) for s in range(10)}
    assert len(chosen) > 1 and all(len(c) == 5 for c in chosen)
    assert heldout_choice(20, 0.01, 0) and len(heldout_choice(20, 0.01, 0)) == 1  # at least one shard
    rows = split_columns(m, "heldout", ["image", "caption", "label"])
    keys = {p.stem for p in map(__import__("pathlib").Path, m.files("heldout"))}
    assert len(rows["image"]) == 6 and all(c.endswith(tuple(f"photo {k}{i:04d}" for k in keys for i in range(6)))
                                           for c in rows["caption"])
    assert rows["label"] == [-1] * 6
    with pytest.raises(ConfigError, match=r"^data.heldout_shards=0.5: 1 shard\(s\) cannot hold 1 out and keep one "
                                          r"for training: list more shards"):
        shard_manifest(recipe(f"data.path={a}/00000.tar", "data.heldout_shards=0.5").data, **QUIET)


def test_heldout_shards_that_leave_a_corpus_nothing_to_train_on_are_refused(corpora):
    a, b = corpora
    seed = next(s for s in range(100) if 4 in heldout_choice(5, 0.6, s))  # b's one shard is listed last
    r = recipe(f"data.sources=[{{path: {a}}}, {{path: {b}/00000.tar}}]", "data.heldout_shards=0.6")
    with pytest.raises(ConfigError, match=rf"^data.heldout_shards=0.6 leaves {b}/00000.tar no training shard"):
        shard_manifest(r.data, seed=seed, **QUIET)


def test_evaluators_read_the_heldout_split_of_foreign_data(corpora):
    from towerlab.data.pipeline import preprocessor
    from towerlab.train.dataset import ensure_data
    from towerlab.train.evaluate import check_eval_data, load_eval_data

    a, _ = corpora
    base = ["data.source=webdataset", f"data.path={a}", *BPE, "data.global_batch=4", "train.workers=1"]
    r = load_recipe(None, [*base, "data.heldout_shards=0.25", "evals={retrieval: {type: retrieval}}"])
    m = ensure_data(r)
    check_eval_data(r, m)
    data = load_eval_data("heldout", m, preprocessor(r, m, train=False), None)  # what the workers' evaluators read
    assert len(data.image) == data.text.shape[0] == m.count("heldout") == 6
    assert data.prompts_per_class == 0 and (data.labels == -1).all()
    with pytest.raises(ConfigError, match=r"evals.zeroshot \(zeroshot\) needs class labels"):
        ensure_data(load_recipe(None, [*base, "data.heldout_shards=0.25"]))  # the default evaluators
    with pytest.raises(ConfigError, match=r"evals.retrieval.data=heldout: .*hold some shards out with "
                                          r"data.heldout_shards"):
        ensure_data(load_recipe(None, [*base, "evals={retrieval: {type: retrieval}}"]))


@pytest.mark.parametrize("overrides, message", [
    (["data.sources=[{path: /a}]", "data.path=/b"], "data.sources and data.path/data.paths are both set"),
    (["data.sources=[{path: /a}]", "data.paths=[/b]"], "data.sources and data.path/data.paths are both set"),
    (["data.source=digits", "data.sources=[{path: /a}]"], "data.sources mixes foreign corpora .* not digits"),
    (["data.sources=[{path: /a, weight: 0}]"], r"data.sources\[0\].weight=0: must be > 0"),
    (["data.sources=[{path: ''}]"], r"data.sources\[0\].path is empty"),
    (["data.sources=[{path: /a, weight: 2}, {path: /b}]"], "differ but data.resampled=false: .* set "
                                                           "data.resampled=true"),
    (["data.sources=[{path: /a}]", "data.num_samples=9"], "data.num_samples with data.sources is the size of a "
                                                          "resampled epoch"),
    (["data.sources=[{path: /a, num_samples: 0}]"], r"data.sources\[0\].num_samples=0: must be at least 1"),
    (["data.source=digits", "data.heldout_shards=0.1"], "data.heldout_shards holds out foreign shards"),
    (["data.heldout_shards=1"], r"data.heldout_shards=1: must be in \[0, 1\)"),
    (["data.sources=[{path: /a, wieght: 2}]"], r"unknown key 'wieght'. Did you mean 'weight'\? Valid keys in a list "
                                              "entry of SourceConfig: path, weight, num_samples"),
])
def test_recipe_checks(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_recipe(None, ["data.source=webdataset", "evals={}", *overrides])


def test_a_sweep_knows_a_mixture_has_no_labels_without_listing_it():
    from towerlab.train.dataset import peek_positives

    assert peek_positives(recipe("data.sources=[{path: 's3://nowhere/{0..9}.tar'}]")) == (False, 1, "data.sources")


def test_sources_across_filesystems_or_sharing_a_shard_are_refused(corpora):
    a, b = corpora
    with pytest.raises(ConfigError, match=r"data.sources mix filesystems \(local, s3\)"):
        shard_manifest(recipe(f"data.sources=[{{path: {a}}}, {{path: 's3://bucket/x.tar'}}]").data, **QUIET)
    with pytest.raises(ConfigError, match=r"name 1 shard\(s\) in two corpora"):
        shard_manifest(recipe(f"data.sources=[{{path: {a}}}, {{path: {a}/00000.tar}}]").data, **QUIET)


def test_a_prepared_dataset_refuses_heldout_shards(tmp_path):
    from towerlab.data.sources import prepare
    from towerlab.train.dataset import ensure_data

    prepare("synthetic", tmp_path / "ds", size=64)
    with pytest.raises(ConfigError, match="is a prepared dataset with its own held-out split: set "
                                          "data.heldout_shards=0"):
        ensure_data(load_recipe(None, ["data.source=parquet", f"data.path={tmp_path / 'ds'}",
                                       "data.heldout_shards=0.1", "evals={}"]))
