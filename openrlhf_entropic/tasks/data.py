"""Prompt datasets, reward-function files and pass@k, shared by both runtimes.

A dataset is JSONL (one JSON object a line) or parquet, with a prompt column and a label
column (`--input-key` / `--label-key`). A reward file is a Python file that defines
`reward_func(queries, prompts, labels)`, the convention OpenRLHF uses for
`--reward.remote_url path/to/file.py`, so one file serves the embedded and the cluster runtime.
"""

from __future__ import annotations

import importlib.util
import json
import math
from collections.abc import Callable
from pathlib import Path

import torch


def load_prompts(path: str | Path, input_key: str = "input", label_key: str = "label") -> list[dict]:
    """Read a JSONL or parquet dataset into `[{"prompt": str, "label": str}, ...]`.

    Blank JSONL lines are skipped. A malformed row (bad JSON, not an object, a missing key, a
    value that is not a string) raises ValueError naming the file and the 1-based line (JSONL)
    or row (parquet); so does a file with no rows.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"dataset file not found: {path}")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        where, records = "line", []
        with path.open("rb") as file:
            for number, raw in enumerate(file, start=1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as error:
                    raise ValueError(f"{path}:line {number}: not UTF-8 text ({error.reason} at byte {error.start})") from None
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    raise ValueError(f"{path}:line {number}: invalid JSON ({error.msg})") from None
                if not isinstance(record, dict):
                    raise ValueError(f"{path}:line {number}: expected a JSON object, got {type(record).__name__}")
                records.append((number, record))
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        # A missing column then fails the per-row key check below, at row 1.
        present = [key for key in (input_key, label_key) if key in table.column_names]
        where, records = "row", list(enumerate(table.select(present).to_pylist(), start=1))
    else:
        raise ValueError(f"{path}: unknown dataset format {suffix!r}; use .jsonl or .parquet")

    prompts = []
    for number, record in records:
        for key in (input_key, label_key):
            if key not in record:
                raise ValueError(f"{path}:{where} {number}: missing key {key!r} (found keys: {sorted(record)})")
            if not isinstance(record[key], str):
                kind = type(record[key]).__name__
                raise ValueError(f"{path}:{where} {number}: {key!r} must be a string, got {kind}")
        prompts.append({"prompt": record[input_key], "label": record[label_key]})
    if not prompts:
        raise ValueError(f"{path}: the dataset has no rows")
    return prompts


def load_reward_func(path: str | Path) -> Callable[[list[str], list[str], list[str]], list[float]]:
    """Load `reward_func(queries, prompts, labels)` from a Python file.

    The file is executed as code, by design: it is trusted input, like a training script. Only
    pass files you would run yourself.

    `reward_func` may return what OpenRLHF accepts: a dict with a "rewards" entry, a tensor or a
    list of numbers, one per query. The callable returned here always gives `list[float]` of
    length `len(queries)`, and raises ValueError on any other shape. NaN rewards are passed
    through unchanged: the runtime drops and counts those samples.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"reward function file not found: {path}")
    if path.suffix != ".py":
        raise ValueError(f"{path}: a reward function file must be a Python file (.py)")
    spec = importlib.util.spec_from_file_location(f"reward_file_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    user_func = getattr(module, "reward_func", None)
    if not callable(user_func):
        raise ValueError(f"{path}: the file must define a function reward_func(queries, prompts, labels)")

    def reward_func(queries: list[str], prompts: list[str], labels: list[str]) -> list[float]:
        result = user_func(queries, prompts, labels)
        if isinstance(result, dict):
            if "rewards" not in result:
                raise ValueError(f"{path}: reward_func returned a dict without a 'rewards' entry")
            result = result["rewards"]
        if isinstance(result, torch.Tensor):
            result = result.detach().float().reshape(-1).tolist()
        try:
            rewards = [float(value) for value in result]
        except (TypeError, ValueError) as error:
            raise ValueError(f"{path}: reward_func must return numbers, one per query ({error})") from None
        if len(rewards) != len(queries):
            raise ValueError(f"{path}: reward_func returned {len(rewards)} rewards for {len(queries)} queries")
        return rewards

    return reward_func


def pass_at_k(correct: list[list[bool]], k: int) -> float:
    """Unbiased pass@k, averaged over prompts: mean of 1 - C(n-c, k) / C(n, k).

    `correct[i]` holds the n >= k verdicts of the samples of prompt i, c of them True
    (Chen et al., 2021). Prompts may have different n.
    """
    if k < 1:
        raise ValueError(f"pass_at_k: k must be >= 1, got {k}")
    if not correct:
        raise ValueError("pass_at_k: no prompts given")
    total = 0.0
    for index, verdicts in enumerate(correct):
        n, c = len(verdicts), sum(bool(v) for v in verdicts)
        if n < k:
            raise ValueError(f"pass_at_k: prompt {index} has {n} samples, fewer than k={k}")
        total += 1.0 - math.comb(n - c, k) / math.comb(n, k)
    return total / len(correct)
