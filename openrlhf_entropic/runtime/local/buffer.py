"""The versioned replay buffer, the samples it holds, and the staleness rule that governs both.

Every sample carries the policy version of the weights that generated it. The buffer hands out only
samples fresh enough to train on and counts the ones it evicts, so nothing is lost silently; its
capacity is the backpressure that keeps generators from running further ahead than `Staleness` allows.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass


@dataclass
class Sample:
    """One response to one prompt, as a generator makes it and a learner trains on it."""

    prompt_ids: list[int]
    response_ids: list[int]  # ends at the first EOS, inclusive
    behavior_log_probs: list[float]  # [len(response_ids)]: log-probs under the sampling distribution
    text: str  # prompt + response, the reward function's `query`
    prompt: str
    label: str
    group: int  # index of the prompt within its generation job
    reward: float = 0.0
    advantage: float = 0.0
    version: int = 0  # policy version of the weights that generated it
    uid: int = 0  # generation job
    staleness: int = 0  # set when the buffer hands it out: learner version - version


@dataclass(frozen=True)
class Staleness:
    """How far generation may run ahead of training, in policy versions (AReaL's staleness manager, reduced).

    A sample generated with weights of version v_g and trained at learner version v has staleness
    v - v_g; it is admitted iff v - v_g <= K (`max_staleness`). K = 0 is on-policy.

    Launch rule: a job launched now lands behind `ahead` samples (buffered or in flight), so it is
    trained at version  v_train = v + pending + ahead // batch_samples  with the generators' current
    weights v_sync; it is launched iff  v_train - v_sync <= K  and  ahead + job_samples <= capacity.
    Capacity = (K + 1) x batch_samples + job_samples: K + 1 admissible batches, plus one job of slack
    so that a batch short of samples (NaN rewards dropped) can be topped up.
    """

    max_staleness: int
    batch_samples: int
    job_samples: int
    buffer_capacity: int | None = None  # None: the formula above

    @property
    def capacity(self) -> int:
        """Samples buffered plus in flight, at most."""
        if self.buffer_capacity is not None:
            return self.buffer_capacity
        return (self.max_staleness + 1) * self.batch_samples + self.job_samples

    def admits(self, staleness: int) -> bool:
        """Whether a sample this many versions old may be trained on."""
        return staleness <= self.max_staleness

    def may_launch(self, ahead: int, version: int, pending_train: int, synced_version: int) -> bool:
        """Whether one more generation job may start now (the launch rule above)."""
        if ahead + self.job_samples > self.capacity:
            return False
        trained_at = version + pending_train + ahead // self.batch_samples
        return self.admits(trained_at - synced_version)


class ReplayBuffer:
    """FIFO of `Sample`s, oldest first; run as a Ray actor or used in-process.

    Only `version` (read) and `staleness` (set by `take`) are touched, so the trainer keeps an
    in-process copy that holds one version tag per sample and decides launches without a call.
    """

    def __init__(self, staleness: Staleness):
        if staleness.capacity < 1 or staleness.max_staleness < 0:
            raise ValueError(f"ReplayBuffer needs capacity >= 1 and max_staleness >= 0, got {staleness}")
        self.staleness = staleness
        self.samples: deque[Sample] = deque()
        self.evicted_stale = 0

    def put(self, samples: list[Sample], learner_version: int) -> int:
        """Evict what is too old to train at `learner_version`, append `samples` (oldest first); returns the
        new size. Raises if the capacity would be exceeded."""
        self.evict_stale(learner_version)  # the launch rule counted only usable samples against the capacity
        capacity = self.staleness.capacity
        if len(self.samples) + len(samples) > capacity:
            raise RuntimeError(
                f"replay buffer full: {len(self.samples)} + {len(samples)} > capacity {capacity} "
                "(the trainer must not launch generation beyond the capacity)"
            )
        self.samples.extend(samples)
        return len(self.samples)

    def evict_stale(self, learner_version: int) -> int:
        """Evict every sample too old to train at `learner_version`; returns how many usable remain."""
        fresh = deque(s for s in self.samples if self.staleness.admits(learner_version - s.version))
        self.evicted_stale += len(self.samples) - len(fresh)
        self.samples = fresh
        return len(self.samples)

    def take(self, count: int, learner_version: int) -> list[Sample]:
        """Remove and return the `count` oldest usable samples, each with its `staleness` set.

        Evicts stale ones first. Raises if fewer than `count` usable samples are held, so a caller
        never trains on a short batch by accident.
        """
        available = self.evict_stale(learner_version)
        if available < count:
            raise RuntimeError(f"replay buffer holds {available} usable samples, {count} requested")
        batch = [self.samples.popleft() for _ in range(count)]
        for sample in batch:
            sample.staleness = learner_version - sample.version
        return batch

    def take_shards(self, count: int, learner_version: int, shards: int) -> tuple:
        """`take`, split into `shards` equal lists (one per learner), after a small summary for the driver.

        Returns (summary, shard_0, ..., shard_{shards-1}); the summary holds the batch's "uid",
        "staleness" and "reward" lists. Called with num_returns = 1 + shards, each shard travels to its
        learner by reference and the samples never pass through the driver.
        """
        batch = self.take(count, learner_version)
        size = count // shards
        summary = {"uid": [s.uid for s in batch], "staleness": [s.staleness for s in batch],
                   "reward": [s.reward for s in batch]}
        return (summary, *(batch[rank * size:(rank + 1) * size] for rank in range(shards)))

    def size(self) -> int:
        """Samples held now, usable or not yet evicted."""
        return len(self.samples)

    def evicted_count(self) -> int:
        """Samples evicted as stale so far in this run (the `dropped_stale` metric)."""
        return self.evicted_stale

    def snapshot(self) -> tuple[list[Sample], int]:
        """(the samples held, oldest first; the evicted count): what a checkpoint saves."""
        return list(self.samples), self.evicted_stale

    def restore(self, samples: list[Sample], evicted: int) -> None:
        """Replace the contents with a `snapshot` (on resume)."""
        self.samples = deque(samples)
        self.evicted_stale = evicted
