"""Recipe configuration: typed schema, loading with overrides, the batch plan. Imports only towerlab.registry."""

from towerlab.config.batch import BatchPlan, resolve_batch
from towerlab.config.errors import ConfigError
from towerlab.config.load import Variant, flatten, load_structured, parse_overrides, read_yaml, to_dict, to_yaml
from towerlab.config.schema import (
    AugmentConfig,
    DataConfig,
    DEFAULT_EVALS,
    EvalConfig,
    EvaluatorConfig,
    ModelConfig,
    OptimConfig,
    Recipe,
    TextConfig,
    TrackingConfig,
    TrainConfig,
    VisionConfig,
)

__all__ = [
    "AugmentConfig", "BatchPlan", "ConfigError", "DataConfig", "DEFAULT_EVALS", "EvalConfig", "EvaluatorConfig", "ModelConfig", "OptimConfig", "Recipe",
    "TextConfig", "TrackingConfig", "TrainConfig", "Variant", "VisionConfig", "flatten", "load_structured",
    "parse_overrides", "read_yaml", "resolve_batch", "to_dict", "to_yaml",
]
