"""Cluster runtime: EntroPIC inside OpenRLHF 0.11.2's own Ray trainer, synchronous and async.

How it hooks in, without copying OpenRLHF code: OpenRLHF looks its classes up by module
attribute at the moment it builds them (`RayActorGroup(..., PolicyModelActor)` in
`cli/train_ppo_ray.train`, `ActorPPOTrainer(...)` in `PolicyModelActor.init_model_from_pretrained`,
`GenerateSamplesActor.remote(...)` in `PPOTrainerAsync.__init__`). We subclass those classes and,
in the process that builds them and only for that call, put our subclass under OpenRLHF's name
(`swap_attributes`). Everything else is OpenRLHF's code running unchanged.

- `actor.py`: the EntroPIC actor (entropy measurement, controller, loss, checkpoints, metrics).
- `async_trainer.py`: weight-version tagging of rollouts, staleness metrics and dropping.

This `__init__` imports nothing from openrlhf, vllm or flash_attn, so CPU code (the CLI's --help)
can import the package; the two modules above import openrlhf and run where it is installed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from types import ModuleType

# Set by the CLI on `args.entropic` when it asked vLLM for log-probs only for the entropy estimate;
# the actor's policy loss then keeps the user's `--algo.advantage.is_correction_level off`.
ROLLOUT_LOG_PROBS_FOR_ESTIMATE_ONLY = "rollout_log_probs_for_estimate_only"


@contextlib.contextmanager
def swap_attributes(module: ModuleType, **replacements) -> Iterator[None]:
    """Within the block, `module.<name>` is `replacements[name]`; the originals come back after it."""
    missing = [name for name in replacements if not hasattr(module, name)]
    if missing:
        # A renamed hook point in a newer OpenRLHF must fail here, not silently run without EntroPIC.
        raise AttributeError(f"{module.__name__} has no {missing}: this runtime targets OpenRLHF 0.11.2")
    originals = {name: getattr(module, name) for name in replacements}
    for name, value in replacements.items():
        setattr(module, name, value)
    try:
        yield
    finally:
        for name, value in originals.items():
            setattr(module, name, value)
