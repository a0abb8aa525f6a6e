"""Countdown: a reasoning-shaped embedded task, with a tiny model.

A prompt gives 3-4 numbers and a target, e.g. "2 5 7 9 -> 23 =". A response is an arithmetic
expression over some of the numbers, each used at most once, that equals the target exactly:
"2 * 9 + 5 <eos>", "7 * 2 + 9 <eos>" or "9 + 7 + 5 + 2 <eos>". Unlike the letter-pair task,
correctness takes a computation the model can get wrong, most prompts have many correct
expressions of different shapes, and a short supervised warm start leaves the solve rate far
from saturated, so pass@1 and pass@k both have room to move under RL.

Everything is built locally, as for `synthetic`: a word-level tokenizer over numbers, operators and
parentheses, a Llama model from a config, and seeded prompts. The verifier parses the response
with a small recursive-descent parser and exact Fraction arithmetic; it never evaluates model text
as Python and returns False on any malformed input.
"""

from __future__ import annotations

import functools
import math
import os
import random
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from fractions import Fraction
from pathlib import Path

import torch

# Shared by all runs on the machine (as for synthetic); file names carry a hash of the settings.
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "openrlhf_entropic"
NUMBER_MAX = 10  # given numbers are 1..NUMBER_MAX (repeats allowed)
TARGET_MAX = 30  # targets are at most TARGET_MAX; the vocabulary holds every number 1..TARGET_MAX
SET_SIZES = (3, 4)  # numbers per prompt
NUM_TRAIN = 4000  # rows drawn before the eval sets are held out (~3.9k train rows remain)
WARM_BATCH_SIZE = 128
PAD, EOS, ARROW, EQUALS = "<pad>", "<eos>", "->", "="
OPERATORS = "+-*/"
MODEL_CONFIG = {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 3, "num_attention_heads": 4}
MAX_POSITIONS = 64  # prompt (<= 7 tokens) + response (<= 16 new tokens) with room to spare
MAX_DEPTH = 16  # parenthesis nesting the parser accepts; deeper input is malformed, not a RecursionError

# Tokens of a response: canonical numbers, operators, parentheses; any other character is malformed.
_TOKEN = re.compile(r"\s*(?:(0|[1-9][0-9]*)|([-+*/()])|(\S))")
# A special token's text (<eos>, </s>, <|im_end|>): the response ends at the first one.
_SPECIAL = re.compile(r"<[^<>\s]*>")


class _Malformed(Exception):
    """Raised inside the parser; `evaluate` turns it into None."""


# ---------------------------------------------------------------- verifier


def tokenize_expression(text: str) -> list[str] | None:
    """Split expression text into number, operator and parenthesis tokens; None if anything else occurs.

    Spaces are optional ("(25+3)*2" works), so a reward file can score any model's text.
    """
    tokens, position = [], 0
    text = text.rstrip()
    while position < len(text):
        match = _TOKEN.match(text, position)
        if match is None or match.group(3) is not None:
            return None
        tokens.append(match.group(1) or match.group(2))
        position = match.end()
    return tokens


def evaluate(expression: str | Sequence[str], numbers: Iterable[int]) -> Fraction | None:
    """Exact value of `expression` (text or tokens) if it is well formed over `numbers`, else None.

    Grammar: expr := term (("+" | "-") term)*, term := factor (("*" | "/") factor)*,
    factor := NUMBER | "(" expr ")". Each given number is used at most once (a multiset: a number
    given twice may appear twice); division by zero and an empty expression are malformed.
    """
    tokens = tokenize_expression(expression) if isinstance(expression, str) else list(expression)
    if not tokens:
        return None
    # Compare number tokens as strings: no int() on arbitrary model text (huge digit strings raise).
    available = Counter(str(int(number)) for number in numbers)
    position = 0

    def peek():
        return tokens[position] if position < len(tokens) else None

    def take():
        nonlocal position
        position += 1
        return tokens[position - 1]

    def expr(depth):
        value = term(depth)
        while peek() in ("+", "-"):
            right = term(depth) if take() == "+" else -term(depth)
            value += right
        return value

    def term(depth):
        value = factor(depth)
        while peek() in ("*", "/"):
            if take() == "*":
                value *= factor(depth)
            else:
                divisor = factor(depth)
                if divisor == 0:
                    raise _Malformed
                value /= divisor
        return value

    def factor(depth):
        token = peek()
        if token == "(":
            if depth >= MAX_DEPTH:
                raise _Malformed
            take()
            value = expr(depth + 1)
            if peek() != ")":
                raise _Malformed
            take()
            return value
        if isinstance(token, str) and available[token] > 0:
            available[take()] -= 1
            return Fraction(int(token))
        raise _Malformed  # an operator, ")", an unknown or used-up number, or the end

    try:
        value = expr(0)
    except _Malformed:
        return None
    return value if position == len(tokens) else None


def verify(expression: str | Sequence[str], numbers: Iterable[int], target: int | Fraction) -> bool:
    """True when `expression` (text or tokens) is well formed over `numbers` and equals `target` exactly."""
    value = evaluate(expression, numbers)
    return value is not None and value == target


def parse_label(label: str) -> tuple[list[int], int]:
    """"3 7 25 50 -> 28" -> ([3, 7, 25, 50], 28); ValueError on a malformed label (a data error)."""
    left, arrow, right = label.partition(ARROW)
    try:
        numbers, target = [int(token) for token in left.split()], int(right)
    except ValueError:
        numbers, target = [], None
    if not arrow or not numbers or target is None:
        raise ValueError(f"countdown label must look like '3 7 25 50 -> 28', got {label!r}")
    return numbers, target


def response_expression(query: str, prompt: str) -> str:
    """The response of `query` (query minus prompt, if it starts with it) up to its first special token."""
    response = query[len(prompt):] if query.startswith(prompt) else query
    return _SPECIAL.split(response, maxsplit=1)[0]


def is_correct(queries: list[str], prompts: list[str], labels: list[str]) -> list[bool]:
    """True when the response (query minus prompt, cut at EOS) is a correct expression for the label.

    Same convention as `synthetic.is_correct`; a malformed label raises ValueError.
    """
    verdicts = []
    for query, prompt, label in zip(queries, prompts, labels, strict=True):
        numbers, target = parse_label(label)
        verdicts.append(verify(response_expression(query, prompt), numbers, target))
    return verdicts


def reward_func(queries: list[str], prompts: list[str], labels: list[str]) -> list[float]:
    """1.0 for a correct response, else 0.0 (deterministic). Same signature as an OpenRLHF reward file."""
    return [float(ok) for ok in is_correct(queries, prompts, labels)]


# ---------------------------------------------------------------- solutions

# Generation and the warm start use the classic rules (every intermediate a positive integer):
# fewer values to track, so enumeration is fast, and each such solution also verifies exactly.


def _combine(a: int, b: int):
    """(value, op, left, right) for every classic-rule combination of two values."""
    yield a + b, "+", a, b
    yield a * b, "*", a, b
    if a > b:
        yield a - b, "-", a, b
    elif b > a:
        yield b - a, "-", b, a
    if b > 1 and a % b == 0:
        yield a // b, "/", a, b
    if a > 1 and a != b and b % a == 0:
        yield b // a, "/", b, a


def solution_counts(numbers: Sequence[int]) -> list[Counter]:
    """Classic-rule expressions over each subset of `numbers`, counted by value: `result[mask][value]`.

    `mask` is a bit mask over indices of `numbers`; operand order of + and * is not counted twice.
    """
    return [Counter(counts) for counts in _solution_counts(tuple(numbers))]


@functools.lru_cache(maxsize=4096)  # the warm start asks for the same number sets over and over
def _solution_counts(numbers: tuple[int, ...]) -> tuple[Counter, ...]:
    size = len(numbers)
    counts: list[Counter] = [Counter() for _ in range(1 << size)]
    for mask in range(1, 1 << size):
        if mask & (mask - 1) == 0:
            counts[mask][numbers[mask.bit_length() - 1]] = 1
            continue
        low = mask & -mask  # splits (sub, rest) with the lowest index in sub: each unordered split once
        sub = (mask - 1) & mask
        while sub:
            if sub & low:
                rest = mask ^ sub
                for a, ways_a in counts[sub].items():
                    for b, ways_b in counts[rest].items():
                        for value, *_ in _combine(a, b):
                            counts[mask][value] += ways_a * ways_b
            sub = (sub - 1) & mask
    return tuple(counts)


def sample_solution(numbers: Sequence[int], target: int, rng: random.Random) -> str | None:
    """A random classic-rule expression (space-separated tokens) over `numbers` equal to `target`, or None.

    Top down: pick a subset size, then a subset of that size that reaches the target, then a random
    split and operation whose two sides are reachable, and recurse. Every size is equally likely, so
    short solutions are not drowned out by the many long ones; any shape can come out.
    """
    values = _solution_counts(tuple(numbers))

    def build(mask: int, value: int) -> tuple[str, int]:  # (text, precedence: 0 for + -, 1 for * /, 2 atom)
        if mask & (mask - 1) == 0:
            return str(value), 2
        choices = []
        sub = (mask - 1) & mask
        while sub:
            rest = mask ^ sub
            for a in values[sub]:
                for b in values[rest]:
                    choices.extend((sub, rest, op, a, b) for result, op, left, _ in _combine(a, b)
                                   if result == value and left == a)
            sub = (sub - 1) & mask
        sub, rest, op, a, b = rng.choice(choices)
        (left, left_prec), (right, right_prec) = build(sub, a), build(rest, b)
        prec = 0 if op in "+-" else 1
        left = f"( {left} )" if left_prec < prec else left
        # a - (b + c) and a / (b * c) need parentheses; a + (b - c) and a * (b / c) do not.
        right = f"( {right} )" if right_prec < prec or (right_prec == prec and op in "-/") else right
        return f"{left} {op} {right}", prec

    masks = [mask for mask in range(1, 1 << len(numbers)) if target in values[mask]]
    if not masks:
        return None
    size = rng.choice(sorted({mask.bit_count() for mask in masks}))
    return build(rng.choice([mask for mask in masks if mask.bit_count() == size]), target)[0]


# ---------------------------------------------------------------- prompts


def make_prompts(num_eval: int = 64, seed: int = 1234, num_train: int = NUM_TRAIN) -> tuple[list[dict], list[dict]]:
    """Seeded, solvable prompts as rows {"prompt": "2 5 7 9 -> 23 =", "label": "2 5 7 9 -> 23"}: (train, eval).

    Numbers (sorted, repeats allowed) are drawn from 1..NUMBER_MAX. The target is one of the values
    in 2..TARGET_MAX, other than the numbers themselves, that enumeration finds reachable, drawn
    with weight = its number of expressions: prompts with many solutions are common, as intended.
    Rows are distinct; eval rows (`num_eval` of them) use number sets that no train row uses.
    """
    rng = random.Random(seed)
    cache: dict[tuple[int, ...], dict[int, int]] = {}  # number set -> {target: number of expressions}
    rows, seen = [], set()
    for _ in range(100 * (num_train + num_eval)):  # bounded: ask for more rows than exist and it raises
        if len(rows) == num_train + num_eval:
            break
        numbers = tuple(sorted(rng.randint(1, NUMBER_MAX) for _ in range(rng.choice(SET_SIZES))))
        if numbers not in cache:
            total = sum(_solution_counts(numbers), Counter())
            cache[numbers] = {v: n for v, n in sorted(total.items()) if 2 <= v <= TARGET_MAX and v not in numbers}
        if not cache[numbers]:
            continue
        target = rng.choices(list(cache[numbers]), weights=list(cache[numbers].values()))[0]
        label = " ".join(map(str, numbers)) + f" {ARROW} {target}"
        if label not in seen:
            seen.add(label)
            rows.append((numbers, {"prompt": f"{label} {EQUALS}", "label": label}))
    if len(rows) < num_train + num_eval:
        raise ValueError(f"make_prompts: could not draw {num_train + num_eval} distinct prompts")
    # Hold out whole number sets, so eval measures solving new sets, not recalling seen ones.
    sets = sorted({numbers for numbers, _ in rows})
    random.Random(seed + 1).shuffle(sets)
    eval_sets, eval_rows = set(), []
    for numbers in sets:
        if len(eval_rows) >= num_eval:
            break
        eval_sets.add(numbers)
        eval_rows.extend(row for key, row in rows if key == numbers)
    train_rows = [row for key, row in rows if key not in eval_sets]
    return train_rows, eval_rows[:num_eval]


# ---------------------------------------------------------------- tokenizer and model


def vocabulary() -> list[str]:
    """The task's tokens in id order: pad, eos, the numbers 1..TARGET_MAX, operators, parentheses, "->", "="."""
    return [PAD, EOS, *(str(n) for n in range(1, TARGET_MAX + 1)), *OPERATORS, "(", ")", ARROW, EQUALS]


def build_tokenizer():
    """A word-level `PreTrainedTokenizerFast` over `vocabulary()` (split on spaces, left padding)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    vocab = {token: index for index, token in enumerate(vocabulary())}
    core = Tokenizer(WordLevel(vocab, unk_token=PAD))
    core.pre_tokenizer = WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token=PAD, eos_token=EOS)
    tokenizer.padding_side = "left"  # generation pads prompts on the left
    return tokenizer


def build_model(tokenizer, seed: int = 0):
    """A ~500k-parameter LlamaForCausalLM from `MODEL_CONFIG` (nothing downloaded).

    head_dim is 128 / 4 = 32: vLLM's CPU attention kernel rejects 16.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        num_key_value_heads=MODEL_CONFIG["num_attention_heads"],
        max_position_embeddings=MAX_POSITIONS,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
        **MODEL_CONFIG,
    )
    return LlamaForCausalLM(config)


# ---------------------------------------------------------------- warm start


def warm_start(model, tokenizer, train_rows: list[dict], steps: int = 300, lr: float = 4e-3, seed: int = 0,
               batch_size: int = WARM_BATCH_SIZE, losses: list[float] | None = None):
    """Brief supervised fine-tuning on random correct solutions (loss on response tokens only).

    Each step draws `batch_size` train rows and one random solution each; sequences are right-padded
    to [batch, longest] with the padding masked out. Kept short on purpose: the policy learns the
    format and some arithmetic, solving some prompts but not all, and stays spread over solutions.
    Returns the model, in eval mode, like `synthetic.warm_start`; each step's loss is appended to
    `losses` when a list is given.
    """
    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    # Warmup then cosine decay: at a few hundred steps it learns far more than a constant rate.
    warmup = max(1, steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(
        (step + 1) / warmup, 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps))))
    parsed = {row["label"]: parse_label(row["label"]) for row in train_rows}
    losses = [] if losses is None else losses
    model.train()
    for _ in range(steps):
        sequences, prompt_lengths = [], []
        for row in rng.sample(train_rows, batch_size):
            solution = sample_solution(*parsed[row["label"]], rng)
            if solution is None:
                raise ValueError(f"warm_start: no solution for {row['label']!r}; train rows must be solvable")
            sequences.append(tokenizer.convert_tokens_to_ids(f"{row['prompt']} {solution} {EOS}".split()))
            prompt_lengths.append(len(row["prompt"].split()))
        width = max(map(len, sequences))
        ids = torch.full((len(sequences), width), tokenizer.pad_token_id)
        labels = torch.full_like(ids, -100)
        attention = torch.zeros_like(ids)
        for index, (sequence, length) in enumerate(zip(sequences, prompt_lengths, strict=True)):
            ids[index, :len(sequence)] = torch.tensor(sequence)
            labels[index, length:len(sequence)] = ids[index, length:len(sequence)]
            attention[index, :len(sequence)] = 1
        loss = model(input_ids=ids, attention_mask=attention, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    model.eval()
    return model


def load_warm_model(cache_dir: str | Path, seed: int = 0, steps: int = 300, lr: float = 4e-3):
    """Return (model, tokenizer) after the warm start, cached under `cache_dir` (see `cached_warm_start`).

    The cache key also holds the task's ranges, so a change of the prompt set never loads stale weights.
    """
    from openrlhf_entropic.tasks import cached_warm_start

    def build():
        tokenizer = build_tokenizer()
        return build_model(tokenizer, seed=seed), tokenizer

    settings = {"task": "countdown", "model": MODEL_CONFIG, "seed": seed, "steps": steps, "lr": lr,
                "batch": WARM_BATCH_SIZE, "numbers": NUMBER_MAX, "targets": TARGET_MAX, "sizes": SET_SIZES,
                "train": NUM_TRAIN}
    return cached_warm_start(cache_dir, "countdown_warm_start", settings, build, lambda model, tokenizer: warm_start(
        model, tokenizer, make_prompts()[0], steps=steps, lr=lr, seed=seed))
