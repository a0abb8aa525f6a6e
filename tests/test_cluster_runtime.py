"""The cluster runtime against the real OpenRLHF 0.11.2 source, on CPU.

Only vllm and flash_attn are stand-ins (tests/cluster_standins.py). OpenRLHF's `Actor`,
`PolicyLoss`, `Experience`, `DeepspeedStrategy`, `ActorPPOTrainer.__init__`/`training_step` and its
`__main__` argument handling all run for real, on a tiny random-initialized Llama in a DeepSpeed
engine on CPU (gloo, world size 1).
"""

from __future__ import annotations

import io
import math
import os
import socket
from pathlib import Path

import cluster_standins  # noqa: F401  (must precede every openrlhf import)
import pytest
import torch
from cluster_launch import OPENRLHF_ARGV
from openrlhf.models import Actor, PolicyLoss
from openrlhf.trainer.ppo_utils.experience import Experience

from openrlhf_entropic.entropic import EntroPICConfig, Metric, importance_weighted_entropy, masked_mean
from openrlhf_entropic.reporting.metrics import RunMetric
from openrlhf_entropic.runtime.openrlhf import ClusterConfig
from openrlhf_entropic.runtime.openrlhf import actor as entropic_actor
from openrlhf_entropic.runtime.openrlhf.actor import (
    CONTROLLER_STATE_KEY,
    EntroPICActorPPOTrainer,
    EntroPICPolicyLoss,
    restore_controller_state,
    save_controller_state,
)
from openrlhf_entropic.runtime.openrlhf.async_trainer import (
    POLICY_VERSION,
    StalenessAwareTrainingActor,
    VersionedVLLMLock,
    _CountWeightBroadcasts,
    keep_fresh,
    staleness_of,
)

pytest_plugins = ["cluster_launch"]  # the cli_args fixture

VOCAB = 48


def _random_batch(batch=3, response=6, seed=0):
    """log_probs (with grad), old/rollout log-probs, advantages, mask and entropy, all [batch, response]."""
    generator = torch.Generator().manual_seed(seed)
    # Some probabilities above 0.95 so high_prob mode has tokens to adjust.
    log_probs = torch.log(torch.rand(batch, response, generator=generator) * 0.99 + 0.005)
    log_probs[:, :2] = math.log(0.97)
    log_probs.requires_grad_(True)
    old = log_probs.detach() + 0.05 * torch.randn(batch, response, generator=generator)
    rollout = old + 0.3 * torch.randn(batch, response, generator=generator)
    advantages = torch.tensor([1.0, -1.0, 0.5]).unsqueeze(-1).expand(batch, response).clone()
    mask = torch.ones(batch, response, dtype=torch.bool)
    mask[2, 4:] = False
    entropy = torch.rand(batch, response + 3, generator=generator)  # [batch, seq - 1]: prompt positions first
    return log_probs, old, rollout, advantages, mask, entropy


def _entropic_loss(alpha, mode="high_prob", estimator="on_policy"):
    loss = EntroPICPolicyLoss(PolicyLoss(), EntroPICConfig(enable=True, mode=mode, estimator=estimator))
    loss.entropic.controller.alpha = alpha
    return loss


class _ActorOutput:  # what Actor(return_output=True) returns as its second element, for the hook
    def __init__(self, entropy):
        self.entropy = entropy


@pytest.mark.parametrize("mode", ["high_prob", "all_tokens", "covariance"])
def test_loss_equals_openrlhf_policy_loss_at_alpha_zero(mode):
    log_probs, old, rollout, advantages, mask, entropy = _random_batch()
    expected = PolicyLoss()(log_probs, old, advantages, action_mask=mask)
    loss_fn = _entropic_loss(0.0, mode)
    loss_fn.keep_entropy(None, None, (log_probs, _ActorOutput(entropy)))
    got = loss_fn(log_probs, old, advantages, action_mask=mask)
    assert got[0].item() == expected[0].item()
    for got_extra, expected_extra in zip(got[1:], expected[1:], strict=True):
        assert (got_extra is None and expected_extra is None) or torch.equal(got_extra, expected_extra)


def test_high_prob_adds_the_official_term():
    log_probs, old, _, advantages, mask, entropy = _random_batch()
    alpha = 0.4
    loss_fn = _entropic_loss(alpha, "high_prob")
    loss_fn.keep_entropy(None, None, (log_probs, _ActorOutput(entropy)))
    got = loss_fn(log_probs, old, advantages, action_mask=mask)[0]
    ratio = torch.exp(log_probs - old)
    high = (log_probs.exp() > 0.95) & mask
    official = alpha * (-ratio * advantages.abs())[high].mean()
    base = PolicyLoss()(log_probs, old, advantages, action_mask=mask)[0]
    assert high.sum() > 0
    assert got.item() == pytest.approx((base + official).item(), rel=1e-5)


def test_all_tokens_reweights_advantages_by_one_plus_minus_alpha():
    log_probs, old, _, advantages, mask, entropy = _random_batch()
    alpha = -0.3  # negative alpha: negatives weigh more, entropy rises
    loss_fn = _entropic_loss(alpha, "all_tokens")
    loss_fn.keep_entropy(None, None, (log_probs, _ActorOutput(entropy)))
    got = loss_fn(log_probs, old, advantages, action_mask=mask)[0]
    weighted = advantages * (1 + alpha * torch.sign(advantages))
    expected = PolicyLoss()(log_probs, old, weighted, action_mask=mask)[0]
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    got.backward()
    assert log_probs.grad is not None and torch.isfinite(log_probs.grad).all()


def test_missing_entropy_is_a_clear_error():
    log_probs, old, _, advantages, mask, _ = _random_batch()
    with pytest.raises(RuntimeError, match="entropy_coef"):
        _entropic_loss(0.1)(log_probs, old, advantages, action_mask=mask)


def test_controller_measures_importance_weighted_entropy_from_rollout_log_probs():
    log_probs, old, rollout, advantages, mask, entropy = _random_batch()
    loss_fn = _entropic_loss(0.0, estimator="importance_weighted")
    loss_fn.update_before_next_loss = True
    loss_fn.keep_entropy(None, None, (log_probs, _ActorOutput(entropy)))
    loss_fn(log_probs, old, advantages, action_mask=mask, rollout_log_probs=rollout)
    response_entropy = entropy[:, -mask.shape[1] :]
    expected, ess = importance_weighted_entropy(response_entropy, log_probs, rollout, mask.float())
    plain = masked_mean(response_entropy, mask)
    assert loss_fn.entropic.controller.steps == 1
    assert loss_fn.entropic.controller.last_entropy == pytest.approx(expected.item(), rel=1e-6)
    assert abs(expected.item() - plain.item()) > 1e-4  # the estimate really used the weights
    assert loss_fn.entropic.ess == pytest.approx(ess.item(), rel=1e-6)
    assert loss_fn.metrics[Metric.ENTROPY_IW][0] == loss_fn.entropic.controller.last_entropy
    assert loss_fn.update_before_next_loss is False


def test_without_rollout_log_probs_the_old_ones_are_the_behavior_policy():
    log_probs, old, _, advantages, mask, entropy = _random_batch()
    loss_fn = _entropic_loss(0.0, estimator="importance_weighted")
    loss_fn.update_before_next_loss = True
    loss_fn.keep_entropy(None, None, (log_probs, _ActorOutput(entropy)))
    loss_fn(log_probs, old, advantages, action_mask=mask)
    expected, _ = importance_weighted_entropy(entropy[:, -mask.shape[1] :], log_probs, old, mask.float())
    assert loss_fn.entropic.controller.last_entropy == pytest.approx(expected.item(), rel=1e-6)


def test_controller_state_survives_a_checkpoint_round_trip():
    trained = _entropic_loss(0.0)
    for entropy in (0.4, 0.3, 0.25):
        trained.entropic.controller.update(entropy, weight=10)
    client_states = save_controller_state({"global_step": 3}, trained)
    assert client_states["global_step"] == 3 and CONTROLLER_STATE_KEY in client_states
    buffer = io.BytesIO()
    torch.save(client_states, buffer)  # DeepSpeed stores client_state with torch.save
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)  # plain floats/ints only: safe to load

    resumed = _entropic_loss(0.0)
    assert restore_controller_state(resumed, loaded)
    assert resumed.entropic.controller.state_dict() == trained.entropic.controller.state_dict()
    assert resumed.entropic.controller.update(0.2, weight=10) == trained.entropic.controller.update(0.2, weight=10)
    assert not restore_controller_state(_entropic_loss(0.0), {"global_step": 3})  # plain OpenRLHF checkpoint
    assert save_controller_state({"a": 1}, None) == {"a": 1}  # EntroPIC off: nothing added


def _sample(version, n=1):
    return Experience(prompts=["p"] * n, info={POLICY_VERSION: torch.full((n,), version)})


def test_staleness_is_counted_in_weight_versions_and_stale_samples_are_dropped():
    samples = [_sample(5), _sample(5), _sample(3), _sample(7)]
    staleness = staleness_of(samples, current_version=7)
    assert staleness == [2, 2, 4, 0]
    kept, dropped, metrics = keep_fresh(samples, staleness, max_staleness=2)
    assert kept == [samples[0], samples[1], samples[3]] and dropped == 1
    assert metrics[RunMetric.STALENESS_MEAN] == 2.0 and metrics[RunMetric.STALENESS_MAX] == 4.0
    assert metrics[RunMetric.DROPPED_STALE] == 1.0
    kept, dropped, _ = keep_fresh(samples, staleness, max_staleness=None)
    assert kept == samples and dropped == 0
    with pytest.raises(KeyError, match=POLICY_VERSION):
        staleness_of([Experience(prompts=["p"], info={})], current_version=1)


def test_version_bump_runs_inside_openrlhfs_broadcast_lock():
    # TrainingActor.broadcast_to_vllm holds the vLLM lock around super().broadcast_to_vllm();
    # the bump is only inside the lock if our mixin is the next class after TrainingActor.
    from openrlhf.trainer.ppo_trainer import BasePPOTrainer
    from openrlhf.trainer.ppo_trainer_async import TrainingActor

    mro = StalenessAwareTrainingActor.__ray_actor_class__.__mro__
    assert mro.index(TrainingActor.__ray_actor_class__) + 1 == mro.index(_CountWeightBroadcasts)
    assert mro.index(_CountWeightBroadcasts) + 1 == mro.index(BasePPOTrainer)


def test_async_trainer_builds_our_actors_inside_a_real_ray_worker(cli_args, monkeypatch):
    """Ray ships actor classes by value, so a substitution must reach the copied globals (see swap_names)."""
    import ray
    from openrlhf.utils import get_strategy

    from openrlhf_entropic.runtime.openrlhf.async_trainer import EntroPICPPOTrainerAsync

    strategy = get_strategy(cli_args(["--entropic.enable"]))
    monkeypatch.undo()  # the real ray.init again
    # Workers import openrlhf too: they get the same two stand-ins before anything else runs.
    runtime_env = {
        "env_vars": {"PYTHONPATH": str(Path(__file__).parent)},
        "worker_process_setup_hook": "cluster_standins.install",
    }
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env=runtime_env)
    try:
        # OpenRLHF's own PPOTrainerAsync.__init__ runs in the worker and creates the lock and both actors
        # (which then fail to load the nonexistent model in the background; only their classes matter here).
        trainer = EntroPICPPOTrainerAsync.remote("no-such-model", strategy, None, None, None, None, None)

        def built(self):
            name = lambda handle: handle._ray_actor_creation_function_descriptor.class_name  # noqa: E731
            return name(self.generator_actor), name(self.trainer_actor)

        # (The lock is swapped in by the same call; PPOTrainerAsync keeps no handle to it to check.)
        built_classes = ray.get(trainer.__ray_call__.remote(built))
        assert built_classes == ("VersionTaggingGenerateSamplesActor", "StalenessAwareTrainingActor")

        lock = VersionedVLLMLock.remote()  # Ray accepts our subclass of OpenRLHF's asyncio lock actor
        assert ray.get(lock.version.remote()) == 0
        for _ in range(2):  # what TrainingActor.broadcast_to_vllm + _CountWeightBroadcasts do
            ray.get(lock.acquire.remote())
            ray.get(lock.bump_version.remote())
            ray.get(lock.release.remote())
        assert ray.get(lock.version.remote()) == 2

        # The training actor's drop path, on a real lock: a batch 2 versions old with max_staleness 1 is
        # dropped and counted, and the step count stays (no training, no broadcast).
        training = StalenessAwareTrainingActor.__ray_actor_class__.__new__(
            StalenessAwareTrainingActor.__ray_actor_class__
        )
        training.vllm_lock, training.max_staleness, training.dropped_stale_total = lock, 1, 0  # what __init__ sets
        status, global_step = training.train_step([_sample(0), _sample(0)], 7)
        assert global_step == 7
        assert status[RunMetric.DROPPED_STALE] == 2.0 and status[RunMetric.STALENESS_MAX] == 2.0
    finally:
        ray.shutdown()


# ----- Flag plumbing: argv -> OpenRLHF's own __main__ -> the args every Ray actor receives -----


def test_flags_reach_the_config_the_actor_builds(cli_args):
    args = cli_args(
        ["--entropic.enable", "--entropic.kp", "3", "--entropic.mode", "all_tokens", "--entropic.max_staleness", "2"],
        [*OPENRLHF_ARGV, "--actor.eps_clip_low_high", "0.2", "0.28"],
    )
    config = EntroPICConfig.from_args(args)  # exactly what EntroPICActorPPOTrainer.__init__ does
    assert config.enable and config.kp == 3.0 and config.mode == "all_tokens"
    assert ClusterConfig.from_args(args).max_staleness == 2
    assert config.ki == EntroPICConfig().ki  # untyped flags keep their defaults
    # OpenRLHF's own flags and its post-parse validation ran unchanged on the rest of argv.
    assert args.actor.eps_clip_low_high == [0.2, 0.28] and args.train.async_enable
    assert args.reward.remote_url == ["examples/python/math_reward_func.py"]
    # What EntroPIC needs was set, and recorded so the loss stays the user's.
    assert args.actor.entropy_coef == 0.0
    assert args.algo.advantage.is_correction_level == "token"
    assert ClusterConfig.from_args(args).rollout_log_probs_for_estimate_only is True


def test_plumbing_leaves_openrlhf_alone_when_entropic_is_off(cli_args):
    args = cli_args([])
    assert not EntroPICConfig.from_args(args).enable
    assert args.actor.entropy_coef is None and args.algo.advantage.is_correction_level == "off"


def test_a_users_own_is_correction_level_is_kept(cli_args):
    args = cli_args(["--entropic.enable"], [*OPENRLHF_ARGV, "--algo.advantage.is_correction_level", "seq"])
    assert args.algo.advantage.is_correction_level == "seq"
    assert not ClusterConfig.from_args(args).rollout_log_probs_for_estimate_only


def test_bad_entropic_flags_stop_before_openrlhf_runs(capsys):
    from openrlhf_entropic.cli import train_ppo_ray as cli

    with pytest.raises(SystemExit):
        cli.main(["--entropic.enable", "--entropic.alpha_max", "3", *OPENRLHF_ARGV])
    assert "--entropic.alpha_max must be in (0, 1]" in capsys.readouterr().err


def test_openrlhf_builds_our_classes_inside_the_launcher_context():
    import runpy

    from openrlhf.trainer import ppo_trainer_async
    from openrlhf.trainer.ray import ppo_actor

    from openrlhf_entropic.cli import train_ppo_ray as cli
    from openrlhf_entropic.runtime.openrlhf.async_trainer import EntroPICPPOTrainerAsync

    with cli.entropic_openrlhf(EntroPICConfig(enable=True), ClusterConfig()):
        module_globals = runpy.run_module(cli.OPENRLHF_MODULE, run_name="probe")  # not __main__: no parsing
        assert module_globals["PolicyModelActor"] is entropic_actor.EntroPICPolicyModelActor
        assert ppo_trainer_async.PPOTrainerAsync is EntroPICPPOTrainerAsync  # train() imports it by this name
    assert ppo_actor.PolicyModelActor is not entropic_actor.EntroPICPolicyModelActor  # restored afterwards


# ----- OpenRLHF's real training_step, on a DeepSpeed engine on CPU -----


@pytest.fixture(scope="module")
def gloo_world():
    """A one-rank gloo process group (what DeepSpeed's CPU accelerator uses), torn down afterwards."""
    import deepspeed
    import torch.distributed as dist

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    deepspeed.init_distributed(dist_backend="gloo")
    # OpenRLHF's compute_entropy is @torch.compile; eager mode computes the same values without a C++ build.
    previous = torch._dynamo.config.disable
    torch._dynamo.config.disable = True
    yield
    torch._dynamo.config.disable = previous
    dist.destroy_process_group()


def _allow_cuda_bookkeeping_on_cpu(monkeypatch):
    """ActorPPOTrainer.__init__ names a CUDA device for its replay buffer (unused by training_step) and ends
    with torch.cuda.synchronize(); on a CPU-only torch both raise, though there is nothing to place or sync."""
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)


def _tiny_trainer(args, monkeypatch, gradient_accumulation_steps=1):
    """OpenRLHF's strategy and our EntroPICActorPPOTrainer around a 1-layer Llama in a DeepSpeed engine."""
    from openrlhf.utils import get_strategy

    strategy = get_strategy(args)
    # What setup_distributed computes: batch / micro 1 / world 1.
    strategy.accumulated_gradient = gradient_accumulation_steps
    actor, optimizer, scheduler = _tiny_actor(args, gradient_accumulation_steps)
    _allow_cuda_bookkeeping_on_cpu(monkeypatch)
    trainer = EntroPICActorPPOTrainer(
        strategy, actor, ema_model=None, actor_optim=optimizer, actor_scheduler=scheduler, micro_train_batch_size=1
    )
    return trainer, strategy


def _tiny_actor(args, gradient_accumulation_steps):
    import deepspeed
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    model = LlamaForCausalLM(config)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    engine, optimizer, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        config={
            "train_micro_batch_size_per_gpu": 1,
            "gradient_accumulation_steps": gradient_accumulation_steps,
            "zero_optimization": {"stage": 0},
        },
    )
    actor = Actor(engine, temperature=args.rollout.temperature)
    actor.packing_samples = False  # Actor(<model instance>) does not set it in 0.11.2
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    return actor, optimizer, scheduler


def _experience(seed, prompt=4, response=5):
    generator = torch.Generator().manual_seed(seed)
    sequences = torch.randint(0, VOCAB, (2, prompt + response), generator=generator)
    action_mask = torch.ones(2, response, dtype=torch.bool)
    action_mask[1, -1] = False
    behavior = -torch.rand(2, response, generator=generator) * 2
    return Experience(
        sequences=sequences,
        attention_mask=torch.ones_like(sequences),
        action_mask=action_mask,
        action_log_probs=behavior + 0.01,
        rollout_log_probs=behavior,
        advantages=torch.tensor([[1.0], [-1.0]]).expand(2, response).clone(),
        info={"reward": torch.tensor([1.0, 0.0])},
    )


def test_openrlhf_training_step_steps_the_controller_once_per_optimizer_step(gloo_world, monkeypatch, cli_args):
    from openrlhf.utils.loss_utils import iter_grad_accum_global_norm

    args = cli_args(["--entropic.enable", "--entropic.target_entropy", "0.5", "--entropic.kp", "2"])
    trainer, strategy = _tiny_trainer(args, monkeypatch, gradient_accumulation_steps=2)
    assert isinstance(trainer.actor_loss_fn, EntroPICPolicyLoss)
    assert trainer.entropic_config.kp == 2.0 and trainer.entropic_config.target_entropy == 0.5
    # The CLI asked vLLM for log-probs for the estimate only: the user's loss keeps is_correction_level off.
    assert trainer.entropic_loss.base_loss.is_correction_level == "off"

    experiences = [_experience(seed) for seed in range(4)]
    windows = iter_grad_accum_global_norm(experiences, strategy, 2, lambda e: e.action_mask)
    statuses, controller_steps = [], []
    for step, (experience, loss_batch_info) in enumerate(windows):
        statuses.append(trainer.training_step(experience, 0.0, step, loss_batch_info))
        controller_steps.append(trainer.entropic_loss.entropic.controller.steps)
    assert controller_steps == [1, 1, 2, 2]  # 4 micro-batches, 2 optimizer steps
    assert trainer.actor.model.global_steps == 2
    metrics, weights = statuses[-1]["metrics"], statuses[-1]["weights"]
    assert metrics[Metric.ALPHA] == trainer.entropic_loss.entropic.controller.alpha != 0.0
    assert weights[Metric.ALPHA] is None and weights[Metric.ENTROPY] == "token"
    assert 0.0 < metrics[Metric.ENTROPY].item() <= math.log(VOCAB)
    assert {Metric.ENTROPY_IW, Metric.ESS_FRACTION, Metric.P_TERM, Metric.I_TERM} <= metrics.keys()
    assert "entropy_loss" in metrics  # OpenRLHF's own log-only entropy (entropy_coef 0)


def test_training_step_is_plain_openrlhf_when_entropic_is_off(gloo_world, monkeypatch, cli_args):

    args = cli_args(["--entropic.enable", "false"])
    trainer, strategy = _tiny_trainer(args, monkeypatch)
    assert trainer.entropic_loss is None and isinstance(trainer.actor_loss_fn, PolicyLoss)
    status = trainer.training_step(_experience(0), 0.0, 0, None)
    assert Metric.ALPHA not in status["metrics"] and "policy_loss" in status["metrics"]


def test_controller_state_rides_in_a_real_deepspeed_checkpoint(gloo_world, monkeypatch, cli_args, tmp_path):
    """Our save_checkpoint through OpenRLHF's strategy.save_ckpt (DeepSpeed), then strategy.load_ckpt back."""

    args = cli_args(["--entropic.enable"], [*OPENRLHF_ARGV, "--ckpt.path", str(tmp_path)])
    trainer, strategy = _tiny_trainer(args, monkeypatch)
    for entropy in (0.6, 0.5):
        trainer.entropic_loss.entropic.controller.update(entropy, weight=8)
    # The Ray actor's methods on a plain instance, with the attributes init_model_from_pretrained sets.
    policy_actor = entropic_actor.EntroPICPolicyModelActor.__ray_actor_class__.__new__(
        entropic_actor.EntroPICPolicyModelActor.__ray_actor_class__
    )
    policy_actor.strategy, policy_actor.actor, policy_actor.trainer = strategy, trainer.actor, trainer
    policy_actor.disable_ds_ckpt, policy_actor.save_hf_ckpt = False, False
    policy_actor.save_checkpoint("global_step2", client_states={"global_step": 2})

    _, states = strategy.load_ckpt(
        trainer.actor.model, os.path.join(str(tmp_path), "_actor")
    )  # as --ckpt.load_enable does
    assert states["global_step"] == 2
    resumed = _entropic_loss(0.0)
    assert restore_controller_state(resumed, states)
    assert resumed.entropic.controller.state_dict() == trainer.entropic_loss.entropic.controller.state_dict()
