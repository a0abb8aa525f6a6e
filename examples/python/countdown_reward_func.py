"""Countdown reward for both runtimes (`--reward-func` embedded, `--reward.remote_url` on a cluster).

OpenRLHF's convention: `reward_func(queries, prompts, labels)`, where a query is the prompt
followed by the model's response and a label reads "3 7 9 10 -> 28" (the numbers, then the
target). The response, cut at its first special token (<eos>, </s>, <|im_end|>, ...), must be an
arithmetic expression over the numbers, each used at most once, equal to the target exactly.
Spaces are optional, so any model's text can be scored. The verifier is
`openrlhf_entropic.tasks.countdown.verify`: a small parser with Fraction arithmetic, no eval.

Returns "rewards" (1.0 correct, 0.0 otherwise), "scores" (the same, for dynamic filtering) and
`extra_logs.well_formed`: how often the response was a valid expression, right or wrong.
"""

import torch

from openrlhf_entropic.tasks.countdown import evaluate, parse_label, response_expression


def reward_func(queries, prompts, labels):
    rewards, well_formed = [], []
    for query, prompt, label in zip(queries, prompts, labels, strict=True):
        numbers, target = parse_label(label)
        value = evaluate(response_expression(query, prompt), numbers)
        rewards.append(float(value is not None and value == target))
        well_formed.append(float(value is not None))
    rewards = torch.tensor(rewards)
    return {"rewards": rewards, "scores": rewards, "extra_logs": {"well_formed": torch.tensor(well_formed)}}
