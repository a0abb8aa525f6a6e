"""Soak test of the embedded runtime (not in CI): a long async run killed with SIGKILL and resumed, again and again.

    python benchmarks/soak.py [--steps 3000] [--kills 10] [--output-dir runs/soak]

It runs the same async EntroPIC run twice, with the same seed:
- the reference, uninterrupted, sampling the resident memory of its whole process tree (driver,
  Ray and every actor) as it goes: memory growth per 1000 steps is the slope over the second half;
- the soak run, killed (the driver with SIGKILL, its process group with it) at a random step
  `--kills` times and resumed with `--resume` each time.
A resumed run must continue exactly (the replay buffer is saved, in-flight jobs are collected at
each checkpoint, and every job is sampled with its own seed), so every step of the soak run must
log the same reward, staleness, alpha and drop counters as the reference: a sample dropped or
trained twice would change them. Prints JSON: memory growth, steps that differ, steps logged
twice, and resumes that failed (all goals 0).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

COMPARED = ("reward_mean", "staleness_mean", "staleness_max", "alpha", "entropy_iw", "dropped_stale", "dropped_nan")


def train_command(output_dir: Path, steps: int, resume: bool) -> list[str]:
    command = [sys.executable, "-m", "openrlhf_entropic.cli.train", "--mode", "async", "--max-staleness", "4",
               "--entropic.enable", "--steps", str(steps), "--save-steps", "25", "--eval-steps", str(steps),
               "--output-dir", str(output_dir), "--no-progress"]
    return command + (["--resume"] if resume else ["--overwrite"])


def tree_rss_mib(pid: int) -> float:
    """Resident memory of a process and all its descendants, in MiB."""
    import psutil

    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0
    for process in processes:
        try:
            total += process.memory_info().rss
        except psutil.NoSuchProcess:
            continue
    return total / 2**20


def logged_steps(output_dir: Path) -> int:
    metrics = output_dir / "metrics.jsonl"
    if not metrics.is_file():
        return 0
    lines = metrics.read_text().splitlines()
    return len(lines)


def reference_run(output_dir: Path, steps: int) -> list[tuple[int, float]]:
    """Run uninterrupted, sampling (steps logged, tree RSS MiB) every 2 s."""
    samples = []
    with open(output_dir.with_suffix(".log"), "w") as log:
        process = subprocess.Popen(train_command(output_dir, steps, resume=False), stdout=subprocess.DEVNULL,
                                   stderr=log, start_new_session=True)
        while process.poll() is None:
            samples.append((logged_steps(output_dir), tree_rss_mib(process.pid)))
            time.sleep(2)
    if process.returncode != 0:
        raise RuntimeError(f"the reference run failed (exit {process.returncode}); see {output_dir}.log")
    return samples


def soak_run(output_dir: Path, steps: int, kills: int, rng: random.Random) -> dict:
    """Kill and resume `kills` times, then run to the end; returns the resume counts."""
    resumes = failed_resumes = 0
    with open(output_dir.with_suffix(".log"), "w") as log:
        for attempt in range(kills + 1):
            resume = attempt > 0 and (output_dir / "checkpoints").is_dir()
            resumes += resume
            process = subprocess.Popen(train_command(output_dir, steps, resume), stdout=subprocess.DEVNULL,
                                       stderr=log, start_new_session=True)
            if attempt < kills:
                # A random step of this attempt's share of the run, then a kill at that moment.
                start = logged_steps(output_dir)
                kill_at = start + rng.randint(1, max(1, (steps - start) // (kills - attempt + 1)))
                while process.poll() is None and logged_steps(output_dir) < kill_at:
                    time.sleep(0.05)
                if process.poll() is None:
                    os.killpg(process.pid, signal.SIGKILL)  # the driver and the Ray cluster it started
                    process.wait()
                    continue
            if process.wait() != 0:
                failed_resumes += resume
                print(f"[soak] attempt {attempt} exited {process.returncode}", file=sys.stderr)
            elif logged_steps(output_dir) >= steps:
                break
    return {"resumes": resumes, "failed_resumes": failed_resumes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0, help="Seed of the kill times.")
    parser.add_argument("--output-dir", type=Path, default=Path("runs/soak"))
    args = parser.parse_args()
    args.output_dir.mkdir(parents=True, exist_ok=True)
    reference_dir, soak_dir = args.output_dir / "reference", args.output_dir / "soak"

    started = time.time()
    memory = reference_run(reference_dir, args.steps)
    counts = soak_run(soak_dir, args.steps, args.kills, random.Random(args.seed))

    def rows(directory: Path) -> list[dict]:
        return [json.loads(line) for line in (directory / "metrics.jsonl").read_text().splitlines()]

    reference, soaked = rows(reference_dir), rows(soak_dir)
    steps_logged = [row["step"] for row in soaked]
    differing = [row["step"] for row, ref in zip(soaked, reference, strict=False)
                 if any(abs(row[key] - ref[key]) > 1e-5 for key in COMPARED)]
    # While training (not start-up or shutdown), over the second half of the steps.
    half = [(step, rss) for step, rss in memory if args.steps // 2 <= step < args.steps]
    growth = None
    if len(half) > 1 and half[-1][0] > half[0][0]:
        growth = (half[-1][1] - half[0][1]) / (half[-1][0] - half[0][0]) * 1000
    print(json.dumps({
        "steps": args.steps, "kills": args.kills, **counts,
        "memory_mib_start_of_second_half": half[0][1] if half else None,
        "memory_growth_mib_per_1000_steps": growth,
        "soak_steps_logged": len(steps_logged), "steps_logged_twice": len(steps_logged) - len(set(steps_logged)),
        "steps_missing": args.steps - len(set(steps_logged)),
        "steps_differing_from_reference": len(differing), "first_differing_steps": differing[:10],
        "seconds": time.time() - started,
    }, indent=2))


if __name__ == "__main__":
    main()
