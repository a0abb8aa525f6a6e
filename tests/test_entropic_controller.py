"""The PI controller: sign, control quality on a simulated plant, anti-windup, state, DP sync."""

import json
import math
import os
import random

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hypothesis import given, settings
from hypothesis import strategies as st

from openrlhf_entropic.entropic import EntroPICConfig, EntroPICController


def make(target_entropy, reduce_fn=None, **gains):
    """A controller from a config with these settings."""
    return EntroPICController(EntroPICConfig(target_entropy=target_entropy, **gains), reduce_fn=reduce_fn)


def run_plant(controller, steps, drift, gain=0.05, noise=0.0, start=0.8, seed=0):
    """A plant whose entropy drops by `gain * alpha` per step, plus constant drift and noise.

    Negative drift mimics GRPO's entropy collapse. Returns the measured entropies [steps].
    """
    rng = random.Random(seed)
    entropy, history = start, []
    for _ in range(steps):
        measured = entropy + rng.gauss(0.0, noise)
        alpha = controller.update(measured)
        history.append(measured)
        entropy = max(entropy - gain * alpha + drift, 1e-3)
    return history


def mean_abs_error(history, target):
    tail = history[len(history) // 2 :]
    return sum(abs(h - target) for h in tail) / len(tail)


def test_sign_convention_too_much_entropy_gives_positive_alpha():
    controller = make(target_entropy=0.5, kp=1.0, ki=0.0)
    assert controller.update(0.8) > 0  # too much entropy -> alpha > 0 lowers it
    assert controller.update(0.2) < 0
    assert controller.update(0.5) == 0.0


def test_pi_reaches_and_holds_target_against_collapse_drift_and_noise():
    target = 0.3
    controller = make(target_entropy=target, kp=1.0, ki=0.05)
    history = run_plant(controller, steps=1500, drift=-0.01, noise=0.01)
    assert mean_abs_error(history, target) < 0.02
    # Without control the same plant collapses far below the target.
    off = make(target_entropy=target, kp=0.0, ki=0.0)
    assert mean_abs_error(run_plant(off, steps=1500, drift=-0.01, noise=0.01), target) > 0.2


def test_p_only_leaves_steady_state_error_that_pi_removes():
    target, drift, gain, kp = 0.3, -0.01, 0.05, 1.0
    p_only = run_plant(make(target, kp=kp, ki=0.0), steps=2000, drift=drift, gain=gain)
    pi = run_plant(make(target, kp=kp, ki=0.05), steps=2000, drift=drift, gain=gain)
    # P-only settles where kp * e * gain cancels the drift: e = drift / (gain * kp) = -0.2.
    assert p_only[-1] - target == pytest.approx(drift / (gain * kp), abs=1e-3)
    assert abs(pi[-1] - target) < 1e-3


def test_saturation_does_not_wind_up():
    controller = make(target_entropy=0.1, kp=1.0, ki=0.1, alpha_max=1.0)
    for _ in range(1000):  # a plant stuck far above target: alpha saturates at +1
        assert controller.update(2.0) == 1.0
    assert controller.ki * controller.integral <= controller.alpha_max + 1e-12
    # Once entropy falls below target, alpha leaves saturation at once instead of after
    # unwinding 1000 steps of accumulated error.
    alphas = [controller.update(0.05) for _ in range(10)]
    assert alphas[0] < 1.0
    assert min(alphas) < 0.0


def test_integral_stays_clamped_even_without_saturation():
    controller = make(target_entropy=0.1, kp=0.0, ki=0.1, alpha_max=0.5)
    for _ in range(1000):
        controller.update(0.11)  # small error, alpha never saturates until ki*I reaches the bound
    assert controller.ki * controller.integral == pytest.approx(0.5)
    assert controller.alpha == pytest.approx(0.5)


@settings(max_examples=50, deadline=None)
@given(
    st.lists(st.one_of(st.floats(min_value=-5, max_value=5), st.sampled_from([math.nan, math.inf])), max_size=60),
    st.floats(min_value=0.05, max_value=1.0),
    st.floats(min_value=0.0, max_value=5.0),
    st.floats(min_value=0.0, max_value=1.0),
)
def test_alpha_and_integral_always_bounded(measurements, alpha_max, kp, ki):
    controller = make(target_entropy=0.5, kp=kp, ki=ki, alpha_max=alpha_max)
    for h in measurements:
        alpha = controller.update(h)
        assert -alpha_max <= alpha <= alpha_max
        if ki > 0:
            assert abs(ki * controller.integral) <= alpha_max * (1 + 1e-9)
        assert math.isfinite(controller.integral)


def test_nonfinite_measurement_is_counted_not_integrated():
    controller = make(target_entropy=0.5, kp=1.0, ki=0.1)
    controller.update(0.7)
    before = controller.state_dict()
    for bad in (float("nan"), float("inf"), torch.tensor(float("-inf"))):
        assert controller.update(bad) == before["alpha"]
    after = controller.state_dict()
    assert after["nonfinite_skipped"] == 3
    assert {k: v for k, v in after.items() if k != "nonfinite_skipped"} == {
        k: v for k, v in before.items() if k != "nonfinite_skipped"
    }


def test_state_dict_round_trip_gives_identical_futures():
    rng = random.Random(3)
    measurements = [0.5 + rng.gauss(0, 0.2) for _ in range(80)]
    original = make(0.4, kp=2.0, ki=0.05, target_start=0.8, target_warmup_steps=30)
    for h in measurements[:40]:
        original.update(h)
    state = json.loads(json.dumps(original.state_dict()))  # plain data survives any format
    restored = make(0.4, kp=2.0, ki=0.05, target_start=0.8, target_warmup_steps=30)
    restored.load_state_dict(state)
    assert [original.update(h) for h in measurements[40:]] == [restored.update(h) for h in measurements[40:]]


def test_linear_target_schedule():
    controller = make(target_entropy=0.2, target_start=1.0, target_warmup_steps=4, kp=0.0, ki=0.0)
    targets = []
    for _ in range(6):
        targets.append(controller.target)
        controller.update(0.5)
    assert targets == pytest.approx([1.0, 0.8, 0.6, 0.4, 0.2, 0.2])


@pytest.mark.parametrize(
    "kwargs",
    [
        {"target_entropy": 0.0},
        {"target_entropy": -1.0},
        {"target_entropy": 0.1, "alpha_max": 1.5},
        {"target_entropy": 0.1, "kp": -1.0},
        {"target_entropy": 0.1, "target_start": 0.0, "target_warmup_steps": 5},
    ],
)
def test_bad_settings_are_rejected(kwargs):
    with pytest.raises(ValueError, match="--entropic"):
        make(**kwargs)


def test_reduce_fn_averages_by_token_count():
    # Two fake ranks: rank A measured 1.0 over 300 tokens, rank B 0.0 over 100 tokens.
    other_rank = torch.tensor([0.0 * 100, 100.0], dtype=torch.float64)
    controller = make(0.5, kp=1.0, ki=0.0, reduce_fn=lambda values: values + other_rank)
    assert controller.update(1.0, weight=300) == pytest.approx(0.75 - 0.5)


def _two_rank_worker(rank, port, measurements, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    from openrlhf_entropic.entropic import all_reduce_sum

    controller = make(0.5, kp=1.0, ki=0.1, reduce_fn=all_reduce_sum)
    alphas = [controller.update(h, weight=w) for h, w in measurements[rank]]
    results[rank] = (alphas, controller.state_dict())
    dist.destroy_process_group()


def test_all_reduce_sum_keeps_ranks_identical_under_gloo():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    measurements = {0: [(0.9, 10), (float("nan"), 5), (0.7, 10)], 1: [(0.3, 30), (0.4, 5), (0.6, 10)]}
    results = mp.Manager().dict()
    mp.spawn(_two_rank_worker, args=(port, measurements, results), nprocs=2, join=True)
    assert results[0] == results[1]
    alphas, state = results[0]
    assert alphas[0] == pytest.approx((0.9 * 10 + 0.3 * 30) / 40 - 0.5)
    assert state["nonfinite_skipped"] == 1  # NaN on one rank: both skip together
