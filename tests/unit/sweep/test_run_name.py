"""A trial's MLflow run name: loss, temperature and batch first, then the other swept keys by their last part."""

from types import SimpleNamespace

from towerlab.sweep.run import trial_run_name


def test_trial_run_name_leads_with_loss_temperature_batch():
    recipe = SimpleNamespace(loss=SimpleNamespace(name="siglip", temperature_init=0.1),
                             data=SimpleNamespace(global_batch=256))
    config = {"loss.temperature_init": 0.1, "optim.lr": 0.003, "loss.name": "siglip", "model.embed_dim": 64}
    assert trial_run_name(config, recipe) == "siglip t=0.1 b=256 embed_dim=64 lr=0.003"
    assert trial_run_name({}, recipe) == "siglip t=0.1 b=256"
