"""Clipped PPO/GRPO policy loss with EntroPIC's sample weights.

Every mode reweights positive-advantage and negative-advantage tokens by alpha; with alpha > 0
positives weigh more and entropy falls, with alpha < 0 negatives weigh more and it rises.
"""

from __future__ import annotations

import math

import torch

from .config import LOSS_MODES


class _ClippedSurrogateLoss(torch.autograd.Function):
    """-sum_t scale * mask_t * (min(r_t A_t, clip(r_t) A_t) + r_t * bonus_t), with a hand-written backward.

    Autograd would keep and revisit every intermediate (ratio, both surrogates, their min); the
    gradient needs only the ratio and which tokens are unclipped:
    d loss / d log p_t = -scale * mask_t * r_t * (A_t [t unclipped] + bonus_t).
    Inputs [batch, seq] except advantages ([batch, 1] or [batch, seq]) and scale (0-dim or [batch]).
    Returns (loss 0-dim, clipped [batch]: response tokens per row whose gradient was clipped away).
    """

    @staticmethod
    def forward(ctx, log_probs, old_log_probs, advantages, bonus, mask, scale, clip_low, clip_high, dual_clip):
        ratio = (log_probs.detach().float() - old_log_probs.float()).exp_()
        # min(rA, clip(r)A) = A * min(r, 1 + eps_high) if A > 0, A * max(r, 1 - eps_low) if A < 0;
        # the dual clip caps the latter at dual_clip.
        upper = ratio.clamp(max=1.0 + clip_high)
        lower = ratio.clamp(min=1.0 - clip_low) if dual_clip is None else ratio.clamp(1.0 - clip_low, dual_clip)
        bounded = torch.where(advantages > 0, upper, lower)
        clipped = bounded != ratio
        if advantages.shape[-1] != 1:
            clipped &= advantages != 0  # an A = 0 token has no gradient to clip
        clipped_per_row = torch.linalg.vecdot(clipped.to(mask.dtype), mask)
        if advantages.shape[-1] == 1:
            clipped_per_row = clipped_per_row * (advantages[:, 0] != 0)
        objective = bounded.mul_(advantages)
        if bonus is not None:
            objective.addcmul_(ratio, bonus)
        loss = -(torch.linalg.vecdot(objective, mask) * scale).sum()
        ctx.save_for_backward(ratio, clipped, advantages, bonus, mask, scale)
        ctx.grad_dtype = log_probs.dtype
        ctx.mark_non_differentiable(clipped_per_row)
        return loss, clipped_per_row

    @staticmethod
    def backward(ctx, grad_loss, _grad_clipped):
        ratio, clipped, advantages, bonus, mask, scale = ctx.saved_tensors
        coefficient = torch.where(clipped, 0.0, advantages)
        if bonus is not None:
            coefficient.add_(bonus)
        row_scale = -grad_loss * scale
        coefficient.mul_(ratio).mul_(mask).mul_(row_scale.unsqueeze(-1) if row_scale.dim() else row_scale)
        return coefficient.to(ctx.grad_dtype), None, None, None, None, None, None, None, None


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
    """Clipped PPO loss with EntroPIC coefficients. alpha = 0 is the plain PPO loss.

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
    mask = mask.to(torch.float32)

    # Everything that decides the weights is detached and, for per-sequence advantages (GRPO,
    # RLOO, REINFORCE++), kept at [batch, 1]: the [batch, seq] work stays close to plain PPO's.
    with torch.no_grad():
        advantages = advantages.detach().float()
        if advantages.dim() == log_probs.dim() - 1:
            advantages = advantages.unsqueeze(-1)
        per_sequence = advantages.shape[-1] == 1
        lengths = mask.sum(dim=-1, keepdim=True)
        tokens_per_advantage = lengths if per_sequence else mask
        # w = 1 + alpha * sign(A) * s, where s in {-1, 0, 1} says which tokens are adjusted and how.
        # A weight w >= 0 commutes with PPO's min and clip, w * min(rA, clip(r)A) = min(r wA, clip(r) wA),
        # so all_tokens and covariance are plain PPO on weighted advantages.
        if mode == "all_tokens":
            selector = None  # s = 1 on every response token
            weighted_advantages = torch.add(advantages, advantages.abs(), alpha=alpha)  # A * w
        elif mode == "covariance":
            selector = torch.sign(log_probs.detach().float() + entropy.detach().float()) * mask
            weighted_advantages = torch.addcmul(advantages, advantages.abs(), selector, value=alpha)
        else:
            selector = (log_probs.detach() > math.log(high_prob_threshold)) * mask
            weighted_advantages = advantages

        # Token mean over the batch, or mean over non-empty sequences of each sequence's token mean.
        if token_level:
            scale = 1.0 / lengths.sum().clamp(min=1.0)
        else:
            scale = 1.0 / (lengths[:, 0].clamp(min=1.0) * (lengths > 0).sum().clamp(min=1))
        bonus = None
        if mode == "high_prob":
            # alpha * mean over M of (-ratio * |A|), folded into the objective with the factor that
            # turns the mean over the mask into the mean over M (aggregated the same way).
            high_per_sequence = selector.sum(dim=-1, keepdim=True)
            if token_level:
                rescale = lengths.sum() / high_per_sequence.sum().clamp(min=1.0)
            else:
                rescale = (lengths / high_per_sequence.clamp(min=1.0)) * (
                    (lengths > 0).sum() / (high_per_sequence > 0).sum().clamp(min=1)
                )
            bonus = (alpha * rescale) * advantages.abs() * selector
    loss, clipped_per_row = _ClippedSurrogateLoss.apply(
        log_probs, old_log_probs, weighted_advantages, bonus, mask, scale, clip_eps_low, clip_eps_high, dual_clip
    )

    with torch.no_grad():
        num_tokens = lengths.sum().clamp(min=1.0)
        # Per-token quantities summed to [batch, 1] where the advantages are per sequence.
        if selector is None:
            selected = adjusted = tokens_per_advantage
        elif mode == "high_prob":  # selector is 0/1: its sum is also the adjusted count
            selected = adjusted = high_per_sequence if per_sequence else selector
        elif per_sequence:
            selected = selector.sum(dim=-1, keepdim=True)
            adjusted = torch.count_nonzero(selector, dim=-1).unsqueeze(-1)
        else:
            selected, adjusted = selector, selector != 0
        positive, negative = advantages > 0, advantages < 0
        positive_tokens = (positive * tokens_per_advantage).sum()
        negative_tokens = (negative * tokens_per_advantage).sum()
        nan = torch.tensor(float("nan"))
        metrics = {
            "adjusted_fraction": ((advantages != 0) * adjusted).sum() / num_tokens,
            # NaN, not 0, when a batch has no positive (or negative) token: the mean is undefined.
            "pos_weight_mean": 1 + alpha * (positive * selected).sum() / positive_tokens if positive_tokens else nan,
            "neg_weight_mean": 1 - alpha * (negative * selected).sum() / negative_tokens if negative_tokens else nan,
            "clip_fraction": clipped_per_row.sum() / num_tokens,
        }
    return loss, metrics
