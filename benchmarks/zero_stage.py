"""Which DeepSpeed ZeRO stage for one learner rank: the learner's train step at stages 0, 1 and 2; prints JSON.

The embedded runtime's default is stage 0 with one learner and stage 2 with several. This measures the
one-rank half of that choice: the same `Learner.train_step` (one rank, in this process, gloo, torch
threads = --threads) on the same fixed batch, interleaved round-robin over the stages so that machine
noise hits them alike. The batch is what the benchmark against TRL trains on: 16 prompts x 8 samples
of the embedded task, one optimizer step on one micro-batch of 128, with the embedded ~70k-parameter
model (light) or a 4 x 256 Llama (heavy, 32 random response tokens).

    .venv/bin/python benchmarks/zero_stage.py [--steps 30] [--threads 1] [--configs light,heavy]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from openrlhf_entropic.entropic import EntroPICConfig  # noqa: E402
from openrlhf_entropic.runtime.local.buffer import Sample  # noqa: E402
from openrlhf_entropic.runtime.local.config import RunConfig  # noqa: E402
from openrlhf_entropic.runtime.local.learner import Learner  # noqa: E402
from openrlhf_entropic.tasks import synthetic  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from vs_trl import HEAVY_MODEL  # noqa: E402  (the heavy model of the benchmark against TRL)


def model_factory(config: str):
    """() -> (model, tokenizer) for `config`; every call builds the same weights."""
    def build():
        tokenizer = synthetic.build_tokenizer()
        if config == "light":
            return synthetic.build_model(tokenizer, seed=0), tokenizer
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        llama = LlamaConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                            eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True, **HEAVY_MODEL)
        return LlamaForCausalLM(llama), tokenizer
    return build


def batch(config: str, tokenizer) -> list[Sample]:
    """128 samples: 16 train prompts x 8 responses (3 letters and EOS light, 32 letters heavy), mixed advantages."""
    rng = random.Random(0)
    rows = synthetic.make_prompts()[0][:16]
    length = 2 if config == "light" else 32
    samples = []
    for group, row in enumerate(rows):
        prompt = tokenizer(row["prompt"])["input_ids"]
        for _ in range(8):
            response = tokenizer.convert_tokens_to_ids([rng.choice(row["label"].split()) for _ in range(length)])
            response += [tokenizer.eos_token_id] if config == "light" else []
            samples.append(Sample(prompt, response, [-1.0] * len(response), "", row["prompt"], row["label"], group,
                                  reward=1.0, advantage=rng.choice([-1.0, 1.0])))
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="Timed train steps per stage (after 3 warm-up steps).")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (async learners get 1 core of 2).")
    parser.add_argument("--configs", default="light,heavy")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    report = {"threads": args.threads, "steps": args.steps, "configs": {}}
    for config in args.configs.split(","):
        factory = model_factory(config)
        samples = batch(config, factory()[1])
        learners = {}
        for stage in (0, 1, 2):  # one process group for all three: each learner is rank 0 of a world of 1
            run = RunConfig(rollout_batch_size=16, n_samples_per_prompt=8, train_batch_size=128,
                            micro_train_batch_size=128, max_epochs=1, actor_learning_rate=2e-3, zero_stage=stage)
            rendezvous = f"file://{tempfile.mkdtemp(prefix='zero_stage_')}/store"
            learners[stage] = Learner(0, 1, rendezvous, factory, run, EntroPICConfig(enable=False), None)
            torch.set_num_threads(args.threads)  # the learner pins nothing here (cores=None) but resets threads
        seconds = {stage: [] for stage in learners}
        for step in range(3 + args.steps):
            for stage, learner in learners.items():
                started = time.perf_counter()
                learner.train_step(samples)
                if step >= 3:
                    seconds[stage].append(time.perf_counter() - started)
        medians = {stage: statistics.median(values) for stage, values in seconds.items()}
        report["configs"][config] = {
            "median_train_step_ms": {f"zero_{stage}": round(value * 1000, 2) for stage, value in medians.items()},
            "ratio_to_zero_0": {f"zero_{stage}": round(value / medians[0], 3) for stage, value in medians.items()},
        }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
