"""The linear-probe evaluator: the probe against scikit-learn run step by step (C chosen on the held-out part of
train, refit, scored with sklearn's metrics), and the evaluator on CLIP_benchmark, ImageFolder and the run's own
splits against the probe on the same model's embeddings."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score, top_k_accuracy_score

from benchmark_testing import encoded, noise_image, one_line_error, reference_pixels, write_imagefolder
from towerlab.eval.benchmarks import clip_benchmark_result
from towerlab.eval.linear_probe import C_GRID, linear_probe


def clusters(n, classes, d=6, seed=0, spread=1.0):
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(99).normal(0, 1, (classes, d))
    y = rng.integers(0, classes, n)
    return (centres[y] + spread * rng.normal(0, 1, (n, d))).astype(np.float32), y


def test_probe_matches_sklearn_step_by_step():
    tx, ty = clusters(120, 5, seed=1, spread=1.2)
    vx, vy = clusters(50, 5, seed=2, spread=1.2)
    out, c = linear_probe(tx, ty, vx, vy, ks=(1, 3), heldout=0.25, seed=3)
    order = np.random.default_rng(3).permutation(120)
    val, fit = order[:30], order[30:]
    heldout = [LogisticRegression(C=g, max_iter=1000).fit(tx[fit], ty[fit]).score(tx[val], ty[val]) for g in C_GRID]
    assert c == C_GRID[int(np.argmax(heldout))]  # the first best: ties keep the smaller C
    final = LogisticRegression(C=c, max_iter=1000).fit(tx, ty)
    proba = final.predict_proba(vx)
    assert abs(out["top1"] - top_k_accuracy_score(vy, proba, k=1, labels=final.classes_)) < 1e-12
    assert abs(out["top3"] - top_k_accuracy_score(vy, proba, k=3, labels=final.classes_)) < 1e-12
    assert abs(out["mean_per_class_recall"] - balanced_accuracy_score(vy, final.predict(vx))) < 1e-12
    # separable clusters: the probe finds them
    sx, sy = clusters(100, 4, seed=4, spread=0.05)
    qx, qy = clusters(40, 4, seed=5, spread=0.05)
    assert linear_probe(sx, sy, qx, qy)[0]["top1"] == 1.0


@torch.no_grad()
def probe_on_model(model, recipe, train_blobs, train_y, test_blobs, test_y, ks=(1, 5), heldout=0.2):
    def feats(blobs):
        return model.encode("image", torch.from_numpy(np.stack([reference_pixels(b, recipe) for b in blobs]))).numpy()

    return linear_probe(feats(train_blobs), np.asarray(train_y), feats(test_blobs), np.asarray(test_y), ks,
                        heldout)[0]


def test_linear_probe_on_clip_benchmark_shards(env, tmp_path):
    build, model = env
    rng = np.random.default_rng(8)
    blobs = {}
    labels = {"train": [0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1], "test": [0, 1, 2, 2, 1]}
    (tmp_path / "wds").mkdir()
    (tmp_path / "wds" / "classnames.txt").write_text("zero\none\ntwo\n")
    for split, ys in labels.items():
        (tmp_path / "wds" / split).mkdir()
        blobs[split] = []
        with wds.TarWriter(str(tmp_path / "wds" / split / "0.tar")) as w:
            for i, y in enumerate(ys):
                # the class shows in the pixels' brightness, so the probe has something to find
                img = np.clip(np.asarray(noise_image(rng)) * 0.3 + 80 * y, 0, 255).astype(np.uint8)
                blobs[split].append(encoded(Image.fromarray(img), "PNG"))
                w.write({"__key__": f"s{i:05d}", "png": blobs[split][-1], "cls": y})
    recipe, ev, _ = build({"lp": {"type": "linear_probe", "data": str(tmp_path / "wds"), "ks": [1, 2],
                                  "probe_heldout": 0.3}})
    out = ev(model, 1, names=["lp"])
    expected = probe_on_model(model, recipe, blobs["train"], labels["train"], blobs["test"], labels["test"], (1, 2),
                              0.3)
    assert set(out) == {f"eval/lp/{k}" for k in expected}
    for k, v in expected.items():
        assert abs(out[f"eval/lp/{k}"] - v) < 1e-6, k
    own = {k[len("eval/lp/"):]: v for k, v in out.items()}
    result = clip_benchmark_result("toy", "debug", "x", "linear_probe", own)
    assert result["task"] == "linear_probe" and result["metrics"] == {
        "lp_acc1": out["eval/lp/top1"], "lp_acc2": out["eval/lp/top2"],
        "lp_mean_per_class_recall": out["eval/lp/mean_per_class_recall"]}


def test_linear_probe_on_imagefolder_splits_and_the_runs_own(env, tmp_path):
    build, model = env
    train_files, train_y = write_imagefolder(tmp_path / "in" / "train", np.random.default_rng(9), per_class=3)
    test_files, test_y = write_imagefolder(tmp_path / "in" / "val", np.random.default_rng(10), per_class=1)
    recipe, ev, _ = build({"lp": {"type": "linear_probe", "data": str(tmp_path / "in"), "split": "val",
                                  "layout": "imagefolder"}})
    out = ev(model, 1, names=["lp"])
    expected = probe_on_model(model, recipe, [f.read_bytes() for f in train_files], train_y,
                              [f.read_bytes() for f in test_files], test_y)
    for k, v in expected.items():
        assert abs(out[f"eval/lp/{k}"] - v) < 1e-6, k

    # the run's own data: fit on its train split, score on heldout
    _, ev, _ = build({"lp": {"type": "linear_probe", "data": "heldout", "max_samples": 40}})
    data = ev.data["lp"]
    assert len(data.image) == 40 and len(data.train.image) == 40
    with torch.no_grad():
        expected = linear_probe(model.encode("image", data.train.image[:]).numpy(), data.train.labels.numpy(),
                                model.encode("image", data.image[:]).numpy(), data.labels.numpy())[0]
    out = ev(model, 1, names=["lp"])
    for k, v in expected.items():
        assert abs(out[f"eval/lp/{k}"] - v) < 1e-6, k


def test_linear_probe_errors(env, tmp_path):
    build, _ = env
    write_imagefolder(tmp_path / "flat", np.random.default_rng(11), per_class=1)
    one_line_error(build, {"lp": {"type": "linear_probe", "data": str(tmp_path / "flat")}},
                   str(tmp_path / "flat" / "test"), "set split/train_split")
    (tmp_path / "k").mkdir()
    (tmp_path / "k" / "dataset_coco.json").write_text(json.dumps({"images": []}))
    one_line_error(build, {"lp": {"type": "linear_probe", "data": str(tmp_path / "k")}}, "karpathy",
                   "imagefolder or clip_benchmark")
    one_line_error(build, {"lp": {"type": "linear_probe", "train_split": "training"}}, "train_split",
                   "'training'", "heldout")
    with pytest.raises(Exception, match="probe_heldout"):
        build({"lp": {"type": "linear_probe", "probe_heldout": 1.0}})


def test_only_the_linear_probe_computes_on_the_host():
    from towerlab.train.evaluate import EVALUATORS

    assert [k for k in EVALUATORS.names() if getattr(EVALUATORS.get(k), "on_host", False)] == ["linear_probe"]
