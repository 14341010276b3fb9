"""A loss that takes its positives from labels gets them, or the run is refused before launch (train/dataset.py
check_positives): class labels, or several captions per image for a multi-positive loss (an image's captions are
its positives, by image id); what the data has is read from its manifest, or for a sweep, from what is known
without preparing anything (peek_positives)."""

from __future__ import annotations

import json

import pytest

from towerlab.config import ConfigError
from towerlab.data import read_manifest
from towerlab.data.folder import prepare_images
from towerlab.data.shards import Manifest
from towerlab.train.dataset import check_positives, peek_positives, positives_of
from towerlab.train.recipe import load_recipe


def recipe(repo_root, *overrides):
    return load_recipe(repo_root / "recipes" / "debug.yaml", list(overrides))


@pytest.mark.parametrize("loss, labelled, captions, per_image, expected", [
    ("clip", False, 1, 1, None),  # no labels needed
    ("siglip", False, 1, 1, None),
    ("sdm", True, 1, 1, None),  # class labels
    ("mw_auc", True, 1, 1, None),
    ("hard_negative_mixing", True, 1, 1, None),
    ("sdm", False, 3, 2, None),  # several captions per image: positives from image ids
    ("decoupled_softmax", False, 2, 2, None),
    ("sdm", False, 1, 1, "loss.name=sdm needs class labels or several captions per image; data D has no class "
                         "labels and one caption per record: use a labelled dataset"),
    ("decoupled_softmax", False, 1, 2, "has no class labels and one caption per record "
                                       "(data.captions_per_image=2 repeats it)"),
    ("sdm", False, 3, 1, "set data.captions_per_image=3 (an image's captions are its positives), or use a labelled"),
    ("mw_auc", False, 1, 1, "loss.name=mw_auc takes its positives from class labels; data D has none: use a labelled"
                            " dataset (`towerlab data prepare images` with a 'label' column) or loss.name=clip"),
    ("hard_negative_mixing", False, 3, 3, "loss.name=hard_negative_mixing takes its positives from class labels"),
])
def test_check_positives(repo_root, loss, labelled, captions, per_image, expected):
    r = recipe(repo_root, f"loss.name={loss}", f"data.captions_per_image={per_image}")
    if expected is None:
        check_positives(r, labelled, captions, "D")
        return
    with pytest.raises(ConfigError) as e:
        check_positives(r, labelled, captions, "D")
    assert expected in str(e.value) and "\n" not in str(e.value)


def test_positives_of_a_manifest(tmp_path, digits_dir, make_image_folder):
    assert positives_of(read_manifest(digits_dir)) == (True, 1)
    assert positives_of(Manifest(tmp_path, {"classes": {}})) == (False, 1)  # foreign shards
    src = make_image_folder(tmp_path / "src")
    labelled, _ = prepare_images(src["images"], src["csv"], tmp_path / "labelled", heldout=0.2)
    assert positives_of(labelled) == (True, 2)
    # the same images and captions without the label column
    unlabelled = tmp_path / "unlabelled.jsonl"
    unlabelled.write_text("".join(json.dumps({"image": r["image"], "captions": r["captions"]}) + "\n"
                                  for r in src["records"]))
    m, _ = prepare_images(src["images"], unlabelled, tmp_path / "captions_only", heldout=0.2)
    assert positives_of(m) == (False, 2)
    assert positives_of(read_manifest(tmp_path / "captions_only")) == (False, 2)


def test_peek_positives_knows_only_what_needs_no_preparing(repo_root, tmp_path, digits_dir):
    assert peek_positives(recipe(repo_root, f"data.path={digits_dir}", "data.source=digits")) == \
        (True, 1, str(digits_dir))
    # a built-in source not prepared yet: each has class labels
    assert peek_positives(recipe(repo_root, f"data.path={tmp_path / 'later'}"))[:2] == (True, 1)
    shards = tmp_path / "web"
    shards.mkdir()  # parquet without a towerlab manifest: foreign shards, no labels
    assert peek_positives(recipe(repo_root, "data.source=parquet", f"data.path={shards}")) == (False, 1, str(shards))
    assert peek_positives(recipe(repo_root, "data.source=parquet", f"data.path={tmp_path / 'nowhere'}")) is None
    assert peek_positives(recipe(repo_root, "data.source=parquet", "data.path=s3://bucket/shards")) is None


def test_the_driver_refuses_before_launch(repo_root, tmp_path, make_image_folder):
    from towerlab.train.dataset import ensure_data

    src = make_image_folder(tmp_path / "src")
    unlabelled = tmp_path / "unlabelled.jsonl"
    unlabelled.write_text("".join(json.dumps({"image": r["image"], "captions": r["captions"]}) + "\n"
                                  for r in src["records"]))
    prepare_images(src["images"], unlabelled, tmp_path / "data", heldout=0.2)
    base = ["data.source=parquet", f"data.path={tmp_path / 'data'}", "data.global_batch=4", "train.workers=1",
            "evals={retrieval: {type: retrieval}}"]
    with pytest.raises(ConfigError, match="loss.name=sdm needs class labels or several captions per image; data .* "
                                          "set data.captions_per_image=2"):
        ensure_data(recipe(repo_root, *base, "loss.name=sdm"))
    assert ensure_data(recipe(repo_root, *base, "loss.name=sdm", "data.captions_per_image=2")).counts["train"] > 0
    assert ensure_data(recipe(repo_root, *base, "loss.name=clip")).counts["train"] > 0
