"""Standard benchmark layouts as evaluation data, written on disk the way the real tools write them (ImageFolder
trees saved by PIL, CLIP_benchmark's WebDataset export written with webdataset's TarWriter, Karpathy split JSONs),
evaluated with a tiny random model; every metric is checked against a brute-force numpy/scikit-learn computation on
the same model's embeddings, computed here from the files."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import webdataset as wds
from sklearn.metrics import balanced_accuracy_score

from benchmark_testing import (CLASSES, WORDS, encoded, noise_image, one_line_error, reference_pixels,
                               write_clip_benchmark, write_imagefolder)
from towerlab.eval.benchmarks import builtin, clip_benchmark_result
from towerlab.eval.retrieval import recall_tensors_multi
from towerlab.train.recipe import load_recipe


@torch.no_grad()
def brute_zeroshot(model, pre, pixels: np.ndarray, labels: np.ndarray, names: list[str], templates: list[str]):
    """Independent: per class, each template embedded alone, L2-normalised, averaged, renormalised; numpy ranks."""
    img = F.normalize(model.encode("image", torch.from_numpy(pixels)), dim=-1).numpy()
    classes = []
    for c in names:
        t = torch.from_numpy(pre.tokenizer.encode_batch([tpl.replace("{c}", c) for tpl in templates]))
        e = F.normalize(model.encode("text", t), dim=-1).mean(dim=0)
        classes.append((e / e.norm()).numpy())
    sims = img @ np.stack(classes).T
    order = np.argsort(-sims, axis=1)
    return {"top1": float(np.mean(order[:, 0] == labels)),
            "top5": float(np.mean([labels[i] in order[i, :5] for i in range(len(labels))])),
            "mean_per_class_recall": float(balanced_accuracy_score(labels, order[:, 0]))}


def check(out: dict, name: str, expected: dict):
    assert set(out) == {f"eval/{name}/{k}" for k in expected}
    for k, v in expected.items():
        assert abs(out[f"eval/{name}/{k}"] - v) < 1e-5, k


def test_imagefolder_zeroshot_matches_brute_force(env, tmp_path):
    build, model = env
    files, labels = write_imagefolder(tmp_path / "val", np.random.default_rng(0))
    (tmp_path / "t.txt").write_text("a photo of a {c}.\na blurry scan of the {c}.\n")
    recipe, ev, pre = build({"inet": {"type": "zeroshot", "data": str(tmp_path / "val"),
                                      "templates": str(tmp_path / "t.txt")}})
    data = ev.data["inet"]
    assert data.layout == "imagefolder" and data.classnames == [c.replace("_", " ") for c in sorted(CLASSES)]
    pixels = np.stack([reference_pixels(f, recipe) for f in files])
    np.testing.assert_allclose(data.image[:].numpy(), pixels, atol=1e-5)
    out = ev(model, 1, names=["inet"])
    check(out, "inet", brute_zeroshot(model, pre, pixels, labels, data.classnames,
                                      ["a photo of a {c}.", "a blurry scan of the {c}."]))


def test_clip_benchmark_zeroshot_matches_brute_force(env, tmp_path):
    build, model = env
    labels = np.array([0, 1, 2, 3, 4, 5, 0, 0, 2, 3, 5])
    images = write_clip_benchmark(tmp_path / "wds_toy", np.random.default_rng(1), labels)
    recipe, ev, pre = build({"toy": {"type": "zeroshot", "data": str(tmp_path / "wds_toy"), "ks": [1, 5]}})
    data = ev.data["toy"]
    assert data.layout == "clip_benchmark" and data.prompts_per_class == 2
    pixels = np.stack([reference_pixels(b, recipe) for b in images])
    np.testing.assert_allclose(data.image[:].numpy(), pixels, atol=1e-5)
    out = ev(model, 1, names=["toy"])
    expected = brute_zeroshot(model, pre, pixels, labels, data.classnames, ["a photo of a {c}.", "art of the {c}."])
    check(out, "toy", expected)
    result = clip_benchmark_result("toy", "debug", "ckpt", "zeroshot", {k.split("/")[-1]: v for k, v in out.items()})
    assert result["task"] == "zeroshot_classification" and result["language"] == "en"
    assert result["metrics"] == {"acc1": out["eval/toy/top1"], "acc5": out["eval/toy/top5"],
                                 "mean_per_class_recall": out["eval/toy/mean_per_class_recall"]}


def test_builtin_classnames_and_templates(env, tmp_path, repo_root):
    names, templates = builtin("imagenet_classnames"), builtin("openai_templates")
    # OpenCLIP's list keeps ImageNet's index order, where two names occur twice (two synsets each)
    assert len(names) == 1000 and names[0] == "tench" and names[999] == "toilet paper"
    assert {n for n in names if names.count(n) > 1} == {"missile", "sunglasses"}
    assert len(templates) == 80 and all("{c}" in t for t in templates)
    build, model = env
    write_clip_benchmark(tmp_path / "wds", np.random.default_rng(2), np.array([0, 999, 5]), fmt="png", shards=1)
    (tmp_path / "wds" / "classnames.txt").unlink()
    (tmp_path / "wds" / "zeroshot_classification_templates.txt").unlink()
    _, ev, pre = build({"inet": {"data": str(tmp_path / "wds"), "classnames": "imagenet", "templates": "openai",
                                 "layout": "clip_benchmark"}})
    data = ev.data["inet"]
    assert data.prompts_per_class == 80 and data.prompts.shape[0] == 80_000
    assert torch.equal(data.prompts[80 * 999 + 3], torch.from_numpy(pre.tokenizer.encode_batch(
        [templates[3].replace("{c}", names[999])])[0]))
    # a single template given inline
    _, ev, _ = build({"inet": {"data": str(tmp_path / "wds"), "classnames": "imagenet",
                               "templates": "a photo of a {c}."}})
    assert ev.data["inet"].prompts_per_class == 1
    # the JSON files ship with the package
    pyproject = tomllib.loads((repo_root / "pyproject.toml").read_text())
    assert "eval/data/*.json" in pyproject["tool"]["setuptools"]["package-data"]["towerlab"]


def brute_recall(img: np.ndarray, txt: np.ndarray, text_image: np.ndarray, ks=(1, 5, 10)) -> dict:
    sims = img @ txt.T
    out = {}
    for k in ks:
        i2t = [np.any(text_image[np.argsort(-sims[i])[:k]] == i) for i in range(len(img))]
        t2i = [text_image[j] in np.argsort(-sims[:, j])[:k] for j in range(len(txt))]
        out[f"recall_at_{k}_i2t"], out[f"recall_at_{k}_t2i"] = float(np.mean(i2t)), float(np.mean(t2i))
    return out


def test_multi_caption_recall_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(13, 8, generator=g), dim=-1)
    txt = F.normalize(torch.randn(40, 8, generator=g), dim=-1)
    text_image = torch.randint(0, 13, (40,), generator=g)
    out = recall_tensors_multi(img, txt, text_image, (1, 3, 5), chunk=4)
    expected = brute_recall(img.numpy(), txt.numpy(), text_image.numpy(), (1, 3, 5))
    for k, v in expected.items():
        assert abs(float(out[k]) - v) < 1e-9, k


@pytest.mark.parametrize("coco", [True, False])
def test_karpathy_retrieval_matches_brute_force(env, tmp_path, coco):
    build, model = env
    rng = np.random.default_rng(3)
    entries, files = [], []
    for i in range(9):
        split = "train" if i == 4 else ("restval" if i == 7 else "test")
        sub = "val2014" if coco else ""
        (tmp_path / "imgs" / sub).mkdir(parents=True, exist_ok=True)
        name = f"COCO_val2014_{i:012d}.jpg" if coco else f"{1000 + i}.jpg"
        noise_image(rng).save(tmp_path / "imgs" / sub / name, format="JPEG")
        sentences = [{"raw": f"{WORDS[i]} " + " ".join(rng.choice(WORDS, 3)), "tokens": [], "imgid": i,
                      "sentid": 5 * i + s} for s in range(5 if i % 3 else 4)]
        entry = {"filename": name, "split": split, "sentences": sentences, "imgid": i, "sentids": []}
        if coco:
            entry |= {"filepath": sub, "cocoid": i}
        entries.append(entry)
        if split == "test":
            files.append((tmp_path / "imgs" / sub / name, [s["raw"] for s in sentences]))
    json_name = "dataset_coco.json" if coco else "dataset_flickr30k.json"
    (tmp_path / "ann").mkdir()
    (tmp_path / "ann" / json_name).write_text(json.dumps({"images": entries, "dataset": "coco" if coco else "x"}))
    recipe, ev, pre = build({"ret": {"type": "retrieval", "data": str(tmp_path / "ann"),
                                     "images": str(tmp_path / "imgs")}})
    assert ev.data["ret"].layout == "karpathy"
    pixels = np.stack([reference_pixels(f, recipe) for f, _ in files])
    captions = [c for _, caps in files for c in caps]
    assert len(set(captions)) == len(captions)  # no ties between captions of different images
    text_image = np.array([i for i, (_, caps) in enumerate(files) for _ in caps])
    out = ev(model, 1, names=["ret"])
    with torch.no_grad():
        img = F.normalize(model.encode("image", torch.from_numpy(pixels)), dim=-1).numpy()
        txt = F.normalize(model.encode("text", torch.from_numpy(pre.tokenizer.encode_batch(captions))), dim=-1).numpy()
    for k, v in brute_recall(img, txt, text_image).items():
        assert abs(out[f"eval/ret/{k}"] - v) < 1e-5, k
    assert {"eval/ret/median_rank_i2t", "eval/ret/median_rank_t2i"} <= set(out)
    result = clip_benchmark_result("coco", "debug", "x", "retrieval", {k.split("/")[-1]: v for k, v in out.items()})
    assert result["task"] == "zeroshot_retrieval"
    assert result["metrics"]["image_retrieval_recall@5"] == out["eval/ret/recall_at_5_t2i"]
    assert result["metrics"]["text_retrieval_recall@5"] == out["eval/ret/recall_at_5_i2t"]
    # train = train + restval
    _, ev, _ = build({"ret": {"type": "retrieval", "data": str(tmp_path / "ann" / json_name), "split": "train",
                              "images": str(tmp_path / "imgs")}})
    assert len(ev.data["ret"].image) == 2


def test_clip_benchmark_retrieval_wds(env, tmp_path):
    build, model = env
    rng = np.random.default_rng(4)
    (tmp_path / "wds_flickr" / "test").mkdir(parents=True)
    caps = [["one small", "a blurry one", "one"], ["two", "two scan"], ["three digit", "three", "small three", "a 3"]]
    blobs = []
    with wds.TarWriter(str(tmp_path / "wds_flickr" / "test" / "0.tar")) as w:
        for i, c in enumerate(caps):
            blobs.append(encoded(noise_image(rng), "WEBP"))
            w.write({"__key__": f"s{i:07d}", "webp": blobs[-1], "txt": "\n".join(c)})
    recipe, ev, pre = build({"flickr": {"type": "retrieval", "data": str(tmp_path / "wds_flickr"), "ks": [1, 2]}})
    out = ev(model, 1, names=["flickr"])
    with torch.no_grad():
        img = F.normalize(model.encode("image", torch.from_numpy(
            np.stack([reference_pixels(b, recipe) for b in blobs]))), dim=-1).numpy()
        txt = F.normalize(model.encode("text", torch.from_numpy(
            pre.tokenizer.encode_batch([x for c in caps for x in c]))), dim=-1).numpy()
    text_image = np.array([i for i, c in enumerate(caps) for _ in c])
    for k, v in brute_recall(img, txt, text_image, (1, 2)).items():
        assert abs(out[f"eval/flickr/{k}"] - v) < 1e-5, k


def test_layout_errors_name_the_file_and_the_fix(env, tmp_path):
    build, _ = env
    labels = np.array([0, 1, 2])
    write_clip_benchmark(tmp_path / "a", np.random.default_rng(5), labels, shards=1)
    (tmp_path / "a" / "classnames.txt").unlink()
    one_line_error(build, {"z": {"data": str(tmp_path / "a"), "layout": "clip_benchmark"}},
                   str(tmp_path / "a" / "classnames.txt"), "classnames: PATH|imagenet")

    write_clip_benchmark(tmp_path / "b", np.random.default_rng(5), np.array([0, 6]), shards=1)
    one_line_error(build, {"z": {"data": str(tmp_path / "b")}}, "class index 6", str(tmp_path / "b" / "classnames.txt"),
                   "fix the shard or the class names")

    write_imagefolder(tmp_path / "c", np.random.default_rng(6), per_class=1)
    one_line_error(build, {"z": {"data": str(tmp_path / "c"), "classnames": "imagenet"}}, "1000 names for the 6 class",
                   str(tmp_path / "c"), "one name per folder")
    (tmp_path / "c" / "zebra").mkdir()
    one_line_error(build, {"z": {"data": str(tmp_path / "c")}}, str(tmp_path / "c" / "zebra"),
                   "add its images or remove the folder")

    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "notes.md").write_text("x")
    one_line_error(build, {"z": {"data": str(tmp_path / "d")}}, str(tmp_path / "d"), "set the evaluator's layout")
    one_line_error(build, {"z": {"data": str(tmp_path / "c"), "layout": "imagenet"}}, "layout", "imagefolder")
    one_line_error(build, {"z": {"data": str(tmp_path / "b"), "split": "val"}}, "no split folder 'val'", "test",
                   "set the evaluator's split")
    one_line_error(build, {"z": {"data": str(tmp_path / "a"), "classnames": "imagenet", "templates": "a photo"}},
                   "templates", "{c}")
    one_line_error(build, {"z": {"type": "retrieval", "data": str(tmp_path / "a"), "classnames": "imagenet"}},
                   "no captions", "type: zeroshot")
    one_line_error(build, {"z": {"data": "heldout", "templates": "openai"}}, "evals.z.templates", "heldout",
                   "remove templates")
    one_line_error(build, {"z": {"type": "geometry", "data": str(tmp_path / "a")}}, "evals.z.type",
                   "use zeroshot, retrieval or linear_probe")
    one_line_error(build, {"z": {"data": str(tmp_path / "a"), "classnames": str(tmp_path / "none.txt")}},
                   "evals.z.classnames", "none.txt", "imagenet")


def test_towerlab_eval_writes_clip_benchmark_results(tmp_path, digits_dir, monkeypatch):
    """`towerlab eval MODEL 'evals={...}' --results DIR`: one CLIP_benchmark JSON per benchmark evaluator, its
    numbers those of --json under CLIP_benchmark's names."""
    from clip_testing import save_clip

    from towerlab.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    save_clip(tmp_path / "clip")
    labels = np.array([0, 1, 2, 3, 4, 5, 1])
    write_clip_benchmark(tmp_path / "wds_toy", np.random.default_rng(7), labels, shards=1)
    (tmp_path / "wds_ret" / "test").mkdir(parents=True)
    with wds.TarWriter(str(tmp_path / "wds_ret" / "test" / "0.tar")) as w:
        for i in range(4):
            w.write({"__key__": f"s{i}", "png": encoded(noise_image(np.random.default_rng(i)), "PNG"),
                     "txt": f"{WORDS[i]}\n{WORDS[i]} {WORDS[i + 1]}"})
    evals = {"toy": {"type": "zeroshot", "data": str(tmp_path / "wds_toy")},
             "ret": {"type": "retrieval", "data": str(tmp_path / "wds_ret"), "ks": [1, 2]}}
    out = tmp_path / "results"
    assert main(["eval", str(tmp_path / "clip"), f"data.path={digits_dir}", f"evals={json.dumps(evals)}",
                 "--json", str(tmp_path / "m.json"), "--results", str(out)]) == 0
    metrics = json.loads((tmp_path / "m.json").read_text())["metrics"]
    assert sorted(p.name for p in out.iterdir()) == ["ret.json", "toy.json"]
    toy, ret = (json.loads((out / f"{n}.json").read_text()) for n in ("toy", "ret"))
    assert set(toy) == {"dataset", "model", "pretrained", "task", "metrics", "language"}
    assert (toy["dataset"], toy["task"], ret["task"]) == ("toy", "zeroshot_classification", "zeroshot_retrieval")
    assert toy["model"] == f"hf:{tmp_path / 'clip'}"
    assert toy["metrics"] == {"acc1": metrics["eval/toy/top1"], "acc5": metrics["eval/toy/top5"],
                              "mean_per_class_recall": metrics["eval/toy/mean_per_class_recall"]}
    assert ret["metrics"] == {f"{a}_retrieval_recall@{k}": metrics[f"eval/ret/recall_at_{k}_{d}"]
                              for k in (1, 2) for a, d in (("image", "t2i"), ("text", "i2t"))}


def test_checkpoints_take_evaluator_overrides_only(tmp_path, capsys):
    from towerlab.cli import main
    from towerlab.cli.runs import evaluator_override, with_overrides

    assert evaluator_override("evals={a: {data: /x}}") and evaluator_override("evals.zeroshot.layout=imagefolder")
    assert evaluator_override("eval.batch_size=8") and not evaluator_override("data.path=x")
    recipe = load_recipe(None, ["name=recorded", "model.arch=debug"])
    changed = with_overrides(recipe, ["evals={inet: {data: /data/val, classnames: imagenet}}"])
    # as `towerlab train FILE 'evals={...}'` on a recipe file: merged into the recorded evaluators
    assert list(changed.evals) == [*recipe.evals, "inet"] and changed.evals["inet"].classnames == "imagenet"
    assert changed.name == "recorded" and changed.model == recipe.model
    (tmp_path / "r" / "checkpoint_1" / "ds").mkdir(parents=True)
    (tmp_path / "r" / "towerlab_run.json").write_text("{}")
    assert main(["eval", str(tmp_path / "r" / "checkpoint_1"), "evals.z.data=x", "data.global_batch=8"]) == 2
    assert "evaluator overrides, evals... and eval.*, apply to both" in capsys.readouterr().err


def test_builtin_prompts_have_no_unknown_bpe_token(tmp_path, monkeypatch):
    """The ImageNet class names and CLIP templates, through CLIP's BPE (model.text.tokenizer: clip_bpe): the
    tokens spell the whole cleaned prompt back, so nothing was dropped as unknown."""
    import unicodedata

    from towerlab.data.bpe import ClipBPETokenizer, clean
    from towerlab.eval.benchmarks import prompts

    monkeypatch.setenv("TOWERLAB_CACHE", str(tmp_path / "cache"))
    # each class name in the first template, each template around one name: BPE splits words at spaces and
    # punctuation, so these cover every word of the 80,000 prompts
    names, templates = list(builtin("imagenet_classnames")), list(builtin("openai_templates"))
    texts = prompts(names, templates[:1]) + prompts(["goldfish"], templates)
    assert len(texts) == 1080
    tok = ClipBPETokenizer(77)
    # GPT-2's byte -> character table (bytes_to_unicode): printable bytes stand for themselves, the rest in order
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    alphabet = {b: chr(b) for b in printable} | {b: chr(256 + n) for n, b in
                                                 enumerate(b for b in range(256) if b not in printable)}
    bad = []
    for text, ids in zip(texts, tok.ids(texts)):
        spelled = "".join(tok._tok.id_to_token(i) for i in ids).replace("</w>", "")
        want = "".join(alphabet[b] for b in unicodedata.normalize("NFC", clean(text)).replace(" ", "").encode())
        if spelled != want or not all(0 <= i < tok.vocab_size - 2 for i in ids):
            bad.append(text)
    assert not bad, bad[:5]
    assert max(len(ids) for ids in tok.ids(texts)) + 2 <= 77  # no prompt is truncated at CLIP's context length


def test_training_logs_the_last_evaluation_as_clip_benchmark_results(env, tmp_path):
    build, model = env
    write_imagefolder(tmp_path / "val", np.random.default_rng(12))
    _, ev, _ = build({"inet": {"data": str(tmp_path / "val"), "templates": "a {c}."},
                      "geometry": {"type": "geometry"}})
    ev(model, 1, last=True)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    last = ev(model, 2, last=True)

    class Run:
        logged: dict = {}

        def log_artifact(self, path, artifact_path=None):
            self.logged[f"{artifact_path}/{Path(path).name}"] = json.loads(Path(path).read_text())

    run = Run()
    assert ev.log_results(run, model="debug", pretrained="r@step2") == ["results/inet.json"]
    result = run.logged["results/inet.json"]  # geometry has no CLIP_benchmark task: no file
    assert (result["dataset"], result["model"], result["pretrained"]) == ("inet", "debug", "r@step2")
    assert result["metrics"] == {"acc1": last["eval/inet/top1"], "acc5": last["eval/inet/top5"],
                                 "mean_per_class_recall": last["eval/inet/mean_per_class_recall"]}
