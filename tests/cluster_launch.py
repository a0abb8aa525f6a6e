"""Runs our CLI through OpenRLHF 0.11.2's real `__main__` block on CPU, stopping where `train()` starts Ray.

Shared by the cluster tests: `launch_args(entropic_argv, openrlhf_argv)` (and the `cli_args` fixture)
returns the hierarchized args that OpenRLHF's `train(args)` receives, after a pickle round trip
(what Ray does to `strategy.args`).
"""

from __future__ import annotations

import pickle

import cluster_standins  # noqa: F401  (must precede every openrlhf import)
import pytest

OPENRLHF_ARGV = [
    "--actor.model_name_or_path", "tiny-random-llama",  # never loaded: the run stops before train()
    "--reward.remote_url", "examples/python/math_reward_func.py",
    "--algo.advantage.estimator", "group_norm",
    "--rollout.n_samples_per_prompt", "2",
    "--rollout.batch_size", "2",
    "--rollout.temperature", "0.7",
    "--train.batch_size", "2",
    "--train.micro_batch_size", "1",
    "--actor.num_gpus_per_node", "1",
    "--train.async_enable",
]  # fmt: skip


class _StopBeforeRay(Exception):
    pass


def launch_args(entropic_argv, openrlhf_argv=OPENRLHF_ARGV):
    """Run our CLI's main() on argv through OpenRLHF's real __main__ block; return the args train() got."""
    import ray

    from openrlhf_entropic.cli import train_ppo_ray as cli

    captured = []
    real_prepare = cli.prepare_openrlhf_args

    def capture(args, config, cluster):
        captured.append(real_prepare(args, config, cluster))
        return captured[-1]

    def stop(*args, **kwargs):
        raise _StopBeforeRay

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cli, "prepare_openrlhf_args", capture)
        # train() calls ray.init first unless Ray is up (a test may have started it): stop there, on CPU.
        patch.setattr(ray, "is_initialized", lambda: False)
        patch.setattr(ray, "init", stop)
        with pytest.raises(_StopBeforeRay):
            cli.main([*entropic_argv, *openrlhf_argv])
    assert len(captured) == 1, "OpenRLHF's __main__ must call hierarchize exactly once"
    return pickle.loads(pickle.dumps(captured.pop()))  # Ray pickles strategy.args to every actor


@pytest.fixture
def cli_args():
    """`launch_args` as a fixture."""
    return launch_args
