"""towerlab: contrastive multimodal pretraining experiments on Ray Data, Ray Train + DeepSpeed, Ray Tune and MLflow."""

__version__ = "0.1.0"
