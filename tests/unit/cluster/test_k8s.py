"""KubeRay manifests: every committed one validates against the KubeRay CRDs, is exactly what `towerlab k8s render`
writes today, and a misspelled or missing field is caught (schema, unknown-field walk, pod rules)."""

from __future__ import annotations

import copy
import re
import shlex
from pathlib import Path

import pytest
import yaml

from towerlab.cli import main
from towerlab.cluster.k8s.validate import KINDS, SCHEMA_DIR, extract_schema, schema, validate_doc, validate_file

ROOT = Path(__file__).resolve().parents[3]
SHARED = ROOT.parent / "shared" / "schemas" / "kuberay"
MANIFESTS = sorted((ROOT / "cluster" / "kuberay").glob("*.yaml"))


def test_there_are_manifests():
    names = {p.name for p in MANIFESTS}
    assert {"sweep-quickstart.yaml", "pretrain-g14-large-batch.yaml"} <= names


@pytest.mark.skipif(not SHARED.is_dir(), reason=f"{SHARED} (the KubeRay CRDs of ../shared) is not in this checkout")
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_vendored_schema_equals_shared_crd(kind):
    assert schema(kind) == extract_schema(SHARED / f"ray.io_{KINDS[kind]}.yaml")
    assert (SCHEMA_DIR / f"{KINDS[kind]}.v1.json").is_file()


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_committed_manifest_validates(path):
    assert validate_file(path) == []


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_committed_manifest_is_render_output(path, tmp_path, monkeypatch):
    """The header names the render command; running it again gives the same file."""
    m = re.search(r"^# Rendered by `towerlab k8s render (\S+)` \((.*?)\);", path.read_text(), re.M)
    assert m, f"{path} has no 'Rendered by' header"
    source, flags = m.group(1), shlex.split(m.group(2))
    if not (ROOT / source).is_file():
        pytest.skip(f"{source} is not in this checkout (it comes from another branch)")
    monkeypatch.chdir(ROOT)
    out = tmp_path / "out.yaml"
    assert main(["k8s", "render", source, *flags, "-o", str(out)]) == 0
    assert out.read_text() == path.read_text(), f"{path.name} is stale: run `towerlab k8s render {source} " \
                                                f"{m.group(2)} -o {path.relative_to(ROOT)}`"


def _rendered(tmp_path, monkeypatch, *args) -> list[dict]:
    monkeypatch.chdir(ROOT)
    out = tmp_path / "r.yaml"
    assert main(["k8s", "render", *args, "-o", str(out)]) == 0
    return list(yaml.safe_load_all(out.read_text()))


def test_render_train_runs_the_recipe_on_n_by_g_workers(tmp_path, monkeypatch):
    import ray

    (job,) = _rendered(tmp_path, monkeypatch, "recipes/debug.yaml", "--nodes", "4", "--gpus-per-node", "8")
    spec = job["spec"]
    entry = shlex.split(spec["entrypoint"])
    assert entry[:5] == ["python", "-m", "towerlab.cli", "train", "recipes/debug.yaml"]
    assert {"train.workers=32", "train.use_gpu=true", "train.storage_path=/mnt/shared/checkpoints"} <= set(entry)
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == ray.__version__ and cluster["authOptions"] == {"mode": "token"}
    assert cluster["headGroupSpec"]["serviceType"] == "ClusterIP"
    (group,) = cluster["workerGroupSpecs"]
    assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == 4
    (c,) = group["template"]["spec"]["containers"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 8 and c["resources"]["requests"] == c["resources"]["limits"]
    assert f"ray{ray.__version__}" in c["image"]
    env = {e["name"]: e for e in c["env"]}
    assert env["MLFLOW_TRACKING_PASSWORD"]["valueFrom"]["secretKeyRef"]["key"] == "password"
    # the recipe's CPUs per worker x 8 GPUs, plus 2 for Ray Data and the raylet (debug: 1 CPU per worker)
    assert c["resources"]["limits"]["cpu"] == "10"
    assert c["resources"]["limits"]["memory"] == "480Gi"  # 60Gi per GPU


def test_render_refuses_a_batch_that_does_not_divide(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    # recipes/debug.yaml: global batch 64 over 3 x 1 workers
    assert main(["k8s", "render", "recipes/debug.yaml", "--nodes", "3", "--gpus-per-node", "1"]) == 2
    assert "64" in capsys.readouterr().err


def test_render_object_store_checkpoints(tmp_path, monkeypatch):
    (job,) = _rendered(tmp_path, monkeypatch, "recipes/debug.yaml", "--storage", "s3://bucket/ckpt/")
    assert "train.storage_path=s3://bucket/ckpt" in job["spec"]["entrypoint"]
    pod = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]
    assert [v["name"] for v in pod["volumes"]] == ["dshm"]  # no PVC when checkpoints go to an object store


def _job() -> dict:
    return yaml.safe_load_all((ROOT / "cluster/kuberay/sweep-quickstart.yaml").read_text()).__next__()


def _mutations():
    def rename(d, old, new):
        d[new] = d.pop(old)

    def head_container(doc):
        return doc["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]

    yield ("workerGroupSpec", lambda d: rename(d["spec"], "workerGroupSpecs", "workerGroupSpec"),
           "did you mean 'workerGroupSpecs'")
    yield ("limit", lambda d: rename(head_container(d)["resources"], "limits", "limit"), "did you mean 'limits'")
    yield ("runAsNonroot", lambda d: rename(head_container(d)["securityContext"], "runAsNonRoot", "runAsNonroot"),
           "did you mean 'runAsNonRoot'")
    yield ("replicas type", lambda d: d["spec"]["workerGroupSpecs"][0].update(replicas="two"),
           "'two' is not of type 'integer'")
    yield ("memory quantity", lambda d: head_container(d)["resources"]["limits"].update(memory="16 GB"),
           "does not match")
    yield ("auth mode", lambda d: d["spec"]["authOptions"].update(mode="tokens"), "'tokens' is not one of")
    yield ("no limits", lambda d: head_container(d)["resources"].pop("limits"),
           "resources.limits: set cpu and memory")
    yield ("root", lambda d: d["spec"]["headGroupSpec"]["template"]["spec"]["securityContext"].update(runAsUser=0),
           "runAsUser 0 is root")


@pytest.mark.parametrize("what,mutate,message", list(_mutations()), ids=[m[0] for m in _mutations()])
def test_a_mistake_is_caught(what, mutate, message):
    doc = _job()
    assert validate_doc(doc) == []
    bad = copy.deepcopy(doc)
    mutate(bad)
    problems = validate_doc(bad)
    assert any(message in p for p in problems), problems


def test_validate_cli(tmp_path, capsys):
    good = ROOT / "cluster/kuberay/sweep-quickstart.yaml"
    assert main(["k8s", "validate", str(good)]) == 0
    bad = tmp_path / "bad.yaml"
    bad.write_text(good.read_text().replace("shutdownAfterJobFinishes", "shutdownAfterJobFinish"))
    assert main(["k8s", "validate", str(bad)]) == 2
    assert "shutdownAfterJobFinish: unknown field" in capsys.readouterr().err
    assert main(["k8s", "validate", str(tmp_path / "missing.yaml")]) == 2
