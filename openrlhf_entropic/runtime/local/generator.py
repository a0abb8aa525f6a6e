"""Generator actors: sample responses with a vLLM (or Hugging Face) engine, score them, and turn rewards
into group advantages.

Behavior log-probs are those of the distribution each token was drawn from (temperature and top-p
applied; see `engines.py`), so with `--top-p 1` they equal the learner's on fresh weights and the
importance weights are exactly 1 at staleness 0. Every job is sampled with a seed derived from the
run's seed and the job's uid, so a job gives the same samples on any generator, restarted or resumed.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from openrlhf_entropic.runtime.local.buffer import Sample
from openrlhf_entropic.runtime.local.config import RunConfig

ADVANTAGES = ("grpo", "reinforce_baseline", "rloo")


def compute_advantages(groups: list[list[float]], kind: str = "grpo", eps: float = 1e-6) -> list[list[float]]:
    """Outcome advantages shaped like `groups` (per-prompt reward lists; groups may differ in size).

    grpo: (r - group mean) / (group std + eps). rloo: r minus the mean of the other samples.
    reinforce_baseline: r - group mean, then divided by the std of those values over the whole batch.
    A group whose rewards are all equal says nothing about which answer is better: it gets 0
    (GRPO's std would be 0). Rewards must be finite (drop NaN samples before calling).
    """
    if kind not in ADVANTAGES:
        raise ValueError(f"--advantage must be one of {ADVANTAGES}, got {kind!r}")
    if any(not math.isfinite(r) for group in groups for r in group):
        raise ValueError("compute_advantages: rewards must be finite; drop NaN/inf samples first")
    result = []
    for rewards in groups:
        n = len(rewards)
        mean = sum(rewards) / n if n else 0.0
        if n < 2 or max(rewards) == min(rewards):
            result.append([0.0] * n)
        elif kind == "grpo":
            std = math.sqrt(sum((r - mean) ** 2 for r in rewards) / (n - 1))
            result.append([(r - mean) / (std + eps) for r in rewards])
        elif kind == "rloo":
            result.append([r - (mean * n - r) / (n - 1) for r in rewards])
        else:
            result.append([r - mean for r in rewards])
    if kind == "reinforce_baseline":
        flat = [a for group in result for a in group]
        if len(flat) > 1:
            batch_mean = sum(flat) / len(flat)
            std = math.sqrt(sum((a - batch_mean) ** 2 for a in flat) / (len(flat) - 1))
            result = [[a / (std + eps) for a in group] for group in result]
    return result


def sample_responses(engine, tokenizer, rows: list[dict], n_samples: int, temperature: float, top_p: float,
                     max_new_tokens: int, seed: int) -> list[Sample]:
    """Draw `n_samples` responses for each row {"prompt", "label"} with `engine` (`HFEngine` or `VLLMEngine`).

    Samples come grouped (row 0's n first), `group` = index of the row; each response ends at its
    first EOS, inclusive. Reward, advantage and version are left for the caller.
    """
    prompt_ids = [tokenizer(row["prompt"])["input_ids"] for row in rows]
    completions = engine.sample(prompt_ids, n_samples, temperature, top_p, max_new_tokens, seed)
    samples = []
    for index, (tokens, log_probs) in enumerate(completions):
        row = rows[index // n_samples]
        samples.append(Sample(
            prompt_ids=prompt_ids[index // n_samples], response_ids=tokens, behavior_log_probs=log_probs,
            text=row["prompt"] + " " + tokenizer.decode(tokens, skip_special_tokens=False),
            prompt=row["prompt"], label=row["label"], group=index // n_samples,
        ))
    return samples


def score_samples(samples: list[Sample], reward_fn) -> list[float]:
    """Rewards from `reward_fn(queries, prompts, labels)` as floats, one per sample (NaN kept)."""
    rewards = reward_fn([s.text for s in samples], [s.prompt for s in samples], [s.label for s in samples])
    rewards = [float(r) for r in (rewards.tolist() if isinstance(rewards, torch.Tensor) else rewards)]
    if len(rewards) != len(samples):
        raise ValueError(f"reward function returned {len(rewards)} rewards for {len(samples)} samples")
    return rewards


@dataclass
class Job:
    """A unit of generation: prompt rows to sample, under a uid that follows its samples to training."""

    uid: int
    rows: list[dict]


@dataclass
class Rollout:
    """What a generator reports to the driver for a job; the kept samples themselves go to the buffer."""

    uid: int
    version: int  # policy version of the weights that generated the samples
    kept: int  # samples kept: the ones the buffer receives
    dropped_nan: int  # samples whose reward was NaN: never trained on
    dropped_inf: int  # samples whose reward was +-inf: never trained on
    clipped_rewards: int  # finite rewards outside [-reward_clip, reward_clip], clipped to it
    seconds: float  # time inside generate
    sync_seconds: float  # time loading weights since the generator's previous rollout


def build_engine(kind: str, model, tokenizer, num_threads: int, dtype: str = "float32"):
    """A sampling engine over `model`: "vllm" (`VLLMEngine`) or "hf" (`HFEngine`), with weights in `dtype`."""
    from openrlhf_entropic.runtime.local.engines import HFEngine, VLLMEngine

    if kind == "vllm":
        return VLLMEngine(model, tokenizer, num_threads=num_threads, dtype=dtype)
    return HFEngine(model.to(getattr(torch, dtype)).eval(), tokenizer)


def pin_to_cores(cores: list[int] | None) -> int:
    """Run this process on `cores` (None: leave it as it is) and return the torch threads to use."""
    if cores:
        os.sched_setaffinity(0, cores)
    threads = len(cores) if cores else 1
    torch.set_num_threads(threads)
    return threads


class Generator:
    """A Ray actor holding a sampling engine; `generate` tags every sample with the weight version.

    Ray runs one method at a time per actor, in call order, so a `load_weights` sent before a
    `generate` is always applied first: that is what makes on-policy (K = 0) exact.
    """

    def __init__(self, model_factory, reward_fn, run: RunConfig, cores: list[int] | None, training_model=None):
        """`training_model` (--colocate-all): the (module, tokenizer) of the learner this generator lives in;
        the hf engine samples from that module itself, vLLM starts from its weights."""
        threads = pin_to_cores(cores)
        model, self.tokenizer = model_factory() if training_model is None else training_model
        # How `Learner.get_weights`' flat array splits: (name, shape) and size per tensor, in state_dict order.
        self.layout = [(name, tuple(tensor.shape)) for name, tensor in model.state_dict().items()]
        self.sizes = [math.prod(shape) for _, shape in self.layout]
        self.shares_weights = training_model is not None and run.generator == "hf"  # then a sync is a no-op
        if self.shares_weights:
            from openrlhf_entropic.runtime.local.engines import HFEngine

            self.engine = HFEngine(model, self.tokenizer)  # not build_engine's, which casts and sets eval mode
        else:
            self.engine = build_engine(run.generator, model, self.tokenizer, threads, run.generator_dtype)
        self.reward_fn = reward_fn
        self.run = run
        self.version = 0
        self.sync_seconds = 0.0

    def ready(self) -> bool:
        """True once the engine is up (the trainer waits for it, so start-up errors surface early)."""
        return True

    def load_weights(self, weights: np.ndarray, version: int) -> int:
        """Load the learner's weights (`Learner.get_weights`: flat, in state_dict order) in place and record
        their policy version."""
        started = time.perf_counter()
        if weights.size != sum(self.sizes):
            raise ValueError(f"{weights.size} weights for a model of {sum(self.sizes)}: learner and generator "
                             "models differ")
        with warnings.catch_warnings():  # Ray hands out a read-only array; the engines only copy from it
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            parts = torch.from_numpy(weights).split(self.sizes)
        self.engine.load_weights({name: part.view(shape) for (name, shape), part in zip(self.layout, parts,
                                                                                          strict=True)})
        self.sync_seconds += time.perf_counter() - started
        self.version = version
        return version

    def generate(self, job: Job) -> tuple[Rollout, list[Sample]]:
        """Sample the job's prompt rows; each kept sample gets reward, advantage (within its group), version, uid.

        Returns (report, kept samples). Called with num_returns=2, so the driver reads the small report
        and hands the samples to the buffer by reference, without ever deserializing them.
        """
        run = self.run
        started = time.perf_counter()
        seed = run.seed * 1_000_003 + job.uid
        samples = sample_responses(self.engine, self.tokenizer, job.rows, run.n_samples_per_prompt, run.temperature,
                                   run.top_p, run.generate_max_len, seed)
        with torch.random.fork_rng(devices=[]):  # a reward function that draws (a noisy verifier) repeats too
            torch.manual_seed(seed)
            rewards = score_samples(samples, self.reward_fn)
        # The rule for bad rewards: NaN and inf drop their sample, finite ones are clipped; all counted.
        kept = [(s, min(max(r, -run.reward_clip), run.reward_clip)) for s, r in zip(samples, rewards, strict=True)
                if math.isfinite(r)]
        groups = [[r for s, r in kept if s.group == g] for g in range(len(job.rows))]
        advantages = [a for group in compute_advantages(groups, run.advantage) for a in group]  # `kept` is grouped too
        for (sample, reward), advantage in zip(kept, advantages, strict=True):
            sample.reward, sample.advantage, sample.version, sample.uid = reward, advantage, self.version, job.uid
        report = Rollout(uid=job.uid, version=self.version, kept=len(kept),
                         dropped_nan=sum(math.isnan(r) for r in rewards), dropped_inf=sum(math.isinf(r) for r in rewards),
                         clipped_rewards=sum(math.isfinite(r) and abs(r) > run.reward_clip for r in rewards),
                         seconds=time.perf_counter() - started, sync_seconds=self._take_sync_seconds())
        return report, [s for s, _ in kept]

    def _take_sync_seconds(self) -> float:
        seconds, self.sync_seconds = self.sync_seconds, 0.0
        return seconds
