"""Checking KubeRay manifests before they reach a cluster: Kubernetes silently prunes fields its schema does not
know, so a typo (`workerGroupSpec`, `limit`) would vanish instead of failing; and the security rules of
docs/kubernetes.md hold in every manifest, hand-written ones too.

Per RayCluster or RayJob document:
1. jsonschema against the KubeRay CRD's openAPIV3Schema (types, enums, required keys, quantity patterns); the CRDs
   embed the Kubernetes core types of pod templates (containers, resources, securityContext, volumes).
2. A walk that rejects every key the schema does not list (unless it says x-kubernetes-preserve-unknown-fields),
   with the closest known name.
3. The project's rules. Every cluster: Ray's token authentication on (authOptions.mode: token, or RAY_AUTH_MODE=token
   in the head's env when authOptions is absent), the head service ClusterIP (no LoadBalancer, NodePort or
   Ingress), no literal Redis password. Every pod template: requests and limits for cpu and memory, non-root, no
   privilege escalation, not privileged, no hostPath volumes, no host network/PID/IPC, no literal secret in env
   (secretKeyRef instead). A RayJob: no credential in its entrypoint or runtime env.
Companion kinds that live in the same files (Service, Secret, ConfigMap, PersistentVolumeClaim, ServiceAccount) are
checked lightly: a v1 apiVersion and a name; a Service does not publish the dashboard; a ConfigMap holds no secret.
A mistyped structure (a list where a mapping goes, a scalar document) is one line naming its path.
The CRD schemas are vendored under schemas/ (the v1 openAPIV3Schema of ray-project/kuberay's CRDs, extracted by
`extract_schema` from ../shared/schemas/kuberay/; a test keeps the copies equal), so the check needs no network.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Iterator

import yaml

from towerlab.config import ConfigError
from towerlab.config.secrets import has_credentials, redact_text
from towerlab.util import closest

SCHEMA_DIR = Path(__file__).parent / "schemas"
KINDS = {"RayCluster": "rayclusters", "RayJob": "rayjobs"}
# what a manifest file holds beside them; checked lightly (see _companion)
COMPANIONS = ("Service", "Secret", "ConfigMap", "PersistentVolumeClaim", "ServiceAccount")
API_VERSION = "ray.io/v1"


def extract_schema(crd_file: str | Path, version: str = "v1") -> dict:
    """The openAPIV3Schema of one served version of a CustomResourceDefinition file."""
    # a CRD is megabytes of YAML: libyaml's loader when present (10x faster), the pure-Python one otherwise
    crd = yaml.load(Path(crd_file).read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    for v in crd["spec"]["versions"]:
        if v["name"] == version:
            return v["schema"]["openAPIV3Schema"]
    raise ConfigError(f"{crd_file} has no version {version}")


@cache
def schema(kind: str) -> dict:
    return json.loads((SCHEMA_DIR / f"{KINDS[kind]}.v1.json").read_text())


def _unknown_fields(node, sch: dict, path: str) -> Iterator[str]:
    if not isinstance(sch, dict) or sch.get("x-kubernetes-preserve-unknown-fields"):
        return
    if isinstance(node, dict):
        props = sch.get("properties")
        if props is not None:
            for key, value in node.items():
                if key in props:
                    yield from _unknown_fields(value, props[key], f"{path}.{key}")
                else:
                    near = closest(key, list(props))
                    hint = f" (did you mean '{near}'?)" if near else f" (known: {', '.join(sorted(props))})"
                    yield f"{path}.{key}: unknown field, Kubernetes would silently drop it{hint}"
        elif isinstance(sch.get("additionalProperties"), dict):
            for key, value in node.items():
                yield from _unknown_fields(value, sch["additionalProperties"], f"{path}.{key}")
    elif isinstance(node, list) and isinstance(sch.get("items"), dict):
        for i, value in enumerate(node):
            yield from _unknown_fields(value, sch["items"], f"{path}[{i}]")


def _map(node, key: str) -> dict:
    """node[key] when both are mappings, else {}: a mistyped structure is reported by the schema check (with its
    path), and the rule checks below must not stumble over it."""
    value = node.get(key) if isinstance(node, dict) else None
    return value if isinstance(value, dict) else {}


def _list(node, key: str) -> list:
    value = node.get(key) if isinstance(node, dict) else None
    return value if isinstance(value, list) else []


def _clusters(doc: dict) -> Iterator[tuple[str, dict]]:
    """(path, RayCluster spec) of a RayCluster, or of a RayJob's rayClusterSpec."""
    if doc.get("kind") == "RayCluster" and isinstance(doc.get("spec"), dict):
        yield "spec", doc["spec"]
    elif isinstance(_map(doc, "spec").get("rayClusterSpec"), dict):
        yield "spec.rayClusterSpec", _map(doc, "spec")["rayClusterSpec"]


def _pod_templates(doc: dict) -> Iterator[tuple[str, dict]]:
    """(path, pod spec) of every pod template in a RayCluster or RayJob."""
    spec = _map(doc, "spec")
    if doc.get("kind") == "RayJob" and isinstance(spec.get("submitterPodTemplate"), dict):
        yield "spec.submitterPodTemplate", _map(_map(spec, "submitterPodTemplate"), "spec")
    for base, c in _clusters(doc):
        yield f"{base}.headGroupSpec.template", _map(_map(_map(c, "headGroupSpec"), "template"), "spec")
        for i, g in enumerate(_list(c, "workerGroupSpecs")):
            yield f"{base}.workerGroupSpecs[{i}].template", _map(_map(g, "template"), "spec")


def _env_rules(where: str, container: dict) -> Iterator[str]:
    """Secrets come from Kubernetes Secrets (valueFrom.secretKeyRef), never as literal values in a manifest."""
    for j, e in enumerate(_list(container, "env")):
        if not isinstance(e, dict) or not isinstance(e.get("value"), (str, int, float)):
            continue
        name, value = str(e.get("name", "")), e["value"]
        if name == "RAY_AUTH_MODE" and value != "token":
            yield f"{where}.env[{j}] RAY_AUTH_MODE={value}: Ray's token authentication stays on (token)"
        elif has_credentials(value, name):
            yield (f"{where}.env[{j}] {name}: a literal secret in the manifest; take it from a Secret "
                   f"(valueFrom.secretKeyRef: {{name: SECRET, key: KEY}})")


def _pod_rules(path: str, pod: dict) -> Iterator[str]:
    pod_sc = _map(pod, "securityContext")
    containers = _list(pod, "containers")
    if not containers:
        yield f"{path}.spec.containers: no container"
    for field_name in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(field_name) is True:
            yield f"{path}.spec.{field_name}: must not be true (pods share nothing with their node)"
    for i, v in enumerate(_list(pod, "volumes")):
        if isinstance(v, dict) and "hostPath" in v:
            yield (f"{path}.spec.volumes[{i}] {v.get('name', '')}: hostPath volumes are not allowed (a pod reads and "
                   "writes its node's disk); use a PersistentVolumeClaim or an emptyDir")
    init = _list(pod, "initContainers")
    for group, items in (("containers", containers), ("initContainers", init)):
        for i, c in enumerate(items):
            where = f"{path}.spec.{group}[{i}]"
            if not isinstance(c, dict):
                continue  # the schema check names it
            if group == "containers":
                res = _map(c, "resources")
                for kind in ("requests", "limits"):
                    missing = [r for r in ("cpu", "memory") if r not in _map(res, kind)]
                    if missing:
                        yield (f"{where}.resources.{kind}: set {' and '.join(missing)} (every pod has requests and "
                               "limits)")
            sc = _map(c, "securityContext")
            if not (sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True):
                yield f"{where}: runAsNonRoot must be true (in the container's or the pod's securityContext)"
            if sc.get("runAsUser", pod_sc.get("runAsUser")) == 0:
                yield f"{where}: runAsUser 0 is root"
            if sc.get("allowPrivilegeEscalation") is not False:
                yield f"{where}.securityContext.allowPrivilegeEscalation: must be false"
            if sc.get("privileged"):
                yield f"{where}.securityContext.privileged: must not be true"
            yield from _env_rules(where, c)


def _head_env(cluster: dict) -> dict:
    head = _list(_map(_map(_map(cluster, "headGroupSpec"), "template"), "spec"), "containers")
    env = _list(head[0], "env") if head and isinstance(head[0], dict) else []
    return {e.get("name"): e.get("value") for e in env if isinstance(e, dict)}


def _cluster_rules(path: str, cluster: dict) -> Iterator[str]:
    """Ray's token authentication on, the dashboard inside the cluster, no literal Redis password."""
    mode = _map(cluster, "authOptions").get("mode")
    if mode != "token" and not (mode is None and _head_env(cluster).get("RAY_AUTH_MODE") == "token"):
        yield (f"{path}.authOptions.mode: {mode or 'not set'}; Ray's token authentication stays on: set "
               "authOptions: {mode: token}")
    head = _map(cluster, "headGroupSpec")
    service_type = head.get("serviceType")
    if service_type not in (None, "ClusterIP"):
        yield (f"{path}.headGroupSpec.serviceType: {service_type} would publish the dashboard (and the Jobs API) "
               "outside the cluster; use ClusterIP and kubectl port-forward")
    head_service_type = _map(_map(head, "headService"), "spec").get("type")
    if head_service_type not in (None, "ClusterIP"):
        yield f"{path}.headGroupSpec.headService.spec.type: {head_service_type}: use ClusterIP (kubectl port-forward)"
    if head.get("enableIngress") is True:
        yield (f"{path}.headGroupSpec.enableIngress: an Ingress would publish the dashboard; use kubectl "
               "port-forward")
    redis = _map(_map(cluster, "gcsFaultToleranceOptions"), "redisPassword")
    if redis.get("value"):
        yield (f"{path}.gcsFaultToleranceOptions.redisPassword.value: a literal password; use "
               "redisPassword.valueFrom.secretKeyRef")


def _job_rules(name: str, doc: dict) -> Iterator[str]:
    spec = _map(doc, "spec")
    for key in ("entrypoint", "runtimeEnvYAML"):
        if isinstance(spec.get(key), str) and has_credentials(spec[key]):
            yield (f"{name}.spec.{key}: holds a credential ({redact_text(spec[key])[:200]}) that every dashboard "
                   "user reads; give it to the pods from a Secret (env valueFrom.secretKeyRef)")


DASHBOARD_PORT = 8265


def _companion(doc: dict, name: str) -> list[str]:
    """The light check of a companion kind: it is well-formed, and a Service does not publish Ray's dashboard."""
    kind = doc["kind"]
    if doc.get("apiVersion") != "v1":
        return [f"{name}: apiVersion {doc.get('apiVersion')!r}: {kind} is served as v1"]
    if not isinstance(_map(doc, "metadata").get("name"), str):
        return [f"{name}.metadata.name: every {kind} has a name"]
    problems = []
    if kind == "Service":
        spec = _map(doc, "spec")
        kind_of = spec.get("type", "ClusterIP")
        ports = [p for p in _list(spec, "ports") if isinstance(p, dict)]
        dashboard = [p for p in ports if DASHBOARD_PORT in (p.get("port"), p.get("targetPort"))
                     or "dashboard" in str(p.get("name", "")) + str(p.get("targetPort", ""))]
        if kind_of in ("LoadBalancer", "NodePort") and dashboard:
            problems.append(f"{name}.spec.type: {kind_of} publishes Ray's dashboard (and the Jobs API) outside the "
                            "cluster; use ClusterIP and kubectl port-forward")
    elif kind == "ConfigMap":
        for key, value in _map(doc, "data").items():
            if has_credentials(value, key):
                problems.append(f"{name}.data.{key}: a secret in a ConfigMap; put it in a Secret")
    return problems


def validate_doc(doc, name: str = "document") -> list[str]:
    """Every problem of one manifest document, one line each; [] when it is valid."""
    import jsonschema

    if not isinstance(doc, dict):
        return [f"{name}: a manifest document is a mapping (apiVersion, kind, metadata, spec), not a "
                f"{type(doc).__name__} ({str(doc)[:40]!r})"]
    kind, api = doc.get("kind"), doc.get("apiVersion")
    if kind in COMPANIONS:
        return _companion(doc, name)
    if kind not in KINDS:
        return [f"{name}: kind {kind!r} is not checked here (expected {', '.join([*KINDS, *COMPANIONS])})"]
    if api != API_VERSION:
        return [f"{name}: apiVersion {api!r}: {kind} is served as {API_VERSION}"]
    sch = schema(kind)
    problems = []
    for e in sorted(jsonschema.Draft7Validator(sch).iter_errors(doc), key=lambda e: [str(p) for p in e.absolute_path]):
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in e.absolute_path)
        problems.append(f"{name}{where or ''}: {_short(e)}")
    problems += list(_unknown_fields(doc, sch, name))
    if problems:  # the rules below read a well-formed structure: on a mistyped one they would repeat its mistake
        return problems
    for path, cluster in _clusters(doc):
        problems += list(_cluster_rules(f"{name}.{path}", cluster))
    for path, pod in _pod_templates(doc):
        problems += list(_pod_rules(f"{name}.{path}", pod))
    if kind == "RayJob":
        problems += list(_job_rules(name, doc))
    return problems


JSON_TYPES = {"object": "a mapping", "array": "a list", "string": "a string", "integer": "an integer",
              "number": "a number", "boolean": "true or false"}


def _short(e) -> str:
    """jsonschema's message without the offending value when that is a whole structure (a mapping or a list given
    where a scalar goes would be printed whole)."""
    if isinstance(e.instance, (dict, list)) and e.validator == "type":
        given = "a mapping" if isinstance(e.instance, dict) else "a list"
        return f"{given} where {JSON_TYPES.get(str(e.validator_value), repr(e.validator_value))} goes"
    return e.message[:300]


def validate_text(text: str, source: str) -> list[str]:
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as e:
        return [f"{source}: not YAML ({str(e).splitlines()[0]})"]
    if not docs:
        return [f"{source}: no document"]
    problems = []
    for i, d in enumerate(docs):
        label = d.get("kind") if isinstance(d, dict) and isinstance(d.get("kind"), str) else "document"
        name = _map(d, "metadata").get("name")
        problems += validate_doc(d, f"{source}#{i + 1} {label}" + (f" {name}" if isinstance(name, str) else ""))
    return problems


def validate_file(path: str | Path) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"manifest {p} does not exist")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        return [f"{p}: not UTF-8 text ({e.reason} at byte {e.start})"]
    return validate_text(text, str(p))
