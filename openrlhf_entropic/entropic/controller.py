"""The EntroPIC proportional-integral controller.

Sign convention (as in the official release): the error is `e = H - H*`, so e > 0 means the
policy has too much entropy, and a positive alpha lowers entropy (positive samples weigh more).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .config import EntroPICConfig

ReduceFn = Callable[[torch.Tensor], torch.Tensor]


def all_reduce_sum(values: torch.Tensor, group=None) -> torch.Tensor:
    """Sum `values` [n] over the ranks of `group` (None: all ranks; torch.distributed, any backend).

    Pass it as `reduce_fn` so that every rank feeds the controller the same token-weighted
    entropy and therefore holds the same integral and alpha. Where ranks besides data-parallel
    ones share a batch (tensor or sequence parallel), pass the data-parallel group, or the sums
    count that batch several times.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return values
    if dist.get_world_size(group) == 1:  # the sum is the value itself: no gloo round trip
        return values.detach().to(torch.float64).clone()
    # NCCL needs the tensor on the rank's GPU; gloo takes CPU tensors.
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else values.device
    summed = values.detach().to(device=device, dtype=torch.float64).clone()
    dist.all_reduce(summed, op=dist.ReduceOp.SUM, group=group)
    return summed.to(values.device)


class EntroPICController:
    """PI controller that maps measured entropy to the loss coefficient alpha in [-alpha_max, alpha_max].

    alpha = clip(kp * e + ki * I, -alpha_max, alpha_max), with e = H - H*(step), and the integral
    I of past errors updated after alpha is computed. Anti-windup: |ki * I| is clamped to
    alpha_max, and I does not grow while alpha is saturated in the direction e pushes it.
    A NaN/inf measurement leaves the state untouched, is counted, and keeps the last alpha.
    """

    def __init__(self, config: EntroPICConfig, reduce_fn: ReduceFn | None = None) -> None:
        """Gains, bound and target schedule from `config` (validated there); `reduce_fn` sums over ranks."""
        self.target_entropy = float(config.target_entropy)
        self.kp = float(config.kp)
        self.ki = float(config.ki)
        self.alpha_max = float(config.alpha_max)
        self.target_start = None if config.target_start is None else float(config.target_start)
        self.target_warmup_steps = int(config.target_warmup_steps)
        self.reduce_fn = reduce_fn
        self.integral = 0.0
        self.alpha = 0.0
        self.p_term = 0.0
        self.i_term = 0.0
        self.last_entropy = float("nan")
        self.steps = 0  # finite measurements integrated so far; drives the target schedule
        self.nonfinite_skipped = 0

    @property
    def target(self) -> float:
        """The target for the next update: linear from target_start to target_entropy, then constant."""
        if self.target_start is None or self.steps >= self.target_warmup_steps:
            return self.target_entropy
        fraction = self.steps / self.target_warmup_steps
        return self.target_start + fraction * (self.target_entropy - self.target_start)

    def update(self, entropy: float | torch.Tensor, weight: float | torch.Tensor = 1.0) -> float:
        """Take one entropy measurement (nats; `weight` = its token count) and return the new alpha.

        With a `reduce_fn`, the measurement is first averaged over ranks, weighted by `weight`.
        """
        entropy_value = float(entropy.detach().double()) if isinstance(entropy, torch.Tensor) else float(entropy)
        weight_value = float(weight.detach().double()) if isinstance(weight, torch.Tensor) else float(weight)
        if self.reduce_fn is not None:
            # A NaN on any rank makes the sum NaN everywhere, so all ranks skip together.
            summed = self.reduce_fn(torch.tensor([entropy_value * weight_value, weight_value], dtype=torch.float64))
            entropy_value = float(summed[0] / summed[1]) if float(summed[1]) > 0 else float("nan")
        if not math.isfinite(entropy_value):
            self.nonfinite_skipped += 1
            return self.alpha

        target = self.target
        error = entropy_value - target
        p_term = self.kp * error
        i_term = self.ki * self.integral
        unclipped = p_term + i_term
        alpha = min(max(unclipped, -self.alpha_max), self.alpha_max)

        # Conditional integration: while alpha is pinned at a bound, errors that push further
        # into that bound are not accumulated (they would only have to be unwound later).
        saturated_same_way = abs(unclipped) >= self.alpha_max and error * unclipped > 0
        if not saturated_same_way:
            self.integral += error
        if self.ki > 0:
            limit = self.alpha_max / self.ki
            self.integral = min(max(self.integral, -limit), limit)

        self.alpha, self.p_term, self.i_term = alpha, p_term, i_term
        self.last_entropy = entropy_value
        self.steps += 1
        return alpha

    def state_dict(self) -> dict:
        """Plain-data state (floats and ints only), safe for any checkpoint format."""
        return {
            "integral": self.integral,
            "alpha": self.alpha,
            "p_term": self.p_term,
            "i_term": self.i_term,
            "last_entropy": self.last_entropy,
            "steps": self.steps,
            "nonfinite_skipped": self.nonfinite_skipped,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore what `state_dict` returned; gains and target come from the constructor."""
        self.integral = float(state["integral"])
        self.alpha = float(state["alpha"])
        self.p_term = float(state["p_term"])
        self.i_term = float(state["i_term"])
        self.last_entropy = float(state["last_entropy"])
        self.steps = int(state["steps"])
        self.nonfinite_skipped = int(state["nonfinite_skipped"])
