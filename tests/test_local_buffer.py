"""The replay buffer and the staleness rule, without Ray."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from openrlhf_entropic.runtime.local.buffer import ReplayBuffer, Sample, Staleness


def samples(version, count, start=0):
    return [Sample(prompt_ids=[1], response_ids=[2], behavior_log_probs=[-0.1], text="", prompt="", label="",
                   group=0, version=version, uid=start + i) for i in range(count)]


def buffer_of(max_staleness, capacity=10):
    return ReplayBuffer(Staleness(max_staleness, batch_samples=2, job_samples=1, buffer_capacity=capacity))


def test_take_is_fifo_and_tags_staleness():
    buffer = buffer_of(2)
    buffer.put(samples(3, 2) + samples(4, 2, start=2), learner_version=4)
    batch = buffer.take(3, learner_version=5)
    assert [s.uid for s in batch] == [0, 1, 2]
    assert [s.staleness for s in batch] == [2, 2, 1]
    assert buffer.size() == 1


def test_samples_older_than_k_are_evicted_and_counted():
    buffer = buffer_of(1)
    buffer.put(samples(0, 3) + samples(2, 2, start=3), learner_version=1)
    batch = buffer.take(2, learner_version=3)
    assert [s.uid for s in batch] == [3, 4]  # version 0 is 3 versions old at 3: evicted
    assert buffer.size() == 0 and buffer.evicted_count() == 3


def test_on_policy_rule_keeps_only_current_version():
    buffer = buffer_of(0)
    buffer.put(samples(4, 2) + samples(5, 2, start=2), learner_version=4)
    assert buffer.evict_stale(5) == 2
    assert buffer.evicted_count() == 2
    assert all(s.staleness == 0 for s in buffer.take(2, 5))


def test_capacity_is_a_hard_bound_and_short_batches_are_refused():
    buffer = buffer_of(0, capacity=4)
    buffer.put(samples(0, 3), learner_version=0)
    with pytest.raises(RuntimeError, match="capacity"):
        buffer.put(samples(0, 2), learner_version=0)
    with pytest.raises(RuntimeError, match="3 usable"):
        buffer.take(4, learner_version=0)
    with pytest.raises(ValueError):
        buffer_of(0, capacity=0)


def test_a_put_first_evicts_what_is_too_old_to_train_so_stale_samples_never_block_fresh_ones():
    buffer = buffer_of(0, capacity=4)
    buffer.put(samples(0, 3), learner_version=0)
    assert buffer.put(samples(1, 4), learner_version=1) == 4  # version 0 is stale at 1: room for a full job
    assert buffer.evicted_count() == 3


def test_default_capacity_is_k_plus_one_batches_and_one_job():
    assert Staleness(max_staleness=4, batch_samples=128, job_samples=64).capacity == 5 * 128 + 64
    assert Staleness(max_staleness=0, batch_samples=128, job_samples=128).capacity == 256


def test_on_policy_launches_only_with_fresh_weights():
    rule = Staleness(max_staleness=0, batch_samples=4, job_samples=4)
    assert rule.may_launch(ahead=0, version=3, pending_train=0, synced_version=3)
    assert not rule.may_launch(ahead=0, version=3, pending_train=1, synced_version=3)  # lands after the next step
    assert not rule.may_launch(ahead=4, version=3, pending_train=0, synced_version=3)  # lands in the next batch
    assert not rule.may_launch(ahead=0, version=4, pending_train=0, synced_version=3)  # weights not synced yet


@given(k=st.integers(0, 6), batch=st.integers(1, 8), jobs_per_batch=st.integers(1, 4),
       pending=st.integers(0, 1), lag=st.integers(0, 3))
def test_a_launched_job_is_always_admitted_when_it_is_trained(k, batch, jobs_per_batch, pending, lag):
    # Launch greedily, as the trainer does; every launched job's samples must be admissible when trained.
    job = max(batch // jobs_per_batch, 1)
    rule = Staleness(max_staleness=k, batch_samples=max(batch, job), job_samples=job)
    version, synced = 10 + lag, 10
    ahead = 0
    while rule.may_launch(ahead, version, pending, synced):
        trained_at = version + pending + ahead // rule.batch_samples
        assert rule.admits(trained_at - synced)
        ahead += job
    assert ahead <= rule.capacity
