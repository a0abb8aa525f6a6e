"""The versioned replay buffer: a FIFO of samples, each tagged with the policy version that made it.

Staleness of a sample = learner version at training time - `sample["version"]`. `take` hands out
only samples with staleness <= max_staleness; older ones are dropped and counted, never silently.
The capacity bound is the backpressure: `put` refuses to grow past it, and the trainer launches
generation only while `len(buffer) + samples in flight` stays within it.
"""

from __future__ import annotations

from collections import deque


class ReplayBuffer:
    """FIFO of sample dicts (with an int "version"); run as a Ray actor or used in-process."""

    def __init__(self, capacity: int, max_staleness: int):
        if capacity < 1 or max_staleness < 0:
            raise ValueError(f"ReplayBuffer needs capacity >= 1 and max_staleness >= 0, got {capacity}, {max_staleness}")
        self.capacity = capacity
        self.max_staleness = max_staleness
        self.samples: deque[dict] = deque()
        self.dropped_stale = 0

    def put(self, samples: list[dict]) -> int:
        """Append samples (oldest first); returns the new size. Raises if the capacity would be exceeded."""
        if len(self.samples) + len(samples) > self.capacity:
            raise RuntimeError(
                f"replay buffer full: {len(self.samples)} + {len(samples)} > capacity {self.capacity} "
                "(the trainer must not launch generation beyond the capacity)"
            )
        self.samples.extend(samples)
        return len(self.samples)

    def drop_stale(self, learner_version: int) -> int:
        """Drop every sample older than max_staleness at `learner_version`; returns how many usable remain."""
        fresh = deque(s for s in self.samples if learner_version - s["version"] <= self.max_staleness)
        self.dropped_stale += len(self.samples) - len(fresh)
        self.samples = fresh
        return len(self.samples)

    def take(self, count: int, learner_version: int) -> list[dict]:
        """Remove and return the `count` oldest usable samples, each with its "staleness" set.

        Drops stale ones first. Raises if fewer than `count` usable samples are held, so a
        caller never trains on a short batch by accident.
        """
        available = self.drop_stale(learner_version)
        if available < count:
            raise RuntimeError(f"replay buffer holds {available} usable samples, {count} requested")
        batch = [self.samples.popleft() for _ in range(count)]
        for sample in batch:
            sample["staleness"] = learner_version - sample["version"]
        return batch

    def size(self) -> int:
        return len(self.samples)

    def stats(self) -> dict:
        """{"size", "capacity", "dropped_stale"} as plain ints."""
        return {"size": len(self.samples), "capacity": self.capacity, "dropped_stale": self.dropped_stale}
