"""Chunked entropy, prefix importance weights and the importance-weighted entropy estimate."""

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from openrlhf_entropic.entropic import (
    entropy_from_logits,
    importance_weighted_entropy,
    masked_mean,
    prefix_importance_weights,
)


def naive_entropy(logits, temperature=1.0):
    log_probs = torch.log_softmax(logits.double() / temperature, dim=-1)
    return -(log_probs.exp() * log_probs).sum(-1)


@settings(max_examples=40, deadline=None)
@given(
    batch=st.integers(1, 3),
    seq=st.integers(1, 9),
    vocab=st.integers(2, 40),
    chunk_size=st.integers(1, 12),
    temperature=st.floats(0.3, 2.0),
    scale=st.floats(0.1, 20.0),
    seed=st.integers(0, 2**16),
)
def test_chunked_entropy_and_its_gradient_equal_the_naive_formula(
    batch, seq, vocab, chunk_size, temperature, scale, seed
):
    generator = torch.Generator().manual_seed(seed)
    logits = (torch.randn(batch, seq, vocab, generator=generator) * scale).requires_grad_(True)
    upstream = torch.randn(batch, seq, generator=generator)

    entropy = entropy_from_logits(logits, temperature=temperature, chunk_size=chunk_size)
    expected = naive_entropy(logits, temperature)
    assert entropy.shape == (batch, seq) and entropy.dtype == torch.float32
    torch.testing.assert_close(entropy.double(), expected, rtol=1e-5, atol=1e-5)

    (grad,) = torch.autograd.grad((entropy * upstream).sum(), logits)
    (expected_grad,) = torch.autograd.grad((expected * upstream.double()).sum(), logits)
    torch.testing.assert_close(grad.double(), expected_grad.double(), rtol=1e-4, atol=1e-5)


def test_bf16_logits_accumulate_in_fp32_and_return_grad_in_bf16():
    logits = (torch.randn(2, 6, 1000) * 4).to(torch.bfloat16).requires_grad_(True)
    entropy = entropy_from_logits(logits, chunk_size=5)
    assert entropy.dtype == torch.float32
    # Exact up to fp32 rounding of the bf16 values, not bf16 rounding of the result.
    torch.testing.assert_close(entropy.double(), naive_entropy(logits.detach().float()), rtol=1e-5, atol=1e-5)
    entropy.sum().backward()
    assert logits.grad.dtype == torch.bfloat16 and torch.isfinite(logits.grad.float()).all()


def test_no_grad_form_builds_no_graph():
    logits = torch.randn(1, 4, 7, requires_grad=True)
    with torch.no_grad():
        assert entropy_from_logits(logits).grad_fn is None
    assert entropy_from_logits(logits.detach()).grad_fn is None
    assert entropy_from_logits(logits).grad_fn is not None


def test_entropy_rejects_bad_arguments():
    with pytest.raises(ValueError, match="temperature"):
        entropy_from_logits(torch.randn(1, 2, 3), temperature=0.0)
    with pytest.raises(ValueError, match="chunk_size"):
        entropy_from_logits(torch.randn(1, 2, 3), chunk_size=0)


def test_prefix_weights_exclude_the_token_itself_and_are_truncated():
    log_probs = torch.tensor([[-0.1, -0.2, -0.3, -0.4]])
    behavior = torch.tensor([[-1.1, -0.2, -5.3, -0.4]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    weights = prefix_importance_weights(log_probs, behavior, mask, log_clip=2.0)
    # Position 0 sees an empty prefix; position 1 the ratio of token 0 (e^1); position 2 adds token 1's
    # ratio (e^0); the padded position gets 0.
    torch.testing.assert_close(weights, torch.tensor([[1.0, torch.e, torch.e, 0.0]]))
    sequence = prefix_importance_weights(log_probs, behavior, mask, log_clip=2.0, level="sequence")
    torch.testing.assert_close(sequence, torch.exp(torch.tensor([[2.0, 2.0, 2.0, 0.0]])) * mask)
    with pytest.raises(ValueError, match="level"):
        prefix_importance_weights(log_probs, behavior, mask, level="token")


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    clip=st.floats(0.1, 10.0),
    ess=st.floats(0.0, 1.0),
    level=st.sampled_from(["prefix", "sequence"]),
)
def test_iw_estimate_is_exactly_the_plain_mean_on_fresh_samples(seed, clip, ess, level):
    generator = torch.Generator().manual_seed(seed)
    entropy = torch.rand(3, 7, generator=generator)
    log_probs = -torch.rand(3, 7, generator=generator) * 3
    mask = (torch.rand(3, 7, generator=generator) > 0.3).float()
    mask[0, 0] = 1.0
    estimate, effective = importance_weighted_entropy(
        entropy, log_probs, log_probs.clone(), mask, log_clip=clip, min_ess_fraction=ess, level=level
    )
    assert torch.equal(estimate, masked_mean(entropy, mask))
    assert effective.item() == pytest.approx(mask.sum().item())


def _tabular_policy(table_first, table_second):
    """A 2-token autoregressive policy over a 3-token vocabulary: p(y0), p(y1 | y0)."""
    return torch.tensor(table_first), torch.tensor(table_second)


def _entropy_of(probs):
    return -(probs * probs.log()).sum(-1)


def test_iw_estimate_recovers_exact_entropy_of_a_tabular_policy_from_another_policys_samples():
    current = _tabular_policy([0.7, 0.2, 0.1], [[0.9, 0.05, 0.05], [0.34, 0.33, 0.33], [0.5, 0.25, 0.25]])
    behavior = _tabular_policy([0.2, 0.3, 0.5], [[0.6, 0.2, 0.2], [0.2, 0.4, 0.4], [0.3, 0.4, 0.3]])
    first_pi, second_pi = current
    first_mu, second_mu = behavior

    # Exact token-mean entropy of the current policy, enumerated over every sequence.
    exact = 0.0
    for y0, y1 in itertools.product(range(3), repeat=2):
        probability = first_pi[y0] * second_pi[y0, y1]
        exact += probability * 0.5 * (_entropy_of(first_pi) + _entropy_of(second_pi[y0]))

    generator = torch.Generator().manual_seed(0)
    n = 40000
    y0 = torch.multinomial(first_mu, n, replacement=True, generator=generator)
    y1 = torch.multinomial(second_mu[y0], 1, generator=generator).squeeze(-1)
    entropy = torch.stack([_entropy_of(first_pi).expand(n), _entropy_of(second_pi[y0])], dim=-1)
    log_probs = torch.stack([first_pi[y0].log(), second_pi[y0, y1].log()], dim=-1)
    behavior_log_probs = torch.stack([first_mu[y0].log(), second_mu[y0, y1].log()], dim=-1)
    mask = torch.ones(n, 2)

    estimate, ess = importance_weighted_entropy(
        entropy, log_probs, behavior_log_probs, mask, log_clip=10.0, min_ess_fraction=0.0
    )
    plain = masked_mean(entropy, mask)
    assert abs(estimate.item() - exact.item()) < 0.01
    assert abs(plain.item() - exact.item()) > 0.1  # the unweighted mean is biased toward mu's prefixes
    assert 0 < ess.item() < 2 * n


def test_low_ess_blends_toward_the_plain_mean():
    entropy = torch.tensor([[1.0, 0.0], [1.0, 4.0]])
    log_probs = torch.tensor([[0.0, 0.0], [0.0, 0.0]])
    behavior = torch.tensor([[-3.0, 0.0], [0.0, 0.0]])  # token (0, 0) is far more likely now
    mask = torch.ones(2, 2)
    weighted, ess = importance_weighted_entropy(entropy, log_probs, behavior, mask, log_clip=5.0, min_ess_fraction=0.0)
    plain = masked_mean(entropy, mask)
    blended, _ = importance_weighted_entropy(entropy, log_probs, behavior, mask, log_clip=5.0, min_ess_fraction=1.0)
    trust = ess / 4 / 1.0
    assert ess.item() < 4
    torch.testing.assert_close(blended, trust * weighted + (1 - trust) * plain)
    assert min(weighted, plain) < blended < max(weighted, plain)
    # Above the threshold, no blending at all.
    unblended, _ = importance_weighted_entropy(
        entropy, log_probs, behavior, mask, log_clip=5.0, min_ess_fraction=ess.item() / 4 * 0.99
    )
    torch.testing.assert_close(unblended, weighted)
