"""Peak extra memory of one OpenRLHF training_step with EntroPIC: our entropy measurement vs entropy_coef 0's.

With --actor.entropy_coef 0 OpenRLHF computes the entropy with its compiled `compute_entropy` under
autograd, building a graph over fp32 [batch, seq, vocab] tensors that lives until the step ends,
though the loss never uses it. Our actor measures it chunked without gradient. Each path runs
OpenRLHF 0.11.2's real `ActorPPOTrainer.training_step` (our subclass) in its own process, on a
1-layer Llama with Qwen's vocabulary (151936) in a DeepSpeed engine on CPU (gloo), after one
warm-up step. Peak extra memory = peak resident set during the step (Linux VmHWM after a reset)
minus the resident set before it. Both with torch.compile (OpenRLHF's default; inductor fuses the
softmax, so its graph holds no [batch, seq, vocab] copy) and eager (TORCHDYNAMO_DISABLE=1, as where
compile is unavailable): then autograd keeps the fp32 softmax alive through the step. Prints one JSON object.

    python benchmarks/cluster_entropy_memory.py               # batch 2 x 256 tokens
    python benchmarks/cluster_entropy_memory.py --seq 512

flash-attn has no CPU build: the tests' import stand-in for it is used (nothing here calls it).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PATHS = {
    "ours": "EntroPIC's chunked no-grad entropy (entropy_coef 0)",
    "theirs": "OpenRLHF's compute_entropy under autograd (entropy_coef 0, before this runtime's fix)",
    "none": "no entropy at all (EntroPIC off, entropy_coef unset): the floor",
}


def _rss(field: str) -> int:
    """VmRSS or VmHWM of this process in bytes."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def run_path(path: str, batch: int, seq: int, vocab: int) -> dict:
    """Child process: one warm-up training_step, then the measured one."""
    sys.path.insert(0, str(ROOT / "tests"))
    import cluster_standins  # noqa: F401  (flash_attn, before openrlhf)
    import deepspeed
    import torch
    from cluster_launch import OPENRLHF_ARGV, launch_args
    from openrlhf.models import Actor
    from openrlhf.trainer.ppo_utils.experience import Experience
    from openrlhf.utils import get_strategy
    from transformers import LlamaConfig, LlamaForCausalLM

    from openrlhf_entropic.runtime.openrlhf.actor import EntroPICActorPPOTrainer

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    deepspeed.init_distributed(dist_backend="gloo")
    # ActorPPOTrainer.__init__ names a CUDA device for its replay buffer and syncs CUDA; neither is used here.
    torch.cuda.current_device = lambda: 0
    torch.cuda.synchronize = lambda *args, **kwargs: None

    entropic_argv = [] if path == "none" else ["--entropic.enable"]
    args = launch_args(entropic_argv, OPENRLHF_ARGV)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=seq,
    ))  # fmt: skip
    engine, optimizer, _, _ = deepspeed.initialize(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=1e-3),
        config={"train_micro_batch_size_per_gpu": batch, "gradient_accumulation_steps": 1},
    )
    actor = Actor(engine, temperature=args.rollout.temperature)
    actor.packing_samples = False
    strategy = get_strategy(args)
    strategy.accumulated_gradient = 1
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    trainer = EntroPICActorPPOTrainer(strategy, actor, None, optimizer, scheduler, micro_train_batch_size=batch)
    if path == "theirs":  # keep OpenRLHF's differentiable compute_entropy
        trainer._entropy_for_measurement_only = contextlib.nullcontext

    response = seq // 2
    generator = torch.Generator().manual_seed(0)
    sequences = torch.randint(0, vocab, (batch, seq), generator=generator)
    log_probs = -torch.rand(batch, response, generator=generator)

    def step():
        experience = Experience(
            sequences=sequences,
            attention_mask=torch.ones_like(sequences),
            action_mask=torch.ones(batch, response, dtype=torch.bool),
            action_log_probs=log_probs,
            rollout_log_probs=log_probs,
            advantages=torch.tensor([[1.0], [-1.0]] * (batch // 2)).expand(batch, response).clone(),
            info={"reward": torch.ones(batch)},
        )
        trainer.training_step(experience, 0.0, 0, None)

    step()  # warm-up: torch.compile, DeepSpeed's lazy buffers
    gc.collect()
    before = _rss("VmRSS")
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # reset VmHWM to the current resident set
    step()
    peak = _rss("VmHWM")
    return {"path": path, "peak_extra_bytes": peak - before}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--path", choices=PATHS, help=argparse.SUPPRESS)  # child process
    options = parser.parse_args()
    if options.path:
        print(json.dumps(run_path(options.path, options.batch, options.seq, options.vocab)))
        return
    report = {"shape": [options.batch, options.seq, options.vocab],
              "fp32_logits_mib": round(options.batch * options.seq * options.vocab * 4 / 2**20, 1), "paths": PATHS}
    for mode in ("compiled", "eager"):
        env = {**os.environ, **({"TORCHDYNAMO_DISABLE": "1"} if mode == "eager" else {})}
        results = {}
        for path in PATHS:
            command = [sys.executable, __file__, "--path", path, "--batch", str(options.batch),
                       "--seq", str(options.seq), "--vocab", str(options.vocab)]
            done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env)
            if done.returncode != 0:
                raise SystemExit(f"{mode} {path} failed:\n{done.stderr[-3000:]}")
            results[path] = json.loads(done.stdout.strip().splitlines()[-1])["peak_extra_bytes"]
        report[mode] = {
            "peak_extra_mib": {path: round(value / 2**20, 1) for path, value in results.items()},
            # The entropy measurement's own share of the peak: each path above the no-entropy floor.
            "measurement_mib": {path: round((results[path] - results["none"]) / 2**20, 1) for path in ("ours", "theirs")},
            "peak_extra_memory_ratio": round(results["theirs"] / results["ours"], 2),
        }
    report["device"] = "cpu"
    print(json.dumps(report, indent=2))

if __name__ == "__main__":
    main()
