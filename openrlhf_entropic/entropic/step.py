"""The EntroPIC step: measure the current policy's entropy, update the PI controller, hand out alpha.

Both runtimes hold one `EntroPICStep` per trainer rank and call `update` once per optimizer step;
neither builds a controller or picks an estimator itself. Its `state_dict` is what checkpoints carry.
"""

from __future__ import annotations

import math

import torch

from .config import EntroPICConfig, Metric
from .controller import EntroPICController, ReduceFn, all_reduce_sum
from .entropy import importance_weighted_entropy, masked_mean


class EntroPICStep:
    """The controller plus the entropy estimate it is fed, for one data-parallel rank.

    `update` is collective: every rank calls it once per optimizer step, and `reduce_fn` (a sum over
    the data-parallel ranks; the identity outside torch.distributed) makes alpha identical on all of
    them. With EntroPIC off the entropy is still measured and reported, and alpha stays 0.
    """

    def __init__(self, config: EntroPICConfig, reduce_fn: ReduceFn | None = all_reduce_sum) -> None:
        self.config = config
        self.reduce_fn = reduce_fn
        self.controller = EntroPICController(config, reduce_fn=reduce_fn)
        # Totals over all ranks of the last update: token-mean entropy, the estimate, ESS and tokens.
        self.entropy = self.estimate = self.ess = self.tokens = math.nan

    @property
    def alpha(self) -> float:
        """The coefficient for the loss: in [-alpha_max, alpha_max], 0 while EntroPIC is off."""
        return self.controller.alpha if self.config.enable else 0.0

    def update(
        self,
        entropy: torch.Tensor,
        log_probs: torch.Tensor,
        behavior_log_probs: torch.Tensor,
        mask: torch.Tensor,
    ) -> float:
        """Measure, update the controller, and return the new alpha.

        All inputs [batch, seq] on this rank: `entropy` H_t of the current policy at each position,
        `log_probs` of the sampled tokens under the current policy, `behavior_log_probs` under the
        policy that sampled them, `mask` 1 on response tokens. The estimate is the plain token mean
        (estimator on_policy) or the importance-weighted one, which equals it on fresh samples.
        """
        config = self.config
        with torch.no_grad():
            tokens = mask.to(torch.float32).sum()
            plain = masked_mean(entropy, mask)
            if config.estimator == "importance_weighted":
                estimate, ess = importance_weighted_entropy(
                    entropy, log_probs, behavior_log_probs, mask, log_clip=config.iw_log_clip,
                    min_ess_fraction=config.min_ess_fraction, level=config.iw_level,
                )
            else:
                estimate, ess = plain, tokens
        if config.enable:
            self.controller.update(estimate, weight=tokens)
        local = torch.stack([plain * tokens, estimate * tokens, ess, tokens]).detach().to(torch.float64).cpu()
        totals = self.reduce_fn(local) if self.reduce_fn is not None else local
        self.tokens = float(totals[3])
        divisor = self.tokens if self.tokens > 0 else math.nan
        self.entropy, self.estimate = float(totals[0]) / divisor, float(totals[1]) / divisor
        self.ess = float(totals[2])
        return self.alpha

    def metrics(self) -> dict[str, float]:
        """The last update's controller and measurement values, keyed by `Metric` names (same on every rank)."""
        controller, enabled = self.controller, self.config.enable
        return {
            Metric.ALPHA: self.alpha,
            Metric.P_TERM: controller.p_term if enabled else 0.0,
            Metric.I_TERM: controller.i_term if enabled else 0.0,
            Metric.ENTROPY_TARGET: controller.target,
            Metric.NONFINITE_SKIPPED: controller.nonfinite_skipped,
            Metric.ENTROPY: self.entropy,
            Metric.ENTROPY_IW: self.estimate,
            Metric.ESS: self.ess,
            Metric.ESS_FRACTION: self.ess / self.tokens if self.tokens > 0 else math.nan,
        }

    def state_dict(self) -> dict:
        """Plain-data state (the controller's), safe for any checkpoint format."""
        return self.controller.state_dict()

    def load_state_dict(self, state: dict) -> None:
        """Restore what `state_dict` returned; gains and target come from the config."""
        self.controller.load_state_dict(state)
