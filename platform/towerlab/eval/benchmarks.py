"""Standard benchmarks as evaluation data: the layouts the field ships its test sets in, read into the arrays the
recipe's evaluators embed, so that a run's zero-shot and retrieval numbers can be put next to published tables.

Layouts (the evaluator key `layout`, or recognised from the files):
- imagefolder: one folder of images per class (torchvision's ImageFolder; ImageNet's val/ once sorted into wnid
  folders); class name = folder name with _ as a space, or `classnames:` (e.g. imagenet for wnid folders, whose
  sorted order is the ImageNet-1k index order).
- clip_benchmark: CLIP_benchmark's WebDataset export (`clip_benchmark_export_wds`, the wds_* sets on Hugging Face):
  SPLIT/*.tar with per sample an image (.webp/.jpg/.png) and a class index (.cls) or captions (.txt, one per line),
  and classnames.txt and zeroshot_classification_templates.txt at the root.
- karpathy: Karpathy's COCO/Flickr30k splits, dataset_coco.json / dataset_flickr30k.json
  (`images: [{filename, filepath?, split, sentences: [{raw}]}]`) and the image files.

Images go through the run's eval preprocessing (no augmentation: resize to the model's image size, its mean/std) a
chunk at a time as they are embedded (eval/sharding.py EncodedImages): what is held is where each image is, the
file's path (imagefolder, karpathy) or its place in a tar shard (clip_benchmark), read again at each evaluation.
Texts go through the run's tokenizer when the data is loaded. Class prompts are class-major (every template of class
0, then class 1, ...), which is what zeroshot.class_embeddings ensembles (CLIP's mean of normalised template
embeddings, renormalised). The built-in ImageNet-1k class names and the CLIP paper's 80 templates are package data
(eval/data/*.json, taken from OpenCLIP's zero_shot_metadata.py).
"""

from __future__ import annotations

import json
import re
import tarfile
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Iterator

import torch

from towerlab.config import ConfigError
from towerlab.eval.numbers import as_floats
from towerlab.eval.sharding import EncodedImages
from towerlab.eval.zeroshot import topk_tensors

DATA = Path(__file__).with_name("data")
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
WDS_IMAGE_KEYS = ("webp", "jpg", "jpeg", "png")
CLASSNAMES_FILE = "classnames.txt"
TEMPLATES_FILE = "zeroshot_classification_templates.txt"
FOREIGN = ("imagefolder", "clip_benchmark", "karpathy")


@cache
def builtin(name: str) -> tuple[str, ...]:
    """imagenet_classnames or openai_templates, shipped as package data."""
    return tuple(json.loads((DATA / f"{name}.json").read_text()))


def read_lines(path: Path) -> list[str]:
    """One entry per non-empty line, as CLIP_benchmark writes classnames.txt and its templates file."""
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def resolve_layout(layout: str, spec: str, splits: Any) -> str:
    """The layout of `spec` (an evaluator's data): the declared one, or recognised from the files."""
    layout = str(layout)
    if layout != "auto":
        return layout
    path = Path(spec).expanduser()
    if spec in splits or (path / "manifest.json").is_file() or not path.exists():
        return "towerlab"  # load_eval_data names what is missing
    if path.is_file() and path.suffix == ".json" or path.is_dir() and any(path.glob("dataset_*.json")):
        return "karpathy"
    if path.is_dir() and ((path / CLASSNAMES_FILE).is_file() or any(path.glob("*.tar")) or any(path.glob("*/*.tar"))):
        return "clip_benchmark"
    if path.is_dir() and any(p.is_dir() for p in path.iterdir()):
        return "imagefolder"
    raise ConfigError(f"evaluation data '{spec}': no known layout (a manifest.json, class folders of images, "
                      f"CLIP_benchmark's {CLASSNAMES_FILE} and SPLIT/*.tar, or a Karpathy dataset_*.json): set the "
                      "evaluator's layout: imagefolder|clip_benchmark|karpathy|towerlab")


def check_towerlab_keys(name: str, cfg) -> None:
    """Benchmark keys on towerlab data would be ignored silently: its class prompts were written at prepare time."""
    for key in ("classnames", "templates", "images"):
        if getattr(cfg, key):
            raise ConfigError(f"evals.{name}.{key} applies to benchmark data (imagefolder, clip_benchmark, karpathy); "
                              f"'{cfg.data}' is towerlab data with its own class prompts: remove {key}")


@dataclass
class Samples:
    """What a layout reader yields: the images (encoded bytes from a shard, or an image file's path, read when it is
    preprocessed) and, per image, a class index or its captions."""

    images: list[bytes | Path]
    labels: list[int]
    captions: list[list[str]]
    classnames: list[str] | None  # the layout's own (folder names, classnames.txt), if any
    root: Path  # where classnames.txt / the templates file would be


def imagefolder(root: Path, max_samples: int | None) -> Samples:
    classes = sorted(p for p in root.iterdir() if p.is_dir())
    if not classes:
        raise ConfigError(f"imagefolder {root}: no class folders (one folder of images per class)")
    images, labels = [], []
    for label, folder in enumerate(classes):
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTS)
        if not files:
            raise ConfigError(f"imagefolder {folder}: a class folder without images ({', '.join(IMAGE_EXTS)}): add "
                              "its images or remove the folder")
        for f in files:
            if max_samples is None or len(images) < max_samples:
                images.append(f)
                labels.append(label)
    return Samples(images, labels, [], [p.name.replace("_", " ") for p in classes], root)


@dataclass(frozen=True)
class TarMember:
    """An image left inside its (uncompressed) tar shard, read when it is preprocessed (EncodedImages calls
    read_bytes): a CLIP_benchmark export of ImageNet's validation set is gigabytes of encoded images, which need not
    stay in memory between evaluations."""

    tar: Path
    offset: int
    size: int
    name: str

    def read_bytes(self) -> bytes:
        with open(self.tar, "rb") as f:
            f.seek(self.offset)
            data = f.read(self.size)
        if len(data) != self.size:
            raise OSError(f"the shard ends inside {self.name}")
        return data

    def __str__(self) -> str:
        return f"{self.tar}:{self.name}"


def _tar_files(tar: Path) -> Iterator[dict]:
    """The files of one shard as webdataset's tar_file_iterator yields them (regular files, its metadata files
    skipped), except that an image is a TarMember (where it lies in the shard) rather than its bytes."""
    from webdataset.tariterators import base_plus_ext

    with open(tar, "rb") as f, tarfile.open(fileobj=f, mode="r|") as stream:
        for info in stream:
            if not info.isreg() or re.match(r"__[^/]*__($|/)", info.name):
                continue
            suffix = base_plus_ext(info.name)[1]
            if suffix is not None and suffix.lower() in WDS_IMAGE_KEYS:
                data: Any = TarMember(tar, info.offset_data, info.size, info.name)
            else:  # class index, captions: small, read now
                data = stream.extractfile(info).read()
            yield {"fname": info.name, "data": data, "__url__": str(tar)}
            stream.members = []  # as webdataset does: no list of every member of a large shard


def wds_samples(tars: list[Path]) -> Iterator[tuple[Path, dict]]:
    """Each sample of the shards in order, with the shard it came from (for error messages), grouped into samples
    by webdataset's own group_by_keys; images as TarMembers."""
    from webdataset.tariterators import group_by_keys

    for tar in tars:
        # one shard at a time, unshuffled: the order (and max_samples) is the files' order
        try:
            for sample in group_by_keys(_tar_files(tar)):
                yield tar, sample
        except tarfile.TarError as e:
            raise ConfigError(f"clip_benchmark {tar}: not a readable uncompressed tar ({e}): re-export the "
                              "shard") from None


def clip_benchmark(root: Path, split: str, max_samples: int | None) -> Samples:
    folder = root / split
    if not folder.is_dir():
        found = sorted(p.name for p in root.iterdir() if p.is_dir() and any(p.glob("*.tar")))
        raise ConfigError(f"clip_benchmark {root}: no split folder '{split}' (found: {', '.join(found) or 'none'}): "
                          "set the evaluator's split")
    tars = sorted(folder.glob("*.tar"))
    if not tars:
        raise ConfigError(f"clip_benchmark {folder}: no *.tar shards (write them with clip_benchmark_export_wds)")
    images, labels, captions = [], [], []
    for tar, sample in wds_samples(tars):
        if max_samples is not None and len(images) >= max_samples:
            break
        key = next((k for k in WDS_IMAGE_KEYS if k in sample), None)
        if key is None:
            raise ConfigError(f"clip_benchmark {tar}: sample '{sample['__key__']}' has no image "
                              f"({'/'.join(WDS_IMAGE_KEYS)}): re-export the shard")
        images.append(sample[key])
        if "cls" in sample:
            labels.append(int(sample["cls"].decode().strip()))
        if "txt" in sample:
            captions.append([c.strip() for c in sample["txt"].decode("utf-8").splitlines() if c.strip()])
        if len(labels) != len(images) and len(captions) != len(images):
            raise ConfigError(f"clip_benchmark {tar}: sample '{sample['__key__']}' has neither a .cls class index "
                              "nor a .txt caption file: re-export the shard")
    if not images:
        raise ConfigError(f"clip_benchmark {folder}: the shards hold no samples")
    names = read_lines(root / CLASSNAMES_FILE) if (root / CLASSNAMES_FILE).is_file() else None
    if labels and names is not None:
        bad = [c for c in labels if not 0 <= c < len(names)]
        if bad:
            raise ConfigError(f"clip_benchmark {folder}: class index {bad[0]} (.cls) outside the {len(names)} "
                              f"classes of {root / CLASSNAMES_FILE}: fix the shard or the class names")
    return Samples(images, labels if len(labels) == len(images) else [],
                   captions if len(captions) == len(images) else [], names, root)


def karpathy(spec: Path, split: str, images_dir: str, max_samples: int | None) -> Samples:
    if spec.is_file():
        path = spec
    else:
        found = sorted(spec.glob("dataset_*.json"))
        if len(found) != 1:
            raise ConfigError(f"karpathy {spec}: {len(found)} dataset_*.json files, need one: point data at the "
                              "JSON file itself")
        path = found[0]
    try:
        entries = json.loads(path.read_text())["images"]
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"karpathy {path}: not a Karpathy split JSON ({{images: [{{filename, split, "
                          f"sentences}}]}}): {e}") from None
    root = Path(images_dir).expanduser() if images_dir else path.parent
    wanted = {"train", "restval"} if split == "train" else {split}
    images, captions = [], []
    for entry in entries:
        if entry.get("split") not in wanted:
            continue
        if max_samples is not None and len(images) >= max_samples:
            break
        file = root / entry.get("filepath", "") / entry["filename"]
        if not file.is_file():
            raise ConfigError(f"karpathy {path}: image {file} not found: set the evaluator's images: DIR to the "
                              "folder holding the images (their `filepath` subfolders)")
        images.append(file)
        captions.append([s["raw"].strip() for s in entry["sentences"]])
    if not images:
        splits = sorted({str(e.get("split")) for e in entries})
        raise ConfigError(f"karpathy {path}: no image in split '{split}' (found: {', '.join(splits)}): set the "
                          "evaluator's split")
    return Samples(images, [], captions, None, path.parent)


def classnames_of(spec: str, samples: Samples, where: str) -> list[str]:
    if spec == "imagenet":
        return list(builtin("imagenet_classnames"))
    if spec:
        path = Path(spec).expanduser()
        if not path.is_file():
            raise ConfigError(f"{where}.classnames: '{spec}' is neither a file (one class name per line) nor imagenet")
        return read_lines(path)
    if samples.classnames is None:
        raise ConfigError(f"{where}: {samples.root / CLASSNAMES_FILE} is missing: add it (one class name per line, "
                          "in class-index order) or set classnames: PATH|imagenet")
    return samples.classnames


def templates_of(spec: str, root: Path, where: str) -> list[str]:
    if not spec:
        own = root / TEMPLATES_FILE
        return read_lines(own) if own.is_file() else list(builtin("openai_templates"))
    if spec == "openai":
        return list(builtin("openai_templates"))
    path = Path(spec).expanduser()
    if path.is_file():
        templates = read_lines(path)
    elif "{c}" in spec:
        templates = [spec]
    else:
        raise ConfigError(f"{where}.templates: '{spec}' is neither a file (one template per line), openai, nor a "
                          "template with {c} for the class name (e.g. 'a photo of a {c}.')")
    if not templates or any("{c}" not in t for t in templates):
        raise ConfigError(f"{where}.templates: every template in {spec} needs {{c}} for the class name")
    return templates


def prompts(classnames: list[str], templates: list[str]) -> list[str]:
    """Class-major: every template of class 0, then of class 1, ..."""
    return [t.replace("{c}", c) for c in classnames for t in templates]


def load_benchmark(name: str, cfg, layout: str, pre) -> dict[str, Any]:
    """The EvalData fields of evaluator `name` (an EvaluatorConfig) on a foreign layout (a linear probe's `train`:
    the fields of its train split)."""
    where, spec = f"evals.{name}", Path(cfg.data).expanduser()
    if layout not in FOREIGN:
        raise ConfigError(f"{where}.layout: '{layout}' is not a benchmark layout ({', '.join(FOREIGN)})")
    if not spec.exists():
        raise ConfigError(f"{where}.data: {spec} does not exist")
    if cfg.type == "linear_probe":
        return linear_probe_data(name, cfg, layout, spec, pre)
    s = read_samples(layout, spec, cfg.split, cfg)
    out: dict[str, Any] = {"key": f"{layout}:{spec}:{cfg.split}:{cfg.max_samples}:{cfg.type}:{cfg.classnames}:"
                                  f"{cfg.templates}", "layout": layout, "classnames": []}
    if cfg.type == "zeroshot":
        if not s.labels:
            raise ConfigError(f"{where}: {spec} has no class labels (.cls or class folders): zeroshot needs them; "
                              "use type: retrieval for captioned images")
        names = classnames_of(cfg.classnames, s, where)
        if layout == "imagefolder" and len(names) != len(s.classnames or []):
            # folder i is class i: a list of another length (imagenet's 1000 for a subset) would misname them
            raise ConfigError(f"{where}.classnames: {len(names)} names for the {len(s.classnames or [])} class "
                              f"folders of {spec}: give one name per folder, in sorted folder order")
        if max(s.labels) >= len(names):
            raise ConfigError(f"{where}: class index {max(s.labels)} but {len(names)} class names: give as many "
                              "class names as classes (classnames: PATH)")
        templates = templates_of(cfg.templates, s.root, where)
        out |= {"labels": torch.tensor(s.labels), "classnames": names, "prompts_per_class": len(templates),
                "prompts": torch.from_numpy(pre.tokenizer.encode_batch(prompts(names, templates))),
                "text": torch.zeros(0, 0, dtype=torch.long), "groups": torch.zeros(0, dtype=torch.long)}
    elif cfg.type == "retrieval":
        if not s.captions:
            raise ConfigError(f"{where}: {spec} has no captions (.txt or a Karpathy JSON): retrieval needs them; "
                              "use type: zeroshot for class-labelled images")
        flat = [c for caps in s.captions for c in caps]
        text_image = [i for i, caps in enumerate(s.captions) for _ in caps]
        out |= {"labels": torch.zeros(len(s.images), dtype=torch.long), "prompts_per_class": 0,
                "prompts": torch.zeros(0, 0, dtype=torch.long),
                "text": torch.from_numpy(pre.tokenizer.encode_batch(flat)), "text_image": torch.tensor(text_image),
                "groups": torch.arange(len(s.images))}
    else:
        raise ConfigError(f"{where}.type: {cfg.type} reads towerlab data only; on {layout} data use zeroshot, "
                          "retrieval or linear_probe")
    out["image"] = EncodedImages(s.images, pre, f"{where}: {spec}")
    return out


def read_samples(layout: str, spec: Path, split: str, cfg) -> Samples:
    if layout == "imagefolder":
        return imagefolder(spec, cfg.max_samples)
    if layout == "clip_benchmark":
        return clip_benchmark(spec, split, cfg.max_samples)
    return karpathy(spec, split, cfg.images, cfg.max_samples)


def linear_probe_data(name: str, cfg, layout: str, spec: Path, pre) -> dict[str, Any]:
    """A linear probe's test (`split`) and train (`train_split`) images with their class indices; an imagefolder
    holds one class-folder tree per split (DATA/SPLIT/CLASS/...)."""
    where = f"evals.{name}"
    if layout == "karpathy":
        raise ConfigError(f"{where}: a linear_probe needs class labels; {spec} is a caption set (karpathy): use an "
                          "imagefolder or clip_benchmark dataset")
    parts = {}
    for role, split in (("test", cfg.split), ("train", cfg.train_split)):
        if layout == "imagefolder":
            if not (spec / split).is_dir():
                raise ConfigError(f"{where}: a linear_probe on an imagefolder reads {spec / split}/CLASS/..., which "
                                  f"does not exist: set split/train_split to the subfolders of {spec}")
            parts[role] = imagefolder(spec / split, cfg.max_samples)
        else:
            parts[role] = clip_benchmark(spec, split, cfg.max_samples)
        if not parts[role].labels:
            raise ConfigError(f"{where}: {spec} split '{split}' has no class labels (.cls): a linear_probe needs them")
    test, train = parts["test"], parts["train"]
    if layout == "imagefolder" and test.classnames != train.classnames:
        raise ConfigError(f"{where}: the class folders of {spec / cfg.split} and {spec / cfg.train_split} differ: "
                          "both splits need the same classes")
    common = {"text": torch.zeros(0, 0, dtype=torch.long), "groups": torch.zeros(0, dtype=torch.long),
              "prompts": torch.zeros(0, 0, dtype=torch.long), "prompts_per_class": 0, "layout": layout,
              "classnames": test.classnames or []}
    key = f"{layout}:{spec}:{cfg.max_samples}"
    return common | {"key": f"{key}:{cfg.split}", "image": EncodedImages(test.images, pre, f"{where}: {spec}"),
                     "labels": torch.tensor(test.labels),
                     "train": common | {"key": f"{key}:{cfg.train_split}", "labels": torch.tensor(train.labels),
                                        "image": EncodedImages(train.images, pre, f"{where}: {spec}")}}


def classification_tensors(image_features: torch.Tensor, classes: torch.Tensor, labels: torch.Tensor,
                           ks: tuple[int, ...] = (1, 5), chunk: int = 1024) -> dict[str, torch.Tensor]:
    """top{K} accuracy and mean_per_class_recall (the mean over the classes present of each one's top-1 recall:
    CLIP_benchmark's balanced accuracy), as 0-d tensors."""
    out = topk_tensors(image_features, classes, labels, ks, chunk)
    labels = labels.to(image_features.device)
    pred = torch.cat([(image_features[i : i + chunk] @ classes.T).argmax(dim=1)
                      for i in range(0, image_features.shape[0], chunk)])
    n = classes.shape[0]
    total = torch.bincount(labels, minlength=n).double()
    hit = torch.bincount(labels[pred == labels], minlength=n).double()
    present = total > 0
    out["mean_per_class_recall"] = (hit[present] / total[present]).mean()
    return out


def classification(image_features, classes, labels, ks=(1, 5), chunk=1024) -> dict[str, float]:
    return as_floats(classification_tensors(image_features, classes, labels, ks, chunk))


def clip_benchmark_result(dataset: str, model: str, pretrained: str, type_: str,
                          metrics: dict[str, float]) -> dict[str, Any] | None:
    """One evaluator's metrics (names without the eval/NAME/ prefix) in CLIP_benchmark's result JSON layout
    (clip_benchmark/cli.py: acc1, acc5, mean_per_class_recall; image_retrieval_recall@K is text->image,
    text_retrieval_recall@K image->text); None for evaluator types CLIP_benchmark has no task for."""
    out: dict[str, float] = {}
    if type_ == "zeroshot":
        task = "zeroshot_classification"
        for k, v in metrics.items():
            if k.startswith("top") and k[3:].isdigit():
                out[f"acc{k[3:]}"] = v
            elif k == "mean_per_class_recall":
                out[k] = v
    elif type_ == "retrieval":
        task = "zeroshot_retrieval"
        for k, v in metrics.items():
            if k.startswith("recall_at_"):
                kk, direction = k[len("recall_at_"):].split("_")
                out[f"{'image' if direction == 't2i' else 'text'}_retrieval_recall@{kk}"] = v
    elif type_ == "linear_probe":
        task = "linear_probe"
        out = {("lp_" + k.replace("top", "acc")): v for k, v in metrics.items()}
    else:
        return None
    return {"dataset": dataset, "model": model, "pretrained": pretrained, "task": task, "metrics": out,
            "language": "en"}


def write_results(out_dir: str | Path, recipe, metrics: dict[str, float], model: str, pretrained: str) -> list[Path]:
    """One CLIP_benchmark result JSON per evaluator with a CLIP_benchmark task: OUT_DIR/NAME.json, the dataset
    being the evaluator's name (the files of one `towerlab eval` go to one folder, as CLIP_benchmark's
    --output "{dataset}.json" does)."""
    from towerlab.util import atomic_write

    out, written = Path(out_dir).expanduser(), []
    out.mkdir(parents=True, exist_ok=True)
    for name, cfg in recipe.evals.items():
        prefix = f"eval/{name}/"
        own = {k[len(prefix):]: v for k, v in metrics.items() if k.startswith(prefix)}
        result = clip_benchmark_result(name, model, pretrained, cfg.type, own) if own else None
        if result is not None:
            atomic_write(out / f"{name}.json", json.dumps(result, indent=1))
            written.append(out / f"{name}.json")
    return written
