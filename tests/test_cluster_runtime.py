"""The cluster runtime against the real OpenRLHF 0.11.2 source, on CPU.

Only flash_attn is a stand-in (tests/cluster_standins.py); vllm is the real CPU build. OpenRLHF's
`Actor`, `PolicyLoss`, `Experience`, `NaiveReplayBuffer`, `DeepspeedStrategy`, `ActorPPOTrainer`
(`__init__`, `training_step`, `ppo_train`), `TrainingActor.fit` and its `__main__` argument handling
all run for real, on a tiny random-initialized Llama in a DeepSpeed engine on CPU (gloo, world size 1).
"""

from __future__ import annotations

import functools
import io
import math
import os
import socket
from pathlib import Path

import cluster_standins  # noqa: F401  (must precede every openrlhf import)
import pytest
import torch
from cluster_launch import OPENRLHF_ARGV, launch_args
from openrlhf.models import Actor, PolicyLoss
from openrlhf.trainer.ppo_utils.experience import Experience
from openrlhf.trainer.ppo_utils.kl_controller import FixedKLController

from openrlhf_entropic.entropic import EntroPICConfig, Metric, all_reduce_sum, importance_weighted_entropy, masked_mean
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


def _loss_and_grad(loss_fn, log_probs, old, advantages, mask, entropy=None, **inputs):
    """(loss, d loss / d log_probs) of an EntroPICPolicyLoss or a PolicyLoss on a fresh leaf."""
    log_probs = log_probs.detach().clone().requires_grad_(True)
    if entropy is not None:
        loss_fn.keep_entropy(None, None, (log_probs, _ActorOutput(entropy)))
    loss = loss_fn(log_probs, old, advantages, action_mask=mask, **inputs)[0]
    loss.backward()
    return loss.detach(), log_probs.grad


@pytest.mark.parametrize("mode", ["high_prob", "all_tokens", "covariance"])
def test_log_ratio_clamp_at_alpha_zero_gives_openrlhfs_exact_gradient(mode):
    """A log-ratio of 100 (exp overflows fp32): OpenRLHF clamps it at 20; at alpha = 0 we are its loss bit for bit."""
    log_probs, old, _, advantages, mask, entropy = _random_batch()
    old = old.clone()
    old[0, 0] = log_probs[0, 0].item() - 100.0  # a high-probability token with a huge ratio
    expected_loss, expected_grad = _loss_and_grad(PolicyLoss(), log_probs, old, advantages, mask)
    loss, grad = _loss_and_grad(_entropic_loss(0.0, mode), log_probs, old, advantages, mask, entropy)
    assert torch.equal(loss, expected_loss) and torch.equal(grad, expected_grad)
    loss, grad = _loss_and_grad(_entropic_loss(0.5, mode), log_probs, old, advantages, mask, entropy)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()


def _is_coefficient(old, rollout, mode, low=0.5, high=5.0):
    """Per-token IS coefficient of the TIS (clip) and ICEPOP (mask) corrections, [batch, response]."""
    token_is = torch.exp(old - rollout)
    if mode == "clip":
        return token_is.clamp(low, high)
    return torch.where((token_is >= low) & (token_is <= high), token_is, 0.0)


@pytest.mark.parametrize("is_mode", ["mask", "clip"])
@pytest.mark.parametrize("mode", ["high_prob", "all_tokens"])
def test_is_correction_level_token_weights_the_entropic_gradient_like_the_base_loss(mode, is_mode):
    """With --algo.advantage.is_correction_level token, EntroPIC's gradient per token carries the IS coefficient."""
    log_probs, old, _, advantages, mask, entropy = _random_batch()
    rollout = old.clone()
    rollout[0, 0] = old[0, 0] - 3.0  # IS ratio e^3 = 20: out of [0.5, 5], rejected (mask) or clamped (clip)
    rollout[1, 1] = old[1, 1] + 0.4  # e^-0.4 = 0.67: kept with its weight
    coefficient = _is_coefficient(old, rollout, is_mode)
    assert coefficient[0, 0] in (0.0, 5.0)

    def entropic_part(is_level):
        def loss_fn(alpha):
            base = PolicyLoss(is_correction_level=is_level, is_correction_mode=is_mode)
            loss = EntroPICPolicyLoss(base, EntroPICConfig(enable=True, mode=mode, estimator="on_policy"))
            loss.entropic.controller.alpha = alpha
            return loss

        inputs = dict(rollout_log_probs=rollout)
        with_alpha = _loss_and_grad(loss_fn(0.6), log_probs, old, advantages, mask, entropy, **inputs)[1]
        without = _loss_and_grad(loss_fn(0.0), log_probs, old, advantages, mask, entropy, **inputs)[1]
        return with_alpha - without

    plain, corrected = entropic_part("off"), entropic_part("token")
    assert plain[0, 0] != 0  # the rejected/clamped token does get EntroPIC gradient without the correction
    torch.testing.assert_close(corrected, coefficient * plain, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("mode", ["high_prob", "all_tokens"])
def test_policy_loss_type_gspo_uses_the_sequence_ratio(mode):
    """GSPO: one ratio per sequence and eps ~3e-4. EntroPIC's term must use that ratio, not clipped token ratios."""
    log_probs, old, _, advantages, mask, entropy = _random_batch()
    alpha = 0.4
    gspo = dict(policy_loss_type="gspo", clip_eps_low=3e-4, clip_eps_high=4e-4)
    loss_fn = EntroPICPolicyLoss(PolicyLoss(**gspo), EntroPICConfig(enable=True, mode=mode, estimator="on_policy"))
    loss_fn.entropic.controller.alpha = alpha
    loss_fn.keep_entropy(None, None, (log_probs, _ActorOutput(entropy)))
    got = loss_fn(log_probs, old, advantages, action_mask=mask)[0]
    base = PolicyLoss(**gspo)
    mask_f = mask.float()
    if mode == "all_tokens":  # GSPO's own loss on the advantages weighted (1 + alpha) / (1 - alpha)
        expected = base(log_probs, old, advantages * (1 + alpha * torch.sign(advantages)), action_mask=mask)[0]
    else:  # alpha * mean over sequences with high-probability tokens of mean_M(-r_seq * |A|)
        r_seq = torch.exp(((log_probs - old) * mask_f).sum(-1, keepdim=True) / mask_f.sum(-1, keepdim=True))
        high = (log_probs.exp() > 0.95).float() * mask_f
        per_sequence = (-r_seq * advantages.abs() * high).sum(-1) / high.sum(-1).clamp(min=1)
        official = alpha * per_sequence[high.sum(-1) > 0].mean()
        expected = base(log_probs, old, advantages, action_mask=mask)[0] + official
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)


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


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray cluster whose workers get the flash_attn stand-in before they import openrlhf."""
    import ray

    runtime_env = {
        "env_vars": {"PYTHONPATH": str(Path(__file__).parent)},
        "worker_process_setup_hook": "cluster_standins.install",
    }
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env=runtime_env)
    yield
    ray.shutdown()


def test_async_trainer_builds_our_actors_inside_a_real_ray_worker(local_ray):
    """Ray ships actor classes by value, so a substitution must reach the copied globals (see swap_names)."""
    import ray
    from openrlhf.utils import get_strategy

    from openrlhf_entropic.runtime.openrlhf.async_trainer import EntroPICPPOTrainerAsync

    strategy = get_strategy(launch_args(["--entropic.enable"]))
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


class _Recorder:
    """Records calls as (name, args, kwargs); stands for the Ray actor groups, loggers and queues fit talks to."""

    def __init__(self, calls, name, returns=None):
        self.calls, self.name, self.returns = calls, name, returns

    def __getattr__(self, method):
        def call(*args, **kwargs):
            self.calls.append((f"{self.name}.{method}", args, kwargs))
            return self.returns(method) if self.returns else []

        return call


def _training_actor(args, lock, calls, payloads=()):
    """Our StalenessAwareTrainingActor with the attributes OpenRLHF's __init__ sets, around recorders."""
    training = StalenessAwareTrainingActor.__ray_actor_class__.__new__(StalenessAwareTrainingActor.__ray_actor_class__)
    queue = iter([*payloads, "done"])
    training.args, training.vllm_lock, training.vllm_engines = args, lock, ["engine"]
    training.max_staleness, training.dropped_stale_total = ClusterConfig.from_args(args).max_staleness, 0
    training._partial_rollout, training.critic_model_group = False, None
    training.kl_ctl = FixedKLController(args.algo.kl.init_coef)
    training.rollout_queue = _Recorder(calls, "queue", lambda method: next(queue))
    training.rollout_slots = _Recorder(calls, "slots")
    training.actor_model_group = _Recorder(calls, "actor")
    training.wandb_logger, training.tensorboard_logger = None, _Recorder(calls, "tensorboard")
    training.best_eval_metric_key, training.best_eval_metric_value, training._latest_eval_metric_value = "", 0, None
    return training


def test_entropic_max_staleness_dropping_a_whole_batch_logs_and_saves_nothing(local_ray):
    """OpenRLHF's TrainingActor.fit logs and checkpoints whatever global_step train_step returns; a batch
    dropped whole leaves the step unchanged, so that would repeat the previous step's entry and checkpoint."""
    import ray

    args = launch_args(["--entropic.enable", "--entropic.max_staleness", "1"],
                       [*OPENRLHF_ARGV, "--ckpt.save_steps", "1"])
    lock = VersionedVLLMLock.remote()
    for _ in range(2):
        ray.get(lock.bump_version.remote())
    calls = []
    stale_batch = ([_sample(0), _sample(0)], {"episode": 0}, None, 0.1)  # 2 versions old, max_staleness 1
    training = _training_actor(args, lock, calls, [stale_batch])
    training.fit(global_step=7)  # OpenRLHF's own loop
    assert training.dropped_stale_total == 2
    assert not [name for name, *_ in calls if name in ("tensorboard.log_train", "actor.async_run_method")], calls


def test_critic_freezing_steps_broadcasts_of_a_frozen_actor_keep_the_version(local_ray):
    """With --critic.freezing_steps OpenRLHF broadcasts the unchanged actor; only a trained actor is a new version."""
    import ray

    args = launch_args(["--entropic.enable"], [*OPENRLHF_ARGV, "--critic.freezing_steps", "2"])
    lock = VersionedVLLMLock.remote()
    calls = []

    def actor_fit(method):  # what the actor group's fit returns: its status, once per rank
        return [ray.put({"policy_loss": 0.1})] if method == "async_run_method" else []

    training = _training_actor(args, lock, calls)
    training.actor_model_group = _Recorder(calls, "actor", actor_fit)
    training.actor_changed = False  # as after the start-up broadcast
    versions = []
    for global_step in range(1, 5):  # what BasePPOTrainer.train_step does each step: ppo_train, then broadcast
        training.ppo_train(global_step)
        training.broadcast_to_vllm()
        versions.append(ray.get(lock.version.remote()))
    assert versions == [0, 0, 1, 2]  # the actor first trains at step 3 (> freezing_steps 2)


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


def _tiny_trainer(args, monkeypatch, gradient_accumulation_steps=1, micro_train_batch_size=1):
    """OpenRLHF's strategy and our EntroPICActorPPOTrainer around a 1-layer Llama in a DeepSpeed engine."""
    from openrlhf.utils import get_strategy
    from torch.distributed.device_mesh import init_device_mesh

    strategy = get_strategy(args)
    # What setup_distributed sets: batch / micro / world 1, and the (dp, sp, tp) mesh (on CPU here).
    strategy.accumulated_gradient = gradient_accumulation_steps
    strategy.world_size = 1
    strategy.ds_device_mesh = init_device_mesh("cpu", (1, 1, 1), mesh_dim_names=("dp", "sp", "tp"))
    actor, optimizer, scheduler = _tiny_actor(args, gradient_accumulation_steps)
    _allow_cuda_bookkeeping_on_cpu(monkeypatch)
    trainer = EntroPICActorPPOTrainer(
        strategy,
        actor,
        ema_model=None,
        actor_optim=optimizer,
        actor_scheduler=scheduler,
        micro_train_batch_size=micro_train_batch_size,
        dataloader_pin_memory=False,
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
    statuses, controller_steps, measured = [], [], []
    for step, (experience, loss_batch_info) in enumerate(windows):
        statuses.append(trainer.training_step(experience, 0.0, step, loss_batch_info))
        controller_steps.append(trainer.entropic_loss.entropic.controller.steps)
        measured.append(trainer.entropic_loss.entropic.entropy)
    assert controller_steps == [1, 1, 2, 2]  # 4 micro-batches, 2 optimizer steps
    # The controller measures the first micro-batch of each step (alpha is current for that step).
    micro_batch_entropy = [status["metrics"][Metric.ENTROPY].item() for status in statuses]
    assert measured == pytest.approx([micro_batch_entropy[0]] * 2 + [micro_batch_entropy[2]] * 2, rel=1e-6)
    assert abs(micro_batch_entropy[1] - micro_batch_entropy[0]) > 1e-4  # so the check above can tell them apart
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


@pytest.mark.parametrize("gating", ["binary_kl", "tv"])
def test_is_correction_gating_divergence_starts_with_log_probs_for_the_estimate(gloo_world, monkeypatch, gating):
    """The launcher sets is_correction_level token for the estimate; PolicyLoss must still see the user's off."""
    args = launch_args(["--entropic.enable"], [*OPENRLHF_ARGV, "--algo.advantage.is_correction_gating", gating])
    assert args.algo.advantage.is_correction_level == "token"  # vLLM returns log-probs ...
    trainer, _ = _tiny_trainer(args, monkeypatch)  # ... and PolicyLoss.__init__ validates gating against "off"
    base = trainer.entropic_loss.base_loss
    assert base.is_correction_level == "off" and base.is_correction_gating == gating
    assert trainer.args.algo.advantage.is_correction_level == "token"  # the args are left as the launcher set them


def _uneven_experience(seed, lengths=(5, 2, 4, 1), prompt=4):
    """One batched Experience of len(lengths) samples whose responses have these lengths (right-padded)."""
    generator = torch.Generator().manual_seed(seed)
    batch, response = len(lengths), max(lengths)
    sequences = torch.randint(0, VOCAB, (batch, prompt + response), generator=generator)
    action_mask = torch.arange(response).expand(batch, response) < torch.tensor(lengths).unsqueeze(-1)
    attention_mask = torch.cat([torch.ones(batch, prompt, dtype=torch.bool), action_mask], dim=1)
    behavior = -torch.rand(batch, response, generator=generator) * 2
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5][:batch]).unsqueeze(-1).expand(batch, response)
    return Experience(
        sequences=sequences,
        attention_mask=attention_mask.long(),
        action_mask=action_mask,
        action_log_probs=behavior + 0.01,
        advantages=advantages.clone() * action_mask,
        total_length=attention_mask.sum(-1),
        info={"reward": torch.ones(batch)},
    )


def _one_optimizer_step(args, monkeypatch, alpha, **trainer_options):
    """OpenRLHF's ppo_train over one optimizer step of 4 uneven samples at a fixed alpha.

    Returns (the parameter change, flattened; the number of micro-batches ppo_train ran).
    """
    trainer, _ = _tiny_trainer(args, monkeypatch, **trainer_options)
    trainer.entropic_loss.entropic.update = lambda *measured: None  # hold alpha fixed
    trainer.entropic_loss.entropic.controller.alpha = alpha
    trainer.replay_buffer.append(_uneven_experience(0))
    before = [p.detach().clone() for p in trainer.actor.model.parameters()]
    monkeypatch.setattr(torch.cuda, "current_device", lambda: torch.device("cpu"))  # ppo_train's device
    trainer.ppo_train(kl_ctl=0.0)
    assert trainer.actor.model.global_steps == 1
    after = trainer.actor.model.parameters()
    change = torch.cat([(p.detach() - b).flatten() for p, b in zip(after, before, strict=True)])
    return change, len(trainer.replay_buffer) // trainer.replay_buffer.sample_batch_size


@pytest.mark.parametrize("path", ["dynamic_batching", "gradient_accumulation"])
def test_train_dynamic_batch_enable_applies_the_term_once_per_step(gloo_world, monkeypatch, path):
    """Split one optimizer step into micro-batches: the EntroPIC part must act as on the step taken whole.

    Dynamic batching: DeepSpeed accumulates with gas 1 and OpenRLHF normalizes each micro-batch by the
    step's token count; a per-micro-batch mean would count alpha once per micro-batch. Gradient
    accumulation: OpenRLHF's token mean over the step, not a mean of micro-batch means.
    """
    entropic_argv = ["--entropic.enable", "--entropic.mode", "all_tokens"]
    split_argv = ["--train.batch_size", "4", "--rollout.batch_size", "2"]
    if path == "dynamic_batching":
        # Packing (which dynamic batching turns on) needs flash-attn; the loss normalization does not.
        split_argv += ["--train.dynamic_batch_enable", "--train.max_tokens_per_gpu", "12", "--vllm.num_engines", "1"]
    whole = launch_args(entropic_argv, [*OPENRLHF_ARGV, "--train.batch_size", "4", "--rollout.batch_size", "2"])
    split = launch_args(entropic_argv, [*OPENRLHF_ARGV, *split_argv])
    split.ds.packing_samples = False

    def entropic_part(args, **options):
        with_alpha, micro_batches = _one_optimizer_step(args, monkeypatch, 0.8, **options)
        return with_alpha - _one_optimizer_step(args, monkeypatch, 0.0, **options)[0], micro_batches

    expected, micro_batches = entropic_part(whole, micro_train_batch_size=4)
    assert micro_batches == 1  # the step taken whole
    options = {} if path == "dynamic_batching" else {"gradient_accumulation_steps": 4}
    got, micro_batches = entropic_part(split, **options)
    assert micro_batches >= 2
    assert expected.abs().max() > 1e-4
    torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("entropy_coef", ["0", "0.01"])
def test_actor_entropy_coef_zero_measures_entropy_without_gradient(gloo_world, monkeypatch, entropy_coef):
    """entropy_coef 0 (what the launcher sets): the entropy is only measured, so it must build no autograd graph.

    A nonzero coef is a real entropy bonus: OpenRLHF's differentiable entropy must stay.
    """
    from openrlhf.models.utils import compute_entropy

    args = launch_args(["--entropic.enable"], [*OPENRLHF_ARGV, "--actor.entropy_coef", entropy_coef])
    trainer, _ = _tiny_trainer(args, monkeypatch)
    seen = []
    trainer.actor.register_forward_hook(lambda module, inputs, result: seen.append(result[1]))
    trainer.training_step(_experience(0), 0.0, 0, None)
    (output,) = seen
    assert output.entropy.requires_grad is (entropy_coef != "0")
    with torch.no_grad():  # the same values as OpenRLHF's formula on the same temperature-scaled logits
        expected = compute_entropy(output["logits"])[:, :-1]
    torch.testing.assert_close(output.entropy.detach(), expected, rtol=1e-5, atol=1e-6)


def _ess_on_a_tensor_parallel_pair(rank, port, results):
    """One of two ranks forming ONE data-parallel rank (tensor parallel 2): both see the same micro-batch."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    mesh = init_device_mesh("cpu", (1, 1, 2), mesh_dim_names=("dp", "sp", "tp"))
    strategy = type("Strategy", (), {"ds_device_mesh": mesh})()
    loss_fn = EntroPICPolicyLoss(
        PolicyLoss(), EntroPICConfig(enable=True),
        functools.partial(all_reduce_sum, group=entropic_actor.dp_group(strategy)),
    )
    log_probs, old, rollout, _, mask, entropy = _random_batch()
    loss_fn.entropic.update(entropy[:, -mask.shape[1] :], log_probs.detach(), rollout, mask.float())
    results.put((rank, loss_fn.entropic.ess, loss_fn.entropic.tokens))
    dist.destroy_process_group()


def test_ds_tensor_parallel_size_does_not_inflate_the_ess():
    """The ESS and token totals are summed over data-parallel ranks only, not over their TP/ring duplicates."""
    import torch.multiprocessing as mp

    log_probs, _, rollout, _, mask, entropy = _random_batch()
    _, ess = importance_weighted_entropy(entropy[:, -mask.shape[1] :], log_probs.detach(), rollout, mask.float())
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    context = mp.get_context("spawn")
    results = context.SimpleQueue()
    mp.start_processes(_ess_on_a_tensor_parallel_pair, args=(port, results), nprocs=2, start_method="spawn")
    for _ in range(2):
        _, got_ess, tokens = results.get()
        assert got_ess == pytest.approx(ess.item(), rel=1e-6) and tokens == mask.sum().item()
