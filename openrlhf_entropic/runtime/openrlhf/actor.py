"""The EntroPIC policy actor for OpenRLHF 0.11.2: OpenRLHF's training step, plus the EntroPIC step and term.

OpenRLHF's `PolicyLoss` stays the loss (clipping, IS correction, normalization); we add the EntroPIC
term and update the controller once per optimizer step from the entropy OpenRLHF's actor forward
already computes. Imports openrlhf: only Ray workers and the CPU tests import this module.
"""

from __future__ import annotations

import ray
import torch
from openrlhf.trainer.ray.ppo_actor import ActorPPOTrainer, PolicyModelActor

from openrlhf_entropic.entropic import (
    EntroPICConfig,
    EntroPICStep,
    Metric,
    all_reduce_sum,
    entropic_policy_loss,
    masked_mean,
)

from . import ClusterConfig, swap_names

# Key of the controller state inside OpenRLHF's checkpoint `client_states`.
CONTROLLER_STATE_KEY = "entropic_controller"


class EntroPICPolicyLoss:
    """OpenRLHF's `PolicyLoss` plus EntroPIC's term; called exactly like `PolicyLoss.forward`.

    The term is `entropic_policy_loss(..., term_only=True)` on the same tensors: exactly 0 at alpha = 0, and for `high_prob` the
    official `alpha * mean_M(-ratio * |A|)`. It is a token mean over this micro-batch; OpenRLHF's base
    loss keeps its own normalization.
    """

    def __init__(self, base_loss: torch.nn.Module, config: EntroPICConfig) -> None:
        self.base_loss = base_loss
        self.config = config
        # all_reduce_sum is the identity when torch.distributed is not initialized.
        self.entropic = EntroPICStep(config, reduce_fn=all_reduce_sum)
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
        """Same inputs and outputs as `PolicyLoss.forward` ([batch, response] tensors); the loss gains the term."""
        base_loss, *rest = self.base_loss(
            log_probs,
            old_log_probs,
            advantages,
            action_mask=action_mask,
            rollout_log_probs=rollout_log_probs,
            **normalization,
        )
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

        term, loss_metrics = entropic_policy_loss(
            log_probs,
            old_log_probs,
            advantages,
            mask,
            self.entropic.alpha,
            mode=self.config.mode,
            high_prob_threshold=self.config.high_prob_threshold,
            clip_eps_low=self.base_loss.clip_eps_low,
            clip_eps_high=self.base_loss.clip_eps_high,
            dual_clip=self.base_loss.dual_clip,
            token_level=self.base_loss.token_level_loss,
            entropy=entropy,
            term_only=True,
        )
        # For OpenRLHF's status, as (value, weight): "token" = token mean over ranks, None = as is.
        self.metrics = {name: (value, None) for name, value in self.entropic.metrics().items()}
        self.metrics[Metric.ENTROPY] = (masked_mean(entropy, mask), "token")
        self.metrics[Metric.ADJUSTED_FRACTION] = (loss_metrics["adjusted_fraction"], "token")
        return (base_loss + term, *rest)


class EntroPICActorPPOTrainer(ActorPPOTrainer):
    """OpenRLHF's actor trainer with EntroPIC's loss and controller (a no-op when EntroPIC is off)."""

    def __init__(self, strategy, *args, **kwargs) -> None:
        super().__init__(strategy, *args, **kwargs)
        self.entropic_config = EntroPICConfig.from_args(self.args)
        cluster = ClusterConfig.from_args(self.args)
        self.entropic_loss: EntroPICPolicyLoss | None = None
        if not self.entropic_config.enable:
            return
        if self.args.actor.entropy_coef is None:
            raise ValueError(
                "EntroPIC needs the actor forward's entropy: set --actor.entropy_coef (0 = log only), "
                "or launch with python -m openrlhf_entropic.cli.train_ppo_ray, which does that for you."
            )
        if cluster.rollout_log_probs_for_estimate_only:
            self.actor_loss_fn.is_correction_level = "off"  # the user's setting; vLLM log-probs feed the estimate only
        self.entropic_loss = EntroPICPolicyLoss(self.actor_loss_fn, self.entropic_config)
        self.actor_loss_fn = self.entropic_loss
        self.actor.register_forward_hook(self.entropic_loss.keep_entropy)

    def training_step(self, experience, kl_ctl, step, loss_batch_info=None):
        """OpenRLHF's training step; EntroPIC's controller steps on the first micro-batch of each optimizer step."""
        if self.entropic_loss is None:
            return super().training_step(experience, kl_ctl, step, loss_batch_info)
        self.entropic_loss.update_before_next_loss = self._starts_optimizer_step(step)
        status = super().training_step(experience, kl_ctl, step, loss_batch_info)
        for name, (value, weight) in self.entropic_loss.metrics.items():
            status["metrics"][name] = value
            status["weights"][name] = weight
        return status

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
