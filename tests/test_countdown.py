import itertools
import random
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from openrlhf_entropic.tasks import countdown
from openrlhf_entropic.tasks.data import load_reward_func

REWARD_FILE = Path(__file__).resolve().parents[1] / "examples" / "python" / "countdown_reward_func.py"
NUMBER_SETS = st.lists(st.integers(1, countdown.NUMBER_MAX), min_size=3, max_size=4)


def brute_force_values(numbers: list[int]) -> set[Fraction]:
    """Every value of an expression over a subset of `numbers` (Fractions, no rules on intermediates).

    Independent of the module's enumeration: repeatedly replace two values by one combination.
    """
    found = set()

    def search(values):
        found.update(values)
        for i, j in itertools.permutations(range(len(values)), 2):
            a, b = values[i], values[j]
            rest = [v for k, v in enumerate(values) if k not in (i, j)]
            for value in (a + b, a - b, a * b, a / b if b else None):
                if value is not None:
                    search([*rest, value])

    search([Fraction(n) for n in numbers])
    return found


@pytest.mark.parametrize(("expression", "numbers", "target", "expected"), [
    ("25 + 3", [3, 7, 25, 50], 28, True),
    ("3 + 25", [3, 7, 25, 50], 28, True),
    ("50 - 25 + 3", [3, 7, 25, 50], 28, True),
    ("( 50 - 25 ) + 3", [3, 7, 25, 50], 28, True),
    ("(50-25)+3", [3, 7, 25, 50], 28, True),  # spaces are optional
    ("7 * ( 50 / 25 + 3 ) - 7", [3, 7, 7, 25, 50], 28, True),  # a repeated number may be used twice
    ("6 / ( 1 - 3 / 4 )", [1, 3, 4, 6], 24, True),  # exact fractions in between
    ("28", [3, 28], 28, True),  # a subset, here of one number, is allowed
    ("25 + 7", [3, 7, 25, 50], 28, False),  # wrong value
    ("50 / 2", [3, 7, 25, 50], 25, False),  # 2 is not given
    ("9 + 9 + 5", [5, 9], 23, False),  # 9 used twice but given once
    ("9 + 9 + 5", [5, 9, 9], 23, True),
    ("5 / ( 2 - 2 )", [2, 2, 5], 5, False),  # division by zero
    ("( 25 + 3", [3, 7, 25, 50], 28, False),  # unbalanced
    ("25 + 3 )", [3, 7, 25, 50], 28, False),
    (") 25 + 3 (", [3, 7, 25, 50], 28, False),
    ("( )", [3, 7, 25, 50], 28, False),
    ("+ - * /", [3, 7, 25, 50], 28, False),  # operators only
    ("25 + + 3", [3, 7, 25, 50], 28, False),
    ("- 3 + 31", [3, 31], 28, False),  # no unary minus
    ("25 3", [3, 7, 25, 50], 28, False),
    ("25 + 3 = 28", [3, 7, 25, 50], 28, False),
    ("025 + 3", [3, 7, 25, 50], 28, False),  # numbers are written canonically
    ("2.5 * 10 + 3", [3, 10, 25], 28, False),
    ("25 + x", [3, 7, 25, 50], 28, False),
    ("", [3, 7, 25, 50], 28, False),
    ("   ", [3, 7, 25, 50], 28, False),
])
def test_verifier_on_right_wrong_and_malformed_expressions(expression, numbers, target, expected):
    assert countdown.verify(expression, numbers, target) is expected
    if countdown.tokenize_expression(expression) == expression.split():  # then the token list reads the same
        assert countdown.verify(expression.split(), numbers, target) is expected


def test_verifier_survives_pathological_input():
    assert countdown.verify("(" * 5000 + "3" + ")" * 5000, [3], 3) is False  # no RecursionError
    assert countdown.verify("( ( 3 ) )", [3], 3) is True
    assert countdown.verify("9" * 10000 + " + 3", [3], 3) is False  # no int() of a huge digit string
    assert countdown.verify(["3", None, 4, ["+"]], [3], 3) is False
    assert countdown.verify(["3", "+", " 4"], [3, 4], 7) is False  # token lists are taken as they are


def test_is_correct_reads_the_response_up_to_eos_and_rewards_are_exact():
    prompt, label = "2 5 7 9 -> 23 =", "2 5 7 9 -> 23"
    responses = ["2 * 9 + 5 <eos>", "2 * 9 + 5 <eos> <pad> <pad>", "2 * 9 + 5", "2 * 9 + 5 <eos> + 7",
                 "2 * 9 + 7 <eos>", "<eos>", "", "2 * 9 <pad> + 5 <eos>"]
    queries = [f"{prompt} {response}" for response in responses]
    expected = [True, True, True, True, False, False, False, False]
    assert countdown.is_correct(queries, [prompt] * 8, [label] * 8) == expected
    assert countdown.reward_func(queries, [prompt] * 8, [label] * 8) == [float(ok) for ok in expected]
    with pytest.raises(ValueError, match="label"):
        countdown.is_correct([queries[0]], [prompt], ["2 5 7 9 23"])


@settings(max_examples=150, deadline=None)
@given(numbers=NUMBER_SETS, data=st.data())
def test_every_sampled_solution_verifies(numbers, data):
    reachable = sorted(set().union(*countdown.solution_counts(numbers)))
    target = data.draw(st.sampled_from(reachable))
    solution = countdown.sample_solution(numbers, target, random.Random(data.draw(st.integers(0, 2**32))))
    assert countdown.verify(solution, numbers, target)
    assert countdown.verify(solution.split(), numbers, target)
    assert countdown.sample_solution(numbers, -1, random.Random(0)) is None  # classic rules: never negative


@settings(max_examples=300, deadline=None)
@given(tokens=st.lists(st.sampled_from(countdown.vocabulary()) | st.text(max_size=4), max_size=20),
       numbers=NUMBER_SETS, target=st.integers(-5, 60))
def test_random_token_strings_never_crash_the_verifier(tokens, numbers, target):
    text = " ".join(tokens)
    for expression in (text, tokens):
        value = countdown.evaluate(expression, numbers)
        assert value is None or isinstance(value, Fraction)
        assert countdown.verify(expression, numbers, target) is (value == target)
    label = " ".join(map(str, numbers)) + f" -> {target}"
    (verdict,) = countdown.is_correct([f"p = {text}"], ["p ="], [label])
    assert isinstance(verdict, bool)
    if "<" not in text.replace(countdown.EOS, ""):  # then the response ends at the first <eos>, if any
        assert verdict is countdown.verify(text.split(countdown.EOS)[0], numbers, target)


@settings(max_examples=300, deadline=None)
@given(text=st.text(max_size=40), numbers=NUMBER_SETS, target=st.integers(-5, 60))
def test_arbitrary_text_never_crashes_the_verifier(text, numbers, target):
    assert countdown.verify(text, numbers, target) in (True, False)


def test_prompt_split_is_deterministic_disjoint_and_solvable():
    train, held_out = countdown.make_prompts()
    assert (train, held_out) == countdown.make_prompts()
    assert countdown.make_prompts(seed=7) != (train, held_out)
    assert len(held_out) == 64 and len(train) > 3000
    rows = train + held_out
    assert len({row["label"] for row in rows}) == len(rows)
    assert all(row["prompt"] == row["label"] + " =" for row in rows)
    sets = lambda split: {tuple(countdown.parse_label(row["label"])[0]) for row in split}  # noqa: E731
    assert not sets(train) & sets(held_out)  # whole number sets are held out
    rng = random.Random(0)
    for row in rows:
        numbers, target = countdown.parse_label(row["label"])
        assert len(numbers) in countdown.SET_SIZES and numbers == sorted(numbers)
        assert 2 <= target <= countdown.TARGET_MAX and target not in numbers
        assert countdown.verify(countdown.sample_solution(numbers, target, rng), numbers, target)
    for row in held_out[:16]:  # an independent brute force agrees that eval prompts are solvable
        numbers, target = countdown.parse_label(row["label"])
        assert target in brute_force_values(numbers)


def test_reward_file_matches_the_verifier():
    reward_file = load_reward_func(REWARD_FILE)
    train, held_out = countdown.make_prompts()
    rng = random.Random(1)
    queries, prompts, labels = [], [], []
    for row in rng.sample(train, 40) + held_out[:10]:
        numbers, target = countdown.parse_label(row["label"])
        solution = countdown.sample_solution(numbers, target, rng)
        other = rng.choice(train)["label"].split(" -> ")[0].replace(" ", " + ")  # well formed or not, mostly wrong
        for response in (solution, other, solution + " +", solution.replace(" ", ""), "( " + solution):
            queries.append(f"{row['prompt']} {response} <eos>")
            prompts.append(row["prompt"])
            labels.append(row["label"])
    rewards = reward_file(queries, prompts, labels)
    expected = countdown.reward_func(queries, prompts, labels)
    assert rewards == expected and 0 < sum(expected) < len(expected)


def test_tokenizer_round_trips_prompts_and_a_solution():
    tokenizer = countdown.build_tokenizer()
    train, held_out = countdown.make_prompts()
    numbers, target = countdown.parse_label(held_out[0]["label"])
    solution = countdown.sample_solution(numbers, target, random.Random(0))
    for text in [row["prompt"] for row in train[:50] + held_out] + [f"{held_out[0]['prompt']} {solution} <eos>"]:
        ids = tokenizer(text)["input_ids"]
        assert tokenizer.decode(ids) == text and tokenizer.pad_token_id not in ids
    assert len(tokenizer) == len(countdown.vocabulary()) and tokenizer.padding_side == "left"
    every_symbol = "( 7 - 5 ) * 9 / 3 + 1 -> 30 ="
    ids = tokenizer(every_symbol)["input_ids"]
    assert ids == tokenizer.convert_tokens_to_ids(every_symbol.split()) and tokenizer.pad_token_id not in ids


def held_out_loss(model, tokenizer, rows: list[dict]) -> float:
    """Mean cross-entropy of random correct solutions (response tokens only) for `rows`."""
    rng, losses = random.Random(0), []
    with torch.no_grad():
        for row in rows:
            solution = countdown.sample_solution(*countdown.parse_label(row["label"]), rng)
            prompt_length = len(tokenizer(row["prompt"])["input_ids"])
            ids = torch.tensor([tokenizer(f"{row['prompt']} {solution} <eos>")["input_ids"]])
            labels = ids.clone()
            labels[0, :prompt_length] = -100
            losses.append(model(input_ids=ids, labels=labels).loss.item())
    return sum(losses) / len(losses)


@pytest.fixture
def one_thread():
    # A model this small trains fastest on one thread; on a busy machine more threads only contend.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_warm_start_lowers_the_loss_and_is_cached(tmp_path, one_thread):
    torch.manual_seed(0)
    tokenizer = countdown.build_tokenizer()
    model = countdown.build_model(tokenizer, seed=0)
    config = model.config
    assert config.hidden_size // config.num_attention_heads >= 32 and config.tie_word_embeddings
    train, held_out = countdown.make_prompts()
    before = held_out_loss(model, tokenizer, held_out[:32])
    losses = []
    assert countdown.warm_start(model, tokenizer, train, steps=40, lr=4e-3, seed=0, batch_size=32,
                                losses=losses) is model
    assert len(losses) == 40 and sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5
    assert not model.training
    assert held_out_loss(model, tokenizer, held_out[:32]) < 0.7 * before  # it learned solutions, not noise

    warm, _ = countdown.load_warm_model(tmp_path, steps=2)
    (cached,) = list(tmp_path.glob("*.safetensors"))
    again, _ = countdown.load_warm_model(tmp_path, steps=2)
    assert all(torch.equal(a, b) for a, b in zip(warm.state_dict().values(), again.state_dict().values(),
                                                 strict=True))
    assert len(list(tmp_path.iterdir())) == 1 and cached.exists()
