"""Sweeps: sweep files -> Ray Tune (one TorchTrainer per function trial), nested MLflow runs, resume."""
