"""Clipped PPO/GRPO policy loss with EntroPIC's sample weights.

Every mode reweights positive-advantage and negative-advantage tokens by alpha; with alpha > 0
positives weigh more and entropy falls, with alpha < 0 negatives weigh more and it rises.
"""

from __future__ import annotations

import torch

from .config import LOSS_MODES


def _aggregate(per_token: torch.Tensor, mask: torch.Tensor, token_level: bool) -> torch.Tensor:
    """Mean of per_token [batch, seq] over mask: over all tokens, or per sequence then over sequences."""
    if token_level:
        return (per_token * mask).sum() / mask.sum().clamp(min=1.0)
    lengths = mask.sum(dim=-1)
    per_sequence = (per_token * mask).sum(dim=-1) / lengths.clamp(min=1.0)
    # Sequences with no masked token (empty responses) do not dilute the mean.
    return per_sequence.sum() / (lengths > 0).sum().clamp(min=1)


def entropic_policy_loss(
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    alpha: float | torch.Tensor,
    mode: str = "high_prob",
    high_prob_threshold: float = 0.95,
    clip_eps_low: float = 0.2,
    clip_eps_high: float = 0.2,
    dual_clip: float | None = None,
    token_level: bool = True,
    entropy: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped PPO loss with EntroPIC coefficients. alpha = 0 is exactly the plain PPO loss.

    log_probs [batch, seq] (current policy, with grad), old_log_probs [batch, seq], advantages
    [batch, seq] or [batch], mask [batch, seq] (1 = response token), alpha in [-1, 1].
    Modes:
      high_prob:  PPO + alpha * mean over M of (-ratio * |A|), M = tokens with p > threshold,
                  ratio unclipped (the official form).
      all_tokens: each token's PPO loss times 1 + alpha (A > 0) or 1 - alpha (A < 0).
      covariance: each token's PPO loss times 1 + alpha * sign(A) * sign(log p + H_t); needs
                  `entropy` [batch, seq]. A likelier-than-typical token (log p > -H_t) with A > 0,
                  or a rarer one with A < 0, lowers entropy: those get 1 + alpha.
    Returns (loss 0-dim, metrics of 0-dim detached tensors: adjusted_fraction, pos_weight_mean,
    neg_weight_mean, clip_fraction).
    """
    if mode not in LOSS_MODES:
        raise ValueError(f"mode must be one of {LOSS_MODES}, got {mode!r}")
    alpha = float(alpha)
    if not -1.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [-1, 1] so that sample weights stay >= 0, got {alpha}")
    if mode == "covariance" and entropy is None:
        raise ValueError("mode='covariance' needs the per-position entropy tensor (entropy=...)")
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
    if advantages.dim() == log_probs.dim() - 1:
        advantages = advantages.unsqueeze(-1).expand_as(log_probs)
    mask = mask.to(torch.float32)

    with torch.no_grad():
        advantages = advantages.detach().float()
        positive = (advantages > 0).float() * mask
        negative = (advantages < 0).float() * mask
        if mode == "high_prob":
            adjusted = (log_probs.detach().exp() > high_prob_threshold).float() * mask
            weight = None
        else:
            direction = torch.sign(advantages)
            if mode == "covariance":
                direction = direction * torch.sign(log_probs.detach().float() + entropy.detach().float())
            weight = 1.0 + alpha * direction
            adjusted = (weight != 1.0).float() * mask
        # A weight w >= 0 commutes with PPO's min/clip: w * min(rA, clip(r)A) = min(r wA, clip(r) wA).
        # Folding it into the advantages keeps the autograd graph as small as plain PPO's.
        weighted_advantages = advantages if weight is None else advantages * weight

    ratio = torch.exp(log_probs - old_log_probs)
    surrogate = ratio * weighted_advantages
    clipped_surrogate = ratio.clamp(1.0 - clip_eps_low, 1.0 + clip_eps_high) * weighted_advantages
    objective = torch.min(surrogate, clipped_surrogate)
    if dual_clip is not None:
        objective = torch.where(
            weighted_advantages < 0, torch.max(objective, dual_clip * weighted_advantages), objective
        )
    loss = _aggregate(-objective, mask, token_level)
    if mode == "high_prob":
        loss = loss + alpha * _aggregate(-ratio * advantages.abs(), adjusted, token_level)

    with torch.no_grad():
        if weight is None:  # high_prob: adjusted positives weigh 1 + alpha, adjusted negatives 1 - alpha
            weight = 1.0 + alpha * torch.sign(advantages) * adjusted
        nan = torch.tensor(float("nan"))
        metrics = {
            "adjusted_fraction": adjusted.sum() / mask.sum().clamp(min=1.0),
            # NaN, not 0, when a batch has no positive (or negative) token: the mean is undefined.
            "pos_weight_mean": (weight * positive).sum() / positive.sum() if positive.any() else nan,
            "neg_weight_mean": (weight * negative).sum() / negative.sum() if negative.any() else nan,
            "clip_fraction": ((clipped_surrogate < surrogate).float() * mask).sum() / mask.sum().clamp(min=1.0),
        }
    return loss, metrics
