"""Outcome advantages for groups of samples of one prompt: GRPO, REINFORCE++-baseline, RLOO.

A group whose rewards are all equal carries no signal about which answer is better, so it gets
zero advantage (GRPO's std would be 0 and give NaN otherwise).
"""

from __future__ import annotations

import math

ADVANTAGES = ("grpo", "reinforce_baseline", "rloo")


def compute_advantages(groups: list[list[float]], kind: str = "grpo", eps: float = 1e-6) -> list[list[float]]:
    """Advantages shaped like `groups` (list of per-prompt reward lists; groups may differ in size).

    grpo: (r - group mean) / (group std + eps). rloo: r minus the mean of the other samples.
    reinforce_baseline: r - group mean, then divided by the std of those values over the whole batch.
    Rewards must be finite (drop NaN samples before calling).
    """
    if kind not in ADVANTAGES:
        raise ValueError(f"--advantage must be one of {ADVANTAGES}, got {kind!r}")
    if any(not math.isfinite(r) for group in groups for r in group):
        raise ValueError("compute_advantages: rewards must be finite; drop NaN/inf samples first")
    result = []
    for rewards in groups:
        n = len(rewards)
        mean = sum(rewards) / n if n else 0.0
        if n < 2 or max(rewards) == min(rewards):
            result.append([0.0] * n)
        elif kind == "grpo":
            std = math.sqrt(sum((r - mean) ** 2 for r in rewards) / (n - 1))
            result.append([(r - mean) / (std + eps) for r in rewards])
        elif kind == "rloo":
            result.append([r - (mean * n - r) / (n - 1) for r in rewards])
        else:
            result.append([r - mean for r in rewards])
    if kind == "reinforce_baseline":
        flat = [a for group in result for a in group]
        if len(flat) > 1:
            batch_mean = sum(flat) / len(flat)
            std = math.sqrt(sum((a - batch_mean) ** 2 for a in flat) / (len(flat) - 1))
            result = [[a / (std + eps) for a in group] for group in result]
    return result
