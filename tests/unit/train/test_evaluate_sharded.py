"""Evaluation split over ranks (eval/sharding.py): the shares of every rank, gathered, are the single-process
embeddings in order; every rank runs the same number of forwards (ZeRO-3) even when N is not a multiple of
W x batch; images are preprocessed chunk by chunk exactly as the Preprocessor does it. The last test runs the
recipe's evaluators in two real gloo processes (torch.multiprocessing, a FileStore, no Ray) against one process."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest
import torch

from towerlab.config import ConfigError
from towerlab.eval.sharding import EncodedImages, embed_share, share


def _counting(proj: torch.Tensor):
    """An encoder (rows -> rows @ proj) that counts its calls and the rows it saw."""
    calls = {"forwards": 0, "rows": []}

    def encode(x: torch.Tensor) -> torch.Tensor:
        calls["forwards"] += 1
        calls["rows"].append(len(x))
        return x @ proj

    return encode, calls


@pytest.mark.parametrize("n,world,batch", [(10, 2, 4), (5, 2, 2), (1, 2, 3), (7, 3, 2), (12, 3, 2), (2, 4, 1)])
def test_rank_shares_gather_to_the_whole_set_with_equal_forwards(n, world, batch):
    g = torch.Generator().manual_seed(n * 100 + world * 10 + batch)
    x, proj = torch.randn(n, 6, generator=g), torch.randn(6, 3, generator=g)
    whole = x @ proj
    blocks, forwards = [], []
    for rank in range(world):
        encode, calls = _counting(proj)
        local, f = embed_share(encode, x, batch, rank, world)
        assert calls["forwards"] == f and max(calls["rows"]) <= batch
        blocks.append(local)
        forwards.append(calls["forwards"])
    # ZeRO-3: the same number of forwards on every rank, ceil(N / (W x batch)), dummy chunks included
    assert forwards == [-(-n // (world * batch))] * world
    # as all_gather concatenates them: equal lengths, and trimmed to N they are the rows in order
    assert len({len(b) for b in blocks}) == 1
    torch.testing.assert_close(torch.cat(blocks)[:n], whole)
    # the shares partition the rows
    assert [i for r in range(world) for i in share(n, r, world)] == list(range(n))


def test_encoded_images_are_the_preprocessors_pixels(repo_root, digits_dir, tmp_path, monkeypatch):
    from PIL import Image

    from towerlab.data import read_manifest
    from towerlab.data.pipeline import preprocessor, split_columns
    from towerlab.train.recipe import load_recipe

    monkeypatch.chdir(repo_root)
    recipe = load_recipe("recipes/digits_clip.yaml", [f"data.path={digits_dir}", "model.arch=debug"])
    manifest = read_manifest(digits_dir)
    pre = preprocessor(recipe, manifest, train=False)
    rows = {k: v[:9] for k, v in split_columns(manifest, "heldout", ["image", "caption", "label"]).items()}
    whole = pre(rows)["image"]  # the Preprocessor on the whole batch: what load_eval_data held before
    path = tmp_path / "3.png"
    path.write_bytes(rows["image"][3])
    images = EncodedImages([*rows["image"][:3], path, *rows["image"][4:]], pre, "test data")
    assert len(images) == 9
    np.testing.assert_array_equal(images[2:7].numpy(), whole[2:7])  # bytes and a file alike
    np.testing.assert_array_equal(images[0:9].numpy(), whole)
    assert images[9:12].shape == (0, 3, pre.image_size, pre.image_size)

    buf = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buf, format="PNG")
    bad = EncodedImages([buf.getvalue(), b"not an image", tmp_path / "gone.png"], pre, "evals.x: /data/x")
    bad.check(range(0, 1))
    with pytest.raises(ConfigError, match=r"evals.x: /data/x: image 1 does not decode .*fix or remove it"):
        bad.check(range(0, 3))
    with pytest.raises(ConfigError, match=r"image 2 \(.*gone.png\) does not decode \(FileNotFoundError"):
        bad[2:3]


def test_undecodable_benchmark_image_is_refused_when_the_evaluators_are_built(repo_root, digits_dir, tmp_path,
                                                                              monkeypatch):
    from PIL import Image

    from towerlab.data import read_manifest
    from towerlab.data.pipeline import preprocessor
    from towerlab.models import ContrastiveModel
    from towerlab.train.evaluate import Evaluators
    from towerlab.train.recipe import load_recipe

    monkeypatch.chdir(repo_root)
    for c in ("cat", "dog"):
        (tmp_path / "val" / c).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "val" / c / "a.png")
    (tmp_path / "val" / "dog" / "b.jpg").write_bytes(b"truncated")
    evals = {"z": {"type": "zeroshot", "data": str(tmp_path / "val"), "templates": "a {c}."}}
    recipe = load_recipe("recipes/digits_clip.yaml", [f"data.path={digits_dir}", "model.arch=debug",
                                                       f"evals={json.dumps(evals)}"])
    manifest = read_manifest(digits_dir)
    pre = preprocessor(recipe, manifest, train=False)
    with pytest.raises(ConfigError, match=r"evals.z: .*val: image 2 \(.*b.jpg\) does not decode"):
        Evaluators(recipe, manifest, pre)
    # `towerlab eval` skips the check (it evaluates at once): the evaluation says the same
    ev = Evaluators(recipe, manifest, pre, check_images=False)
    model = ContrastiveModel(recipe.model).eval()
    with pytest.raises(ConfigError, match=r"evals.z: .*val: image 2 \(.*b.jpg\) does not decode"):
        ev(model, 1, names=["z"])


# the two-process test: 359 held-out digits in chunks of 179 over 2 ranks: blocks of 180 rows, so rank 0 runs 179 + 1
# and rank 1 runs 179 and then a dummy forward; one process runs 179 + 179 + 1
BATCH = 179


def _setup(repo: str, digits: str, state: str):
    from towerlab.data import read_manifest
    from towerlab.data.pipeline import preprocessor
    from towerlab.models import ContrastiveModel
    from towerlab.train.evaluate import Evaluators
    from towerlab.train.recipe import load_recipe

    recipe = load_recipe(os.path.join(repo, "recipes", "digits_clip.yaml"),
                         [f"data.path={digits}", "model.arch=debug", f"eval.batch_size={BATCH}"])
    manifest = read_manifest(digits)
    model = ContrastiveModel(recipe.model, temperature_init=0.05).eval()
    model.load_state_dict(torch.load(state, weights_only=True))
    return Evaluators(recipe, manifest, preprocessor(recipe, manifest, train=False)), model


def _evaluate(repo: str, digits: str, state: str) -> dict:
    """All evaluators (zeroshot, retrieval, geometry) once, the embeddings of each input, and the forwards run."""
    from towerlab.train.evaluate import Embedder

    ev, model = _setup(repo, digits, state)
    forwards = {"image": 0, "text": 0}
    encode = model.encode

    def counted(modality, x):
        forwards[modality] += 1
        return encode(modality, x)

    model.encode = counted
    metrics = ev(model, 1, last=True)
    data = ev.data["zeroshot"]
    with torch.no_grad():
        embed = Embedder(model, BATCH)
        emb = {w: embed(data, w) for w in ("image", "text", "prompts")}
    return {"metrics": metrics, "forwards": forwards, "emb": emb, "n": {w: len(getattr(data, w)) for w in emb}}


def _worker(rank: int, world: int, store: str, out_dir: str, repo: str, digits: str, state: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        torch.save(_evaluate(repo, digits, state), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes importing torch and towerlab: well over a few seconds
def test_two_gloo_ranks_equal_one_process(repo_root, digits_dir, tmp_path):
    import torch.multiprocessing as mp

    from towerlab.models import ContrastiveModel
    from towerlab.train.recipe import load_recipe

    torch.manual_seed(0)
    recipe = load_recipe(repo_root / "recipes" / "digits_clip.yaml", [f"data.path={digits_dir}", "model.arch=debug"])
    state = str(tmp_path / "model.pt")
    torch.save(ContrastiveModel(recipe.model, temperature_init=0.05).state_dict(), state)
    args = (str(repo_root), str(digits_dir), state)
    mp.spawn(_worker, args=(2, str(tmp_path / "store"), str(tmp_path), *args), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    one = _evaluate(*args)

    n = one["n"]
    assert n["image"] == 359 and n["text"] == 359
    # one process: ceil(N / batch) forwards per input; each rank: ceil(N / (2 x batch)), the same on both
    # (x 2: the evaluators' embeddings, then the Embedder's of the same inputs)

    def chunks(n_rows: int, batch: int) -> int:
        return -(-n_rows // batch)

    assert one["forwards"] == {"image": 2 * chunks(359, BATCH), "text": 2 * (chunks(359, BATCH) +
                                                                          chunks(n["prompts"], BATCH))}
    per_rank = {"image": 2 * chunks(359, 2 * BATCH), "text": 2 * (chunks(359, 2 * BATCH) +
                                                                  chunks(n["prompts"], 2 * BATCH))}
    assert ranks[0]["forwards"] == ranks[1]["forwards"] == per_rank
    assert per_rank["image"] < one["forwards"]["image"]
    for r in ranks:
        for w, e in one["emb"].items():
            assert r["emb"][w].shape == e.shape
            torch.testing.assert_close(r["emb"][w], e, rtol=1e-5, atol=1e-5)
    assert ranks[0]["metrics"] == ranks[1]["metrics"]  # the same gathered matrices on both ranks
    assert set(ranks[0]["metrics"]) == set(one["metrics"]) and len(one["metrics"]) >= 10
    for k, v in one["metrics"].items():
        assert abs(ranks[0]["metrics"][k] - v) < 1e-4, k


def test_clip_benchmark_images_stay_in_their_shards(tmp_path):
    """CLIP_benchmark shards: each image is held as its place in the tar, and reading it gives the bytes webdataset's
    own reader yields for that sample; a shard that is not a readable tar is one line naming it."""
    import webdataset as wds

    from benchmark_testing import write_clip_benchmark
    from towerlab.eval.benchmarks import TarMember, clip_benchmark

    labels = [0, 1, 2, 3, 4, 5, 0]
    blobs = write_clip_benchmark(tmp_path / "wds", np.random.default_rng(0), np.array(labels), shards=2)
    samples = clip_benchmark(tmp_path / "wds", "test", None)
    assert all(isinstance(m, TarMember) for m in samples.images) and samples.labels == labels
    tars = sorted((tmp_path / "wds" / "test").glob("*.tar"))
    reference = [s for tar in tars for s in wds.WebDataset(str(tar), shardshuffle=False, empty_check=False)]
    assert [m.read_bytes() for m in samples.images] == [s["webp"] for s in reference] == blobs
    assert clip_benchmark(tmp_path / "wds", "test", 3).images == samples.images[:3]

    tars[1].write_bytes(tars[1].read_bytes()[:700])
    with pytest.raises(ConfigError, match=rf"clip_benchmark {tars[1]}: not a readable uncompressed tar .*re-export"):
        clip_benchmark(tmp_path / "wds", "test", None)
