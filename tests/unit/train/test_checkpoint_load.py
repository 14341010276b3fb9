"""`towerlab eval DIR` never runs code from a checkpoint: a pickle that would call anything beyond tensors, plain
data and DeepSpeed's own types is refused in one line before it is loaded, whichever of the checkpoint's files
holds it and whatever its format."""

from __future__ import annotations

import pickle

import pytest
import torch

from towerlab.cli import main
from towerlab.config import to_yaml
from towerlab.train.checkpoint import check_pickles
from towerlab.train.recipe import load_recipe


class Payload:
    """Unpickling this creates the file `marker`: what a malicious checkpoint would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _checkpoint(root, repo_root):
    ckpt = root / "checkpoint_000"
    (ckpt / "ds").mkdir(parents=True)
    (ckpt / "recipe.yaml").write_text(to_yaml(load_recipe(repo_root / "recipes" / "debug.yaml")))
    return ckpt


@pytest.mark.parametrize("where, fmt", [("mp_rank_00_model_states.pt", "torch"),
                                        ("mp_rank_00_model_states.pt", "pickle"),
                                        ("zero_pp_rank_0_mp_rank_00_optim_states.pt", "torch")])
def test_eval_refuses_a_pickle_that_runs_code(where, fmt, tmp_path, repo_root, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    ckpt = _checkpoint(tmp_path, repo_root)
    marker = tmp_path / "pwned"
    if where != "mp_rank_00_model_states.pt":  # a harmless model file beside the malicious optimizer state
        torch.save({"module": {"w": torch.ones(2)}, "step": 3}, ckpt / "ds" / "mp_rank_00_model_states.pt")
    state = {"module": {"w": torch.ones(2)}, "payload": Payload(marker)}
    if fmt == "torch":
        torch.save(state, ckpt / "ds" / where)
    else:
        with open(ckpt / "ds" / where, "wb") as f:
            pickle.dump(state, f)
    assert main(["eval", str(ckpt)]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: refusing {ckpt / 'ds' / where}"), err
    assert ("io.open" in err) if fmt == "torch" else ("not a checkpoint written by torch.save" in err)
    assert "Traceback" not in err
    assert not marker.exists()


def test_deepspeeds_own_types_pass(tmp_path, repo_root):
    """What DeepSpeed's optimizer-state files really pickle (its loss scaler, the ZeRO stage enum) is accepted."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    ckpt = _checkpoint(tmp_path, repo_root)
    torch.save({"module": {"w": torch.ones(2)}, "ds_config": {"a": [1, 2.0, "x"]}, "step": 3},
               ckpt / "ds" / "mp_rank_00_model_states.pt")
    torch.save({"optimizer_state_dict": {"loss_scaler": LossScaler(1.0), "zero_stage": ZeroStageEnum.optimizer_states,
                                         "state": {0: {"exp_avg": torch.zeros(2)}}}},
               ckpt / "ds" / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    check_pickles(ckpt)  # no error


def test_the_step_is_read_from_rank_0s_states_under_zero3_too(tmp_path):
    """ZeRO-3 writes one model-states file per rank (zero_pp_rank_R_mp_rank_00_...), no mp_rank_00_model_states.pt:
    the step (and the checkpoint's completeness) comes from rank 0's."""
    from towerlab.train.checkpoint import states_file
    from towerlab.train.export import torch_load_step

    ds = tmp_path / "ckpt" / "ds"
    ds.mkdir(parents=True)
    assert not states_file(ds.parent).is_file()  # neither layout: incomplete
    torch.save({"module": None, "step": 7}, ds / "zero_pp_rank_0_mp_rank_00_model_states.pt")
    torch.save({"module": None, "step": 9}, ds / "zero_pp_rank_1_mp_rank_00_model_states.pt")
    assert states_file(ds.parent).name == "zero_pp_rank_0_mp_rank_00_model_states.pt"
    assert torch_load_step(states_file(ds.parent)) == 7
    (ds / "zero_pp_rank_0_mp_rank_00_model_states.pt").unlink()
    torch.save({"module": {}, "step": 4}, ds / "mp_rank_00_model_states.pt")
    assert torch_load_step(states_file(ds.parent)) == 4
