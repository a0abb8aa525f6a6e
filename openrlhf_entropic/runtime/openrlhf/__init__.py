"""Cluster runtime: EntroPIC inside OpenRLHF 0.11.2's own Ray trainer, synchronous and async.

We subclass the OpenRLHF classes that need a change and put ours under OpenRLHF's names only while
OpenRLHF builds them (`swap_names`), so the rest is OpenRLHF's code unchanged; docs/cluster.md has
the map. This `__init__` imports nothing of openrlhf, vllm or flash_attn, so CPU code can import it.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

from openrlhf_entropic.entropic.config import dataclass_from_args


@dataclass
class ClusterConfig:
    """The cluster runtime's settings beside EntroPICConfig; the flags are spelled `--entropic.<field>`.

    The launcher puts both on `args.entropic`, which OpenRLHF hands to every Ray actor.
    """

    max_staleness: int | None = field(default=None, metadata={
        "help": "Drop samples more than this many policy versions old (async only); None keeps all.",
        "metavar": "K"})
    entropy_chunk_size: int = field(default=256, metadata={
        "help": "Token rows per chunk when computing entropy from logits."})
    # Set by the launcher, not a flag: it asked vLLM for sampling log-probs only for the entropy
    # estimate, so the actor's policy loss keeps the user's `--algo.advantage.is_correction_level off`.
    rollout_log_probs_for_estimate_only: bool = False

    def __post_init__(self) -> None:
        if self.max_staleness is not None and self.max_staleness < 0:
            raise ValueError(f"--entropic.max_staleness must be >= 0, got {self.max_staleness}")
        if self.entropy_chunk_size < 1:
            raise ValueError(f"--entropic.entropy_chunk_size must be >= 1, got {self.entropy_chunk_size}")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ClusterConfig:
        """From our parser's flat `entropic.<field>` names, or OpenRLHF's nested `args.entropic`."""
        return dataclass_from_args(cls, args, "entropic")


@contextlib.contextmanager
def swap_names(namespace: dict, **replacements) -> Iterator[None]:
    """Within the block, `namespace[name]` is `replacements[name]`; the originals come back after it.

    `namespace` is where OpenRLHF looks the name up: `vars(module)` for a `from module import name`
    that runs inside the block, or `function.__globals__` for a global name used inside `function`.
    Inside a Ray actor these differ: Ray ships an actor class by value, and its functions then carry
    their own copy of the globals they use, so only `__globals__` reaches them there.
    """
    missing = [name for name in replacements if name not in namespace]
    if missing:
        # A renamed hook point in a newer OpenRLHF must fail here, not silently run without EntroPIC.
        raise KeyError(
            f"{namespace.get('__name__', 'namespace')} has no {missing}: this runtime targets OpenRLHF 0.11.2"
        )
    originals = {name: namespace[name] for name in replacements}
    namespace.update(replacements)
    try:
        yield
    finally:
        namespace.update(originals)
