"""Generator throughput: VLLMEngine against HFEngine, same model, batch, threads and token count.

Each engine runs in its own spawned process (so each peak RSS is its own) on a Llama built from a
config (4 layers x 256 hidden, 8 heads of 32, vocabulary 8192 by default; token ids, no tokenizer),
in float32. 16 prompts x 8 samples = 128 samples x 128 new tokens, EOS ignored so every sample gets
all 128 tokens. Start-up and a short warm-up batch are timed apart from the rate. Then `--repeats`
timed batches per engine, interleaved (vLLM, HF, HF, vLLM, ...) so that drifting load on a shared
machine hits both alike; the rate is that of each engine's fastest batch. The CPU time of each
batch (process_time, all threads of the engine's process) is reported too: on a shared machine
it says what each engine costs when the wall clock also counts other jobs. Prints one JSON object;
the goal is vLLM >= 1.5x HF in samples per second.

    python benchmarks/generator_throughput.py              # 1 thread each (the generator actor's)
    python benchmarks/generator_throughput.py --threads 2
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch


def rss_mib() -> float:
    """Current resident set size of this process in MiB."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize() / 2**20


def os_threads() -> int:
    """Number of OS threads of this process."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("Threads:"))


def engine_process(kind: str, args, connection, log_path: str) -> None:
    """Child process: build the model and engine, warm up, then time one batch per "run" message.

    Replies (over `connection`): {"startup_seconds", "warmup_seconds", ...} once ready, then the
    seconds of each batch, then final stats ({"peak_rss_mib", "torch_threads", "os_threads"}) on "stop".
    """
    import os

    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)  # vLLM logs a lot to stdout
    os.dup2(log, 1)
    os.dup2(log, 2)
    from transformers import LlamaConfig, LlamaForCausalLM

    from openrlhf_entropic.runtime.local.engines import HFEngine, VLLMEngine

    torch.set_num_threads(args.threads)
    rss_imports = rss_mib()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                         num_hidden_layers=args.layers, num_attention_heads=args.hidden // args.head_dim,
                         num_key_value_heads=args.hidden // args.head_dim,
                         max_position_embeddings=args.prompt_len + args.new_tokens, pad_token_id=0, eos_token_id=1,
                         bos_token_id=1, tie_word_embeddings=True)
    model = LlamaForCausalLM(config).eval()
    prompts = torch.randint(2, args.vocab, (args.prompts, args.prompt_len), generator=torch.Generator().manual_seed(1))
    prompt_ids = prompts.tolist()
    started = time.perf_counter()
    if kind == "vllm":
        engine = VLLMEngine(model, None, num_threads=args.threads, kv_cache_gib=args.kv_cache_gib)
        del model  # the engine holds its own copy of the weights
    else:
        engine = HFEngine(model)
    startup = time.perf_counter() - started

    def batch(new_tokens: int, seed: int) -> tuple[float, float]:
        """(wall seconds, CPU seconds of this process, all threads) of one batch."""
        started, cpu_started = time.perf_counter(), time.process_time()
        results = engine.sample(prompt_ids, args.n_samples, args.temperature, 1.0, new_tokens, seed=seed,
                                ignore_eos=True)
        seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
        lengths = {len(tokens) for tokens, _ in results}
        if len(results) != args.prompts * args.n_samples or lengths != {new_tokens}:
            raise RuntimeError(f"expected {args.prompts * args.n_samples} x {new_tokens} tokens, "
                               f"got {len(results)} samples of lengths {sorted(lengths)}")
        return seconds, cpu_seconds

    warmup, _ = batch(8, seed=0)
    connection.send({"startup_seconds": startup, "warmup_seconds": warmup, "rss_after_imports_mib": rss_imports})
    while (message := connection.recv()) != "stop":
        connection.send(batch(args.new_tokens, seed=message))
    connection.send({"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # KiB on Linux
                     "torch_threads": torch.get_num_threads(), "os_threads": os_threads()})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1, help="torch/vLLM threads, the same for both engines")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--head-dim", type=int, default=32)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--n-samples", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--kv-cache-gib", type=float, default=0.5)
    args = parser.parse_args()

    context = multiprocessing.get_context("spawn")
    runs, connections, processes = {}, {}, []
    with tempfile.TemporaryDirectory() as directory:
        try:
            for kind in ("vllm", "hf"):  # started one after the other: start-up times do not overlap
                connections[kind], child_end = context.Pipe()
                log_path = str(Path(directory) / f"{kind}.log")
                process = context.Process(target=engine_process, args=(kind, args, child_end, log_path))
                process.start()
                processes.append((kind, process, log_path))
                if not connections[kind].poll(1800):
                    raise RuntimeError(f"{kind} engine did not start")
                runs[kind] = {**connections[kind].recv(), "batch_seconds": [], "batch_cpu_seconds": []}
            for repeat in range(args.repeats):  # interleaved, alternating who goes first, so load drift hits both
                order = ("vllm", "hf") if repeat % 2 == 0 else ("hf", "vllm")
                for kind in order:
                    connections[kind].send(1 + repeat)
                    seconds, cpu_seconds = connections[kind].recv()
                    runs[kind]["batch_seconds"].append(seconds)
                    runs[kind]["batch_cpu_seconds"].append(cpu_seconds)
            for kind, connection in connections.items():
                connection.send("stop")
                runs[kind].update(connection.recv())
        except (EOFError, OSError, RuntimeError) as error:
            logs = "".join(f"--- {kind}\n{Path(log).read_text()[-3000:]}" for kind, _, log in processes)
            sys.exit(f"benchmark failed: {error!r}\n{logs}")
        finally:
            for _, process, _ in processes:
                process.join(timeout=60)
    samples = args.prompts * args.n_samples
    for run in runs.values():
        run["samples_per_second"] = samples / min(run["batch_seconds"])
        run["tokens_per_second"] = samples * args.new_tokens / min(run["batch_seconds"])
        run["samples_per_cpu_second"] = samples / min(run["batch_cpu_seconds"])
    vllm, hf = runs["vllm"], runs["hf"]
    report = {
        "model": {"layers": args.layers, "hidden": args.hidden, "head_dim": args.head_dim, "vocab": args.vocab,
                  "dtype": "float32"},
        "samples": args.prompts * args.n_samples, "new_tokens": args.new_tokens, "prompt_len": args.prompt_len,
        "threads": args.threads,
        "vllm_samples_per_second": round(vllm["samples_per_second"], 2),
        "hf_samples_per_second": round(hf["samples_per_second"], 2),
        "speedup": round(vllm["samples_per_second"] / hf["samples_per_second"], 2),
        "speedup_of_medians": round(statistics.median(hf["batch_seconds"]) / statistics.median(vllm["batch_seconds"]), 2),
        "goal_speedup": 1.5,
        # samples per CPU-second of the engine process: what each engine costs, robust to other load
        "vllm_samples_per_cpu_second": round(vllm["samples_per_cpu_second"], 2),
        "hf_samples_per_cpu_second": round(hf["samples_per_cpu_second"], 2),
        "speedup_cpu_time": round(vllm["samples_per_cpu_second"] / hf["samples_per_cpu_second"], 2),
        "vllm_tokens_per_second": round(vllm["tokens_per_second"], 1),
        "hf_tokens_per_second": round(hf["tokens_per_second"], 1),
        "vllm_batch_seconds": [round(s, 3) for s in vllm["batch_seconds"]],
        "hf_batch_seconds": [round(s, 3) for s in hf["batch_seconds"]],
        "vllm_batch_cpu_seconds": [round(s, 3) for s in vllm["batch_cpu_seconds"]],
        "hf_batch_cpu_seconds": [round(s, 3) for s in hf["batch_cpu_seconds"]],
        "vllm_startup_seconds": round(vllm["startup_seconds"], 2),
        "vllm_warmup_seconds": round(vllm["warmup_seconds"], 2),
        "hf_startup_seconds": round(hf["startup_seconds"], 2),
        "hf_warmup_seconds": round(hf["warmup_seconds"], 2),
        "vllm_peak_rss_mib": round(vllm["peak_rss_mib"], 1),
        "hf_peak_rss_mib": round(hf["peak_rss_mib"], 1),
        "vllm_rss_after_imports_mib": round(vllm["rss_after_imports_mib"], 1),
        "hf_rss_after_imports_mib": round(hf["rss_after_imports_mib"], 1),
        "vllm_kv_cache_gib": args.kv_cache_gib,
        # what today's torch.stack(output.scores) would have held for this batch, avoided by HFEngine
        "hf_stacked_scores_mib_avoided": args.prompts * args.n_samples * args.new_tokens * args.vocab * 4 / 2**20,
        "vllm_torch_threads": vllm["torch_threads"], "hf_torch_threads": hf["torch_threads"],
        "vllm_os_threads": vllm["os_threads"], "hf_os_threads": hf["os_threads"],
    }
    report["goal_met"] = report["speedup"] >= report["goal_speedup"]
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
