"""The EntroPIC policy actor for OpenRLHF 0.11.2: OpenRLHF's training step, plus the EntroPIC step and term.

EntroPIC is handed to OpenRLHF's own `PolicyLoss` as advantages (`entropic_advantages`), so its IS
correction, GSPO ratio, log-ratio clamp, dual clip and loss normalization (dynamic batching too)
apply to the EntroPIC part exactly as to the base loss. Imports openrlhf: only Ray workers and the
CPU tests import this module.
"""

from __future__ import annotations

import contextlib
import functools
import math

import ray
import torch
from openrlhf.models import Actor, PolicyLoss
from openrlhf.trainer.ray.ppo_actor import ActorPPOTrainer, PolicyModelActor

from openrlhf_entropic.entropic import (
    EntroPICConfig,
    EntroPICStep,
    Metric,
    all_reduce_sum,
    entropy_from_logits,
    masked_mean,
)
from openrlhf_entropic.entropic.loss import entropic_advantages

from . import ClusterConfig, swap_names

# Key of the controller state inside OpenRLHF's checkpoint `client_states`.
CONTROLLER_STATE_KEY = "entropic_controller"


def dp_group(strategy):
    """The data-parallel process group of OpenRLHF's (dp, sp, tp) device mesh; None (all ranks) without one.

    Ring-attention and tensor-parallel ranks of one data-parallel rank hold the same micro-batch, so
    the controller sums over this group only, or its token and ESS totals are inflated.
    """
    mesh = getattr(strategy, "ds_device_mesh", None)  # set by strategy.setup_distributed
    return mesh["dp"].get_group() if mesh is not None else None


class EntroPICPolicyLoss:
    """OpenRLHF's `PolicyLoss` with EntroPIC's weights; called exactly like `PolicyLoss.forward`.

    all_tokens / covariance: the base loss on the reweighted advantages w_t * A. high_prob: the base
    loss plus `term_loss` (a `PolicyLoss` with the same settings and no clipping) on the bonus
    advantages, which is the official alpha * mean_M(-ratio * |A|). At alpha = 0 it is the base loss.
    """

    def __init__(self, base_loss: PolicyLoss, config: EntroPICConfig, reduce_fn=None) -> None:
        self.base_loss = base_loss
        self.config = config
        self.entropic = EntroPICStep(config, reduce_fn=reduce_fn or all_reduce_sum)
        # The official high_prob term uses the unclipped ratio: infinite eps, no dual clip.
        self.term_loss = PolicyLoss(
            clip_eps_low=math.inf,
            clip_eps_high=math.inf,
            dual_clip=None,
            token_level_loss=base_loss.token_level_loss,
            policy_loss_type=base_loss.policy_loss_type,
            is_correction_level=base_loss.is_correction_level,
            is_correction_mode=base_loss.is_correction_mode,
            is_correction_gating=base_loss.is_correction_gating,
            is_correction_threshold=base_loss.is_correction_threshold,
        )
        self.update_before_next_loss = False  # set by the trainer on the first micro-batch of a step
        self.forward_entropy: torch.Tensor | None = None  # [batch, seq - 1] from the last training forward
        self.metrics: dict[str, tuple[float | torch.Tensor, str | None]] = {}

    def keep_entropy(self, module, inputs, result) -> None:
        """Forward hook on OpenRLHF's `Actor`: keep `output.entropy` of a `return_output=True` forward."""
        if isinstance(result, tuple) and getattr(result[1], "entropy", None) is not None:
            self.forward_entropy = result[1].entropy.detach()

    def __call__(
        self,
        log_probs: torch.Tensor,
        old_log_probs: torch.Tensor,
        advantages: torch.Tensor,
        action_mask: torch.Tensor | None = None,
        rollout_log_probs: torch.Tensor | None = None,
        **normalization,
    ):
        """Same inputs and outputs as `PolicyLoss.forward` ([batch, response] tensors); the loss gains EntroPIC."""
        if self.forward_entropy is None:
            raise RuntimeError(
                "EntroPIC got no entropy from the actor forward. The actor must run with return_entropy "
                "(--actor.entropy_coef set; openrlhf_entropic.cli.train_ppo_ray sets it to 0 when unset)."
            )
        entropy = self.forward_entropy[:, -action_mask.shape[1] :]
        self.forward_entropy = None  # consumed: a later loss call must never reuse it
        mask = action_mask.to(torch.float32)
        if self.update_before_next_loss:
            # Behavior policy: vLLM's sampling log-probs when present, else the make-experience ones
            # (the same weights that generated the samples when training is synchronous).
            behavior_log_probs = rollout_log_probs if rollout_log_probs is not None else old_log_probs
            self.entropic.update(entropy, log_probs, behavior_log_probs, mask)
            self.update_before_next_loss = False

        alpha = self.entropic.alpha
        clipped_advantages, bonus, adjusted = entropic_advantages(
            log_probs,
            advantages,
            mask,
            alpha,
            mode=self.config.mode,
            high_prob_threshold=self.config.high_prob_threshold,
            token_level=self.base_loss.token_level_loss,
            entropy=entropy,
        )
        if alpha == 0.0:
            clipped_advantages, bonus = advantages, None  # exactly OpenRLHF's loss
        inputs = dict(action_mask=action_mask, rollout_log_probs=rollout_log_probs, **normalization)
        loss, *rest = self.base_loss(log_probs, old_log_probs, clipped_advantages, **inputs)
        if bonus is not None:
            loss = loss + self.term_loss(log_probs, old_log_probs, bonus, **inputs)[0]
        # For OpenRLHF's status, as (value, weight): "token" = token mean over ranks, None = as is.
        self.metrics = {name: (value, None) for name, value in self.entropic.metrics().items()}
        self.metrics[Metric.ENTROPY] = (masked_mean(entropy, mask), "token")
        self.metrics[Metric.ADJUSTED_FRACTION] = (masked_mean(adjusted, mask), "token")
        return (loss, *rest)


@contextlib.contextmanager
def loss_level_view(args, cluster: ClusterConfig):
    """While open, `args` shows the user's own IS-correction level when the launcher changed it.

    The launcher sets `is_correction_level token` only so that vLLM returns sampling log-probs for the
    estimate. `PolicyLoss.__init__` validates gating and mode against the level, so it must be built
    from the user's `off`, or a valid `off` setting (e.g. gating binary_kl) fails at start-up.
    """
    advantage = args.algo.advantage
    launcher_level = advantage.is_correction_level
    if cluster.rollout_log_probs_for_estimate_only:
        advantage.is_correction_level = "off"
    try:
        yield
    finally:
        advantage.is_correction_level = launcher_level


class EntroPICActorPPOTrainer(ActorPPOTrainer):
    """OpenRLHF's actor trainer with EntroPIC's loss and controller (a no-op when EntroPIC is off)."""

    def __init__(self, strategy, *args, **kwargs) -> None:
        cluster = ClusterConfig.from_args(strategy.args)
        with loss_level_view(strategy.args, cluster):
            super().__init__(strategy, *args, **kwargs)
        self.entropic_config = EntroPICConfig.from_args(self.args)
        self.entropy_chunk_size = cluster.entropy_chunk_size
        self.entropic_loss: EntroPICPolicyLoss | None = None
        if not self.entropic_config.enable:
            return
        if self.args.actor.entropy_coef is None:
            raise ValueError(
                "EntroPIC needs the actor forward's entropy: set --actor.entropy_coef (0 = log only), "
                "or launch with python -m openrlhf_entropic.cli.train_ppo_ray, which does that for you."
            )
        reduce_fn = functools.partial(all_reduce_sum, group=dp_group(strategy))
        self.entropic_loss = EntroPICPolicyLoss(self.actor_loss_fn, self.entropic_config, reduce_fn)
        self.actor_loss_fn = self.entropic_loss
        self.actor.register_forward_hook(self.entropic_loss.keep_entropy)

    def training_step(self, experience, kl_ctl, step, loss_batch_info=None):
        """OpenRLHF's training step; EntroPIC's controller steps on the first micro-batch of each optimizer step."""
        if self.entropic_loss is None:
            return super().training_step(experience, kl_ctl, step, loss_batch_info)
        self.entropic_loss.update_before_next_loss = self._starts_optimizer_step(step)
        with self._entropy_for_measurement_only():
            status = super().training_step(experience, kl_ctl, step, loss_batch_info)
        for name, (value, weight) in self.entropic_loss.metrics.items():
            status["metrics"][name] = value
            status["weights"][name] = weight
        return status

    def _entropy_for_measurement_only(self):
        """With entropy_coef 0 (log only) the entropy takes no gradient: compute it in chunks without autograd.

        OpenRLHF's `compute_entropy` builds an autograd graph over fp32 [batch, seq, vocab] softmax
        copies, held until the step ends, though the loss never uses it. Its name is swapped in the
        actor module for the step, so packing and ring-attention gathering stay OpenRLHF's.
        A nonzero entropy_coef (a real entropy bonus) keeps OpenRLHF's differentiable one.
        """
        if self.args.actor.entropy_coef != 0:
            return contextlib.nullcontext()
        chunk_size = self.entropy_chunk_size

        def measured_entropy(logits: torch.Tensor) -> torch.Tensor:  # [batch, seq, vocab] -> [batch, seq]
            return entropy_from_logits(logits.detach(), chunk_size=chunk_size)

        return swap_names(Actor.forward.__globals__, compute_entropy=measured_entropy)

    def _starts_optimizer_step(self, step: int) -> bool:
        """Whether micro-batch `step` (counted from 0 in each epoch of ppo_train) opens an optimizer step."""
        if self.args.train.dynamic_batch_enable:
            return step == 0 or bool(self.replay_buffer.dynamic_optimizer_step[step - 1])
        return step % max(int(self.strategy.accumulated_gradient), 1) == 0


def save_controller_state(client_states: dict | None, entropic_loss: EntroPICPolicyLoss | None) -> dict:
    """Checkpoint `client_states` with the controller state added (a copy; plain floats and ints)."""
    client_states = dict(client_states or {})
    if entropic_loss is not None:
        client_states[CONTROLLER_STATE_KEY] = entropic_loss.entropic.state_dict()
    return client_states


def restore_controller_state(entropic_loss: EntroPICPolicyLoss | None, checkpoint_states: dict) -> bool:
    """Load the controller state from a checkpoint's client states; False if there was none to load."""
    state = (checkpoint_states or {}).get(CONTROLLER_STATE_KEY)
    if entropic_loss is None or state is None:
        return False
    entropic_loss.entropic.load_state_dict(state)
    return True


@ray.remote(num_gpus=1)
class EntroPICPolicyModelActor(PolicyModelActor.__ray_actor_class__):
    """OpenRLHF's policy actor, building our trainer and keeping the controller in its checkpoints."""

    def init_model_from_pretrained(self, strategy, pretrain, max_steps=None, vllm_engines=None):
        build = super().init_model_from_pretrained
        with swap_names(build.__func__.__globals__, ActorPPOTrainer=EntroPICActorPPOTrainer):
            build(strategy, pretrain, max_steps, vllm_engines)
        entropic_loss = self.trainer.entropic_loss
        if restore_controller_state(entropic_loss, self.checkpoint_states):
            strategy.print(
                f"EntroPIC: restored the controller from the checkpoint: {entropic_loss.entropic.state_dict()}"
            )
        elif entropic_loss is not None and self.checkpoint_states:
            strategy.print("EntroPIC: the checkpoint has no controller state; the controller starts from zero")

    def save_checkpoint(self, tag, client_states=None, metric_value=None, metric_key=None):
        client_states = save_controller_state(client_states, self.trainer.entropic_loss)
        return super().save_checkpoint(tag, client_states, metric_value, metric_key)
