"""Credentials never reach MLflow, artifacts or messages: the redaction rules (config/secrets.py) and a real run
logged through towerlab's tracking code into a local SQLite store."""

from __future__ import annotations

import yaml

from towerlab.config import flatten, to_dict
from towerlab.config.secrets import (MASK, env_secrets, has_credentials, is_secret_key, redact_params, redact_text,
                                     redact_tree, redact_uri, redacted_yaml)
from towerlab.tracking import MlflowRun, redact
from towerlab.train.recipe import load_recipe

PASSWORD = "hunter2-very-secret"
TOKEN = "tok-3f9a8b7c6d5e4f"


def test_uri_credentials_and_secret_query_parameters_are_masked():
    assert redact_uri(f"http://alice:{PASSWORD}@mlflow:5000/api") == "http://***@mlflow:5000/api"
    assert redact_uri(f"https://{TOKEN}@github.com/x.git") == "https://***@github.com/x.git"
    assert redact_uri(f"s3://b/k?token={TOKEN}&part=3") == "s3://b/k?token=***&part=3"
    assert redact_uri(f"https://acct.blob/c?sv=2022&sig={TOKEN}") == "https://acct.blob/c?sv=2022&sig=***"
    assert redact_uri(f"https://h/x?X-Amz-Credential=AKIA&X-Amz-Signature={TOKEN}").count(MASK) == 2
    assert redact_uri("sqlite:////tmp/mlruns.db") == "sqlite:////tmp/mlruns.db"
    assert redact(f"http://u:{PASSWORD}@h:5000") == "http://***@h:5000"  # tracking's own name for it


def test_secret_keys_are_named_by_their_last_word():
    for key in ("password", "MLFLOW_TRACKING_PASSWORD", "RAY_AUTH_TOKEN", "hub.auth_token", "apiKey", "api_key",
                "AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "credentials", "x.basic_auth", "X-Amz-Signature"):
        assert is_secret_key(key), key
    for key in ("data.augment.token_mask", "data.augment.token_mask_prob", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH",
                "MLFLOW_TRACKING_USERNAME", "name", "monkey", "tracking.uri"):
        assert not is_secret_key(key), key


def test_text_and_trees_are_redacted():
    line = f"error: override tracking.uri=http://u:{PASSWORD}@h:5000 and hub.token={TOKEN} (token_mask=true)"
    out = redact_text(line)
    assert PASSWORD not in out and TOKEN not in out
    assert "tracking.uri=http://***@h:5000" in out and "hub.token=***" in out and "token_mask=true" in out
    tree = {"auth": {"password": PASSWORD, "user": "bob"}, "urls": [f"s3://b?key={TOKEN}"], "steps": 3}
    assert redact_tree(tree) == {"auth": {"password": MASK, "user": "bob"}, "urls": [f"s3://b?key={MASK}"],
                                 "steps": 3}
    assert tree["auth"]["password"] == PASSWORD  # the input is left as it was
    assert has_credentials(f"http://u:{PASSWORD}@h") and has_credentials("x", key="token")
    assert not has_credentials("http://h:5000") and not has_credentials(True, key="token")


def test_secret_environment_values_are_scrubbed_but_short_ones_are_not():
    env = {"HF_TOKEN": TOKEN, "SHORT_TOKEN": "1", "HOME": "/home/alice-very-long-path"}
    assert env_secrets(env) == [TOKEN]
    assert redact_text(f"name=run-{TOKEN} steps=1 /home/alice-very-long-path", env) == \
        f"name=run-{MASK} steps=1 /home/alice-very-long-path"


def _log_like_the_driver(recipe, uri: str) -> str:
    """What train.driver does when it creates a run: the same two calls on the same tracker."""
    run = MlflowRun.start(uri, recipe.tracking.experiment, recipe.name, redact_params(flatten(to_dict(recipe))),
                          {"towerlab.test": "1"})
    run.log_text(redacted_yaml(recipe), "recipe.yaml")
    run.end()
    return run.run_id


def test_a_logged_run_holds_no_credential(tmp_path, monkeypatch):
    from mlflow import MlflowClient

    monkeypatch.setenv("TL_TEST_HUB_TOKEN", TOKEN)
    recipe = load_recipe(None, [f"tracking.uri=http://alice:{PASSWORD}@mlflow.example:5000",
                                "tracking.experiment=exp-${oc.env:TL_TEST_HUB_TOKEN}",
                                f"presets.remote.data.path=s3://bucket/shards?token={TOKEN}",
                                f"presets.remote.hub.password={PASSWORD}"])
    # the resolved recipe does hold them: what is checked below is that logging drops them
    assert PASSWORD in recipe.tracking.uri and TOKEN in recipe.tracking.experiment
    uri = f"sqlite:///{tmp_path}/x.db"
    run_id = _log_like_the_driver(recipe, uri)

    client = MlflowClient(uri)
    params = client.get_run(run_id).data.params
    assert params["tracking.uri"] == "http://***@mlflow.example:5000"
    assert params["tracking.experiment"] == f"exp-{MASK}"
    assert params["presets.remote.hub.password"] == MASK
    assert params["presets.remote.data.path"] == f"s3://bucket/shards?token={MASK}"
    assert params["data.augment.token_mask"] == "False"  # named like a token, but not a secret: kept
    for value in params.values():
        assert PASSWORD not in value and TOKEN not in value

    artifact = open(client.download_artifacts(run_id, "recipe.yaml", str(tmp_path))).read()
    assert PASSWORD not in artifact and TOKEN not in artifact
    logged = yaml.safe_load(artifact)
    assert logged["tracking"]["uri"] == "http://***@mlflow.example:5000"
    assert logged["presets"]["remote"]["hub"]["password"] == MASK
    assert logged["train"]["steps"] == recipe.train.steps  # everything else as it was


def test_checkpoint_recipe_copy_is_redacted():
    """save_checkpoint (rank 0) writes the recipe beside the shards: redacted, like the artifact."""
    from pathlib import Path

    from towerlab.train.checkpoint import RECIPE_FILE, save_checkpoint

    class Engine:  # DeepSpeed's engine writes the shards; only the recipe copy is looked at here
        def save_checkpoint(self, path, tag, client_state):
            Path(path, tag).mkdir()

    copies = []
    recipe = load_recipe(None, [f"tracking.uri=http://alice:{PASSWORD}@mlflow.example:5000"])
    save_checkpoint(Engine(), recipe, 0, {}, lambda ckpt, name: copies.append(Path(ckpt.path, RECIPE_FILE).read_text()))
    assert len(copies) == 1 and PASSWORD not in copies[0]
    assert yaml.safe_load(copies[0])["tracking"]["uri"] == "http://***@mlflow.example:5000"
