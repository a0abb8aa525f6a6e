"""Train with the embedded runtime: `python -m openrlhf_entropic.cli.train [flags]`.

The flags are the fields of `runtime.local.config.RunConfig` plus the shared `--entropic.*` flags.
A preset (`--preset embedded`, the default) fills every flag the user did not type.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import sys

from openrlhf_entropic.entropic import EntroPICConfig, add_entropic_args
from openrlhf_entropic.entropic.config import add_dataclass_flags, dataclass_from_args
from openrlhf_entropic.runtime.local.config import PRESETS, RunConfig
from openrlhf_entropic.tasks import Task


def build_parser() -> argparse.ArgumentParser:
    """The CLI parser: one flag per RunConfig field, then the `--entropic.*` flags; all default to None."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataclass_flags(parser, RunConfig, lambda name: "--" + name.replace("_", "-"), lambda name: name)
    add_entropic_args(parser)
    return parser


def parse_args(argv: list[str] | None = None) -> tuple[RunConfig, EntroPICConfig]:
    """Parse flags, apply the preset, and reject impossible combinations with a message."""
    parser = build_parser()
    args = parser.parse_args(argv)
    preset = PRESETS[args.preset or RunConfig.preset]
    if args.max_staleness is None:
        args.max_staleness = 4 if args.mode == "async" else 0
    run = dataclass_from_args(RunConfig, args, overrides=preset["run"])
    try:
        entropic = EntroPICConfig.from_args(args, **preset["entropic"])
    except ValueError as error:
        parser.error(str(error))
    for message in run.check():
        parser.error(message)
    return run, entropic


def load_pretrained(path: str):
    """(model, tokenizer) from a local Hugging Face directory; never downloads."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, padding_side="left")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return AutoModelForCausalLM.from_pretrained(path, local_files_only=True), tokenizer


def build_task(args: RunConfig) -> Task:
    """The embedded synthetic task, or the task given by --prompt-data, --reward-func and --pretrain."""
    from openrlhf_entropic.tasks import synthetic

    if args.pretrain:
        factory = functools.partial(load_pretrained, args.pretrain)
    else:
        cache = args.warm_start_cache or str(synthetic.DEFAULT_CACHE)
        factory = functools.partial(synthetic.load_warm_model, cache, seed=0, steps=args.warm_start_steps)
        factory()  # warm start once here, so the actors only read the cache
    if args.prompt_data is None:
        train_rows, eval_rows = synthetic.make_prompts()
        reward_fn, correct_fn = synthetic.reward_func, synthetic.is_correct
    else:
        from openrlhf_entropic.tasks.data import load_prompts

        rows = load_prompts(args.prompt_data, args.input_key, args.label_key)
        if args.eval_data:
            train_rows, eval_rows = rows, load_prompts(args.eval_data, args.input_key, args.label_key)
        else:
            held_out = max(1, min(48, len(rows) // 10))
            if len(rows) < 2:
                raise ValueError(f"{args.prompt_data}: need at least 2 rows to hold out an eval split")
            train_rows, eval_rows = rows[held_out:], rows[:held_out]
    if args.reward_func:
        from openrlhf_entropic.tasks.data import load_reward_func

        reward_fn = load_reward_func(args.reward_func)
        correct_fn = functools.partial(_positive_reward, reward_fn)
    return Task(model_factory=factory, reward_fn=reward_fn, correct_fn=correct_fn, train_rows=train_rows,
                eval_rows=eval_rows)


def _positive_reward(reward_fn, queries, prompts, labels) -> list[bool]:
    """pass@k verdicts for a reward file: a sample is correct when its reward is > 0."""
    return [reward > 0 for reward in reward_fn(queries, prompts, labels)]


def main(argv: list[str] | None = None) -> dict:
    """Parse, build the task, run the embedded trainer; returns the summary dict."""
    from openrlhf_entropic.runtime.local.trainer import LocalTrainer

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run, entropic = parse_args(argv)
    return LocalTrainer(run, entropic, build_task(run)).run()


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:]), indent=2))
