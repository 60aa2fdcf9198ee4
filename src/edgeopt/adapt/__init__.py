"""On-device adaptation: fine-tune a deployed model on local data within a measured memory budget."""

from edgeopt.adapt.adapt import AdaptConfig, AdaptResult, adapt, is_quantized
from edgeopt.adapt.checkpoint import checkpoint_path, load_checkpoint, save_checkpoint
from edgeopt.adapt.memory import MemoryMeasurement, measure_training_memory
from edgeopt.adapt.strategies import (
    STRATEGIES,
    STRATEGY_NAMES,
    BiasLast,
    FullFinetune,
    LastLayer,
    SparseUpdate,
    get_strategy,
    mark_trainable,
)

# ``edgeopt.adapt`` is this package, so the top-level API names the function ``adapt_model``.
adapt_model = adapt

__all__ = [
    "STRATEGIES", "STRATEGY_NAMES", "AdaptConfig", "AdaptResult", "BiasLast", "FullFinetune", "LastLayer",
    "MemoryMeasurement", "SparseUpdate", "adapt", "adapt_model", "checkpoint_path", "get_strategy", "is_quantized",
    "load_checkpoint", "mark_trainable", "measure_training_memory", "save_checkpoint",
]
