"""bit_core: the Big Transfer (BiT) engine — GN+WS ResNet-v2 models, official weights,
the BiT-HyperRule, data, fine-tuning, evaluation and prediction. No web, DB or queue code."""

from bit_core.hyperrule import Plan, hyperrule
from bit_core.npz import CheckpointError, load_bit_npz, save_bit_npz
from bit_core.registry import create_model, list_models

__all__ = [
    "CheckpointError",
    "Plan",
    "create_model",
    "hyperrule",
    "list_models",
    "load_bit_npz",
    "save_bit_npz",
]
