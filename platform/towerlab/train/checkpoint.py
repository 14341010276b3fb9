"""A run's checkpoints: their layout and file names, writing one from the workers (`save_checkpoint`), finding and
loading them outside training (for `towerlab eval` and `towerlab reproduce`), and consolidating ZeRO shards into one
fp32 state dict (`export_fp32`).

A run directory <train.storage_path>/<name>/ holds RUN_FILE (its MLflow run id) and Ray Train's checkpoint_*
directories. A checkpoint is a Ray Train checkpoint directory under <train.storage_path>/<name>/ holding DeepSpeed's
save_checkpoint output under the tag `ds`, the resolved recipe (recipe.yaml, written by rank 0) and the data
position (position.json: step and samples seen, so a resumed run's data starts there). A target is a
checkpoint directory, a run directory (its latest checkpoint) or an MLflow run id (its recipe artifact names the run
directory, resolved from the current directory as training did).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import torch

from towerlab.config import ConfigError, Recipe
from towerlab.config.secrets import redacted_yaml
from towerlab.models import ContrastiveModel
from towerlab.train.module import build_module
from towerlab.train.recipe import load_recipe

CKPT_TAG = "ds"  # DeepSpeed's save_checkpoint tag: <checkpoint>/ds/ holds every rank's shard
RECIPE_FILE = "recipe.yaml"  # the resolved recipe, beside the shards and as the MLflow run's artifact
POSITION_FILE = "position.json"  # the step and samples seen, as rank 0 saved them: the driver reads it on resume
RUN_FILE = "towerlab_run.json"  # in the run directory: the MLflow run id (and the redacted tracking URI)
FP32_FILE = "pytorch_model_fp32.pt"  # export_fp32's consolidated state dict, logged under the artifact path model/
RUN_ID = re.compile(r"^[0-9a-f]{32}$")


@dataclass
class Target:
    checkpoint: Path
    recipe: Recipe
    run_id: str | None  # the MLflow run that wrote it, when known


def latest_checkpoint(run_dir: Path) -> Path:
    # Ray Train names checkpoints checkpoint_<timestamp>: the name order is the time order
    found = sorted(p for p in run_dir.glob("checkpoint_*") if (p / CKPT_TAG).is_dir())
    if not found:
        raise ConfigError(f"{run_dir}: no checkpoint yet (train.checkpoint_every steps write one, and the last step)")
    return found[-1]


def checkpoint_samples(checkpoint: Path | str | None) -> int:
    """Training samples the run had seen at `checkpoint` (its position file; 0 without one, e.g. written by an older
    towerlab): where a resumed run's data pass starts, without loading any weights."""
    if checkpoint is None:
        return 0
    try:
        return int(json.loads((Path(checkpoint) / POSITION_FILE).read_text()).get("samples", 0))
    except (OSError, ValueError, TypeError, AttributeError):
        return 0


def recorded_recipe(uri: str, run_id: str) -> Recipe:
    """The resolved recipe a run logged as its recipe.yaml artifact."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(uri)
    try:
        client.get_run(run_id)
    except MlflowException:
        raise ConfigError(f"no MLflow run '{run_id}' at {uri}: check the run id and --tracking-uri") from None
    with tempfile.TemporaryDirectory(prefix="towerlab-recipe-") as d:
        try:
            path = client.download_artifacts(run_id, RECIPE_FILE, d)
        except (MlflowException, OSError):
            raise ConfigError(f"MLflow run '{run_id}' has no {RECIPE_FILE} artifact: it was not started by "
                              "`towerlab train`") from None
        return load_recipe(path)


def _held(recipe: Recipe) -> dict[str, tuple[tuple[int, ...], bool]]:
    """What a checkpoint of `recipe` holds: every state-dict entry's shape, and whether it trains (the optimizer's
    state follows the trainable ones). Built on the meta device: no memory, no weights read."""
    with torch.device("meta"):
        module = build_module(recipe, rank=0, world_size=1, load_weights=False)
    trains = {n for n, p in module.named_parameters() if p.requires_grad}
    return {k: (tuple(v.shape), k in trains) for k, v in module.state_dict().items()}


def resume_differences(run_dir: Path, recipe: Recipe) -> tuple[Path | None, list[str]]:
    """The run's latest checkpoint and what `recipe` changes of what it holds (model and loss shapes, which
    parameters train, the ZeRO partitioning): a resume with any of these cannot load it. ([], when there is no
    checkpoint, or it has no readable recipe to compare with.)"""
    try:
        ckpt = latest_checkpoint(run_dir)
    except ConfigError:
        return None, []
    try:
        old = load_recipe(ckpt / RECIPE_FILE)
    except (ConfigError, OSError):
        return ckpt, []
    diffs = []
    if old.train.zero_stage != recipe.train.zero_stage:
        diffs.append(f"train.zero_stage {old.train.zero_stage} -> {recipe.train.zero_stage}")
    elif old.train.zero_stage > 0 and old.train.workers != recipe.train.workers:
        # ZeRO partitions the optimizer state by worker; DeepSpeed does not re-partition a checkpoint on load
        diffs.append(f"train.workers {old.train.workers} -> {recipe.train.workers} under ZeRO-{old.train.zero_stage}")
    was, now = _held(old), _held(recipe)
    for k in sorted(was.keys() | now.keys()):
        a, b = was.get(k), now.get(k)
        if a is None or b is None or a[0] != b[0]:
            shape = lambda x: "absent" if x is None else "x".join(map(str, x[0])) or "scalar"  # noqa: E731
            diffs.append(f"{k} {shape(a)} -> {shape(b)}")
        elif a[1] != b[1]:
            diffs.append(f"{k} {'trains' if a[1] else 'frozen'} -> {'trains' if b[1] else 'frozen'}")
    return ckpt, diffs


def run_id_of(run_dir: Path) -> str | None:
    f = run_dir / RUN_FILE
    return json.loads(f.read_text())["mlflow_run_id"] if f.is_file() else None


def resolve_target(target: str, uri: str | None) -> Target:
    """`target`: a checkpoint directory, a run directory, or an MLflow run id (needs `uri`)."""
    p = Path(target)
    if p.is_dir():
        ckpt = p if (p / CKPT_TAG).is_dir() else latest_checkpoint(p) if (p / RUN_FILE).is_file() else None
        if ckpt is None:
            raise ConfigError(f"{p}: neither a checkpoint directory (with {CKPT_TAG}/) nor a run directory "
                              f"(with {RUN_FILE})")
        run_id = run_id_of(ckpt.parent)
        if (ckpt / RECIPE_FILE).is_file():
            recipe = load_recipe(ckpt / RECIPE_FILE)
        elif run_id and uri:
            recipe = recorded_recipe(uri, run_id)
        else:
            raise ConfigError(f"{ckpt}: no {RECIPE_FILE} and no MLflow run to read it from (pass --tracking-uri)")
        return Target(ckpt, recipe, run_id)
    if not RUN_ID.match(target):
        raise ConfigError(f"'{target}' is neither a directory (checkpoint or run) nor an MLflow run id (32 hex digits)")
    if uri is None:
        raise ConfigError(f"run id '{target}' needs a tracking store: pass --tracking-uri")
    recipe = recorded_recipe(uri, target)
    run_dir = Path(recipe.train.storage_path).absolute() / recipe.name
    if run_id_of(run_dir) != target:
        raise ConfigError(f"run '{target}' ({recipe.name}) has no checkpoints under {run_dir}: run this from the "
                          "directory it was trained in, or pass its checkpoint directory instead")
    return Target(latest_checkpoint(run_dir), recipe, target)


# What DeepSpeed's optimizer-state files pickle besides what torch.load(weights_only=True) accepts (tensors,
# containers, numbers, strings): its loss scaler, the ZeRO stage enum and the fragment addresses of ZeRO's flat
# buffers. Constructing these runs no code of the file's choosing.
DEEPSPEED_GLOBALS = frozenset({"deepspeed.runtime.fp16.loss_scaler.LossScaler",
                               "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
                               "deepspeed.runtime.zero.config.ZeroStageEnum",
                               "deepspeed.utils.tensor_fragment.fragment_address"})


def check_pickles(checkpoint: Path) -> None:
    """Refuse a checkpoint whose files would run code when unpickled. Every .pt file under the checkpoint's ds/ is
    read statically (torch lists the globals a file's pickle names without loading it): anything beyond what
    weights_only loading allows and DEEPSPEED_GLOBALS, or a file that is not torch.save's zip format, is refused
    before DeepSpeed's own loader (which unpickles without restriction) sees it."""
    for f in sorted((checkpoint / CKPT_TAG).glob("*.pt")):
        try:
            unsafe = set(torch.serialization.get_unsafe_globals_in_checkpoint(f)) - DEEPSPEED_GLOBALS
        except Exception as e:  # noqa: BLE001: not a torch.save zip archive (a bare pickle, a truncated file)
            raise ConfigError(f"refusing {f}: not a checkpoint written by torch.save ({type(e).__name__}); "
                              "towerlab loads only its own checkpoints") from None
        if unsafe:
            raise ConfigError(f"refusing {f}: loading it would call {', '.join(sorted(unsafe))}, which a "
                              "checkpoint of towerlab never holds (a pickle that runs code?): evaluate only "
                              "checkpoints from storage you trust")


def states_file(checkpoint: Path) -> Path:
    """Rank 0's model-states file of a DeepSpeed checkpoint (the client state, and below ZeRO-3 the weights):
    mp_rank_00_model_states.pt, or under ZeRO-3, where every rank writes its own, zero_pp_rank_0_mp_rank_00_...;
    `checkpoint`/ds/mp_rank_00_model_states.pt (absent) when it has neither."""
    ds = Path(checkpoint) / CKPT_TAG
    zero3 = ds / "zero_pp_rank_0_mp_rank_00_model_states.pt"
    return zero3 if zero3.is_file() else ds / "mp_rank_00_model_states.pt"


def load_model(checkpoint: Path, recipe: Recipe) -> tuple[ContrastiveModel, int]:
    """The checkpoint's model in fp32 on CPU, and the step it was saved at. Its files are checked first
    (`check_pickles`): a checkpoint someone else wrote cannot run code here."""
    path = states_file(checkpoint)
    if not path.is_file():
        raise ConfigError(f"{checkpoint}: {path.name} missing: not a complete DeepSpeed checkpoint")
    check_pickles(checkpoint)
    try:
        # the model states (weights, shapes, client state, the DeepSpeed config) are plain data
        states = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise ConfigError(f"{path}: cannot be read as tensors and plain data ({type(e).__name__}): not a "
                          "checkpoint towerlab wrote, or damaged") from None
    if recipe.train.zero_stage == 3:  # ZeRO-3 keeps only placeholders in module: rebuild from the partitions
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        # DeepSpeed unpickles its optimizer-state files without restriction: check_pickles vetted them above
        weights = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), tag=CKPT_TAG)
    else:
        weights = states["module"]
    # the checkpoint holds every weight: a pretrained start is built from its configuration, not loaded again
    module = build_module(recipe, rank=0, world_size=1, load_weights=False)
    module.load_state_dict({k: v.float() for k, v in weights.items()})
    module.model.eval()
    return module.model, int(states.get("step", 0))


def checkpoint_dir_name() -> str:
    """A new checkpoint's directory name, as Ray Train names it (checkpoint_<timestamp>: name order is time order)."""
    return f"checkpoint_{datetime.now():%Y-%m-%d_%H-%M-%S.%f}"


def no_space(e: BaseException) -> bool:
    """Whether `e` is a write into a full filesystem (pyarrow's copy raises it with the errno only in its text)."""
    return getattr(e, "errno", None) == errno.ENOSPC or "no space left" in str(e).lower()


def _worst_over_ranks(value: int) -> int:
    """The largest `value` over the ranks of the training group (this rank's alone outside one)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return value
    t = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def save_checkpoint(engine, recipe: Recipe, rank: int, client_state: dict, report, storage=None) -> None:
    """Every rank writes its own ZeRO shard into a temporary directory; `report(ray.train.Checkpoint, name)` hands
    it to Ray Train, which copies all ranks' files into <storage>/<name>/. Rank 0 adds the recipe, so `towerlab eval
    CHECKPOINT` needs nothing else.

    A copy that fails on any rank (a full disk) leaves a partial directory that Ray Train never registers but that
    looks like the newest checkpoint to anyone listing the run directory: once every rank is done with its copy,
    rank 0 (whose name Ray Train uses) deletes it (`storage`: Ray Train's StorageContext), and every rank raises; a
    full disk as one OSError naming the storage path and the fixes."""
    from ray.train import Checkpoint

    tmp = tempfile.mkdtemp(prefix="towerlab-ckpt-")
    name = checkpoint_dir_name()
    try:
        engine.save_checkpoint(tmp, tag=CKPT_TAG, client_state=client_state)
        if rank == 0:
            with open(os.path.join(tmp, RECIPE_FILE), "w") as f:
                f.write(redacted_yaml(recipe))  # a checkpoint travels: no credential in it
            with open(os.path.join(tmp, POSITION_FILE), "w") as f:  # where the data resumes, read by the driver
                json.dump(client_state, f)
        failure: Exception | None = None
        try:
            report(Checkpoint.from_directory(tmp), name)
        except Exception as e:  # noqa: BLE001: every rank first learns how the others' copies went (below)
            failure = e
        # 0: copied, 1: failed, 2: failed for lack of space, on the worst rank. After this no rank writes into the
        # directory any more, so rank 0 can delete what the copies left.
        outcome = _worst_over_ranks(0 if failure is None else 2 if no_space(failure) else 1)
        if outcome:
            where = storage.build_checkpoint_path_from_name(name) if storage is not None else None
            if rank == 0 and where is not None:
                with contextlib.suppress(Exception):
                    storage.storage_filesystem.delete_dir(where)
            if outcome == 2:
                place = os.path.dirname(where) if where else recipe.train.storage_path
                raise OSError(errno.ENOSPC, f"no space left on device writing a checkpoint to {place} "
                              f"(train.storage_path={recipe.train.storage_path}); earlier checkpoints are intact: "
                              "free space there, set train.storage_path to a larger disk, or keep fewer "
                              f"checkpoints (train.keep_checkpoints={recipe.train.keep_checkpoints})") from None
            if failure is not None:
                raise failure
            raise RuntimeError("the checkpoint could not be written by another worker (its error says why); "
                               "its partial directory was deleted")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def export_fp32(checkpoint, run, tag: str = CKPT_TAG) -> str:
    """Consolidate a ZeRO-2/3 checkpoint (every rank's shard) into one fp32 state dict with DeepSpeed's
    zero_to_fp32 and log it to `run` as the artifact model/pytorch_model_fp32.pt. Returns the artifact path."""
    import torch

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with checkpoint.as_directory() as d:
        state = get_fp32_state_dict_from_zero_checkpoint(d, tag=tag)
    out = tempfile.mkdtemp(prefix="towerlab-fp32-")
    try:
        tmp = os.path.join(out, FP32_FILE + ".tmp")
        torch.save({k: v.contiguous() for k, v in state.items()}, tmp)
        os.replace(tmp, os.path.join(out, FP32_FILE))
        run.log_artifact(os.path.join(out, FP32_FILE), "model")
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return f"model/{FP32_FILE}"
