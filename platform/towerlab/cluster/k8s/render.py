"""KubeRay manifests rendered from a recipe or a sweep, so nobody hand-edits cluster YAML.

- A recipe (large-batch pretraining) becomes one RayJob that brings up its own RayCluster: a head that runs only
  the driver and N GPU worker nodes of G GPUs each; the recipe runs with train.workers = N x G, use_gpu, and its
  checkpoints on shared storage; the cluster is deleted after the job (shutdownAfterJobFinishes + TTL).
- A sweep becomes a RayCluster (a long-lived pool with an autoscaled CPU group and GPU group, for
  `towerlab submit` through its dashboard service) and a RayJob that runs the sweep on a pool of its own.

Everything a pod needs comes from the image: towerlab, its pinned dependencies and the project files (recipes,
sweeps) at PROJECT_DIR, built by cluster/Dockerfile on top of the rayproject/ray image of the pinned Ray version.
The rules of the project hold in every pod: non-root (the image's `ray` user, uid 1000), no privilege escalation,
requests = limits, Ray's token authentication, MLflow credentials from a Secret, the dashboard as a ClusterIP
service only, GCS fault tolerance through an external Redis. No credential is ever written into a manifest: an
override or option that holds one is refused (check_no_credentials).
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field

import yaml

from towerlab.config import ConfigError
from towerlab.config.secrets import has_credentials, redact_text

PROJECT_DIR = "/home/ray/towerlab"
SHARED_MOUNT = "/mnt/shared"  # the PVC: checkpoints/ (and datasets, e.g. data.path=/mnt/shared/datasets/X)
RAY_UID, RAY_GID = 1000, 100  # the `ray` user and `users` group of the rayproject/ray images


def default_image(gpu: bool = True) -> str:
    """The image cluster/Dockerfile builds: its tag names the towerlab, Ray and Python versions it holds."""
    from importlib.metadata import version

    return f"towerlab:{version('towerlab')}-ray{version('ray')}-py311" + ("-gpu" if gpu else "")


@dataclass
class K8sOptions:
    """What `towerlab k8s render` takes besides the recipe: the cluster's shape and where things live."""

    nodes: int = 1
    gpus_per_node: int = 0
    cpus_per_node: int = 8
    memory_per_node: str = ""  # default: 60Gi per GPU, 32Gi for a CPU node
    image: str = ""
    namespace: str = "towerlab"
    tracking_uri: str = "http://mlflow.mlflow.svc.cluster.local:5000"
    mlflow_secret: str = "mlflow-credentials"  # keys: username, password
    storage: str = "pvc://towerlab-shared"  # pvc://CLAIM (ReadWriteMany, at /mnt/shared) or s3://, gs:// URI
    redis_address: str = "redis.towerlab.svc.cluster.local:6379"
    redis_secret: str = "redis-password"  # key: password
    ttl_seconds: int = 3600
    overrides: list[str] = field(default_factory=list)

    @property
    def pvc(self) -> str | None:
        return self.storage[len("pvc://"):] if self.storage.startswith("pvc://") else None

    @property
    def storage_path(self) -> str:
        return f"{SHARED_MOUNT}/checkpoints" if self.pvc else self.storage.rstrip("/")


def _quantity(n: float) -> str:
    return str(int(n)) if float(n).is_integer() else f"{int(n * 1000)}m"


def _env(o: K8sOptions) -> list[dict]:
    secret = lambda key: {"secretKeyRef": {"name": o.mlflow_secret, "key": key}}  # noqa: E731
    return [{"name": "MLFLOW_TRACKING_URI", "value": o.tracking_uri},
            {"name": "MLFLOW_TRACKING_USERNAME", "valueFrom": secret("username")},
            {"name": "MLFLOW_TRACKING_PASSWORD", "valueFrom": secret("password")}]


def _pod(o: K8sOptions, name: str, cpus: float, memory: str, gpus: int, ports: list[dict] | None = None) -> dict:
    """A pod template: one Ray container, requests = limits (Guaranteed QoS), non-root, shared checkpoints."""
    res = {"cpu": _quantity(cpus), "memory": memory}
    if gpus:
        res["nvidia.com/gpu"] = gpus
    mounts = [{"name": "dshm", "mountPath": "/dev/shm"}]  # Ray's object store and NCCL use shared memory
    volumes: list[dict] = [{"name": "dshm", "emptyDir": {"medium": "Memory"}}]
    if o.pvc:
        mounts.append({"name": "shared", "mountPath": SHARED_MOUNT})
        volumes.append({"name": "shared", "persistentVolumeClaim": {"claimName": o.pvc}})
    container = {
        "name": name, "image": o.image, "imagePullPolicy": "IfNotPresent", "workingDir": PROJECT_DIR,
        "env": _env(o), "resources": {"requests": dict(res), "limits": dict(res)},
        "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]},
                            "runAsNonRoot": True},
        "volumeMounts": mounts}
    if ports:
        container["ports"] = ports
    spec = {"securityContext": {"runAsNonRoot": True, "runAsUser": RAY_UID, "runAsGroup": RAY_GID,
                                "fsGroup": RAY_GID, "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [container], "volumes": volumes}
    if gpus:
        spec["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    return {"spec": spec}


def _head(o: K8sOptions) -> dict:
    ports = [{"containerPort": 6379, "name": "gcs-server"}, {"containerPort": 8265, "name": "dashboard"},
             {"containerPort": 10001, "name": "client"}]
    return {
        # num-cpus 0: the head runs the driver (and Tune's bookkeeping), never a training worker
        "rayStartParams": {"num-cpus": "0", "dashboard-host": "0.0.0.0"},
        "serviceType": "ClusterIP",
        "template": _pod(o, "ray-head", 4, "16Gi", 0, ports)}


def _worker_group(o: K8sOptions, group: str, replicas: int, min_replicas: int, max_replicas: int, gpus: int,
                  cpus: int, memory: str) -> dict:
    memory = memory or (f"{60 * gpus}Gi" if gpus else "32Gi")
    return {"groupName": group, "replicas": replicas, "minReplicas": min_replicas, "maxReplicas": max_replicas,
            "rayStartParams": {}, "template": _pod(o, "ray-worker", cpus, memory, gpus)}


def _cluster_spec(o: K8sOptions, groups: list[dict], autoscale: bool = False) -> dict:
    from importlib.metadata import version

    spec = {"rayVersion": version("ray"),
            "authOptions": {"mode": "token"},
            "gcsFaultToleranceOptions": {
                "redisAddress": o.redis_address,
                "redisPassword": {"valueFrom": {"secretKeyRef": {"name": o.redis_secret, "key": "password"}}}},
            "headGroupSpec": _head(o), "workerGroupSpecs": groups}
    if autoscale:
        spec["enableInTreeAutoscaling"] = True
    return spec


def _metadata(name: str, o: K8sOptions, role: str) -> dict:
    return {"name": name, "namespace": o.namespace,
            "labels": {"app.kubernetes.io/name": "towerlab", "app.kubernetes.io/component": role}}


def _submitter(o: K8sOptions) -> dict:
    """The pod KubeRay starts to submit the job: the same rules as every other pod."""
    pod = _pod(o, "ray-job-submitter", 0.5, "1Gi", 0)
    pod["spec"]["restartPolicy"] = "Never"
    pod["spec"]["volumes"] = [v for v in pod["spec"]["volumes"] if v["name"] == "dshm"]
    pod["spec"]["containers"][0]["volumeMounts"] = [{"name": "dshm", "mountPath": "/dev/shm"}]
    return pod


def _rayjob(name: str, o: K8sOptions, entrypoint: list[str], cluster: dict) -> dict:
    runtime_env = {"working_dir": f"local://{PROJECT_DIR}", "env_vars": {"PYTHONUNBUFFERED": "1"}}
    return {"apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": _metadata(name, o, "job"),
            "spec": {"entrypoint": shlex.join(entrypoint),
                     "runtimeEnvYAML": yaml.safe_dump(runtime_env, sort_keys=False),
                     "shutdownAfterJobFinishes": True, "ttlSecondsAfterFinished": o.ttl_seconds,
                     "backoffLimit": 0, "submitterPodTemplate": _submitter(o), "rayClusterSpec": cluster}}


def _k8s_name(name: str) -> str:
    import re

    return re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")[:50]


def train_overrides(o: K8sOptions) -> list[str]:
    """What a recipe needs to run on the rendered cluster (validated with the recipe before rendering)."""
    out = [f"train.workers={o.nodes * max(o.gpus_per_node, 1)}", f"train.storage_path={o.storage_path}"]
    if o.gpus_per_node:
        out += ["train.use_gpu=true"]
    return out


def check_no_credentials(o: K8sOptions) -> None:
    """A manifest is read by everyone with access to the namespace (and lands in git): a credential in an override
    or an option would be written into it in plain text, so it is refused; secrets reach the pods from Secrets."""
    given = [("--tracking-uri", "", o.tracking_uri), ("--storage", "", o.storage),
             ("--redis-address", "", o.redis_address), ("--image", "", o.image)]
    given += [(f"override {key}", key, value) for key, _, value in (x.partition("=") for x in o.overrides)]
    for what, key, value in given:
        if value and has_credentials(value, key):
            hint = (f"MLflow's come from Secret {o.mlflow_secret} (keys username, password)" if what == "--tracking-uri"
                    else "give it to the pods from a Kubernetes Secret (env valueFrom.secretKeyRef) and read it in "
                         "the recipe as ${oc.env:VAR}")
            raise ConfigError(f"k8s render: {what} {redact_text(value)} holds a credential, which the manifest would "
                              f"carry in plain text: leave it out; {hint}")


def render_train(recipe_file: str, recipe_name: str, o: K8sOptions) -> list[dict]:
    """One RayJob: its own cluster of o.nodes GPU (or CPU) nodes, deleted after the run."""
    check_no_credentials(o)
    gpu = o.gpus_per_node > 0
    groups = [_worker_group(o, "gpu" if gpu else "cpu", o.nodes, o.nodes, o.nodes, o.gpus_per_node,
                            o.cpus_per_node, o.memory_per_node)]
    entry = ["python", "-m", "towerlab.cli", "train", recipe_file, *o.overrides, *train_overrides(o), "--no-progress"]
    return [_rayjob(f"towerlab-train-{_k8s_name(recipe_name)}", o, entry, _cluster_spec(o, groups))]


def render_sweep(sweep_file: str, sweep_name: str, o: K8sOptions) -> list[dict]:
    """A RayCluster (an autoscaled CPU + GPU pool for `towerlab submit`) and a RayJob running the sweep."""
    check_no_credentials(o)
    cpu_group = _worker_group(o, "cpu", 1, 0, o.nodes, 0, o.cpus_per_node, o.memory_per_node)
    groups = [cpu_group]
    if o.gpus_per_node:
        groups.append(_worker_group(o, "gpu", 0, 0, o.nodes, o.gpus_per_node, o.cpus_per_node, o.memory_per_node))
    name = _k8s_name(sweep_name)
    cluster = {"apiVersion": "ray.io/v1", "kind": "RayCluster", "metadata": _metadata(f"towerlab-{name}", o, "pool"),
               "spec": _cluster_spec(o, groups, autoscale=True)}
    entry = ["python", "-m", "towerlab.cli", "sweep", sweep_file, *o.overrides,
             f"storage_path={o.storage_path}/sweeps"]
    job = _rayjob(f"towerlab-sweep-{name}", o, entry, _cluster_spec(o, groups, autoscale=True))
    return [cluster, job]


def to_yaml(docs: list[dict], header: str) -> str:
    body = "---\n".join(yaml.safe_dump(d, sort_keys=False, width=120) for d in docs)
    return "".join(f"# {line}\n" if line else "#\n" for line in header.splitlines()) + body
