import math

import pytest

from openrlhf_entropic.runtime.local.generator import compute_advantages


def test_grpo_normalizes_within_group():
    (advantages,) = compute_advantages([[1.0, 0.0, 0.0, 1.0]], "grpo")
    std = math.sqrt(sum((r - 0.5) ** 2 for r in [1, 0, 0, 1]) / 3)
    assert advantages == pytest.approx([0.5 / std, -0.5 / std, -0.5 / std, 0.5 / std], rel=1e-5)


def test_rloo_subtracts_mean_of_the_others():
    (advantages,) = compute_advantages([[1.0, 0.0, 0.0]], "rloo")
    assert advantages == pytest.approx([1.0, -0.5, -0.5])


def test_reinforce_baseline_uses_group_mean_then_batch_std():
    groups = compute_advantages([[1.0, 0.0], [2.0, 2.0, 5.0]], "reinforce_baseline")
    centered = [0.5, -0.5, -1.0, -1.0, 2.0]
    mean = sum(centered) / 5
    std = math.sqrt(sum((c - mean) ** 2 for c in centered) / 4)
    assert [a for g in groups for a in g] == pytest.approx([c / std for c in centered], rel=1e-5)


@pytest.mark.parametrize("kind", ["grpo", "reinforce_baseline", "rloo"])
def test_all_equal_rewards_and_single_samples_give_zero_not_nan(kind):
    groups = compute_advantages([[1.0, 1.0, 1.0], [0.0], []], kind)
    assert groups == [[0.0, 0.0, 0.0], [0.0], []]


def test_bad_input_is_rejected():
    with pytest.raises(ValueError, match="finite"):
        compute_advantages([[1.0, float("nan")]], "grpo")
    with pytest.raises(ValueError, match="--advantage"):
        compute_advantages([[1.0, 0.0]], "ppo")
