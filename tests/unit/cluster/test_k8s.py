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


# The security rules of docs/kubernetes.md, on the committed sweep manifest's RayCluster with one thing changed.

def _cluster() -> dict:
    return _job()  # the first document of sweep-quickstart.yaml is the RayCluster


def _head(doc):
    return doc["spec"]["headGroupSpec"]["template"]["spec"]


def _security_breaks():
    yield ("auth disabled", lambda d: d["spec"]["authOptions"].update(mode="disabled"),
           "spec.authOptions.mode: disabled; Ray's token authentication stays on")
    yield ("auth missing", lambda d: d["spec"].pop("authOptions"), "spec.authOptions.mode: not set")
    yield ("auth env off", lambda d: _head(d)["containers"][0]["env"].append({"name": "RAY_AUTH_MODE",
                                                                               "value": "disabled"}),
           "RAY_AUTH_MODE=disabled: Ray's token authentication stays on")
    yield ("LoadBalancer", lambda d: d["spec"]["headGroupSpec"].update(serviceType="LoadBalancer"),
           "serviceType: LoadBalancer would publish the dashboard")
    yield ("NodePort", lambda d: d["spec"]["headGroupSpec"].update(serviceType="NodePort"),
           "serviceType: NodePort would publish the dashboard")
    yield ("headService", lambda d: d["spec"]["headGroupSpec"].update(headService={"spec": {"type": "NodePort"}}),
           "headService.spec.type: NodePort")
    yield ("ingress", lambda d: d["spec"]["headGroupSpec"].update(enableIngress=True), "enableIngress")
    yield ("privileged", lambda d: _head(d)["containers"][0]["securityContext"].update(privileged=True),
           "securityContext.privileged: must not be true")
    yield ("root allowed", lambda d: (_head(d)["containers"][0]["securityContext"].update(runAsNonRoot=False),
                                      _head(d)["securityContext"].pop("runAsNonRoot")),
           "runAsNonRoot must be true")
    yield ("hostPath", lambda d: _head(d)["volumes"].append({"name": "host", "hostPath": {"path": "/"}}),
           "volumes[2] host: hostPath volumes are not allowed")
    yield ("hostNetwork", lambda d: _head(d).update(hostNetwork=True), "spec.hostNetwork: must not be true")
    yield ("literal password", lambda d: _head(d)["containers"][0]["env"][2].update(value="hunter2", valueFrom=None)
           or _head(d)["containers"][0]["env"][2].pop("valueFrom"),
           "env[2] MLFLOW_TRACKING_PASSWORD: a literal secret in the manifest")
    yield ("literal token", lambda d: d["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["env"]
           .append({"name": "HF_TOKEN", "value": "hf_abc"}), "env[3] HF_TOKEN: a literal secret")
    yield ("password in a URI", lambda d: _head(d)["containers"][0]["env"][0].update(value="http://u:p@mlflow:5000"),
           "env[0] MLFLOW_TRACKING_URI: a literal secret")
    yield ("redis password", lambda d: d["spec"]["gcsFaultToleranceOptions"].update(redisPassword={"value": "pw"}),
           "redisPassword.value: a literal password")


@pytest.mark.parametrize("what,mutate,message", list(_security_breaks()), ids=[m[0] for m in _security_breaks()])
def test_a_security_rule_is_enforced(what, mutate, message):
    doc = _cluster()
    assert validate_doc(doc) == []
    bad = copy.deepcopy(doc)
    mutate(bad)
    problems = validate_doc(bad)
    assert any(message in p for p in problems), problems


def test_token_auth_from_the_head_environment_is_accepted():
    doc = _cluster()
    doc["spec"].pop("authOptions")
    _head(doc)["containers"][0]["env"].append({"name": "RAY_AUTH_MODE", "value": "token"})
    assert validate_doc(doc) == []


def test_a_credential_in_a_rayjob_entrypoint_is_refused():
    job = list(yaml.safe_load_all((ROOT / "cluster/kuberay/sweep-quickstart.yaml").read_text()))[1]
    job["spec"]["entrypoint"] += " tracking.uri=http://alice:hunter2@mlflow:5000"
    problems = validate_doc(job)
    assert any("spec.entrypoint: holds a credential" in p for p in problems), problems
    assert not any("hunter2" in p for p in problems)


COMPANIONS = """
apiVersion: v1
kind: Service
metadata: {name: ray-dashboard}
spec:
  type: ClusterIP
  ports: [{name: dashboard, port: 8265}]
---
apiVersion: v1
kind: Secret
metadata: {name: mlflow-credentials}
stringData: {username: alice, password: hunter2}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: towerlab-config}
data: {MLFLOW_TRACKING_URI: "http://mlflow:5000"}
---
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: towerlab-shared}
spec: {accessModes: [ReadWriteMany], resources: {requests: {storage: 100Gi}}}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: towerlab}
"""


def test_a_file_with_companion_kinds_validates(tmp_path, capsys):
    f = tmp_path / "all.yaml"
    f.write_text((ROOT / "cluster/kuberay/sweep-quickstart.yaml").read_text() + "---" + COMPANIONS)
    assert main(["k8s", "validate", str(f)]) == 0, capsys.readouterr().err
    assert "valid" in capsys.readouterr().out


@pytest.mark.parametrize("change,message", [
    (("type: ClusterIP", "type: LoadBalancer"),
     "Service ray-dashboard.spec.type: LoadBalancer publishes Ray's dashboard"),
    (("type: ClusterIP", "type: NodePort"), "NodePort publishes Ray's dashboard"),
    (('data: {MLFLOW_TRACKING_URI: "http://mlflow:5000"}', "data: {MLFLOW_TRACKING_PASSWORD: hunter2}"),
     "ConfigMap towerlab-config.data.MLFLOW_TRACKING_PASSWORD: a secret in a ConfigMap"),
    (("apiVersion: v1\nkind: ServiceAccount", "apiVersion: v2\nkind: ServiceAccount"),
     "ServiceAccount towerlab: apiVersion 'v2': ServiceAccount is served as v1"),
    (("kind: PersistentVolumeClaim", "kind: Deployment"), "kind 'Deployment' is not checked here"),
])
def test_companion_kinds_are_checked_lightly(tmp_path, capsys, change, message):
    f = tmp_path / "all.yaml"
    text = COMPANIONS.replace(*change)
    f.write_text(text)
    assert main(["k8s", "validate", str(f)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and "hunter2" not in err


@pytest.mark.parametrize("text,message", [
    ("- a\n- b\n", "#1 document: a manifest document is a mapping (apiVersion, kind, metadata, spec), not a list"),
    ("just a string\n", "not a str"),
    ("apiVersion: ray.io/v1\nkind: RayCluster\nmetadata: [x]\nspec: [1, 2]\n",
     "#1 RayCluster.spec: a list where a mapping goes"),
    (None, "workerGroupSpecs: a mapping where a list goes"),
    (None, "containers: a mapping where a list goes"),
    (None, "#1 RayCluster towerlab-quickstart.spec.headGroupSpec.template.spec.volumes[0]: 'x' is not of type"),
])
def test_a_mistyped_structure_is_one_line_per_problem(tmp_path, capsys, text, message):
    if text is None:
        doc = _cluster()
        if "workerGroupSpecs" in message:
            doc["spec"]["workerGroupSpecs"] = {"groupName": "cpu"}
        elif "containers" in message:
            _head(doc)["containers"] = {"name": "ray-head"}
        else:
            _head(doc)["volumes"] = ["x"]
        text = yaml.safe_dump(doc)
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    assert main(["k8s", "validate", str(f)]) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert "Traceback" not in err
    assert all(line.startswith("error: ") for line in err.strip().splitlines())


def test_render_never_writes_a_credential(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    out = tmp_path / "r.yaml"
    for args in (["train.steps=3", "tracking.uri=http://alice:hunter2@mlflow:5000"],
                 ["data.path=s3://bucket/shards?token=hunter2"],
                 ["--tracking-uri", "http://alice:hunter2@mlflow:5000"]):
        assert main(["k8s", "render", "recipes/debug.yaml", *args, "-o", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: k8s render: ") and "holds a credential" in err, err
        assert len(err.strip().splitlines()) == 1 and "hunter2" not in err
        assert not out.exists()
