"""Generator actors: sample responses with Hugging Face `generate` and record behavior log-probs.

Behavior log-probs are those of the distribution the tokens were actually drawn from:
`generate`'s processed scores, i.e. the logits after temperature *and* top-p. The learner's
current log-probs are temperature-scaled without top-p, so with `--top-p 1` (the default) the
two match exactly on fresh weights; with top-p < 1 the ratio pi/mu also carries the truncation.
"""

from __future__ import annotations

import math
import time

import torch

from openrlhf_entropic.tasks.advantages import compute_advantages


@torch.no_grad()
def sample_responses(model, tokenizer, rows: list[dict], n_samples: int, temperature: float, top_p: float,
                     max_new_tokens: int) -> list[dict]:
    """Draw `n_samples` responses for each row {"prompt", "label"}; return one dict per sample.

    Each dict holds prompt_ids and response_ids (lists of ints; the response ends at its first EOS,
    inclusive), behavior_log_probs (one float per response token), text (prompt + response, the
    reward function's `query`), prompt, label and group (index of its row). Samples come grouped:
    row 0's n samples first.
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
        samples.append({
            "prompt_ids": prompt_ids[index][prompt_mask[index]].tolist(),
            "response_ids": tokens[:length],
            "behavior_log_probs": log_probs[index, :length].tolist(),
            "text": row["prompt"] + " " + tokenizer.decode(tokens[:length], skip_special_tokens=False),
            "prompt": row["prompt"],
            "label": row["label"],
            "group": index // n_samples,
        })
    return samples


def score_samples(samples: list[dict], reward_fn) -> list[float]:
    """Rewards from `reward_fn(queries, prompts, labels)` as floats, one per sample (NaN kept)."""
    rewards = reward_fn([s["text"] for s in samples], [s["prompt"] for s in samples], [s["label"] for s in samples])
    rewards = [float(r) for r in (rewards.tolist() if isinstance(rewards, torch.Tensor) else rewards)]
    if len(rewards) != len(samples):
        raise ValueError(f"reward function returned {len(rewards)} rewards for {len(samples)} samples")
    return rewards


class Generator:
    """A Ray actor holding a copy of the policy; `generate` tags every sample with the weight version.

    Ray runs one method at a time per actor, in call order, so a `load_weights` sent before a
    `generate` is always applied first: that is what makes on-policy (K = 0) exact.
    """

    def __init__(self, model_factory, reward_fn, sampling: dict, seed: int):
        torch.set_num_threads(1)
        torch.manual_seed(seed)
        self.model, self.tokenizer = model_factory()
        self.model.eval()
        self.reward_fn = reward_fn
        self.sampling = sampling  # n_samples, temperature, top_p, max_new_tokens, advantage
        self.version = 0

    def load_weights(self, state_dict: dict, version: int) -> int:
        """Replace the weights with the learner's (a dict of tensors) and record their policy version."""
        self.model.load_state_dict(state_dict, strict=False)
        self.version = version
        return version

    def generate(self, job: dict) -> dict:
        """Sample the job's prompt rows and return {"uid", "samples", "dropped_nan", "seconds"}.

        Each sample gets reward, advantage (within its prompt group), version and job uid. A sample
        whose reward is NaN/inf is dropped here and counted in `dropped_nan`; never trained on.
        """
        cfg = self.sampling
        started = time.perf_counter()
        samples = sample_responses(self.model, self.tokenizer, job["rows"], cfg["n_samples"], cfg["temperature"],
                                   cfg["top_p"], cfg["max_new_tokens"])
        rewards = score_samples(samples, self.reward_fn)
        kept = [(s, r) for s, r in zip(samples, rewards, strict=True) if math.isfinite(r)]
        groups = [[r for s, r in kept if s["group"] == g] for g in range(len(job["rows"]))]
        advantages = compute_advantages(groups, cfg["advantage"])
        flat_advantages = [a for group in advantages for a in group]  # `kept` is in group order too
        for (sample, reward), advantage in zip(kept, flat_advantages, strict=True):
            sample.update(reward=reward, advantage=advantage, version=self.version, uid=job["uid"])
        return {"uid": job["uid"], "samples": [s for s, _ in kept], "dropped_nan": len(samples) - len(kept),
                "seconds": time.perf_counter() - started}

    def get_rng_state(self) -> torch.Tensor:
        """Torch RNG state [bytes] (uint8), saved in checkpoints so a resumed run samples the same."""
        return torch.get_rng_state()

    def set_rng_state(self, state: torch.Tensor) -> None:
        torch.set_rng_state(state)
