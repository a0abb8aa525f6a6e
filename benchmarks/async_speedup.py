"""Async vs on-policy throughput of the embedded runtime on this machine; prints JSON.

Runs the embedded default twice with the same model, batch and seed, on-policy (K = 0) and async
(K = 4), and compares samples_per_second (summary: mean over the second half of the steps).
Beside it: the ideal overlap limit (T_gen + T_train) / max(T_gen, T_train), with T_gen the time
inside generate per batch and T_train the time inside the learners per step, both measured in
the on-policy run.

    python benchmarks/async_speedup.py [--steps 60] [--output-dir runs/bench_async]
"""

import argparse
import json
from pathlib import Path

from openrlhf_entropic.cli.train import main


def run(output_dir: Path, steps: int, *flags: str) -> tuple[dict, list[dict]]:
    summary = main(["--output-dir", str(output_dir), "--overwrite", "--steps", str(steps), "--no-progress",
                    "--eval-steps", str(steps), *flags])
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return summary, rows


def main_cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--output-dir", default="runs/bench_async")
    args = parser.parse_args()
    out = Path(args.output_dir)
    on_summary, on_rows = run(out / "on_policy", args.steps, "--mode", "on_policy")
    async_summary, async_rows = run(out / "async", args.steps, "--mode", "async", "--max-staleness", "4")
    half = on_rows[len(on_rows) // 2:]
    t_gen = (half[-1]["generate_seconds"] - on_rows[len(on_rows) // 2 - 1]["generate_seconds"]) / len(half)
    t_train = sum(row["train_seconds"] for row in half) / len(half)
    result = {
        "steps": args.steps,
        "on_policy_samples_per_second": on_summary["samples_per_second"],
        "async_samples_per_second": async_summary["samples_per_second"],
        "speedup": async_summary["samples_per_second"] / on_summary["samples_per_second"],
        "t_gen_seconds": t_gen,
        "t_train_seconds": t_train,
        "overlap_limit": (t_gen + t_train) / max(t_gen, t_train),
        "async_staleness_mean": async_summary["staleness_mean"],
        "goal_speedup_at_least_1_3": async_summary["samples_per_second"] / on_summary["samples_per_second"] >= 1.3,
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main_cli()
