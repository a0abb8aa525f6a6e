"""The EntroPIC algorithm core: pure torch, shared by the embedded and cluster runtimes."""

from .config import EntroPICConfig, Metric, add_entropic_args
from .controller import EntroPICController, all_reduce_sum
from .entropy import entropy_from_logits, importance_weighted_entropy, masked_mean, prefix_importance_weights
from .loss import entropic_policy_loss
from .step import EntroPICStep

__all__ = [
    "EntroPICConfig",
    "EntroPICController",
    "EntroPICStep",
    "Metric",
    "add_entropic_args",
    "all_reduce_sum",
    "entropic_policy_loss",
    "entropy_from_logits",
    "importance_weighted_entropy",
    "masked_mean",
    "prefix_importance_weights",
]
