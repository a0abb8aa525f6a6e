"""Tasks: prompts, a model to start from, and verifiable rewards."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

# reward_func(queries, prompts, labels) -> one float per query (OpenRLHF's reward-file signature);
# a correct_fn has the same inputs and returns one bool per query.
RewardFn = Callable[[list[str], list[str], list[str]], list[float]]
CorrectFn = Callable[[list[str], list[str], list[str]], list[bool]]


@dataclass
class Task:
    """What a run trains on. Rows are {"prompt": str, "label": str}; every callable must pickle (Ray ships it)."""

    model_factory: Callable[[], tuple]  # () -> (Hugging Face causal LM, its tokenizer)
    reward_fn: RewardFn
    correct_fn: CorrectFn  # the verdicts behind pass@k
    train_rows: list[dict]
    eval_rows: list[dict]
    dropped_prompts: int = 0  # rows left out for being longer than --prompt-max-len
