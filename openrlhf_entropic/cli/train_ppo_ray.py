"""`python -m openrlhf_entropic.cli.train_ppo_ray`: OpenRLHF 0.11.2's train_ppo_ray, with an EntroPIC actor.

Every flag of `openrlhf.cli.train_ppo_ray` passes through unchanged; the `--entropic.*` flags are the
shared ones of `openrlhf_entropic.entropic.config`, the same as in the embedded runtime.

OpenRLHF builds its parser inside `if __name__ == "__main__":`, so it cannot be imported and
extended. Instead: we parse our flags with `parse_known_args`, then run OpenRLHF's own module as
`__main__` (runpy) on the remaining argv, so its parser, validation and `train()` run unchanged.
While it runs, our subclasses stand in for `PolicyModelActor` and `PPOTrainerAsync`, and its one
call to `hierarchize(args)` is wrapped to attach our config as `args.entropic`: that object becomes
`strategy.args`, which OpenRLHF hands to every Ray actor.

`--help` needs only this file and the config: openrlhf, vllm and flash_attn are imported only
when training starts.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import runpy
import sys
from collections.abc import Iterator

from openrlhf_entropic.entropic.config import EntroPICConfig, add_dataclass_flags, add_entropic_args
from openrlhf_entropic.runtime.openrlhf import ClusterConfig

OPENRLHF_MODULE = "openrlhf.cli.train_ppo_ray"

EPILOG = f"""\
Every other flag is passed unchanged to OpenRLHF 0.11.2's {OPENRLHF_MODULE}
(see `python -m {OPENRLHF_MODULE} --help` where openrlhf, vllm and flash-attn are installed).

With --entropic.enable, this launcher also:
  * sets --actor.entropy_coef 0 (OpenRLHF's "log only" value) when it is unset, so that the actor
    forward returns the policy entropy the controller measures (computed in chunks of
    --entropic.entropy_chunk_size rows, without gradient);
  * with --train.async_enable and --entropic.estimator importance_weighted, asks vLLM for the
    sampling log-probs (is_correction_level token) but keeps your policy loss as it was
    (is_correction_level off stays off in the loss, with your gating, mode and threshold).
"""


def build_parser() -> argparse.ArgumentParser:
    """Our parser: only the `--entropic.*` flags; abbreviations off so no OpenRLHF flag is taken by prefix."""
    parser = argparse.ArgumentParser(
        prog="python -m openrlhf_entropic.cli.train_ppo_ray",
        description="OpenRLHF's PPO/GRPO Ray trainer (sync or --train.async_enable) with EntroPIC entropy control.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    group = add_entropic_args(parser)
    add_dataclass_flags(group, ClusterConfig, lambda name: f"--entropic.{name}", lambda name: f"entropic.{name}")
    return parser


def parse_args(argv: list[str]) -> tuple[EntroPICConfig, ClusterConfig, list[str]]:
    """Split argv into our validated configs and the argv left for OpenRLHF."""
    parser = build_parser()
    ours, openrlhf_argv = parser.parse_known_args(argv)
    try:
        return EntroPICConfig.from_args(ours), ClusterConfig.from_args(ours), openrlhf_argv
    except ValueError as error:
        parser.error(str(error))


def prepare_openrlhf_args(args, config: EntroPICConfig, cluster: ClusterConfig):
    """Attach both configs to OpenRLHF's hierarchized args as `args.entropic`, and set what EntroPIC needs.

    `args` is the nested namespace of `openrlhf.utils.config.hierarchize`. Each change is printed.
    """
    if cluster.max_staleness is not None and not args.train.async_enable:
        print("[EntroPIC] --entropic.max_staleness has no effect without --train.async_enable (staleness is 0)")
    if config.enable:
        estimate_only = _set_what_entropic_needs(args, config)
        cluster = dataclasses.replace(cluster, rollout_log_probs_for_estimate_only=estimate_only)
    args.entropic = argparse.Namespace(**dataclasses.asdict(config), **dataclasses.asdict(cluster))
    return args


def _set_what_entropic_needs(args, config: EntroPICConfig) -> bool:
    """Turn on the actor entropy and vLLM log-probs EntroPIC reads; True if the log-probs feed only the estimate."""
    estimate_only = False
    if args.actor.entropy_coef is None:
        args.actor.entropy_coef = 0.0
        print("[EntroPIC] --actor.entropy_coef 0 (log only): the actor forward returns the entropy, without gradient")
    if config.estimator == "importance_weighted":
        if args.train.async_enable and args.algo.advantage.is_correction_level == "off":
            # OpenRLHF requests vLLM log-probs (logprobs=1, logprobs_mode=processed_logprobs) only
            # when this is not "off"; the actor resets its PolicyLoss back to "off".
            args.algo.advantage.is_correction_level = "token"
            estimate_only = True
            print("[EntroPIC] asking vLLM for sampling log-probs for the entropy estimate; the loss is unchanged")
        if args.rollout.top_p < 1.0:
            print(
                "[EntroPIC] warning: --rollout.top_p < 1 makes vLLM's processed log-probs those of the "
                "truncated distribution, which the importance weights then treat as the behavior policy"
            )
    return estimate_only


@contextlib.contextmanager
def entropic_openrlhf(config: EntroPICConfig, cluster: ClusterConfig) -> Iterator[None]:
    """While open, OpenRLHF builds our actor and async trainer, and its `hierarchize` attaches our configs."""
    from openrlhf.trainer import ppo_trainer_async
    from openrlhf.trainer.ray import ppo_actor
    from openrlhf.utils import config as openrlhf_config

    from openrlhf_entropic.runtime.openrlhf import swap_names
    from openrlhf_entropic.runtime.openrlhf.actor import EntroPICPolicyModelActor
    from openrlhf_entropic.runtime.openrlhf.async_trainer import EntroPICPPOTrainerAsync

    upstream_hierarchize = openrlhf_config.hierarchize

    def hierarchize_with_entropic(flat_args):
        return prepare_openrlhf_args(upstream_hierarchize(flat_args), config, cluster)

    with (
        # The driver runs these imports itself (runpy, and inside train()), so the module attributes are read.
        swap_names(vars(ppo_actor), PolicyModelActor=EntroPICPolicyModelActor),
        swap_names(vars(ppo_trainer_async), PPOTrainerAsync=EntroPICPPOTrainerAsync),
        swap_names(vars(openrlhf_config), hierarchize=hierarchize_with_entropic),
    ):
        yield


def run_openrlhf(config: EntroPICConfig, cluster: ClusterConfig, openrlhf_argv: list[str]) -> None:
    """Run OpenRLHF's train_ppo_ray `__main__` on `openrlhf_argv`, inside `entropic_openrlhf`."""
    saved_argv = sys.argv
    sys.argv = [OPENRLHF_MODULE, *openrlhf_argv]
    try:
        with entropic_openrlhf(config, cluster):
            runpy.run_module(OPENRLHF_MODULE, run_name="__main__")
    finally:
        sys.argv = saved_argv


def main(argv: list[str] | None = None) -> None:
    config, cluster, openrlhf_argv = parse_args(sys.argv[1:] if argv is None else argv)
    run_openrlhf(config, cluster, openrlhf_argv)


if __name__ == "__main__":
    main()
