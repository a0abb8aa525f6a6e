"""Peak extra memory and time of `entropy_from_logits` against the naive formula.

Each variant runs in its own process on the same bf16 logits [batch, seq, vocab]. Peak extra
memory is the peak resident set (CPU, Linux VmHWM after a reset) or the CUDA allocator peak,
minus what was held once the logits existed. Prints one JSON object with the ratios.

    python benchmarks/entropy_memory.py                  # [1, 2048, 151936], the goal's size
    python benchmarks/entropy_memory.py --seq 256        # quicker
"""

import argparse
import json
import subprocess
import sys
import time

import torch

VARIANTS = ("naive", "chunked", "naive_grad", "chunked_grad")


def naive_entropy(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """The textbook formula: full fp32 log-softmax and softmax copies of [batch, seq, vocab]."""
    log_probs = torch.log_softmax(logits.float() / temperature, dim=-1)
    return -(log_probs.exp() * log_probs).sum(-1)


def _rss_bytes(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def run_variant(args) -> dict:
    """Child process: time one variant and measure its peak extra memory."""
    from openrlhf_entropic.entropic import entropy_from_logits

    device = torch.device(args.device)
    torch.manual_seed(0)
    logits = (torch.randn(args.batch, args.seq, args.vocab, device=device) * 3).to(torch.bfloat16)
    with_grad = args.variant.endswith("_grad")
    logits.requires_grad_(with_grad)
    if args.variant.startswith("naive"):
        compute = lambda: naive_entropy(logits, args.temperature)  # noqa: E731
    else:
        compute = lambda: entropy_from_logits(logits, args.temperature, chunk_size=args.chunk_size)  # noqa: E731
    upstream = torch.ones(args.batch, args.seq, device=device)

    def step():
        entropy = compute()
        if with_grad:
            (grad,) = torch.autograd.grad((entropy * upstream).sum(), logits)
            del grad
        if device.type == "cuda":
            torch.cuda.synchronize()

    step()  # warm-up, also allocator caches
    seconds = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        step()
        seconds.append(time.perf_counter() - start)

    # Peak extra memory of one clean step, measured after the timing runs.
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        peak_extra = torch.cuda.max_memory_allocated() - base
    else:
        import gc

        gc.collect()
        base = _rss_bytes("VmRSS")
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")  # reset VmHWM (peak RSS) to the current RSS
        step()
        peak_extra = _rss_bytes("VmHWM") - base
    return {"variant": args.variant, "seconds_min": min(seconds), "peak_extra_bytes": peak_extra}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--chunk-size", type=int, default=None, help="default: the library's default")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.chunk_size is None:
        from openrlhf_entropic.runtime.local.config import RunConfig

        args.chunk_size = RunConfig().entropy_chunk_size
    if args.variant:
        print(json.dumps(run_variant(args)))
        return

    results = {}
    for variant in VARIANTS:
        command = [sys.executable, __file__, "--variant", variant]
        for name in ("batch", "seq", "vocab", "chunk_size", "temperature", "repeats", "device"):
            command += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        results[variant] = json.loads(output.strip().splitlines()[-1])

    def ratio(numerator, denominator, key):
        return results[numerator][key] / max(results[denominator][key], 1)

    report = {
        "benchmark": "entropy_from_logits",
        "shape": [args.batch, args.seq, args.vocab],
        "dtype": "bfloat16",
        "device": args.device,
        "chunk_size": args.chunk_size,
        "peak_extra_mib": {v: round(r["peak_extra_bytes"] / 2**20, 1) for v, r in results.items()},
        "seconds": {v: round(r["seconds_min"], 4) for v, r in results.items()},
        "memory_ratio_naive_over_chunked": round(ratio("naive", "chunked", "peak_extra_bytes"), 2),
        "memory_ratio_naive_over_chunked_with_grad": round(ratio("naive_grad", "chunked_grad", "peak_extra_bytes"), 2),
        "time_ratio_chunked_over_naive": round(results["chunked"]["seconds_min"] / results["naive"]["seconds_min"], 3),
        "time_ratio_chunked_over_naive_with_grad": round(
            results["chunked_grad"]["seconds_min"] / results["naive_grad"]["seconds_min"], 3
        ),
        "goal": "memory ratio >= 4, time ratio <= 1.2",
    }
    report["goal_met"] = (
        report["memory_ratio_naive_over_chunked"] >= 4 and report["time_ratio_chunked_over_naive"] <= 1.2
    )
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
