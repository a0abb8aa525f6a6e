"""The EntroPIC step both runtimes call: estimator choice, controller update, metrics, state, ranks."""

import math

import pytest
import torch

from openrlhf_entropic.entropic import EntroPICConfig, EntroPICStep, Metric, importance_weighted_entropy, masked_mean


def batch(seed=0, stale=0.3):
    generator = torch.Generator().manual_seed(seed)
    entropy = torch.rand(4, 6, generator=generator)
    log_probs = -torch.rand(4, 6, generator=generator)
    behavior = log_probs + stale * torch.randn(4, 6, generator=generator)
    mask = torch.ones(4, 6)
    mask[3, 4:] = 0
    return entropy, log_probs, behavior, mask


@pytest.mark.parametrize("estimator", ["on_policy", "importance_weighted"])
def test_the_controller_sees_the_configured_estimate(estimator):
    entropy, log_probs, behavior, mask = batch()
    config = EntroPICConfig(enable=True, estimator=estimator, target_entropy=0.2, kp=1.0, ki=0.0)
    step = EntroPICStep(config, reduce_fn=None)
    alpha = step.update(entropy, log_probs, behavior, mask)
    plain = masked_mean(entropy, mask).item()
    weighted, ess = importance_weighted_entropy(entropy, log_probs, behavior, mask)
    expected = plain if estimator == "on_policy" else weighted.item()
    assert abs(weighted.item() - plain) > 1e-3  # the two really differ on this batch
    assert alpha == pytest.approx(expected - 0.2, rel=1e-6)
    metrics = step.metrics()
    assert metrics[Metric.ENTROPY] == pytest.approx(plain, rel=1e-6)
    assert metrics[Metric.ENTROPY_IW] == pytest.approx(expected, rel=1e-6)
    assert metrics[Metric.ESS_FRACTION] == pytest.approx(1.0 if estimator == "on_policy" else ess.item() / 22, rel=1e-6)
    assert metrics[Metric.ALPHA] == alpha and metrics[Metric.P_TERM] == pytest.approx(alpha)


def test_off_it_measures_but_alpha_stays_zero():
    step = EntroPICStep(EntroPICConfig(enable=False), reduce_fn=None)
    assert step.update(*batch()) == 0.0
    assert step.controller.steps == 0 and math.isfinite(step.metrics()[Metric.ENTROPY])


def test_state_round_trip_gives_the_same_alphas():
    config = EntroPICConfig(enable=True, target_entropy=0.3, kp=2.0, ki=0.1)
    first = EntroPICStep(config, reduce_fn=None)
    for seed in range(3):
        first.update(*batch(seed))
    second = EntroPICStep(config, reduce_fn=None)
    second.load_state_dict(first.state_dict())
    assert [first.update(*batch(seed)) for seed in range(3, 6)] == [second.update(*batch(seed)) for seed in range(3, 6)]


def test_ranks_are_reduced_token_weighted():
    # A fake second rank that measured entropy 0 on 22 tokens with ESS 22: every sum doubles its tokens.
    def reduce_fn(values):
        if values.numel() == 2:  # the controller's (entropy * tokens, tokens)
            return values + torch.tensor([0.0, 22.0], dtype=torch.float64)
        return values + torch.tensor([0.0, 0.0, 22.0, 22.0], dtype=torch.float64)

    entropy, log_probs, _, mask = batch()
    step = EntroPICStep(EntroPICConfig(enable=True, target_entropy=0.1, kp=1.0, ki=0.0), reduce_fn=reduce_fn)
    alpha = step.update(entropy, log_probs, log_probs, mask)
    plain = masked_mean(entropy, mask).item()
    assert alpha == pytest.approx(plain / 2 - 0.1, rel=1e-6)
    assert step.metrics()[Metric.ENTROPY] == pytest.approx(plain / 2, rel=1e-6) and step.tokens == 44
