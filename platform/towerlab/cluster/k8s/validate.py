"""Checking KubeRay manifests before they reach a cluster: Kubernetes silently prunes fields its schema does not
know, so a typo (`workerGroupSpec`, `limit`) would vanish instead of failing.

Three checks per document:
1. jsonschema against the KubeRay CRD's openAPIV3Schema (types, enums, required keys, quantity patterns); the CRDs
   embed the Kubernetes core types of pod templates (containers, resources, securityContext, volumes).
2. A walk that rejects every key the schema does not list (unless it says x-kubernetes-preserve-unknown-fields),
   with the closest known name.
3. The project's rules for every pod template: requests and limits for cpu and memory, non-root, no privilege
   escalation.
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
from towerlab.util import closest

SCHEMA_DIR = Path(__file__).parent / "schemas"
KINDS = {"RayCluster": "rayclusters", "RayJob": "rayjobs"}
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


def _pod_templates(doc: dict) -> Iterator[tuple[str, dict]]:
    """(path, pod spec) of every pod template in a RayCluster or RayJob."""
    spec = doc.get("spec") or {}
    clusters = []
    if doc.get("kind") == "RayCluster":
        clusters.append(("spec", spec))
    else:
        if isinstance(spec.get("rayClusterSpec"), dict):
            clusters.append(("spec.rayClusterSpec", spec["rayClusterSpec"]))
        if isinstance(spec.get("submitterPodTemplate"), dict):
            yield "spec.submitterPodTemplate", spec["submitterPodTemplate"].get("spec") or {}
    for base, c in clusters:
        head = (c.get("headGroupSpec") or {}).get("template") or {}
        yield f"{base}.headGroupSpec.template", head.get("spec") or {}
        for i, g in enumerate(c.get("workerGroupSpecs") or []):
            yield f"{base}.workerGroupSpecs[{i}].template", (g.get("template") or {}).get("spec") or {}


def _pod_rules(path: str, pod: dict) -> Iterator[str]:
    pod_sc = pod.get("securityContext") or {}
    containers = pod.get("containers") or []
    if not containers:
        yield f"{path}.spec.containers: no container"
    for i, c in enumerate(containers):
        where = f"{path}.spec.containers[{i}]"
        res = c.get("resources") or {}
        for kind in ("requests", "limits"):
            missing = [r for r in ("cpu", "memory") if r not in (res.get(kind) or {})]
            if missing:
                yield f"{where}.resources.{kind}: set {' and '.join(missing)} (every pod has requests and limits)"
        sc = c.get("securityContext") or {}
        if not (sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True):
            yield f"{where}: runAsNonRoot must be true (in the container's or the pod's securityContext)"
        if sc.get("runAsUser", pod_sc.get("runAsUser")) == 0:
            yield f"{where}: runAsUser 0 is root"
        if sc.get("allowPrivilegeEscalation") is not False:
            yield f"{where}.securityContext.allowPrivilegeEscalation: must be false"
        if sc.get("privileged"):
            yield f"{where}.securityContext.privileged: must not be true"


def validate_doc(doc, name: str = "document") -> list[str]:
    """Every problem of one manifest document, one line each; [] when it is valid."""
    import jsonschema

    if not isinstance(doc, dict):
        return [f"{name}: not a mapping"]
    kind, api = doc.get("kind"), doc.get("apiVersion")
    if kind not in KINDS:
        return [f"{name}: kind {kind!r} is not checked here (expected {' or '.join(KINDS)})"]
    if api != API_VERSION:
        return [f"{name}: apiVersion {api!r}: {kind} is served as {API_VERSION}"]
    sch = schema(kind)
    problems = []
    for e in sorted(jsonschema.Draft7Validator(sch).iter_errors(doc), key=lambda e: list(e.absolute_path)):
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in e.absolute_path)
        problems.append(f"{name}{where or ''}: {e.message}")
    problems += list(_unknown_fields(doc, sch, name))
    for path, pod in _pod_templates(doc):
        problems += list(_pod_rules(f"{name}.{path}", pod))
    return problems


def validate_text(text: str, source: str) -> list[str]:
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as e:
        return [f"{source}: not YAML ({str(e).splitlines()[0]})"]
    if not docs:
        return [f"{source}: no document"]
    problems = []
    for i, d in enumerate(docs):
        label = d.get("kind", "document") if isinstance(d, dict) else "document"
        name = (d.get("metadata") or {}).get("name") if isinstance(d, dict) else None
        problems += validate_doc(d, f"{source}#{i + 1} {label}" + (f" {name}" if name else ""))
    return problems


def validate_file(path: str | Path) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"manifest {p} does not exist")
    return validate_text(p.read_text(), str(p))
