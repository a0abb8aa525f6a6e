"""Cluster runtime: EntroPIC inside OpenRLHF 0.11.2's own Ray trainer, synchronous and async.

How it hooks in, without copying OpenRLHF code: OpenRLHF looks its classes up by name at the
moment it builds them (`RayActorGroup(..., PolicyModelActor)` in `cli/train_ppo_ray.train`,
`ActorPPOTrainer(...)` in `PolicyModelActor.init_model_from_pretrained`, `GenerateSamplesActor.remote(...)`
in `PPOTrainerAsync.__init__`). We subclass those classes and, in the process that builds them and
only for that call, put our subclass under OpenRLHF's name (`swap_names`). Everything else is
OpenRLHF's code running unchanged.

- `actor.py`: the EntroPIC actor (entropy measurement, controller, loss, checkpoints, metrics).
- `async_trainer.py`: weight-version tagging of rollouts, staleness metrics and dropping.

This `__init__` imports nothing from openrlhf, vllm or flash_attn, so CPU code (the CLI's --help)
can import the package; the two modules above import openrlhf and run where it is installed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

# Set by the CLI on `args.entropic` when it asked vLLM for log-probs only for the entropy estimate;
# the actor's policy loss then keeps the user's `--algo.advantage.is_correction_level off`.
ROLLOUT_LOG_PROBS_FOR_ESTIMATE_ONLY = "rollout_log_probs_for_estimate_only"


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
