from .evaluator import HSRDiffEvaluator, lower_is_better, samples_to_masks
from .startup import check_run_values
from .trainer import HSRDiffTrainer, NonFiniteLossError

__all__ = ["HSRDiffEvaluator", "HSRDiffTrainer", "NonFiniteLossError", "check_run_values", "lower_is_better", "samples_to_masks"]
