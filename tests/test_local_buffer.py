import pytest

from openrlhf_entropic.runtime.local.buffer import ReplayBuffer


def samples(version, count, start=0):
    return [{"version": version, "id": start + i} for i in range(count)]


def test_take_is_fifo_and_tags_staleness():
    buffer = ReplayBuffer(capacity=10, max_staleness=2)
    buffer.put(samples(3, 2) + samples(4, 2, start=2))
    batch = buffer.take(3, learner_version=5)
    assert [s["id"] for s in batch] == [0, 1, 2]
    assert [s["staleness"] for s in batch] == [2, 2, 1]
    assert buffer.size() == 1


def test_samples_older_than_k_are_dropped_and_counted():
    buffer = ReplayBuffer(capacity=10, max_staleness=1)
    buffer.put(samples(0, 3) + samples(2, 2, start=3))
    batch = buffer.take(2, learner_version=3)
    assert [s["id"] for s in batch] == [3, 4]  # version 0 is 3 versions old at 3: dropped
    assert buffer.stats() == {"size": 0, "capacity": 10, "dropped_stale": 3}


def test_on_policy_rule_keeps_only_current_version():
    buffer = ReplayBuffer(capacity=10, max_staleness=0)
    buffer.put(samples(4, 2) + samples(5, 2, start=2))
    assert buffer.drop_stale(5) == 2
    assert buffer.stats()["dropped_stale"] == 2
    assert all(s["staleness"] == 0 for s in buffer.take(2, 5))


def test_capacity_is_a_hard_bound_and_short_batches_are_refused():
    buffer = ReplayBuffer(capacity=4, max_staleness=0)
    buffer.put(samples(0, 3))
    with pytest.raises(RuntimeError, match="capacity"):
        buffer.put(samples(0, 2))
    with pytest.raises(RuntimeError, match="3 usable"):
        buffer.take(4, learner_version=0)
    with pytest.raises(ValueError):
        ReplayBuffer(capacity=0, max_staleness=0)
