"""Train with the embedded runtime: `python -m openrlhf_entropic.cli.train [flags]`.

Flags use dashes (`--n-samples-per-prompt`); where OpenRLHF has a flag for the same thing the name
is OpenRLHF's with dashes (`--rollout-batch-size`, `--train-batch-size`, `--micro-train-batch-size`,
`--max-epochs`, `--actor-learning-rate`, `--eps-clip`, `--max-norm`, `--generate-max-len`,
`--save-steps`, `--eval-steps`). The `--entropic.*` flags are shared with the cluster runtime.
`--max-staleness K` and `--entropic.max_staleness K` are one setting.

A preset (`--preset embedded`, the default) fills every flag the user did not type.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import sys

from openrlhf_entropic.entropic import EntroPICConfig, add_entropic_args

# The embedded default: the synthetic letter-pair task with a tiny model, sized so that a
# 4-cell compare finishes within minutes on 2 CPU cores.
PRESETS = {
    "embedded": {
        "run": {
            "steps": 300, "rollout_batch_size": 16, "n_samples_per_prompt": 8, "train_batch_size": 128,
            "micro_train_batch_size": 128, "max_epochs": 1, "actor_learning_rate": 2e-3, "temperature": 1.0,
            "top_p": 1.0, "generate_max_len": 3, "eps_clip": 0.2, "max_norm": 1.0, "advantage": "grpo",
            "num_generators": 1, "num_learners": 1, "sync_every": 1, "eval_n_samples": 8, "eval_k": 4,
            "warm_start_steps": 150,
        },
        # Tuned on this task: the target ramps down from about the warm-start entropy, so the
        # integral does not wind up early; a 0.5 threshold gives high_prob mode enough tokens to act on.
        "entropic": {"target_entropy": 0.35, "target_start": 1.2, "target_warmup_steps": 80, "kp": 3.0, "ki": 0.1,
                     "mode": "high_prob", "high_prob_threshold": 0.5},
    },
}


def build_parser() -> argparse.ArgumentParser:
    """The CLI parser; preset-controlled flags default to None (= take the preset's value)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--preset", default="embedded", choices=sorted(PRESETS), help="Default values for every untyped flag.")
    add("--mode", default="on_policy", choices=("on_policy", "async"),
        help="on_policy: generators wait for fresh weights (K = 0); async: they run up to K versions ahead.")
    add("--max-staleness", dest="entropic.max_staleness", type=int, default=None, metavar="K",
        help="K: drop samples more than K policy versions old (default 0 on-policy, 4 async).")
    add("--steps", type=int, help="Total training steps (a resumed run continues up to this total).")
    add("--seed", type=int, default=0)
    add("--output-dir", default="runs/train", help="Metrics, TensorBoard events, checkpoints, summary.json.")
    add("--num-generators", type=int)
    add("--num-learners", type=int, help="Data-parallel DeepSpeed ZeRO-2 learner ranks.")
    add("--sync-every", type=int, help="Send weights to the generators every N training steps.")
    add("--save-steps", type=int, default=-1, help="Checkpoint every N steps (-1 = never).")
    add("--resume", action="store_true", help="Continue from the latest checkpoint in --output-dir.")
    add("--eval-steps", type=int, default=10, help="Evaluate on fresh samples of the eval prompts every N steps.")
    add("--eval-n-samples", type=int, help="Samples per eval prompt (>= --eval-k).")
    add("--eval-k", type=int, help="k of pass@k.")
    add("--ray-address", default=None, help="Join this Ray cluster instead of starting a local one.")
    add("--ray-dashboard", action="store_true", help="Start the Ray dashboard (off by default).")
    add("--ray-num-cpus", type=int, default=None, help="CPUs of the local Ray cluster (default: all).")
    add("--learner-num-gpus", type=float, default=0, help="GPUs per learner actor (0 = CPU with gloo).")
    add("--prompt-data", default=None, help="JSONL or parquet prompts (default: the embedded synthetic task).")
    add("--eval-data", default=None, help="Eval prompts (default: 10%% of --prompt-data held out, at most 48).")
    add("--input-key", default="input")
    add("--label-key", default="label")
    add("--reward-func", default=None,
        help="Python file defining reward_func(queries, prompts, labels). It runs as code: use trusted files only.")
    add("--pretrain", default=None, help="Local Hugging Face model directory (default: the embedded tiny model).")
    add("--warm-start-cache", default=None,
        help="Where the embedded model's warm start is cached (default: $XDG_CACHE_HOME or ~/.cache, "
        "/openrlhf_entropic; keyed by a hash of its settings).")
    add("--warm-start-steps", type=int)
    add("--advantage", choices=("grpo", "reinforce_baseline", "rloo"))
    add("--temperature", type=float)
    add("--top-p", type=float)
    add("--n-samples-per-prompt", type=int)
    add("--rollout-batch-size", type=int, help="Prompts per training step.")
    add("--train-batch-size", type=int, help="Samples per optimizer step (over all learners).")
    add("--micro-train-batch-size", type=int, help="Samples per forward/backward on one learner.")
    add("--max-epochs", type=int, help="PPO epochs over each rollout batch.")
    add("--actor-learning-rate", type=float)
    add("--eps-clip", type=float)
    add("--max-norm", type=float, help="Gradient clipping norm.")
    add("--generate-max-len", type=int, help="Max new tokens per response.")
    add("--buffer-capacity", type=int, default=None,
        help="Replay buffer capacity in samples (default (K+1) x batch + one generation job).")
    add("--no-progress", action="store_true", help="Hide the tqdm progress bar.")
    add_entropic_args(parser)
    return parser


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, EntroPICConfig]:
    """Parse flags, apply the preset, and reject impossible combinations with a message."""
    parser = build_parser()
    args = parser.parse_args(argv)
    preset = PRESETS[args.preset]
    for key, value in preset["run"].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    staleness = getattr(args, "entropic.max_staleness")
    if args.mode == "on_policy" and staleness not in (None, 0):
        parser.error(f"--max-staleness {staleness} needs --mode async (on-policy means K = 0)")
    defaults = {**preset["entropic"], "max_staleness": 0 if args.mode == "on_policy" else 4}
    try:
        entropic = EntroPICConfig.from_args(args, **defaults)
    except ValueError as error:
        parser.error(str(error))
    batch = args.rollout_batch_size * args.n_samples_per_prompt
    checks = [
        (args.steps >= 1, f"--steps must be >= 1, got {args.steps}"),
        (args.mode == "async" or args.sync_every == 1, "on-policy needs --sync-every 1 (fresh weights every step)"),
        (args.sync_every >= 1, f"--sync-every must be >= 1, got {args.sync_every}"),
        (args.num_generators >= 1, f"--num-generators must be >= 1, got {args.num_generators}"),
        (args.rollout_batch_size % args.num_generators == 0,
         f"--rollout-batch-size {args.rollout_batch_size} must be divisible by --num-generators {args.num_generators}"),
        (1 <= args.num_learners <= batch,
         f"--num-learners {args.num_learners} must be between 1 and the batch ({batch} samples)"),
        (batch % args.train_batch_size == 0,
         f"the batch ({batch} samples) must be a multiple of --train-batch-size {args.train_batch_size}"),
        (args.train_batch_size % (args.micro_train_batch_size * args.num_learners) == 0,
         f"--train-batch-size {args.train_batch_size} must be a multiple of --micro-train-batch-size x "
         f"--num-learners ({args.micro_train_batch_size} x {args.num_learners})"),
        (args.max_epochs >= 1, f"--max-epochs must be >= 1, got {args.max_epochs}"),
        (args.temperature > 0 and 0 < args.top_p <= 1, "--temperature must be > 0 and --top-p in (0, 1]"),
        (args.eval_steps >= 1 and args.eval_n_samples >= args.eval_k >= 1,
         "--eval-steps must be >= 1 and --eval-n-samples >= --eval-k >= 1"),
        (args.prompt_data is None or args.reward_func is not None, "--prompt-data needs --reward-func"),
        (args.buffer_capacity is None or args.buffer_capacity >= batch + batch // args.num_generators,
         f"--buffer-capacity must hold a batch plus one generation job ({batch + batch // args.num_generators} samples)"),
    ]
    for ok, message in checks:
        if not ok:
            parser.error(message)
    return args, entropic


def load_pretrained(path: str):
    """(model, tokenizer) from a local Hugging Face directory; never downloads."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, padding_side="left")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return AutoModelForCausalLM.from_pretrained(path, local_files_only=True), tokenizer


def build_task(args) -> dict:
    """model_factory, reward_fn, correct_fn, train_rows and eval_rows (embedded task or files)."""
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
    return {"model_factory": factory, "reward_fn": reward_fn, "correct_fn": correct_fn, "train_rows": train_rows,
            "eval_rows": eval_rows}


def _positive_reward(reward_fn, queries, prompts, labels) -> list[bool]:
    """pass@k verdicts for a reward file: a sample is correct when its reward is > 0."""
    return [reward > 0 for reward in reward_fn(queries, prompts, labels)]


def main(argv: list[str] | None = None) -> dict:
    """Parse, build the task, run the embedded trainer; returns the summary dict."""
    from openrlhf_entropic.runtime.local.trainer import LocalTrainer

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args, entropic = parse_args(argv)
    return LocalTrainer(args, entropic, build_task(args)).run()


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:]), indent=2))
