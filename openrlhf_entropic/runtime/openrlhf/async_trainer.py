"""Staleness for OpenRLHF's async trainer (`--train.async_enable`): weight versions, metrics, dropping.

OpenRLHF does not record which weights generated a sample, so we count the broadcasts that bring new
actor weights (the policy version) inside its own vLLM lock, and tag each sample with the version at
the moment vLLM generates it (not when it is handed over: surplus samples wait in a buffer). The
trainer logs staleness and drops samples older than `--entropic.max_staleness`. Imports openrlhf:
see `actor.py`.
"""

from __future__ import annotations

import ray
import torch
from openrlhf.trainer.ppo_trainer import BasePPOTrainer
from openrlhf.trainer.ppo_trainer_async import GenerateSamplesActor, PPOTrainerAsync, TrainingActor, VLLMLock
from openrlhf.trainer.ppo_utils.samples_generator import SamplesGenerator
from openrlhf.utils.logging_utils import init_logger

from openrlhf_entropic.reporting.metrics import RunMetric

from . import ClusterConfig, swap_names

logger = init_logger(__name__)

POLICY_VERSION = "policy_version"  # key in each rollout sample's `info`


def staleness_of(samples, current_version: int) -> list[int]:
    """Policy versions between each sample's generating weights and `current_version` (samples: Experience list)."""
    staleness = []
    for sample in samples:
        if POLICY_VERSION not in sample.info:
            raise KeyError(f"a rollout sample has no info[{POLICY_VERSION!r}]: it did not come from our generator")
        staleness.append(current_version - int(sample.info[POLICY_VERSION].reshape(-1)[0]))
    return staleness


def keep_fresh(samples, staleness: list[int], max_staleness: int | None):
    """(kept samples, number dropped, metrics) with samples staler than `max_staleness` removed (None keeps all)."""
    kept = [s for s, age in zip(samples, staleness, strict=True) if max_staleness is None or age <= max_staleness]
    dropped = len(samples) - len(kept)
    metrics = {
        RunMetric.STALENESS_MEAN: sum(staleness) / len(staleness) if staleness else float("nan"),
        RunMetric.STALENESS_MAX: float(max(staleness)) if staleness else float("nan"),
        RunMetric.DROPPED_STALE: float(dropped),
    }
    return kept, dropped, metrics


@ray.remote(num_cpus=0)
class VersionedVLLMLock(VLLMLock.__ray_actor_class__):
    """OpenRLHF's generation/broadcast lock, also counting weight broadcasts (the policy version)."""

    def __init__(self) -> None:
        super().__init__()
        self._version = 0

    async def bump_version(self) -> None:
        self._version += 1

    async def version(self) -> int:
        return self._version


class VersionTaggingSamplesGenerator(SamplesGenerator):
    """OpenRLHF's SamplesGenerator; every sample gets `info["policy_version"]` when vLLM generates it.

    With --rollout.vllm_generate_batch_size > --rollout.batch_size, one vLLM call makes several
    batches and the surplus waits in `_sample_buffer`: those samples keep the version they were made by.
    """

    vllm_lock = None  # the VersionedVLLMLock, set by the actor that builds this generator

    def _generate_vllm(self, *args, **kwargs):
        # Runs inside GenerateSamplesActor.fit's hold of the vLLM lock, so no broadcast lands meanwhile.
        # (With --train.partial_rollout_enable there is no lock: the version is the one generation began with.)
        version = ray.get(self.vllm_lock.version.remote())
        experiences, *rest = super()._generate_vllm(*args, **kwargs)
        for sample in experiences:
            sample.info[POLICY_VERSION] = torch.full((len(sample.prompts),), version, dtype=torch.long)
        return (experiences, *rest)


@ray.remote
class VersionTaggingGenerateSamplesActor(GenerateSamplesActor.__ray_actor_class__):
    """OpenRLHF's async generator, building the version-tagging SamplesGenerator."""

    def __init__(self, *args, vllm_lock, **kwargs) -> None:
        build = super().__init__
        with swap_names(build.__func__.__globals__, SamplesGenerator=VersionTaggingSamplesGenerator):
            build(*args, vllm_lock=vllm_lock, **kwargs)
        self.samples_generator.vllm_lock = vllm_lock


class _CountWeightBroadcasts(BasePPOTrainer):
    # Sits between TrainingActor and BasePPOTrainer in the MRO: TrainingActor.broadcast_to_vllm takes the
    # vLLM lock and then calls super(), so this bump happens inside the lock, right after the new weights land.
    # Only broadcasts after an actor update count: with --critic.freezing_steps the actor is frozen for
    # the first steps while OpenRLHF still broadcasts its unchanged weights every step.
    actor_changed = True  # the first broadcast (on resume) loads the checkpoint's weights into vLLM

    def ppo_train(self, global_steps: int) -> dict:
        status = super().ppo_train(global_steps)
        self.actor_changed |= "policy_loss" in status  # the actor's fit ran at least one training step
        return status

    def broadcast_to_vllm(self) -> None:
        super().broadcast_to_vllm()
        if self.actor_changed:
            ray.get(self.vllm_lock.bump_version.remote())
            self.actor_changed = False


@ray.remote
class StalenessAwareTrainingActor(TrainingActor.__ray_actor_class__, _CountWeightBroadcasts):
    """OpenRLHF's async training actor, with staleness metrics and `--entropic.max_staleness` dropping."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.max_staleness = ClusterConfig.from_args(self.args).max_staleness
        self.dropped_stale_total = 0
        self.trained_last_batch = True

    def train_step(self, rollout_samples, global_step: int):
        # Only this actor bumps the version, so reading it here (outside the lock) is exact.
        current_version = ray.get(self.vllm_lock.version.remote())
        staleness = staleness_of(rollout_samples, current_version)
        kept, dropped, metrics = keep_fresh(rollout_samples, staleness, self.max_staleness)
        self.dropped_stale_total += dropped
        metrics[RunMetric.DROPPED_STALE] = float(self.dropped_stale_total)
        self.trained_last_batch = bool(kept)
        if not kept:
            # No update: the weights and step count stay, and save_logs_and_checkpoints skips this batch
            # (TrainingActor.fit calls it anyway). The running drop count is logged with the next step.
            logger.warning(f"EntroPIC: dropped {dropped} samples staler than {self.max_staleness} policy versions")
            return metrics, global_step
        status, global_step = super().train_step(kept, global_step)
        status.update(metrics)
        return status, global_step

    def save_logs_and_checkpoints(self, global_step: int, logs_dict=None, client_states=None) -> None:
        # A batch dropped whole leaves global_step where it was: logging or saving it again would
        # repeat the previous step's entry and checkpoint.
        if self.trained_last_batch:
            super().save_logs_and_checkpoints(global_step, logs_dict, client_states)


@ray.remote
class EntroPICPPOTrainerAsync(PPOTrainerAsync.__ray_actor_class__):
    """OpenRLHF's async PPO trainer, built from the versioned lock, tagging generator and staleness-aware trainer."""

    def __init__(self, *args, **kwargs) -> None:
        build = super().__init__
        with swap_names(
            build.__func__.__globals__,
            VLLMLock=VersionedVLLMLock,
            GenerateSamplesActor=VersionTaggingGenerateSamplesActor,
            TrainingActor=StalenessAwareTrainingActor,
        ):
            build(*args, **kwargs)
