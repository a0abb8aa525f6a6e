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


def cached_warm_start(cache_dir, name: str, settings: dict, build, warm_start):
    """(model, tokenizer) after a supervised warm start, cached as `<name>_<hash of settings>.safetensors`.

    `build()` returns a fresh (model, tokenizer); `warm_start(model, tokenizer)` trains it in place.
    The hash covers every setting that shapes the weights, so a changed one never loads a stale
    file, and the file is written under another name and renamed, so a concurrent run never reads
    half of it. The tied lm_head is not stored separately.
    """
    import hashlib
    import json
    import os
    from pathlib import Path

    from safetensors.torch import load_file, save_file

    model, tokenizer = build()
    digest = hashlib.sha256(json.dumps(settings).encode()).hexdigest()[:12]
    path = Path(cache_dir) / f"{name}_{digest}.safetensors"
    if not path.exists():
        warm_start(model, tokenizer)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")  # its own name: two first runs never share one file
        save_file({key: tensor.contiguous() for key, tensor in model.state_dict().items() if key != "lm_head.weight"},
                  str(tmp))
        tmp.replace(path)
    model.load_state_dict(load_file(path), strict=False)
    model.eval()
    return model, tokenizer
