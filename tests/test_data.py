"""Dataset loading, reward-function files and pass@k."""

import json
import math
from itertools import combinations
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from openrlhf_entropic.tasks.data import load_prompts, load_reward_func, pass_at_k

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_shipped_toy_dataset_and_reward_file_agree():
    prompts = load_prompts(EXAMPLES / "data" / "toy_prompts.jsonl")
    assert len(prompts) == 8
    reward_func = load_reward_func(EXAMPLES / "python" / "toy_reward_func.py")
    queries = [p["prompt"] + p["label"] for p in prompts]  # every answer right
    queries[0] = prompts[0]["prompt"] + "999"  # one wrong
    rewards = reward_func(queries, [p["prompt"] for p in prompts], [p["label"] for p in prompts])
    assert rewards == [0.0] + [1.0] * 7


def test_jsonl_custom_keys_and_blank_lines(tmp_path):
    path = write_lines(
        tmp_path / "d.jsonl",
        [json.dumps({"question": "1+1=", "answer": "2", "extra": 3}), "", json.dumps({"question": "q", "answer": "a"})],
    )
    assert load_prompts(path, input_key="question", label_key="answer") == [
        {"prompt": "1+1=", "label": "2"},
        {"prompt": "q", "label": "a"},
    ]


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ('{"input": "x", "label": ', "invalid JSON"),
        ('["input", "label"]', "expected a JSON object"),
        ('{"input": "x"}', "missing key 'label'"),
        ('{"input": "x", "label": 3}', "'label' must be a string, got int"),
        ('{"input": null, "label": "3"}', "'input' must be a string, got NoneType"),
    ],
)
def test_malformed_jsonl_row_names_file_and_line(tmp_path, bad_line, message):
    good = json.dumps({"input": "a", "label": "b"})
    path = write_lines(tmp_path / "bad.jsonl", [good, "", bad_line, good])
    with pytest.raises(ValueError, match=message) as info:
        load_prompts(path)
    assert f"{path}:line 3:" in str(info.value)


def test_empty_missing_and_unknown_files_are_errors(tmp_path):
    with pytest.raises(ValueError, match="no rows"):
        load_prompts(write_lines(tmp_path / "empty.jsonl", ["", "  "]))
    with pytest.raises(FileNotFoundError, match="not found"):
        load_prompts(tmp_path / "absent.jsonl")
    (tmp_path / "d.csv").write_text("input,label\n")
    with pytest.raises(ValueError, match="unknown dataset format"):
        load_prompts(tmp_path / "d.csv")


def test_parquet_rows_and_bad_row(tmp_path):
    good = tmp_path / "good.parquet"
    pq.write_table(pa.table({"input": ["p1", "p2"], "label": ["l1", "l2"], "other": [1, 2]}), good)
    assert load_prompts(good) == [{"prompt": "p1", "label": "l1"}, {"prompt": "p2", "label": "l2"}]

    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"input": ["p1", None], "label": ["l1", "l2"]}), bad)
    with pytest.raises(ValueError, match=r"bad\.parquet:row 2: 'input' must be a string"):
        load_prompts(bad)

    no_label = tmp_path / "no_label.parquet"
    pq.write_table(pa.table({"input": ["p1"]}), no_label)
    with pytest.raises(ValueError, match=r"row 1: missing key 'label'"):
        load_prompts(no_label)


def test_reward_func_return_shapes(tmp_path):
    path = tmp_path / "r.py"
    path.write_text(
        "import torch\n"
        "def reward_func(queries, prompts, labels):\n"
        "    kind = labels[0]\n"
        "    if kind == 'list':\n        return [1, 0.5]\n"
        "    if kind == 'tensor':\n        return torch.tensor([[1.0], [float('nan')]])\n"
        "    if kind == 'short':\n        return [1.0]\n"
        "    if kind == 'nodict':\n        return {'scores': [1.0, 1.0]}\n"
        "    return ['a', 'b']\n"
    )
    reward_func = load_reward_func(path)
    assert reward_func(["a", "b"], ["", ""], ["list", ""]) == [1.0, 0.5]
    rewards = reward_func(["a", "b"], ["", ""], ["tensor", ""])
    assert rewards[0] == 1.0 and math.isnan(rewards[1])  # NaN reaches the runtime, which drops and counts it
    with pytest.raises(ValueError, match="1 rewards for 2 queries"):
        reward_func(["a", "b"], ["", ""], ["short", ""])
    with pytest.raises(ValueError, match="without a 'rewards' entry"):
        reward_func(["a", "b"], ["", ""], ["nodict", ""])
    with pytest.raises(ValueError, match="must return numbers"):
        reward_func(["a", "b"], ["", ""], ["text", ""])


def test_reward_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="reward function file not found"):
        load_reward_func(tmp_path / "absent.py")
    path = tmp_path / "no_func.py"
    path.write_text("def reward(q, p, l):\n    return [0.0]\n")
    with pytest.raises(ValueError, match="must define a function reward_func"):
        load_reward_func(path)


def test_pass_at_k_matches_the_definition():
    # One prompt, n=4, c=1: pass@1 = 1/4; pass@2 = 1 - C(3,2)/C(4,2) = 1/2.
    assert pass_at_k([[True, False, False, False]], 1) == pytest.approx(0.25)
    assert pass_at_k([[True, False, False, False]], 2) == pytest.approx(0.5)
    # Averaged over prompts; a prompt with n - c < k always passes.
    assert pass_at_k([[True, True, True, False], [False] * 4], 2) == pytest.approx(0.5)
    # Brute force: probability that a random k-subset holds a correct sample.
    verdicts = [True, False, True, False, False, False]
    subsets = list(combinations(verdicts, 3))
    assert pass_at_k([verdicts], 3) == pytest.approx(sum(any(s) for s in subsets) / len(subsets))
    assert pass_at_k([verdicts], 6) == 1.0  # k = n: some sample of the full set is correct


def test_pass_at_k_bad_input():
    with pytest.raises(ValueError, match="fewer than k=3"):
        pass_at_k([[True, False]], 3)
    with pytest.raises(ValueError, match="no prompts"):
        pass_at_k([], 1)
    with pytest.raises(ValueError, match="k must be >= 1"):
        pass_at_k([[True]], 0)
