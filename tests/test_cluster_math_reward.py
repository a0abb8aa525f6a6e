"""Math answer checking, and the reward file loaded and called the way OpenRLHF 0.11.2 does it."""

from __future__ import annotations

import asyncio
from pathlib import Path

import cluster_standins  # noqa: F401  (must precede every openrlhf import)
import pytest
import torch

from openrlhf_entropic.tasks.math_answer import answers_match, extract_answer, normalize_answer, score_response

REWARD_FILE = Path(__file__).resolve().parents[1] / "examples" / "python" / "math_reward_func.py"


@pytest.mark.parametrize(
    ("text", "answer"),
    [
        ("so \\boxed{12}.", "12"),
        ("first \\boxed{1} then \\boxed{\\frac{3}{4}}", "\\frac{3}{4}"),
        ("\\boxed{\\{1, 2\\}} done", "\\{1, 2\\}"),
        ("The final answer is 42<|im_end|>", "42"),
        ("Answer: $x = 3$\n", "$x = 3$"),
        ("work\n#### 1,250", "1,250"),
        ("no answer here", None),
        ("unclosed \\boxed{12", None),
    ],
)
def test_extract_answer(text, answer):
    assert extract_answer(text) == answer


@pytest.mark.parametrize(
    ("predicted", "reference", "same"),
    [
        ("\\dfrac{1}{2}", "1/2", True),
        ("0.5", "\\frac{1}{2}", True),
        ("-\\frac{3}{4}", "-0.75", True),
        ("1,000", "1000", True),
        ("$90^\\circ$", "90", True),
        ("\\text{5 }", "5", True),
        ("2", "3", False),
        ("1,2", "12", False),  # a list is not a thousands separator
        ("1/0", "1/0", True),  # equal strings; no division
        ("", "0", False),
    ],
)
def test_answers_match(predicted, reference, same):
    assert answers_match(predicted, reference) is same


def test_normalize_is_light():
    assert normalize_answer(" $\\left( 1, 2 \\right)$. ") == "(1,2)"


def test_score_response_and_missing_label():
    assert score_response("thus \\boxed{7}", "\\boxed{7}") == (1.0, True)
    assert score_response("I am not sure", "7") == (0.0, False)
    with pytest.raises(ValueError, match="label_key"):
        score_response("\\boxed{7}", None)


def test_reward_file_through_openrlhfs_own_loader():
    from openrlhf.utils.agent import SingleTurnAgentExecutor

    executor = SingleTurnAgentExecutor(remote_rm_url=str(REWARD_FILE))  # importlib-loads reward_func
    prompt = "Q: 1+1? Example: \\boxed{5}\nA:"
    queries = [prompt + " It is \\boxed{2}<|im_end|>", prompt + " 3", prompt + " \\boxed{3}"]
    results = [
        asyncio.run(executor._fetch_rewards_via_func([query], [prompt], ["2"]))[0] for query in queries
    ]  # one sample per call, as the executor does
    assert [float(r["rewards"].item()) for r in results] == [1.0, 0.0, 0.0]
    assert [r["extra_logs"]["answer_found"].flatten()[0].item() for r in results] == [1.0, 0.0, 1.0]
    # samples_generator turns the reward into torch.tensor([reward]): it must be one number per sample.
    assert torch.tensor([results[0]["rewards"]]).shape == (1,)
