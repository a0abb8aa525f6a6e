"""Bias and noise of the entropy estimators on stale samples of the embedded model; prints JSON.

A GRPO run (plain torch, one process) keeps a copy of the weights of every version. At each
measured step v and staleness s, a training-sized batch is drawn from version v - s (the
behavior policy) and the current policy's entropy is estimated from it by each estimator; the
truth is the plain token mean on a large fresh batch from version v. Reported per learning rate,
staleness and estimator: bias (mean error), std of the error, and RMSE, over steps and seeds.

    python benchmarks/iw_estimator.py [--seeds 2] [--steps 60]
"""

import argparse
import copy
import json
import math

import torch

from openrlhf_entropic.entropic import entropic_policy_loss, importance_weighted_entropy, masked_mean
from openrlhf_entropic.runtime.local.engines import HFEngine
from openrlhf_entropic.runtime.local.generator import compute_advantages, sample_responses, score_samples
from openrlhf_entropic.runtime.local.learner import collate, policy_outputs
from openrlhf_entropic.tasks import synthetic

STALENESS = (0, 2, 4, 8)
ESTIMATORS = {  # name -> importance_weighted_entropy settings (None = the plain token mean)
    "on_policy": None,
    "iw_prefix_clip2_ess0.5": {"log_clip": 2.0, "min_ess_fraction": 0.5, "level": "prefix"},
    "iw_prefix_clip1_ess0.5": {"log_clip": 1.0, "min_ess_fraction": 0.5, "level": "prefix"},
    "iw_prefix_clip0.5_ess0.5": {"log_clip": 0.5, "min_ess_fraction": 0.5, "level": "prefix"},
    "iw_prefix_clip2_ess0.95": {"log_clip": 2.0, "min_ess_fraction": 0.95, "level": "prefix"},
    "iw_prefix_clip5_raw": {"log_clip": 5.0, "min_ess_fraction": 0.0, "level": "prefix"},
    "iw_sequence_clip2_ess0.5": {"log_clip": 2.0, "min_ess_fraction": 0.5, "level": "sequence"},
}


def _seed() -> int:
    """A fresh sampling seed from torch's RNG (seeded per run), so runs repeat and draws differ."""
    return int(torch.randint(2**31, (1,)))


def estimates(model, tokenizer, behavior, rows):
    samples = sample_responses(HFEngine(behavior, tokenizer), tokenizer, rows, 8, 1.0, 1.0, 3, _seed())
    batch = collate(samples, tokenizer.pad_token_id)
    with torch.no_grad():
        log_probs, entropy = policy_outputs(model, batch, 1.0, 1024)
    out = {}
    for name, settings in ESTIMATORS.items():
        if settings is None:
            out[name] = float(masked_mean(entropy, batch["mask"]))
        else:
            value, _ = importance_weighted_entropy(entropy, log_probs, batch["behavior_log_probs"], batch["mask"],
                                                   **settings)
            out[name] = float(value)
    return out


def true_entropy(model, tokenizer, rows):
    batch = collate(sample_responses(HFEngine(model, tokenizer), tokenizer, rows, 16, 1.0, 1.0, 3, _seed()), tokenizer.pad_token_id)
    with torch.no_grad():
        _, entropy = policy_outputs(model, batch, 1.0, 1024)
    return float(masked_mean(entropy, batch["mask"]))


def run(lr: float, seed: int, steps: int, cache: str) -> dict[tuple[int, str], list[float]]:
    torch.manual_seed(seed)
    model, tokenizer = synthetic.load_warm_model(cache)
    train_rows, _ = synthetic.make_prompts()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    history, errors = [copy.deepcopy(model)], {}
    for step in range(steps):
        rows = [train_rows[i] for i in torch.randint(len(train_rows), (16,), generator=generator)]
        if step >= max(STALENESS) and step % 4 == 0:
            truth = true_entropy(model, tokenizer, rows * 4)
            for staleness in STALENESS:
                for name, value in estimates(model, tokenizer, history[-1 - staleness], rows).items():
                    errors.setdefault((staleness, name), []).append(value - truth)
        samples = sample_responses(HFEngine(model, tokenizer), tokenizer, rows, 8, 1.0, 1.0, 3, _seed())
        rewards = score_samples(samples, synthetic.reward_func)
        groups = [rewards[g * 8:(g + 1) * 8] for g in range(len(rows))]
        for sample, advantage in zip(samples, [a for g in compute_advantages(groups) for a in g], strict=True):
            sample.advantage = advantage
        batch = collate(samples, tokenizer.pad_token_id)
        log_probs, _ = policy_outputs(model, batch, 1.0, 1024)
        loss, _ = entropic_policy_loss(log_probs, batch["behavior_log_probs"], batch["advantages"], batch["mask"], 0.0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history = (history + [copy.deepcopy(model)])[-(max(STALENESS) + 1):]
    return errors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--learning-rates", default="2e-3,1e-2", help="The preset's and a faster-drifting one.")
    parser.add_argument("--warm-start-cache", default=str(synthetic.DEFAULT_CACHE))
    args = parser.parse_args()
    torch.set_num_threads(1)
    table = []
    for lr in (float(x) for x in args.learning_rates.split(",")):
        pooled: dict[tuple[int, str], list[float]] = {}
        for seed in range(args.seeds):
            for key, values in run(lr, seed, args.steps, args.warm_start_cache).items():
                pooled.setdefault(key, []).extend(values)
        for (staleness, name), values in sorted(pooled.items()):
            mean = sum(values) / len(values)
            std = math.sqrt(sum((v - mean) ** 2 for v in values) / max(1, len(values) - 1))
            rmse = math.sqrt(sum(v * v for v in values) / len(values))
            table.append({"lr": lr, "staleness": staleness, "estimator": name, "bias": mean, "std": std,
                          "rmse": rmse, "n": len(values)})
    print(json.dumps(table, indent=1))


if __name__ == "__main__":
    main()
