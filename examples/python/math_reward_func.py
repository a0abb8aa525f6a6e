"""Math reward for OpenRLHF 0.11.2 (`--reward.remote_url examples/python/math_reward_func.py`).

OpenRLHF loads this file in each vLLM engine actor and calls `reward_func(queries, prompts, labels)`
once per generated sample: a query is the decoded prompt + response, a label the dataset's
`--data.label_key` column. It reads `rewards` (used for advantages), `scores` (dynamic filtering)
and `extra_logs` (each logged under its key) from the returned dict.

The reward is 1.0 when the response's final answer (last \\boxed{...}, else an "answer:" line)
equals the label, 0.0 otherwise; `extra_logs.answer_found` shows how often an answer was given.
"""

import torch

from openrlhf_entropic.tasks.math_answer import score_response


def reward_func(queries, prompts, labels):
    rewards, found = [], []
    for query, prompt, label in zip(queries, prompts, labels, strict=True):
        # Score only the response, so a \boxed{} in a few-shot prompt is never taken for the answer.
        response = query[len(prompt) :] if query.startswith(prompt) else query
        reward, answer_found = score_response(response, label)
        rewards.append(reward)
        found.append(float(answer_found))
    rewards = torch.tensor(rewards)
    return {"rewards": rewards, "scores": rewards, "extra_logs": {"answer_found": torch.tensor(found)}}
