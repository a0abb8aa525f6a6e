"""Clipped PPO/GRPO policy loss with EntroPIC's sample weights.

Every mode reweights positive-advantage and negative-advantage tokens by alpha; with alpha > 0
positives weigh more and entropy falls, with alpha < 0 negatives weigh more and it rises.
The embedded runtime trains on `entropic_policy_loss`; the cluster runtime hands EntroPIC to
OpenRLHF's own PolicyLoss as advantages (`entropic_advantages`), so OpenRLHF's clipping, IS
correction and normalization apply to it too.
"""

from __future__ import annotations

import math

import torch

from .config import LOSS_MODES

MAX_LOG_RATIO = 20.0  # OpenRLHF's clamp of log(pi / pi_old)


class _ClippedSurrogateLoss(torch.autograd.Function):
    """-sum_t scale * mask_t * (C_t * bounded(r_t) + r_t * bonus_t), with a hand-written backward.

    bounded(r) is PPO's clip of the ratio on the side the advantage A_t picks: min(r, 1 + eps_high)
    for A > 0, max(r, 1 - eps_low) (capped at dual_clip) for A < 0. C_t = A_t gives plain PPO.
    Autograd would keep every intermediate; the gradient needs only the ratio and the unclipped set:
    d loss / d log p_t = -scale * mask_t * r_t * (C_t [t unclipped] + bonus_t).
    As in OpenRLHF, log r is clamped to [-20, 20] and a token beyond it gets no gradient, so one
    absurd ratio cannot turn the loss into inf or NaN.
    Inputs [batch, seq] except advantages and coefficients ([batch, 1] or [batch, seq]) and scale
    (0-dim or [batch]); bonus may be None (= 0).
    Returns (loss 0-dim, clipped [batch]: response tokens per row whose gradient was clipped away).
    """

    @staticmethod
    def forward(ctx, log_probs, old_log_probs, advantages, coefficients, bonus, mask, scale, clip_low, clip_high,
                dual_clip):
        log_ratio = log_probs.detach().float() - old_log_probs.float()
        saturated = log_ratio.abs() > MAX_LOG_RATIO
        ratio = log_ratio.clamp_(-MAX_LOG_RATIO, MAX_LOG_RATIO).exp_()
        upper = ratio.clamp(max=1.0 + clip_high)
        lower = ratio.clamp(min=1.0 - clip_low) if dual_clip is None else ratio.clamp(1.0 - clip_low, dual_clip)
        bounded = torch.where(advantages > 0, upper, lower)
        clipped = (bounded != ratio) & (advantages != 0)  # an A = 0 token has no gradient to clip
        clipped_per_row = torch.linalg.vecdot(clipped.to(mask.dtype).expand_as(mask), mask)
        objective = bounded.mul_(coefficients)
        if bonus is not None:
            objective.addcmul_(ratio, bonus)
        loss = -(torch.linalg.vecdot(objective, mask) * scale).sum()
        ctx.save_for_backward(ratio, clipped, saturated, coefficients, bonus, mask, scale)
        ctx.grad_dtype = log_probs.dtype
        ctx.mark_non_differentiable(clipped_per_row)
        return loss, clipped_per_row

    @staticmethod
    def backward(ctx, grad_loss, _grad_clipped):
        ratio, clipped, saturated, coefficients, bonus, mask, scale = ctx.saved_tensors
        grad = torch.where(clipped, 0.0, coefficients)
        if bonus is not None:
            grad = grad + bonus
        row_scale = -grad_loss * scale
        grad = (grad * ratio).mul_(mask).mul_(row_scale.unsqueeze(-1) if row_scale.dim() else row_scale)
        grad.masked_fill_(saturated, 0.0)
        return grad.to(ctx.grad_dtype), *([None] * 9)


def _validate(mode: str, alpha: float, entropy: torch.Tensor | None) -> float:
    if mode not in LOSS_MODES:
        raise ValueError(f"mode must be one of {LOSS_MODES}, got {mode!r}")
    alpha = float(alpha)
    if not -1.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [-1, 1] so that sample weights stay >= 0, got {alpha}")
    if mode == "covariance" and entropy is None:
        raise ValueError("mode='covariance' needs the per-position entropy tensor (entropy=...)")
    return alpha


@torch.no_grad()
def _entropic_weights(log_probs, advantages, mask, alpha, mode, high_prob_threshold, token_level, entropy):
    """(advantages, adjustment, bonus, selector, scale): what decides EntroPIC's weights, all detached.

    advantages come back fp32, [batch, 1] for per-sequence ones (GRPO, RLOO, REINFORCE++), so the
    [batch, seq] work stays close to plain PPO's. adjustment (all_tokens, covariance) is added to
    A inside PPO's clip; bonus (high_prob) is the advantage of the unclipped term; the other is None.
    scale turns a masked sum into the loss's aggregation (token mean or mean of sequence means).
    """
    advantages = advantages.detach().float()
    if advantages.dim() == log_probs.dim() - 1:
        advantages = advantages.unsqueeze(-1)
    lengths = mask.sum(dim=-1, keepdim=True)
    if token_level:
        scale = 1.0 / lengths.sum().clamp(min=1.0)
    else:
        scale = 1.0 / (lengths[:, 0].clamp(min=1.0) * (lengths > 0).sum().clamp(min=1))

    # s: which tokens are adjusted, and in which direction.
    if mode == "all_tokens":
        selector = torch.ones_like(advantages)
    elif mode == "covariance":
        selector = torch.sign(log_probs.detach().float() + entropy.detach().float()) * mask
    else:
        selector = (log_probs.detach() > math.log(high_prob_threshold)).float() * mask

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
        return advantages, None, (alpha * rescale) * advantages.abs() * selector, selector, scale
    # w >= 0 commutes with PPO's min and clip: w * min(rA, clip(r)A) = bounded(r) * (A + alpha * s * |A|),
    # with the clip side still chosen by sign(A).
    return advantages, alpha * advantages.abs() * selector, None, selector, scale


def entropic_advantages(
    log_probs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    alpha: float | torch.Tensor,
    mode: str = "high_prob",
    high_prob_threshold: float = 0.95,
    token_level: bool = True,
    entropy: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """EntroPIC written as advantages, for a runtime whose own PPO loss does the clipping and weighting.

    Inputs as in `entropic_policy_loss` (log_probs, mask, entropy [batch, seq]; advantages [batch, seq]
    or [batch]). Returns, all detached:
      clipped_advantages [batch, seq]: the advantages to give PPO's clipped surrogate. A itself for
        high_prob; A + alpha * s_t * |A| (= w_t * A) for all_tokens and covariance, since w_t >= 0
        commutes with PPO's min, clip and dual clip.
      bonus [batch, seq] or None: high_prob only. The loss gains the unclipped term -ratio * bonus,
        aggregated like the PPO loss; this is alpha * mean over M of (-ratio * |A|).
      adjusted [batch, seq] bool: the response tokens EntroPIC reweights (A != 0 and s_t != 0).
    """
    alpha = _validate(mode, alpha, entropy)
    mask = mask.to(torch.float32)
    advantages, adjustment, bonus, selector, _ = _entropic_weights(
        log_probs, advantages, mask, alpha, mode, high_prob_threshold, token_level, entropy
    )
    with torch.no_grad():
        clipped_advantages = (advantages if adjustment is None else advantages + adjustment).expand_as(mask)
        adjusted = (advantages != 0) & (selector != 0) & (mask > 0)
    return clipped_advantages, bonus, adjusted


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
    Modes (w_t = 1 + alpha * sign(A_t) * s_t is a token's weight, s_t in {-1, 0, 1}):
      high_prob:  PPO + alpha * mean over M of (-ratio * |A|), M = tokens with p > threshold,
                  ratio unclipped (the official form).
      all_tokens: each token's PPO loss times w_t with s_t = 1.
      covariance: each token's PPO loss times w_t with s_t = sign(log p + H_t); needs `entropy`
                  [batch, seq]. A likelier-than-typical token (log p > -H_t) with A > 0, or a
                  rarer one with A < 0, lowers entropy: those get 1 + alpha.
    Aggregation: token mean over the batch (token_level) or mean over non-empty sequences of each
    sequence's token mean.
    Returns (loss 0-dim, metrics: adjusted_fraction and clip_fraction, 0-dim detached tensors).
    """
    alpha = _validate(mode, alpha, entropy)
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
    mask = mask.to(torch.float32)
    advantages, adjustment, bonus, selector, scale = _entropic_weights(
        log_probs, advantages, mask, alpha, mode, high_prob_threshold, token_level, entropy
    )
    with torch.no_grad():
        coefficients = advantages if adjustment is None else advantages + adjustment

    loss, clipped_per_row = _ClippedSurrogateLoss.apply(
        log_probs, old_log_probs, advantages, coefficients, bonus, mask, scale, clip_eps_low, clip_eps_high, dual_clip
    )
    with torch.no_grad():
        num_tokens = mask.sum().clamp(min=1.0)
        adjusted = ((advantages != 0) & (selector != 0)).float().expand_as(mask)
        metrics = {
            "adjusted_fraction": torch.linalg.vecdot(adjusted, mask).sum() / num_tokens,
            "clip_fraction": clipped_per_row.sum() / num_tokens,
        }
    return loss, metrics
