"""EntroPIC policy loss: exact PPO at alpha = 0, and gradients with the stated coefficients."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from openrlhf_entropic.entropic import entropic_policy_loss, entropy_from_logits

MODES = ["high_prob", "all_tokens", "covariance"]


def plain_ppo_loss(log_probs, old_log_probs, advantages, mask, clip_eps=0.2):
    """Reference clipped PPO loss, token mean over the mask."""
    ratio = torch.exp(log_probs - old_log_probs)
    objective = torch.min(ratio * advantages, ratio.clamp(1 - clip_eps, 1 + clip_eps) * advantages)
    return (-objective * mask).sum() / mask.sum()


def random_batch(seed, batch=4, seq=6, vocab=5, peaked=False):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, seq, vocab, generator=generator) * (8.0 if peaked else 1.5)
    tokens = torch.multinomial(torch.softmax(logits, -1).reshape(-1, vocab), 1, generator=generator).reshape(batch, seq)
    log_probs = torch.log_softmax(logits, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    entropy = entropy_from_logits(logits)
    old_log_probs = log_probs + 0.3 * torch.randn(batch, seq, generator=generator)
    advantages = torch.randn(batch, generator=generator).unsqueeze(-1).expand(batch, seq).contiguous()
    mask = (torch.rand(batch, seq, generator=generator) > 0.2).float()
    mask[:, 0] = 1.0
    return log_probs, old_log_probs, advantages, mask, entropy


def plain_ppo_autograd(log_probs, old_log_probs, advantages, mask, token_level=True, dual_clip=None, clip_eps=0.2):
    """Reference clipped (and dual-clipped) PPO through autograd, token or sequence aggregation."""
    advantages = advantages.unsqueeze(-1) if advantages.dim() == 1 else advantages
    ratio = torch.exp(log_probs - old_log_probs)
    objective = torch.min(ratio * advantages, ratio.clamp(1 - clip_eps, 1 + clip_eps) * advantages)
    if dual_clip is not None:
        objective = torch.where(advantages < 0, torch.max(objective, dual_clip * advantages), objective)
    if token_level:
        return (-objective * mask).sum() / mask.sum()
    lengths = mask.sum(-1)
    return ((-objective * mask).sum(-1) / lengths.clamp(min=1)).sum() / (lengths > 0).sum()


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16))
def test_alpha_zero_is_plain_ppo_in_every_mode(seed):
    log_probs, old_log_probs, advantages, mask, entropy = random_batch(seed)
    losses = [
        entropic_policy_loss(log_probs, old_log_probs, advantages, mask, alpha=0.0, mode=mode, entropy=entropy)[0]
        for mode in MODES
    ]
    assert torch.equal(losses[0], losses[1]) and torch.equal(losses[0], losses[2])
    # Per token bit for bit; only the order of the final sum differs from the reference.
    torch.testing.assert_close(
        losses[0], plain_ppo_loss(log_probs, old_log_probs, advantages, mask), rtol=1e-6, atol=1e-7
    )


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    dual_clip=st.sampled_from([None, 3.0]),
    token_level=st.booleans(),
    per_sequence=st.booleans(),
)
def test_fused_backward_matches_autograd_of_plain_ppo_in_the_clipped_regime(seed, dual_clip, token_level, per_sequence):
    log_probs, _, advantages, mask, _ = random_batch(seed)
    generator = torch.Generator().manual_seed(seed + 1)
    old_log_probs = log_probs + 1.5 * torch.randn(log_probs.shape, generator=generator)  # many clipped ratios
    if not per_sequence:
        advantages = torch.randn(log_probs.shape, generator=generator)
        advantages[0, 0] = 0.0
    else:
        advantages = advantages[:, 0]
    mask[-1] = 0.0  # an empty response
    ours_input = log_probs.clone().requires_grad_(True)
    reference_input = log_probs.clone().requires_grad_(True)
    loss, metrics = entropic_policy_loss(
        ours_input,
        old_log_probs,
        advantages,
        mask,
        0.0,
        mode="all_tokens",
        dual_clip=dual_clip,
        token_level=token_level,
    )
    reference = plain_ppo_autograd(reference_input, old_log_probs, advantages, mask, token_level, dual_clip)
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-6)
    (ours_grad,) = torch.autograd.grad(loss, ours_input)
    (reference_grad,) = torch.autograd.grad(reference, reference_input)
    torch.testing.assert_close(ours_grad, reference_grad, rtol=1e-5, atol=1e-6)
    assert 0.0 < metrics["clip_fraction"].item() < 1.0


def gradient(mode, alpha, log_probs, advantages, mask, entropy, **kwargs):
    log_probs = log_probs.clone().requires_grad_(True)
    loss, metrics = entropic_policy_loss(
        log_probs, log_probs.detach(), advantages, mask, alpha=alpha, mode=mode, entropy=entropy, **kwargs
    )
    (grad,) = torch.autograd.grad(loss, log_probs)
    return grad, metrics


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), alpha=st.floats(-1.0, 1.0), peaked=st.booleans())
def test_gradients_carry_the_stated_coefficients(seed, alpha, peaked):
    # With old == current every ratio is 1 (no clipping): d loss / d log p_t = -A_t * w_t / N.
    log_probs, _, advantages, mask, entropy = random_batch(seed, peaked=peaked)
    n = mask.sum()
    sign = torch.sign(advantages)

    grad, _ = gradient("all_tokens", alpha, log_probs, advantages, mask, entropy)
    torch.testing.assert_close(grad, -advantages * (1 + alpha * sign) * mask / n)

    grad, _ = gradient("covariance", alpha, log_probs, advantages, mask, entropy)
    weight = 1 + alpha * sign * torch.sign(log_probs + entropy)
    torch.testing.assert_close(grad, -advantages * weight * mask / n)

    grad, metrics = gradient("high_prob", alpha, log_probs, advantages, mask, entropy, high_prob_threshold=0.6)
    high = (log_probs.exp() > 0.6).float() * mask
    expected = -advantages * mask / n - alpha * advantages.abs() * high / high.sum().clamp(min=1)
    torch.testing.assert_close(grad, expected)
    assert metrics["adjusted_fraction"].item() == pytest.approx((high.sum() / n).item())


def test_weights_do_not_revive_clipped_tokens_but_high_prob_term_uses_the_unclipped_ratio():
    log_probs = torch.tensor([[-0.01, -0.01]], requires_grad=True)
    old_log_probs = torch.tensor([[-1.0, -0.01]])  # token 0: ratio e^0.99, clipped for A > 0
    advantages = torch.tensor([1.0])
    mask = torch.ones(1, 2)
    for mode in ("all_tokens", "covariance"):
        loss, metrics = entropic_policy_loss(
            log_probs, old_log_probs, advantages, mask, 0.5, mode=mode, entropy=torch.full((1, 2), 0.1)
        )
        (grad,) = torch.autograd.grad(loss, log_probs)
        assert grad[0, 0] == 0.0 and grad[0, 1] == pytest.approx(-1.5 / 2)
        assert metrics["clip_fraction"].item() == 0.5
    loss, _ = entropic_policy_loss(log_probs, old_log_probs, advantages, mask, 0.5, mode="high_prob")
    (grad,) = torch.autograd.grad(loss, log_probs)
    ratio = torch.exp(log_probs - old_log_probs).detach()
    torch.testing.assert_close(grad, torch.tensor([[0.0, -0.5]]) - 0.5 * ratio / 2)


def test_covariance_reduces_to_all_tokens_when_tokens_are_high_probability():
    log_probs, old_log_probs, advantages, mask, entropy = random_batch(7, peaked=True)
    keep = ((log_probs + entropy) > 0).all(dim=-1)  # sequences where every token is likelier than typical
    assert keep.sum() >= 1
    args = (log_probs[keep], old_log_probs[keep], advantages[keep], mask[keep])
    covariance, _ = entropic_policy_loss(*args, 0.7, mode="covariance", entropy=entropy[keep])
    all_tokens, _ = entropic_policy_loss(*args, 0.7, mode="all_tokens")
    torch.testing.assert_close(covariance, all_tokens)


def test_adjusted_fraction_counts_reweighted_tokens():
    log_probs = torch.log(torch.tensor([[0.99, 0.5, 0.99, 0.99]]))
    advantages = torch.tensor([[1.0, 1.0, -1.0, 0.0]])
    mask = torch.ones(1, 4)
    _, metrics = entropic_policy_loss(log_probs, log_probs, advantages, mask, 0.4, mode="high_prob")
    assert metrics["adjusted_fraction"].item() == pytest.approx(0.5)  # the A = 0 token keeps weight 1
    _, metrics = entropic_policy_loss(log_probs, log_probs, advantages, mask, 0.4, mode="all_tokens")
    assert metrics["adjusted_fraction"].item() == pytest.approx(0.75)
    assert set(metrics) == {"adjusted_fraction", "clip_fraction"}


def test_dual_clip_bounds_negative_advantage_loss():
    log_probs = torch.tensor([[2.0]])
    old_log_probs = torch.tensor([[0.0]])  # ratio e^2 ~ 7.4
    advantages = torch.tensor([-1.0])
    mask = torch.ones(1, 1)
    loss, _ = entropic_policy_loss(log_probs, old_log_probs, advantages, mask, 0.0, dual_clip=3.0)
    assert loss.item() == pytest.approx(3.0)
    loss, _ = entropic_policy_loss(log_probs, old_log_probs, advantages, mask, 0.5, mode="all_tokens", dual_clip=3.0)
    assert loss.item() == pytest.approx(3.0 * 0.5)


def test_sequence_level_aggregation_ignores_empty_responses():
    log_probs = torch.zeros(3, 2, requires_grad=True)
    advantages = torch.tensor([1.0, 2.0, 5.0])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0], [0.0, 0.0]])
    loss, _ = entropic_policy_loss(log_probs, log_probs.detach(), advantages, mask, 0.0, token_level=False)
    assert loss.item() == pytest.approx(-(1.0 + 2.0) / 2)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"mode": "bogus"}, "mode"),
        ({"alpha": 1.5}, "alpha"),
        ({"mode": "covariance"}, "entropy"),
        ({"dual_clip": 0.5}, "dual_clip"),
    ],
)
def test_bad_arguments_are_rejected(kwargs, message):
    log_probs, old_log_probs, advantages, mask, _ = random_batch(0)
    call = {"alpha": 0.1, **kwargs}
    with pytest.raises(ValueError, match=message):
        entropic_policy_loss(log_probs, old_log_probs, advantages, mask, **call)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**16), alpha=st.floats(-1.0, 1.0), mode=st.sampled_from(MODES),
       token_level=st.booleans())
def test_entropic_advantages_give_the_same_loss_through_a_plain_ppo_loss(seed, alpha, mode, token_level):
    """A runtime with its own PPO loss gets EntroPIC as advantages: PPO(clipped) + unclipped bonus term."""
    from openrlhf_entropic.entropic.loss import entropic_advantages

    log_probs, old_log_probs, advantages, mask, entropy = random_batch(seed, peaked=True)
    clipped, bonus, adjusted = entropic_advantages(
        log_probs, advantages, mask, alpha, mode=mode, token_level=token_level, entropy=entropy
    )
    got = plain_ppo_autograd(log_probs, old_log_probs, clipped, mask, token_level=token_level)
    if bonus is not None:
        ratio = torch.exp(log_probs - old_log_probs)
        got = got + plain_ppo_autograd(log_probs, log_probs, ratio * bonus, mask, token_level=token_level)  # -r * bonus
    expected, metrics = entropic_policy_loss(
        log_probs, old_log_probs, advantages, mask, alpha, mode=mode, token_level=token_level, entropy=entropy
    )
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert (adjusted.float() * mask).sum() / mask.sum() == pytest.approx(metrics["adjusted_fraction"].item())


@pytest.mark.parametrize("mode", MODES)
def test_an_absurd_log_ratio_gives_a_finite_loss_and_no_gradient_for_that_token(mode):
    log_probs = torch.tensor([[-0.01, -0.5, -0.02]], requires_grad=True)
    old_log_probs = torch.tensor([[-100.01, -0.5, -0.02]])  # log ratio 100 on token 0
    for advantages in (torch.tensor([1.0]), torch.tensor([-1.0])):
        for alpha in (0.0, 0.5):
            loss, _ = entropic_policy_loss(log_probs, old_log_probs, advantages, torch.ones(1, 3), alpha, mode=mode,
                                           entropy=torch.full((1, 3), 0.3), high_prob_threshold=0.6)
            (grad,) = torch.autograd.grad(loss, log_probs)
            assert torch.isfinite(loss) and torch.isfinite(grad).all() and grad[0, 0] == 0.0
