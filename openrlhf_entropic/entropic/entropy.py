"""Token entropy from logits, and the entropy of the current policy estimated from stale samples.

At LLM scale a [batch, seq, vocab] fp32 softmax copy is the problem (2048 x 151936 x 4 B = 1.2 GB
per copy), so entropy is computed in row chunks and, for gradients, recomputed in backward.
"""

from __future__ import annotations

import torch


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Token mean of `values` [batch, seq] over `mask` [batch, seq] (1 = response token); 0-dim fp32."""
    mask = mask.to(torch.float32)
    return (values.to(torch.float32) * mask).sum() / mask.sum().clamp(min=1.0)


def _accumulate_dtype(logits: torch.Tensor) -> torch.dtype:
    """fp32 for bf16/fp16/fp32 logits, fp64 for fp64 ones."""
    return torch.promote_types(logits.dtype, torch.float32)


def _chunk_entropy(logits_chunk: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Entropy [rows] and log-probs [rows, vocab] of a chunk of logits [rows, vocab], in fp32 or wider."""
    # One owned fp32 buffer turned into log-probs in place, plus one for the probabilities:
    # two [rows, vocab] temporaries at most.
    log_probs = logits_chunk.to(_accumulate_dtype(logits_chunk), copy=True)
    if temperature != 1.0:
        log_probs.div_(temperature)
    log_probs.sub_(torch.logsumexp(log_probs, dim=-1, keepdim=True))
    entropy = -torch.linalg.vecdot(log_probs.exp(), log_probs)
    return entropy, log_probs


def _entropy_rows(logits: torch.Tensor, temperature: float, chunk_size: int) -> torch.Tensor:
    """Entropy [batch * seq] of logits [batch, seq, vocab], one chunk of rows at a time."""
    rows = logits.reshape(-1, logits.shape[-1])
    entropy = torch.empty(rows.shape[0], dtype=_accumulate_dtype(logits), device=logits.device)
    for start in range(0, rows.shape[0], chunk_size):
        entropy[start : start + chunk_size] = _chunk_entropy(rows[start : start + chunk_size], temperature)[0]
    return entropy


class _ChunkedEntropy(torch.autograd.Function):
    """Entropy whose backward recomputes softmax chunk by chunk instead of storing it."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, temperature: float, chunk_size: int) -> torch.Tensor:
        entropy = _entropy_rows(logits, temperature, chunk_size)
        ctx.save_for_backward(logits, entropy)
        ctx.temperature, ctx.chunk_size = temperature, chunk_size
        return entropy.reshape(logits.shape[:-1])

    @staticmethod
    def backward(ctx, grad_entropy: torch.Tensor):
        logits, entropy = ctx.saved_tensors
        rows = logits.reshape(-1, logits.shape[-1])
        grad_rows = grad_entropy.reshape(-1).to(entropy.dtype)
        grad_logits = torch.empty_like(rows)
        for start in range(0, rows.shape[0], ctx.chunk_size):
            end = start + ctx.chunk_size
            _, log_probs = _chunk_entropy(rows[start:end], ctx.temperature)
            # dH/dz_i = -p_i (log p_i + H) / T, built in place on two [rows, vocab] buffers.
            probs = log_probs.exp()
            log_probs.add_(entropy[start:end].unsqueeze(-1))
            coefficient = (grad_rows[start:end] / -ctx.temperature).unsqueeze(-1)
            grad_logits[start:end] = probs.mul_(log_probs).mul_(coefficient).to(rows.dtype)
        return grad_logits.reshape(logits.shape), None, None


def entropy_from_logits(logits: torch.Tensor, temperature: float = 1.0, chunk_size: int = 256) -> torch.Tensor:
    """Full-vocabulary entropy of softmax(logits / temperature) per position.

    logits: [batch, seq, vocab] (any float dtype, bf16 included). Returns [batch, seq] in fp32
    (fp64 for fp64 logits): bf16 logits are upcast chunk by chunk, never as a whole.
    Peak extra memory is O(chunk_size x vocab) in both forms: without grad the chunks are
    discarded; with grad (logits.requires_grad and grad mode on) backward recomputes them.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if logits.requires_grad and torch.is_grad_enabled():
        return _ChunkedEntropy.apply(logits, float(temperature), int(chunk_size))
    with torch.no_grad():
        return _entropy_rows(logits, temperature, chunk_size).reshape(logits.shape[:-1])


def prefix_importance_weights(
    log_probs: torch.Tensor,
    behavior_log_probs: torch.Tensor,
    mask: torch.Tensor,
    log_clip: float = 2.0,
    level: str = "prefix",
) -> torch.Tensor:
    """Truncated importance weights of each response position under the current policy.

    All inputs [batch, seq]: `log_probs` of the sampled tokens under the current policy,
    `behavior_log_probs` under the policy that sampled them, `mask` 1 on response tokens.
    level="prefix": w_t = prod_{s<t} pi/mu (token t itself excluded: H_t depends only on the
    prefix). level="sequence": every position gets the whole response's ratio. The log weight
    is clamped to [-log_clip, log_clip]. Returns [batch, seq] fp32, 0 off the mask.
    """
    mask = mask.to(torch.float32)
    log_ratio = (log_probs.detach().float() - behavior_log_probs.detach().float()) * mask
    if level == "prefix":
        log_weight = torch.cumsum(log_ratio, dim=-1) - log_ratio
    elif level == "sequence":
        log_weight = log_ratio.sum(dim=-1, keepdim=True).expand_as(log_ratio)
    else:
        raise ValueError(f"level must be 'prefix' or 'sequence', got {level!r}")
    return torch.exp(log_weight.clamp(-log_clip, log_clip)) * mask


def importance_weighted_entropy(
    entropy: torch.Tensor,
    log_probs: torch.Tensor,
    behavior_log_probs: torch.Tensor,
    mask: torch.Tensor,
    log_clip: float = 2.0,
    min_ess_fraction: float = 0.5,
    level: str = "prefix",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Estimate the current policy's token-mean entropy from samples of a behavior policy.

    entropy, log_probs, behavior_log_probs, mask: [batch, seq] (entropy = H_t of the current
    policy at each sampled prefix). Self-normalized truncated weights give the estimate; its
    effective sample size ESS = (sum w)^2 / sum w^2. When ESS / tokens < min_ess_fraction the
    estimate blends linearly toward the plain token mean (fully plain at ESS = 0), which trades
    the weights' noise for the plain mean's small bias. Returns (estimate, ess), both 0-dim fp32.
    With log_probs == behavior_log_probs it is exactly the plain token mean and ESS = tokens.
    """
    weights = prefix_importance_weights(log_probs, behavior_log_probs, mask, log_clip=log_clip, level=level)
    entropy = entropy.detach().float()
    num_tokens = mask.to(torch.float32).sum()
    weight_sum = weights.sum()
    ess = weight_sum.square() / weights.square().sum().clamp(min=1e-30)
    plain = masked_mean(entropy, mask)
    weighted = (weights * entropy).sum() / weight_sum.clamp(min=1e-30)
    if min_ess_fraction <= 0:
        return weighted, ess
    trust = (ess / num_tokens.clamp(min=1.0) / min_ess_fraction).clamp(max=1.0)
    return trust * weighted + (1.0 - trust) * plain, ess
