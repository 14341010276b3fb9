"""Bad inputs, command by command: each row of CASES is a `towerlab ...` command line (plus the files it needs) that
must end with exit 2 and exactly one line, `error: ...`, naming the thing (the row's expected substring), with no
traceback, within seconds, before Ray starts (ray.init raises here), and without writing anything (the working
directory is compared before and after). Run in-process: a subprocess per row would import torch a hundred times.

Placeholders in a row's arguments: {tmp} (the row's working directory), {repo} (the project root), {digits} (a
prepared digits dataset, outside the working directory), {closed} (a port on 127.0.0.1 nothing listens on), {silent}
(a port that accepts connections and never answers), {web} (a web server that is not a Ray dashboard).
"""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
from pathlib import Path

import pytest
import yaml

from towerlab.cli import main

DEBUG = "{repo}/recipes/debug.yaml"
SERVER = "http://mlflow.example:5000"  # a tracking server for submit rows (never contacted: they fail before)
SECONDS = 15  # a row's budget: the silent-server rows wait for one short client timeout


# files a row writes into its working directory before the command runs -------------------------------------------
def files(**contents: str | bytes):
    """Write each NAME=text (a path relative to the working directory; __ stands for /) before the command."""
    def setup(tmp: Path) -> None:
        for name, text in contents.items():
            p = tmp / name.replace("__", "/")
            p.parent.mkdir(parents=True, exist_ok=True)
            (p.write_bytes if isinstance(text, bytes) else p.write_text)(text)
    return setup


def recipe(**sections) -> str:
    """A recipe file's text: debug.yaml's essentials with `sections` replacing or adding top-level keys."""
    base = {"name": "bad", "data": {"source": "synthetic", "path": "data/synthetic", "global_batch": 64},
            "model": {"arch": "debug"}, "loss": {"name": "clip"}, "train": {"workers": 2, "steps": 10}}
    return yaml.safe_dump({**base, **sections})


def sweep(**keys) -> str:
    """A sweep file's text: a small grid over the bundled debug recipe, with `keys` replacing top-level keys
    (a value of None drops the key)."""
    base = {"name": "bad-sweep", "recipe": str(Path(__file__).resolve().parents[2] / "recipes" / "debug.yaml"),
            "space": {"loss.temperature_init": {"grid": [0.05, 0.1]}}, "metric": "train/loss", "mode": "min"}
    base.update(keys)
    return yaml.safe_dump({k: v for k, v in base.items() if v is not None})


def images(csv: str | bytes, name: str = "captions.csv"):
    """An image folder src/images with one real image a.png, its captions file src/NAME, and a file outside it."""
    def setup(tmp: Path) -> None:
        from PIL import Image

        (tmp / "src" / "images").mkdir(parents=True)
        Image.new("RGB", (8, 8), "red").save(tmp / "src" / "images" / "a.png")
        Image.new("RGB", (8, 8), "blue").save(tmp / "outside.png")
        p = tmp / "src" / name
        (p.write_bytes if isinstance(csv, bytes) else p.write_text)(csv)
    return setup


def manifest(edit):
    """The bundled sweep's KubeRay manifest as k.yaml, after `edit(docs)` changed it."""
    def setup(tmp: Path) -> None:
        src = Path(__file__).resolve().parents[2] / "cluster" / "kuberay" / "sweep-quickstart.yaml"
        docs = [d for d in yaml.safe_load_all(src.read_text()) if d]
        edit(docs)
        (tmp / "k.yaml").write_text(yaml.safe_dump_all(docs))
    return setup


def head(docs) -> dict:
    """The head pod's container of the RayCluster in `docs`."""
    cluster = next(d for d in docs if d["kind"] == "RayCluster")
    return cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]


def _set(path: str, value):
    """An edit of the RayCluster: set the dotted `path` under its spec (list indices as numbers) to `value`."""
    def edit(docs) -> None:
        node = next(d for d in docs if d["kind"] == "RayCluster")["spec"]
        *parents, last = [int(k) if k.isdigit() else k for k in path.split(".")]
        for k in parents:
            node = node[k]
        node[last] = value
    return edit


HEAD = "headGroupSpec.template.spec"
RUN_FILE = '{"mlflow_run_id": "0123456789abcdef0123456789abcdef"}'


def case(args: str, expected: str, setup=None, id: str | None = None):
    return pytest.param(args.split(" "), expected, setup, id=id or args[:60])


CASES = [
    # train: recipe keys, types, shapes and ranges -----------------------------------------------------------------
    case(f"train {DEBUG} optim.lrr=1", "optim.lrr"),
    case(f"train {DEBUG} optim.lr=abc", "optim.lr"),
    case(f"train {DEBUG} train=3", "train"),
    case(f"train {DEBUG} loss=clip", "loss"),
    case(f"train {DEBUG} evals=[zeroshot]", "evals"),
    case(f"train {DEBUG} optim.lr=-0.1", "optim.lr"),
    case(f"train {DEBUG} optim.lr=nan", "optim.lr"),
    case(f"train {DEBUG} optim.lr=inf", "optim.lr"),
    case(f"train {DEBUG} optim.betas=[0.9]", "optim.betas"),
    case(f"train {DEBUG} optim.betas=[0.9,1.5]", "optim.betas"),
    case(f"train {DEBUG} optim.schedule=exponential", "optim.schedule"),
    case(f"train {DEBUG} optim.warmup_steps=-1", "optim.warmup_steps"),
    case(f"train {DEBUG} train.keep_checkpoints=0", "train.keep_checkpoints"),
    case(f"train {DEBUG} train.steps=0", "train.steps"),
    case(f"train {DEBUG} train.workers=0", "train.workers"),
    case(f"train {DEBUG} train.zero_stage=4", "train.zero_stage"),
    case(f"train {DEBUG} train.precision=fp8", "train.precision"),
    case(f"train {DEBUG} train.use_gpu=maybe", "train.use_gpu"),
    case(f"train {DEBUG} data.global_batch=1", "data.global_batch"),
    case(f"train {DEBUG} data.micro_batch=7", "micro_batch"),
    case(f"train {DEBUG} model.embed_dim=0", "model.embed_dim"),
    case(f"train {DEBUG} model.arch=resnet9000", "resnet9000"),
    case(f"train {DEBUG} data.augment.crop_scale_min=0", "data.augment.crop_scale_min"),
    case(f"train {DEBUG} foo.bar=1", "foo"),
    case(f"train {DEBUG} train.steps", "train.steps"),
    case(f"train {DEBUG} =5", "=5"),
    case(f"train {DEBUG} name=..", "name"),
    case(f"train {DEBUG} name={'a' * 300}", "name"),
    case(f"train {DEBUG} name=a/b", "name"),
    case(f"train {DEBUG} name=", "name"),
    case(f"train {DEBUG} seed=9223372036854775808", "seed"),
    case(f"train {DEBUG} seed=-1", "seed"),
    case(f"train {DEBUG} loss.name=clipp", "clipp"),
    case(f"train {DEBUG} loss.temperature_init=-0.1", "loss.temperature_init"),
    case(f"train {DEBUG} loss.nope=1", "loss.nope"),
    case(f"train {DEBUG} evals.zs.type=nope", "nope"),
    case(f"train {DEBUG} evals.zs.ks=[0]", "evals.zs.ks"),
    case(f"train {DEBUG} evals.zs.type=retrieval evals.zs.data=nope data.path={{digits}}", "evals.zs.data"),
    case("train " + DEBUG + " tracking.uri=${{oc.env:TOWERLAB_NO_SUCH_VARIABLE}}", "TOWERLAB_NO_SUCH_VARIABLE",
         id="train unset environment variable"),
    # train: the recipe file itself
    case("train {tmp}/empty.yaml", "empty.yaml", files(**{"empty.yaml": ""})),
    case("train {tmp}/comments.yaml", "comments.yaml", files(**{"comments.yaml": "# nothing here\n"})),
    case("train {tmp}/missing.yaml", "missing.yaml"),
    case("train {tmp}/bad.yaml", "bad.yaml", files(**{"bad.yaml": "name: [unclosed\n  data: {\n"})),
    case("train {tmp}/list.yaml", "list.yaml", files(**{"list.yaml": "- name\n- data\n"})),
    case("train {tmp}/r.yaml", "r.yaml", files(**{"r.yaml": b"name: \xff\xfe bad\n"}), id="train non-UTF-8 recipe"),
    case("train {tmp}", "{tmp}", id="train a directory as recipe"),
    case("train {tmp}/r.yaml", "scheduler", files(**{"r.yaml": recipe(scheduler="asha")}), id="train unknown section"),
    case("train {tmp}/r.yaml", "train", files(**{"r.yaml": recipe(train=[1, 2])}), id="train section as list"),
    # train: data and tracking store
    case(f"train {DEBUG} data.source=parquet data.path={{tmp}}/nope", "nope"),
    case(f"train {DEBUG} data.source=nope", "nope"),
    case(f"train {DEBUG} data.source=parquet data.path={{tmp}}/ds", "manifest.json",
         files(**{"ds__manifest.json": "{not json"}), id="train corrupt manifest.json"),
    case(f"train {DEBUG} data.source=parquet data.path={{tmp}}/ds", "manifest.json",
         files(**{"ds__manifest.json": "[1, 2]"}), id="train foreign manifest.json"),
    case(f"train {DEBUG} data.path={{tmp}}/mine", "mine", files(**{"mine__notes.txt": "mine"}),
         id="train built-in source into a non-empty foreign dir"),
    case(f"train {DEBUG} data.source=webdataset data.paths=[/x/{{{{000..001}}}}.tar]", "quote",
         id="train unquoted braces in a list override"),
    # train: weighted mixtures of foreign corpora and held-out shards (data/foreign.py)
    case(f'train {DEBUG} data.source=webdataset data.path=null '
         f'data.sources=[{{{{"path":"/a","weight":2}}}},{{{{"path":"/b"}}}}]', "data.resampled=true",
         id="train unequal mixture weights without resampling"),
    case(f'train {DEBUG} data.source=webdataset data.path=/c data.sources=[{{{{"path":"/a"}}}}]',
         "data.sources and data.path", id="train data.sources and data.path"),
    case(f'train {DEBUG} data.source=webdataset data.path=null data.sources=[{{{{"path":"/a","weight":-1}}}}]',
         "data.sources[0].weight", id="train negative mixture weight"),
    case(f"train {DEBUG} data.heldout_shards=0.1", "data.heldout_shards", id="train held-out shards of digits"),
    case(f"train {DEBUG} data.source=webdataset data.path={{tmp}}/one.tar data.num_samples=8 "
         "data.heldout_shards=0.5", "data.heldout_shards=0.5", id="train held-out shards leave none to train"),
    case(f"train {DEBUG} data.captions_per_image=0", "data.captions_per_image"),
    case(f"train {DEBUG} model.freeze=[nomatch.*]", "nomatch"),
    case(f"train {DEBUG} train.device_memory=lots", "train.device_memory"),
    case(f"train {DEBUG} optim.implementation=nope", "optim.implementation"),
    case(f"train {DEBUG} model.text.tokenizer=nope", "model.text.tokenizer"),
    case(f"train {DEBUG} model.vision.act=nope", "model.vision.act"),
    case(f"train {DEBUG} train.max_failures=-2", "train.max_failures"),
    case(f"train {DEBUG} data.micro_batch=64", "data.micro_batch"),
    case(f"train {DEBUG} preset=nope", "nope"),
    case(f"train {DEBUG} tracking.uri=http://127.0.0.1:{{closed}}", "unreachable"),
    case(f"train {DEBUG} --tracking-uri http://127.0.0.1:{{silent}}", "unreachable"),
    case(f"train {DEBUG} train.storage_path={{tmp}}/f", "storage_path", files(f="a file")),

    # plan and recipes ---------------------------------------------------------------------------------------------
    case(f"plan {DEBUG} --gpu-memory 80XB", "--gpu-memory"),
    case(f"plan {DEBUG} optim.lrr=1", "optim.lrr"),
    case("plan {tmp}/missing.yaml", "missing.yaml"),
    case(f"plan {DEBUG} --gpu NoSuchGPU", "NoSuchGPU"),
    case(f"plan {DEBUG} --workers 0", "train.workers"),
    case(f"plan {DEBUG} --peak-tflops -5", "--peak-tflops"),
    case(f"recipes tiny-clip {DEBUG}", "debug.yaml", id="recipes tiny-clip onto a file"),
    case(f"recipes params {DEBUG} model.arch=nope", "nope"),
    case("recipes params {tmp}/missing.yaml", "missing.yaml"),
    case("recipes tiny-clip {tmp}/full", "full", files(**{"full__keep.txt": "mine"})),
    case("recipes reference --write {tmp}/f/ref.md", "ref.md", files(f="a file, not a directory")),

    # sweep --------------------------------------------------------------------------------------------------------
    case("sweep", "sweep file"),
    case("sweep {tmp}/missing.yaml", "missing.yaml"),
    case("sweep {tmp}/s.yaml", "s.yaml", files(**{"s.yaml": ""}), id="sweep empty file"),
    case("sweep {tmp}/s.yaml", "recipe", files(**{"s.yaml": sweep(recipe=None)}), id="sweep without recipe"),
    case("sweep {tmp}/s.yaml", "nope.yaml", files(**{"s.yaml": sweep(recipe="nope.yaml")}), id="sweep missing recipe"),
    case("sweep {tmp}/s.yaml", "space", files(**{"s.yaml": sweep(space={})}), id="sweep empty space"),
    case("sweep {tmp}/s.yaml", "space.optim.lr",
         files(**{"s.yaml": sweep(space={"optim.lr": {"normal": [0, 1]}})}), id="sweep unknown distribution"),
    case("sweep {tmp}/s.yaml", "optim.lrr", files(**{"s.yaml": sweep(space={"optim.lrr": {"grid": [1, 2]}})}),
         id="sweep unknown key in space"),
    case("sweep {tmp}/s.yaml", "space.optim.lr", files(**{"s.yaml": sweep(space={"optim.lr": {"uniform": [1, 0.1]}})}),
         id="sweep uniform low > high"),
    case("sweep {tmp}/s.yaml", "space.optim.lr",
         files(**{"s.yaml": sweep(space={"optim.lr": {"loguniform": [0, 0.1]}})}), id="sweep loguniform from 0"),
    case("sweep {tmp}/s.yaml", "space.loss.name", files(**{"s.yaml": sweep(space={"loss.name": {"grid": []}})}),
         id="sweep empty grid"),
    # integer bounds over an integer key are sampled as integers; fractional ones would give every trial a fraction
    case("sweep {tmp}/s.yaml", "train.steps", files(**{"s.yaml": sweep(space={"train.steps": {"uniform": [5.5, 10]}})}),
         id="sweep float range over an int key"),
    case("sweep {tmp}/s.yaml", "nope", files(**{"s.yaml": sweep(space={"loss.name": {"grid": ["clip", "nope"]}})}),
         id="sweep unknown sampled value"),
    case("sweep {tmp}/s.yaml", "optim.lr", files(**{"s.yaml": sweep(space={"optim.lr": {"grid": [-1, 0.1]}})}),
         id="sweep out-of-range sampled value"),
    case("sweep {tmp}/s.yaml search.num_samples=-1", "search.num_samples", files(**{"s.yaml": sweep()})),
    case("sweep {tmp}/s.yaml scheduler.name=hyperband", "scheduler.name", files(**{"s.yaml": sweep()})),
    case("sweep {tmp}/s.yaml", "scheduler", files(**{"s.yaml": sweep(scheduler="asha")}), id="sweep scheduler scalar"),
    case("sweep {tmp}/s.yaml mode=maximize", "mode", files(**{"s.yaml": sweep()})),
    case("sweep {tmp}/s.yaml metric=eval/nope", "eval/nope", files(**{"s.yaml": sweep()})),
    case("sweep {tmp}/s.yaml name=a/b", "name", files(**{"s.yaml": sweep()})),
    case("sweep {tmp}/s.yaml scheduler.name=asha scheduler.grace_period=1000", "grace_period",
         files(**{"s.yaml": sweep()})),
    case("sweep {tmp}/s.yaml max_concurrent_trials=0", "max_concurrent_trials", files(**{"s.yaml": sweep()})),
    case("sweep {tmp}/s.yaml overrides=[optim.lrr=1]", "optim.lrr", files(**{"s.yaml": sweep()})),
    case("sweep {tmp}/s.yaml tracking.uri=http://127.0.0.1:{closed}", "unreachable", files(**{"s.yaml": sweep()})),
    case("sweep --resume nope --storage-path {tmp}/results", "nope"),
    case("sweep --resume s --storage-path {tmp}/results", "state",
         files(**{"results__s__towerlab_sweep.json": "{corrupt"}), id="sweep --resume corrupt state"),
    case("sweep --resume s --storage-path {tmp}/results", "state",
         files(**{"results__s__towerlab_sweep.json": "[1, 2, 3]"}), id="sweep --resume foreign state"),
    case("sweep --resume s --storage-path {tmp}/results", "towerlab_sweep.json",
         files(**{"results__s__towerlab_sweep.json": '{"sweep_file": "x.yaml", "sweep": {"spac": 1}}'}),
         id="sweep --resume state with unknown keys"),

    # compare ------------------------------------------------------------------------------------------------------
    case("compare", "--sweep"),
    case("compare --sweep q --tracking-uri http://127.0.0.1:{closed}", "unreachable"),
    case("compare --sweep q --tracking-uri http://127.0.0.1:{silent}", "unreachable"),
    case("compare --sweep nope --tracking-uri sqlite:///{tmp}/db/m.db", "m.db", files(**{"db__keep": ""})),
    case("compare 0123456789abcdef0123456789abcdef --tracking-uri sqlite:///{tmp}/db/m.db",
         "m.db", files(**{"db__keep": ""})),
    case("compare --sweep q --mode sideways", "--mode"),

    # report -------------------------------------------------------------------------------------------------------
    case("report", "--sweep"),
    case("report --sweep nope --tracking-uri sqlite:///{tmp}/db/m.db", "m.db", files(**{"db__keep": ""})),
    case("report --sweep q --out {tmp}/notes.html --tracking-uri sqlite:///{tmp}/db/m.db", "notes.html",
         files(**{"notes.html": "<html>mine</html>"}), id="report --out a file towerlab did not write"),
    case("report --sweep q --out {tmp}/d --tracking-uri sqlite:///{tmp}/db/m.db", "directory",
         files(**{"d__keep": ""}), id="report --out a directory"),

    # data prepare -------------------------------------------------------------------------------------------------
    case("data prepare digits --out {tmp}/mine", "mine", files(**{"mine__notes.txt": "mine"})),
    case("data prepare digits --out {tmp}/f", "f", files(f="a file")),
    case("data prepare digitz --out {tmp}/x", "digitz"),
    case("data prepare digits --out {tmp}/x --shards 0", "--shards"),
    case("data prepare synthetic --out {tmp}/x --size -5", "--size"),
    case("data prepare images --out {tmp}/x", "--images"),
    case("data prepare images --out {tmp}/x --images {tmp}/src/images --captions {tmp}/src/c.py", ".py",
         images("print()\n", "c.py"), id="prepare images captions of an unknown type"),
    case("data prepare images --out {tmp}/x --images {tmp}/nope --captions {tmp}/c.csv", "nope",
         files(**{"c.csv": "image,caption\na.png,a red square\n"})),
    case("data prepare images --out {tmp}/x --images {tmp}/src/images --captions {tmp}/src/none.csv", "none.csv",
         images("image,caption\na.png,a red square\n")),
    case("data prepare images --out {tmp}/x --images {tmp}/src/images --captions {tmp}/src/c.txt", "c.txt",
         images("a.png a red square\n", "c.txt"), id="prepare images captions .txt"),
    case("data prepare images --out {tmp}/x --images {tmp}/src/images --captions {tmp}/src/captions.csv", "line 2",
         images("image,caption\na.png,caf\xe9 cr\xe8me\n".encode("latin-1")), id="prepare images Latin-1 CSV"),
    case("data prepare images --out {tmp}/x --images {tmp}/src/images --captions {tmp}/src/captions.csv", "line",
         images('image,caption\na.png,"a red\nsquare\nb.png,blue\n'), id="prepare images unterminated quote"),
    case("data prepare images --out {tmp}/x --images {tmp}/src/images --captions {tmp}/src/captions.csv", "outside",
         images("image,caption\n../../outside.png,a blue square\n") , id="prepare images path outside --images"),
    case("data prepare images --out {tmp}/x --images {tmp}/src/images --captions {tmp}/src/captions.csv", "outside",
         lambda tmp: images(f"image,caption\n{tmp}/outside.png,a blue square\n")(tmp),
         id="prepare images absolute path"),
    case("data prepare images --out {tmp}/x --images {tmp}/src/images --captions {tmp}/src/captions.csv", "caption",
         images("file,text\na.png,a red square\n"), id="prepare images CSV without image/caption columns"),
    case("data prepare images --out {tmp}/x --images {tmp}/src/images --captions {tmp}/src/captions.csv",
         "captions.csv", images(""), id="prepare images empty CSV"),
    case("data prepare images --out {tmp}/x --images {tmp}/src/images --captions {tmp}/src/c.jsonl", "line 2",
         images('{"image": "a.png", "caption": "red"}\n{"image": \n', "c.jsonl"), id="prepare images broken JSONL"),
    case("data prepare images --out {tmp}/x --images {tmp}/src/images --captions {tmp}/src/captions.csv "
         "--heldout 1.5", "--heldout", images("image,caption\na.png,a red square\n")),
    case("data prepare images --out {tmp}/x --images {tmp}/src/images --captions {tmp}/src/captions.csv "
         "--shard-size 0", "--shard-size", images("image,caption\na.png,a red square\n")),
    case("data prepare images --out {tmp}/mine --images {tmp}/src/images --captions {tmp}/src/captions.csv", "mine",
         lambda tmp: (images("image,caption\na.png,a red square\n")(tmp), files(**{"mine__notes.txt": "x"})(tmp)),
         id="prepare images into a foreign dir"),

    # eval ---------------------------------------------------------------------------------------------------------
    case("eval no-such-run", "no-such-run"),
    case(f"eval {DEBUG}", "debug.yaml", id="eval a recipe file"),
    case("eval {tmp}/empty", "towerlab_run.json", files(**{"empty__x.txt": ""}), id="eval a foreign directory"),
    case("eval {tmp}/r", "no checkpoint", files(**{"r__towerlab_run.json": RUN_FILE}), id="eval run without ckpt"),
    case("eval {tmp}/r", "no checkpoint", files(**{"r__towerlab_run.json": "{broken"}),
         id="eval corrupt run file"),
    case("eval 0123456789abcdef0123456789abcdef --tracking-uri http://127.0.0.1:{closed}", "unreachable"),
    case("eval 0123456789abcdef0123456789abcdef --tracking-uri sqlite:///{tmp}/db/m.db", "m.db",
         files(**{"db__keep": ""})),
    case("eval hf:{tmp}/nope", "nope"),
    case("eval open_clip:ViT-B-32", "open_clip"),
    case("eval hf:{tmp}/nope --recipe {tmp}/missing.yaml", "missing.yaml"),
    case("eval {tmp}/r/checkpoint_1 data.global_batch=8", "--recipe and overrides",
         files(**{"r__checkpoint_1__ds__x": ""}), id="eval checkpoint with overrides"),

    # export -------------------------------------------------------------------------------------------------------
    case("export {tmp}/r --format onnx --out {tmp}/o", "--format"),
    case("export {tmp}/nope --format hf --out {tmp}/o", "nope"),
    case("export {tmp}/empty --format hf --out {tmp}/o", "empty", files(**{"empty__x.txt": ""}),
         id="export a foreign directory"),
    case("export {tmp}/r --format hf --out {tmp}/mine", "mine",
         files(**{"r__towerlab_run.json": RUN_FILE, "mine__notes.txt": "mine"}), id="export --out a foreign dir"),
    case("export 0123456789abcdef0123456789abcdef --format hf --out {tmp}/o --tracking-uri http://127.0.0.1:{closed}",
         "unreachable"),

    # reproduce, runs doctor, ui -----------------------------------------------------------------------------------
    case("reproduce 0123456789abcdef0123456789abcdef --tracking-uri http://127.0.0.1:{closed}", "unreachable"),
    case("reproduce 0123456789abcdef0123456789abcdef --tracking-uri sqlite:///{tmp}/db/m.db", "m.db",
         files(**{"db__keep": ""})),
    case("runs doctor --tracking-uri http://127.0.0.1:{closed}", "unreachable"),
    case("runs doctor --tracking-uri http://127.0.0.1:{silent}", "unreachable"),
    case("runs doctor --stale-after 0", "--stale-after"),
    case("ui --tracking-uri sqlite:///{tmp}/none.db", "none.db"),
    case("ui --tracking-uri http://127.0.0.1:{closed}", "unreachable"),

    # submit and jobs ----------------------------------------------------------------------------------------------
    case(f"submit train {DEBUG} --tracking-uri {SERVER} --address http://127.0.0.1:{{closed}} --project-dir {{repo}}",
         "unreachable"),
    case(f"submit train {DEBUG} --tracking-uri {SERVER} --address http://127.0.0.1:{{silent}} --project-dir {{repo}}",
         "127.0.0.1"),
    case(f"submit train {DEBUG} --tracking-uri {SERVER} --project-dir {{repo}}", "--address"),
    case(f"submit train {DEBUG} --tracking-uri {SERVER} --address 127.0.0.1:6379 --project-dir {{repo}}", "--address"),
    case(f"submit train {DEBUG} --address http://127.0.0.1:{{closed}} --project-dir {{repo}}", "--tracking-uri"),
    case(f"submit train {DEBUG} --tracking-uri sqlite:///m.db --address http://127.0.0.1:{{closed}} "
         "--project-dir {repo}", "sqlite"),
    case(f"submit train {DEBUG} --tracking-uri {SERVER}/?token=abc --address http://127.0.0.1:{{closed}} "
         "--project-dir {repo}", "credential"),
    case(f"submit train {DEBUG} --tracking-uri {SERVER} --address http://127.0.0.1:{{closed}} --token-file "
         "{tmp}/none --project-dir {repo}", "none"),
    case(f"submit train {DEBUG} --tracking-uri {SERVER} --address http://127.0.0.1:{{closed}} --token-file "
         "{tmp}/t --project-dir {repo}", "empty", files(t="\n")),
    case(f"submit train {DEBUG} --tracking-uri {SERVER} --address http://127.0.0.1:{{closed}} --token-file "
         "{tmp}/t --project-dir {repo}", "unreachable", files(t="s3cr3t-token\n"), id="submit token with newline"),
    case(f"submit train {DEBUG} optim.lrr=1 --tracking-uri {SERVER} --address http://127.0.0.1:{{closed}} "
         "--project-dir {repo}", "optim.lrr"),
    case(f"submit train {{tmp}}/missing.yaml --tracking-uri {SERVER} --address http://127.0.0.1:{{closed}}",
         "missing.yaml"),
    case(f"submit train {DEBUG} --tracking-uri {SERVER} --address http://127.0.0.1:{{closed}} "
         "--project-dir {tmp}/proj", "project", files(**{"proj__x": ""}), id="submit recipe outside the project"),
    case(f"submit sweep {{tmp}}/s.yaml --tracking-uri {SERVER} --address http://127.0.0.1:{{closed}} "
         "--project-dir {tmp}", "recipe", files(**{"s.yaml": sweep()}), id="submit sweep recipe outside project"),
    case(f"submit sweep {{tmp}}/s.yaml --tracking-uri {SERVER} --address http://127.0.0.1:{{closed}} "
         "--project-dir {tmp}", "space", files(**{"s.yaml": sweep(space={})}), id="submit sweep empty space"),
    case("jobs ls --address http://127.0.0.1:{closed}", "unreachable"),
    case("jobs ls --address http://127.0.0.1:{silent}", "127.0.0.1"),
    case("jobs ls --address ftp://127.0.0.1:8265", "--address"),
    case("jobs ls --address http://127.0.0.1:{web}", "not a Ray dashboard"),
    case(f"submit train {DEBUG} --tracking-uri {SERVER} --address http://127.0.0.1:{{web}} --project-dir {{repo}}",
         "not a Ray dashboard"),
    case("jobs logs towerlab-train-x", "--address"),
    case("jobs stop towerlab-train-x --address http://127.0.0.1:{closed}", "unreachable"),
    case("jobs logs towerlab-train-x --address http://127.0.0.1:{closed} --token-file {tmp}/none", "none"),

    # k8s ----------------------------------------------------------------------------------------------------------
    case("k8s validate {tmp}/missing.yaml", "missing.yaml"),
    case("k8s validate {tmp}/k.yaml", "k.yaml", files(**{"k.yaml": "kind: [unclosed\n"}), id="k8s validate not YAML"),
    case("k8s validate {tmp}/k.yaml", "k.yaml", files(**{"k.yaml": ""}), id="k8s validate empty file"),
    case("k8s validate {tmp}/k.yaml", "k.yaml", files(**{"k.yaml": "- a\n- b\n"}), id="k8s validate a list"),
    case("k8s validate {tmp}/k.yaml", "spec", manifest(lambda docs: docs[0].update(spec=3)),
         id="k8s validate spec is a number"),
    case("k8s validate {tmp}/k.yaml", "containers", manifest(_set(f"{HEAD}.containers", "ray-head")),
         id="k8s validate containers is a string"),
    case("k8s validate {tmp}/k.yaml", "privileged",
         manifest(lambda docs: head(docs).setdefault("securityContext", {}).update(privileged=True)),
         id="k8s validate privileged container"),
    case("k8s validate {tmp}/k.yaml", "hostPath",
         manifest(_set(f"{HEAD}.volumes", [{"name": "h", "hostPath": {"path": "/"}}])), id="k8s validate hostPath"),
    case("k8s validate {tmp}/k.yaml", "LoadBalancer", manifest(_set("headGroupSpec.serviceType", "LoadBalancer")),
         id="k8s validate LoadBalancer dashboard"),
    case("k8s validate {tmp}/k.yaml", "auth", manifest(_set("authOptions.mode", "disabled")),
         id="k8s validate token auth disabled"),
    case("k8s validate {tmp}/k.yaml", "PASSWORD",
         manifest(lambda docs: head(docs)["env"].append({"name": "MLFLOW_TRACKING_PASSWORD", "value": "hunter2"})),
         id="k8s validate literal password env"),
    case("k8s validate {tmp}/k.yaml", "root", manifest(_set(f"{HEAD}.securityContext.runAsUser", 0)),
         id="k8s validate root user"),
    case("k8s validate {tmp}/k.yaml", "unknownField", manifest(_set("unknownField", 1)),
         id="k8s validate unknown field"),
    case("k8s render {repo}/recipes/debug.yaml --nodes 0 --project-dir {repo}", "--nodes"),
    case("k8s render {repo}/recipes/debug.yaml --storage /local/path --project-dir {repo}", "--storage"),
    case("k8s render {repo}/recipes/debug.yaml --tracking-uri http://user:pw@mlflow:5000 --project-dir {repo}",
         "--tracking-uri"),
    case("k8s render {repo}/recipes/debug.yaml --project-dir {tmp}", "project"),
    case("k8s render {tmp}/missing.yaml --project-dir {tmp}", "missing.yaml"),
    case(f"k8s render {DEBUG} --ttl-seconds -1 --project-dir {{repo}}", "--ttl-seconds"),
    case(f"k8s render {DEBUG} --cpus-per-node 0 --project-dir {{repo}}", "--cpus-per-node"),
    case(f"k8s render {DEBUG} --memory-per-node lots --project-dir {{repo}}", "--memory-per-node"),
    case(f"k8s render {DEBUG} --namespace Bad_NS! --project-dir {{repo}}", "--namespace"),
    case(f"k8s render {DEBUG} --redis-address nohostport --project-dir {{repo}}", "--redis-address"),
    case("k8s render {repo}/recipes/debug.yaml optim.lrr=1 --project-dir {repo}", "optim.lrr"),
    case("k8s render {repo}/recipes/debug.yaml tracking.uri=http://u:secret@mlflow:5000 --project-dir {repo}",
         "tracking.uri"),
    case("k8s render {tmp}/s.yaml --project-dir {tmp}", "space", files(**{"s.yaml": sweep(space={})}),
         id="k8s render sweep with empty space"),
]


# fixtures ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def silent_port():
    """A port that accepts connections and never answers: a hung server."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(64)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(srv.accept()[0])
            except OSError:
                continue

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    yield srv.getsockname()[1]
    stop.set()
    t.join(timeout=2)
    for c in held:
        c.close()
    srv.close()


@pytest.fixture(scope="module")
def web_port():
    """A web server that is not a Ray dashboard: every GET is a 404 page."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class NotFound(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_error(404)

        def log_message(self, *args):  # not on the test's stderr
            pass

    srv = ThreadingHTTPServer(("127.0.0.1", 0), NotFound)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv.server_address[1]
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def no_ray(monkeypatch):
    """A bad input must be refused before Ray starts: starting it fails the row."""
    import ray
    import ray._private.worker

    def refuse(*a, **k):
        raise AssertionError("a bad input reached ray.init")

    monkeypatch.setattr(ray, "init", refuse)
    monkeypatch.setattr(ray._private.worker, "init", refuse)


def _hung(signum, frame):
    raise TimeoutError(f"the command hung for {2 * SECONDS} s")


def snapshot(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*")}


@pytest.mark.parametrize("args, expected, setup", CASES)
def test_bad_input_is_one_error_line(args, expected, setup, tmp_path, repo_root, digits_dir, silent_port, web_port,
                                     no_ray, offline, restore_signals, monkeypatch, capsys):
    from towerlab.util import free_port

    for var in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN",
                "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)
    # the silent rows wait for these client timeouts; their defaults (5 s) are tested in tracking/test_store_checks.py
    monkeypatch.setattr("towerlab.tracking.uri.CHECK_TIMEOUT_S", 1.0)
    monkeypatch.setattr("towerlab.cluster.jobs.PROBE_TIMEOUT_S", 1.0)
    if setup:
        setup(tmp_path)
    values = {"tmp": str(tmp_path), "repo": str(repo_root), "digits": str(digits_dir), "closed": str(free_port()),
              "silent": str(silent_port), "web": str(web_port)}
    argv = [a.format(**values) for a in args]
    expected = expected.format(**values)
    before = snapshot(tmp_path)
    capsys.readouterr()

    start = time.monotonic()
    previous = signal.signal(signal.SIGALRM, _hung)  # a hang fails the row instead of the whole run
    signal.setitimer(signal.ITIMER_REAL, 2 * SECONDS)
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's usage errors
        code = e.code
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    seconds = time.monotonic() - start

    out = capsys.readouterr()
    text = out.out + out.err
    lines = [line for line in text.splitlines() if line.strip()]
    assert "Traceback" not in text, text
    assert code == 2, text
    assert len(lines) == 1 and lines[0].startswith("error: "), text
    assert expected in lines[0], f"{expected!r} not in {lines[0]!r}"
    assert seconds < SECONDS, f"{seconds:.1f} s"
    assert snapshot(tmp_path) == before, "a refused command wrote into the working directory"


def test_table_size():
    """The net spans every command with at least a hundred different inputs."""
    assert len(CASES) >= 100
    commands = {p.values[0][0] for p in CASES}
    assert {"train", "sweep", "data", "eval", "compare", "submit", "jobs", "k8s", "export"} <= commands
    assert len({json.dumps(p.values[0]) + p.id for p in CASES}) == len(CASES)
