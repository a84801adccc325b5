from .evaluator import HSRDiffEvaluator, lower_is_better, samples_to_masks
from .trainer import HSRDiffTrainer, NonFiniteLossError

__all__ = ["HSRDiffEvaluator", "HSRDiffTrainer", "NonFiniteLossError", "lower_is_better", "samples_to_masks"]
