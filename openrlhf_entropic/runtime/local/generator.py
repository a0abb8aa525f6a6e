"""Generator actors: sample responses, score them, and turn rewards into group advantages.

Behavior log-probs are those of the distribution the tokens were actually drawn from:
`generate`'s processed scores, i.e. the logits after temperature *and* top-p. The learner's
current log-probs are temperature-scaled without top-p, so with `--top-p 1` (the default) the
two match exactly on fresh weights; with top-p < 1 the ratio pi/mu also carries the truncation.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

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


@torch.no_grad()
def sample_responses(model, tokenizer, rows: list[dict], n_samples: int, temperature: float, top_p: float,
                     max_new_tokens: int) -> list[Sample]:
    """Draw `n_samples` responses for each row {"prompt", "label"}, grouped: row 0's n samples first.

    Each response ends at its first EOS, inclusive; `group` is the index of its row. Reward,
    advantage and version are left for the caller.
    """
    encoded = tokenizer([row["prompt"] for row in rows], return_tensors="pt", padding=True).to(model.device)
    output = model.generate(
        **encoded, do_sample=True, temperature=temperature, top_p=top_p, top_k=0, max_new_tokens=max_new_tokens,
        num_return_sequences=n_samples, output_scores=True, return_dict_in_generate=True,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    prompt_width = encoded["input_ids"].shape[1]
    responses = output.sequences[:, prompt_width:]  # [rows * n, new_tokens]
    scores = torch.stack(output.scores, dim=1).float()  # [rows * n, new_tokens, vocab], processed
    log_probs = torch.log_softmax(scores, dim=-1).gather(-1, responses.unsqueeze(-1)).squeeze(-1)
    prompt_mask = encoded["attention_mask"].repeat_interleave(n_samples, dim=0).bool()
    prompt_ids = encoded["input_ids"].repeat_interleave(n_samples, dim=0)
    samples = []
    for index in range(responses.shape[0]):
        tokens = responses[index].tolist()
        length = tokens.index(tokenizer.eos_token_id) + 1 if tokenizer.eos_token_id in tokens else len(tokens)
        row = rows[index // n_samples]
        samples.append(Sample(
            prompt_ids=prompt_ids[index][prompt_mask[index]].tolist(),
            response_ids=tokens[:length],
            behavior_log_probs=log_probs[index, :length].tolist(),
            text=row["prompt"] + " " + tokenizer.decode(tokens[:length], skip_special_tokens=False),
            prompt=row["prompt"],
            label=row["label"],
            group=index // n_samples,
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
    """What a generator returns for a job: the kept samples and what was dropped on the way."""

    uid: int
    samples: list[Sample]
    dropped_nan: int  # samples whose reward was NaN: never trained on
    dropped_inf: int  # samples whose reward was +-inf: never trained on
    clipped_rewards: int  # finite rewards outside [-reward_clip, reward_clip], clipped to it
    seconds: float  # time inside generate


class Generator:
    """A Ray actor holding a copy of the policy; `generate` tags every sample with the weight version.

    Ray runs one method at a time per actor, in call order, so a `load_weights` sent before a
    `generate` is always applied first: that is what makes on-policy (K = 0) exact.
    """

    def __init__(self, model_factory, reward_fn, run: RunConfig, seed: int):
        torch.set_num_threads(1)
        torch.manual_seed(seed)
        self.model, self.tokenizer = model_factory()
        self.model.eval()
        self.reward_fn = reward_fn
        self.run = run
        self.version = 0

    def load_weights(self, state_dict: dict, version: int) -> int:
        """Replace the weights with the learner's (a dict of tensors) and record their policy version."""
        self.model.load_state_dict(state_dict, strict=False)
        self.version = version
        return version

    def generate(self, job: Job) -> Rollout:
        """Sample the job's prompt rows; each kept sample gets reward, advantage (within its group), version, uid."""
        run = self.run
        started = time.perf_counter()
        samples = sample_responses(self.model, self.tokenizer, job.rows, run.n_samples_per_prompt, run.temperature,
                                   run.top_p, run.generate_max_len)
        rewards = score_samples(samples, self.reward_fn)
        # The rule for bad rewards: NaN and inf drop their sample, finite ones are clipped; all counted.
        kept = [(s, min(max(r, -run.reward_clip), run.reward_clip)) for s, r in zip(samples, rewards, strict=True)
                if math.isfinite(r)]
        groups = [[r for s, r in kept if s.group == g] for g in range(len(job.rows))]
        advantages = [a for group in compute_advantages(groups, run.advantage) for a in group]  # `kept` is grouped too
        for (sample, reward), advantage in zip(kept, advantages, strict=True):
            sample.reward, sample.advantage, sample.version, sample.uid = reward, advantage, self.version, job.uid
        return Rollout(uid=job.uid, samples=[s for s, _ in kept], dropped_nan=sum(math.isnan(r) for r in rewards),
                       dropped_inf=sum(math.isinf(r) for r in rewards),
                       clipped_rewards=sum(math.isfinite(r) and abs(r) > run.reward_clip for r in rewards),
                       seconds=time.perf_counter() - started)

    def get_rng_state(self) -> torch.Tensor:
        """Torch RNG state [bytes] (uint8), saved in checkpoints so a resumed run samples the same."""
        return torch.get_rng_state()

    def set_rng_state(self, state: torch.Tensor) -> None:
        torch.set_rng_state(state)
