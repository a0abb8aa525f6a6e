"""The issue's control goals on the embedded default, measured; prints JSON.

Runs GRPO and EntroPIC, on-policy and async (staleness 4), with the embedded preset, and checks:
GRPO on-policy entropy_final <= 0.5 x entropy_initial; EntroPIC on-policy tracking error <= 0.10;
EntroPIC async tracking and eval tracking errors <= 0.15; async EntroPIC pass_at_k >= GRPO's.

    python benchmarks/embedded_goals.py [--seeds 0] [--output-dir runs/bench_goals] [extra train flags]
"""

import argparse
import json
from pathlib import Path

from openrlhf_entropic.cli.train import main

CELLS = {
    "grpo_on_policy": ["--mode", "on_policy", "--entropic.enable", "false"],
    "entropic_on_policy": ["--mode", "on_policy", "--entropic.enable", "true"],
    "grpo_async": ["--mode", "async", "--max-staleness", "4", "--entropic.enable", "false"],
    "entropic_async": ["--mode", "async", "--max-staleness", "4", "--entropic.enable", "true"],
}
FIELDS = ("entropy_initial", "entropy_final", "entropy_tracking_error", "entropy_eval_tracking_error",
          "reward_final", "pass_at_1", "pass_at_k", "staleness_mean", "samples_per_second", "seconds")


def main_cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--output-dir", default="runs/bench_goals")
    args, extra = parser.parse_known_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    cells = {}
    for name, flags in CELLS.items():
        runs = [main(["--output-dir", str(Path(args.output_dir) / name / f"seed{seed}"), "--overwrite", "--seed", str(seed),
                      "--no-progress", *flags, *extra]) for seed in seeds]
        cells[name] = {field: sum(r[field] for r in runs) / len(runs) for field in FIELDS}
    grpo, pic, grpo_async, pic_async = (cells[name] for name in CELLS)
    goals = {
        "grpo_collapse_final_le_half_initial": grpo["entropy_final"] <= 0.5 * grpo["entropy_initial"],
        "entropic_on_policy_tracking_le_0.10": pic["entropy_tracking_error"] <= 0.10,
        "entropic_async_tracking_le_0.15": pic_async["entropy_tracking_error"] <= 0.15,
        "entropic_async_eval_tracking_le_0.15": pic_async["entropy_eval_tracking_error"] <= 0.15,
        "entropic_async_pass_at_k_ge_grpo": pic_async["pass_at_k"] >= grpo_async["pass_at_k"],
    }
    print(json.dumps({"seeds": seeds, "cells": cells, "goals": goals}, indent=2))


if __name__ == "__main__":
    main_cli()
