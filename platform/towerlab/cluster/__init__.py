"""Leaving the local machine: submitting trainings and sweeps to a running Ray cluster through Ray's Jobs API
(`jobs.py`), and rendering and checking KubeRay manifests for Kubernetes (`k8s/`). Imports only towerlab.config."""
