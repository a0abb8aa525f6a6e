"""Example reward file for `examples/data/toy_prompts.jsonl`: 1.0 when the answer is the label.

OpenRLHF's convention: `reward_func(queries, prompts, labels)`, where a query is the prompt
followed by the model's response. It returns a dict whose "rewards" are one float per query.
"""

import re

import torch


def reward_func(queries, prompts, labels):
    rewards = []
    for query, prompt, label in zip(queries, prompts, labels, strict=True):
        response = query[len(prompt) :] if query.startswith(prompt) else query
        numbers = re.findall(r"-?\d+", response)
        # The first number of the response is the answer; anything after it is ignored.
        rewards.append(1.0 if numbers and numbers[0] == label.strip() else 0.0)
    rewards = torch.tensor(rewards)
    return {"rewards": rewards, "scores": rewards, "extra_logs": {}}
