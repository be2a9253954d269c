"""The unlearning method itself: importances, dampening, PTN search, baselines.

Pure with respect to the rest of Potion: works on any ``nn.Module`` and any iterable of
``(x, y)`` batches, and imports neither Ray, MLflow, the CLI, datasets nor models.
"""
from potion.unlearning.cache import ImportanceCache, hash_arrays
from potion.unlearning.dampening import (
    RatioQuantiles,
    alpha_from_share,
    dampen,
    importance_ratios,
    percentile_for_share,
)
from potion.unlearning.importances import ESTIMATORS, compute_importances, importance_sums
from potion.unlearning.evaluator import StepEvaluator
from potion.unlearning.methods import METHODS, HealContext, HealResult, heal
from potion.unlearning import baselines as _baselines  # noqa: F401  (registers task_vector, finetune)
from potion.unlearning import plus as _plus  # noqa: F401  (registers potion_plus)
from potion.unlearning.ptn import (
    NothingToHeal,
    PTNConfig,
    PTNNoCrossing,
    PTNResult,
    StepResult,
    ptn_search,
    share_at_step,
    smallest_crossing,
)

__all__ = [
    "ESTIMATORS", "METHODS", "HealContext", "HealResult", "ImportanceCache", "NothingToHeal", "PTNConfig",
    "PTNNoCrossing", "PTNResult", "RatioQuantiles", "StepEvaluator", "StepResult",
    "alpha_from_share", "compute_importances", "dampen", "hash_arrays", "heal",
    "importance_ratios", "importance_sums", "percentile_for_share", "ptn_search",
    "share_at_step", "smallest_crossing",
]
