"""KubeRay manifests: rendered from recipes and sweeps (render.py), checked against the CRD schemas (validate.py)."""
