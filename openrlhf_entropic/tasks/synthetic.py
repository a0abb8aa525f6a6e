"""The embedded default task: pick two different letters from a set, with a tiny model.

A prompt lists 4 distinct letters out of 12, e.g. "c f k l =". Any ordered pair of two
different letters from the set is correct ("f k", "l c", ...): 12 correct answers per prompt.
After a supervised warm start on random correct answers the policy spreads over all of them
(high entropy). GRPO then rewards whichever pairs it happens to sample, and, since the
rich get richer under softmax policy gradient, entropy collapses onto a few pairs within a
few hundred steps. That is the collapse EntroPIC must prevent.

Everything is built locally: a word-level tokenizer over the 15 symbols, a Llama model from
a config, and prompts from a fixed seed (an eval split of whole letter sets is held out).
"""

from __future__ import annotations

import itertools
import os
import random
from pathlib import Path

import torch

LETTERS = "abcdefghijkl"
SET_SIZE = 4
PAD, EOS, EQUALS = "<pad>", "<eos>", "="
SUCCESS_PROB = 0.7
# Shared by all runs on the machine; the file name carries a hash of everything that shapes the weights.
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "openrlhf_entropic"
# head_dim 32: vLLM's CPU attention kernel supports 32 and up, not 16.
MODEL_CONFIG = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2}


def build_tokenizer():
    """A word-level `PreTrainedTokenizerFast` over the task's symbols (split on spaces)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    vocab = {token: index for index, token in enumerate([PAD, EOS, EQUALS, *LETTERS])}
    core = Tokenizer(WordLevel(vocab, unk_token=PAD))
    core.pre_tokenizer = WhitespaceSplit()
    # unk = pad: an unknown word must be detectable (the CLI refuses prompts that contain one).
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token=PAD, eos_token=EOS, unk_token=PAD)
    tokenizer.padding_side = "left"  # generation pads prompts on the left
    return tokenizer


def build_model(tokenizer, seed: int = 0):
    """A ~70k-parameter LlamaForCausalLM built from `MODEL_CONFIG` (nothing downloaded)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        num_key_value_heads=MODEL_CONFIG["num_attention_heads"],
        max_position_embeddings=32,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
        **MODEL_CONFIG,
    )
    return LlamaForCausalLM(config)


def make_prompts(num_eval: int = 48, seed: int = 1234) -> tuple[list[dict], list[dict]]:
    """All C(12, 4) = 495 letter sets as rows {"prompt", "label"}, split into (train, eval).

    The label is the set itself ("c f k l"); the eval split holds out `num_eval` whole sets.
    """
    rows = [{"prompt": " ".join(combo) + f" {EQUALS}", "label": " ".join(combo)}
            for combo in itertools.combinations(LETTERS, SET_SIZE)]
    random.Random(seed).shuffle(rows)
    return rows[num_eval:], rows[:num_eval]


def is_correct(queries: list[str], prompts: list[str], labels: list[str]) -> list[bool]:
    """True when the response (query minus prompt) is two different letters of the label set."""
    verdicts = []
    for query, prompt, label in zip(queries, prompts, labels, strict=True):
        answer = query[len(prompt):].replace(EOS, " ").split()
        verdicts.append(len(answer) == 2 and answer[0] != answer[1] and set(answer) <= set(label.split()))
    return verdicts


def reward_func(queries: list[str], prompts: list[str], labels: list[str]) -> list[float]:
    """1.0 with probability SUCCESS_PROB for a correct response, else 0.0 (a noisy verifier).

    The noise keeps reward variance inside a group even once every answer is correct, as on real
    tasks, so policy-gradient advantages (and with them EntroPIC's lever) never vanish. Draws use
    torch's RNG, which checkpoints save. Same signature as an OpenRLHF reward file.
    """
    lucky = (torch.rand(len(queries)) < SUCCESS_PROB).tolist()
    return [float(ok and luck) for ok, luck in zip(is_correct(queries, prompts, labels), lucky, strict=True)]


def warm_start(model, tokenizer, train_rows: list[dict], steps: int = 150, lr: float = 3e-3, seed: int = 0):
    """Brief supervised fine-tuning on uniformly random correct answers (loss on the answer tokens only).

    It is kept short on purpose: the policy learns the format and to copy letters, with a high
    entropy over the 12 correct pairs and some mistakes left, so rewards vary within a group.
    """
    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        batch = rng.sample(train_rows, 32)
        texts, prompt_lengths = [], []
        for row in batch:
            first, second = rng.sample(row["label"].split(), 2)
            texts.append(f"{row['prompt']} {first} {second} {EOS}")
            prompt_lengths.append(len(row["prompt"].split()))
        ids = torch.tensor([tokenizer.convert_tokens_to_ids(text.split()) for text in texts])
        labels = ids.clone()
        for index, length in enumerate(prompt_lengths):
            labels[index, :length] = -100
        loss = model(input_ids=ids, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    return model


def load_warm_model(cache_dir: str | Path, seed: int = 0, steps: int = 150, lr: float = 3e-3):
    """Return (model, tokenizer) after the warm start, cached under `cache_dir` (see `cached_warm_start`)."""
    from openrlhf_entropic.tasks import cached_warm_start

    def build():
        tokenizer = build_tokenizer()
        return build_model(tokenizer, seed=seed), tokenizer

    settings = {"model": MODEL_CONFIG, "seed": seed, "steps": steps, "lr": lr, "letters": LETTERS}
    return cached_warm_start(cache_dir, "warm_start", settings, build, lambda model, tokenizer: warm_start(
        model, tokenizer, make_prompts()[0], steps=steps, lr=lr, seed=seed))
