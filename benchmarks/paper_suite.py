"""The EntroPIC paper's claims on the countdown task, as one command: runs, plots, docs-ready results.md, JSON.

    python benchmarks/paper_suite.py [--output-dir runs/paper_suite] [--seeds 0,1,2] [--steps 300]
        [--claims 1,2,3,4,5,6] [--warm-start-entropy 0.8] [--target-fractions 0.5,0.75,1.0]
        [--dry-run] [--report-only] [--publish docs] [-- extra cli.train flags]

Claims (K = max_staleness; async cells run at K = 4 unless named otherwise):
  1. collapse: GRPO's entropy collapses, on-policy and async: entropy_final <= 0.5 x entropy_initial.
  2. control: EntroPIC holds 0.5, 0.75 and 1.0 x the warm-start entropy, on-policy and async: tracking
     error <= 0.10 of the target, on the training-time estimate and on the eval (true) entropy.
  3. solve rate: pass@1 and pass@k of EntroPIC vs GRPO, on-policy and async, against the seed spread.
  4. P vs PI off-policy: --entropic.ki 0 vs the preset's ki at K = 4 and K = 8.
  5. importance-weighted vs unweighted entropy estimate at K = 8, scored against the eval entropy.
  6. throughput: samples/s and wall time, on-policy vs async, from the runs of claims 1 and 3.

Every training setting ("run cell") runs once per seed as its own `python -m openrlhf_entropic.cli.train
--task countdown` process, one after another, into OUT/<cell>/seed<S>/ (log: OUT/<cell>/seed<S>.log,
whose first line is the command); a cell that serves several claims runs once. A failed run is
reported and the others go on. Then each claim gets its report from `compare.write_report`
(OUT/claims/<n>-<name>/: report.md, report.json, plots), so tables and plots come from the same code
as `cli.compare`, and OUT/results.md (docs-ready) and OUT/results.json sum up the claims; the JSON is
also printed. OUT/suite.json records every run (command, exit code, wall time) as it finishes, so
`--report-only` can rebuild the results from it. Field definitions: docs/compare.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from openrlhf_entropic.cli.compare import (
    LOG_TAIL_LINES,
    comma_list,
    format_stats,
    git_commit,
    summarize_run,
    write_report,
)

# The countdown preset's H* (0.6) is 0.75 x its target_start (0.8), the warm-start entropy it measured;
# the cells of claims 3-6 use that fraction, so they are the claim-2 cells of fraction 0.75. (At 0.5,
# about where GRPO itself ends after 300 steps, EntroPIC and GRPO hardly differed.)
MAIN_FRACTION = 0.75
ASYNC_K = 4  # the async cells of claims 1-3 and 6
LONG_K = 8  # the larger staleness of claims 4 and 5
COLLAPSE_RATIO = 0.5  # claim 1: entropy_final <= this x entropy_initial
TRACKING_GOAL = 0.10  # claim 2: tracking error <= this (relative to the target)
# cli.train flags the suite sets itself; passing them after `--` would silently change what a cell is.
SUITE_FLAGS = ("--task", "--mode", "--max-staleness", "--entropic.max_staleness", "--seed", "--output-dir",
               "--entropic.enable", "--steps", "--entropic.target_entropy", "--entropic.target_start",
               "--entropic.ki", "--entropic.estimator", "--resume")


@dataclass(frozen=True)
class RunCell:
    """One training setting of the suite; its runs go to OUT/<name>/seed<S>/."""

    entropic: bool
    staleness: int  # K; 0 = on-policy
    p_only: bool = False  # --entropic.ki 0: the controller without its integral term
    unweighted: bool = False  # --entropic.estimator on_policy: the plain mean on stale samples

    def name(self, target: float) -> str:
        """Folder name: algorithm, EntroPIC target and variant, then the regime (on_policy / async_k<K>)."""
        base = f"entropic_h{target:g}" if self.entropic else "grpo"
        base += "_p" if self.p_only else ""
        base += "_unweighted" if self.unweighted else ""
        return f"{base}_{'on_policy' if self.staleness == 0 else f'async_k{self.staleness}'}"

    def flags(self, target: float, warm_start_entropy: float) -> list[str]:
        """The cli.train flags that make this cell (seed, steps and folder are added per run)."""
        if self.staleness == 0:
            flags = ["--mode", "on_policy", "--max-staleness", "0"]
        else:
            flags = ["--mode", "async", "--max-staleness", str(self.staleness)]
        flags += ["--entropic.enable", "true" if self.entropic else "false"]
        # GRPO gets the target too: it does not act on it, but its tracking error is scored against it.
        flags += ["--entropic.target_entropy", f"{target:g}", "--entropic.target_start", f"{warm_start_entropy:g}"]
        flags += ["--entropic.ki", "0"] if self.p_only else []
        flags += ["--entropic.estimator", "on_policy"] if self.unweighted else []
        return flags


@dataclass(frozen=True)
class Claim:
    """One claim: the cells it reads (display name in its report -> (RunCell, target)), and how it is judged."""

    number: int
    slug: str
    title: str
    goal: str
    cells: Callable[[SuiteSettings], dict[str, tuple[RunCell, float]]]
    judge: Callable[[dict, SuiteSettings], dict]
    plots: tuple[str, ...]  # the plots results.md shows (all are in the claim's report)


@dataclass(frozen=True)
class SuiteSettings:
    """What shapes the cells: the warm-start entropy the targets are fractions of, and those fractions."""

    warm_start_entropy: float
    target_fractions: tuple[float, ...]

    @property
    def main_target(self) -> float:
        return round(MAIN_FRACTION * self.warm_start_entropy, 6)

    def target(self, fraction: float) -> float:
        return round(fraction * self.warm_start_entropy, 6)


GRPO_ON, GRPO_ASYNC = RunCell(False, 0), RunCell(False, ASYNC_K)


def _solve_rate_cells(settings: SuiteSettings) -> dict[str, tuple[RunCell, float]]:
    """GRPO and EntroPIC at the main target, on-policy and async K = 4 (claims 3 and 6)."""
    main = settings.main_target
    return {"grpo_on_policy": (GRPO_ON, main), "grpo_async": (GRPO_ASYNC, main),
            "entropic_on_policy": (RunCell(True, 0), main), "entropic_async": (RunCell(True, ASYNC_K), main)}


# ---------------------------------------------------------------------------------------------
# Judging: each takes the claim's report (compare.write_report's dict) and returns its figures.


def _stats(report: dict, cell: str, field: str) -> dict | None:
    """{"mean", "std", "n", "values"} of a field of a cell in a claim's report; None if not measured."""
    return (report.get(cell) or {}).get("fields", {}).get(field)


def _missing(report: dict, cells: list[str]) -> list[str]:
    return [cell for cell in cells if cell not in report]


def difference(a: dict | None, b: dict | None) -> dict | None:
    """a - b of two fields' means, and whether it exceeds the seed spread (the larger of the two sample stds).

    `exceeds_seed_std` is None when neither side has a spread (one seed each): then the data cannot say.
    """
    if a is None or b is None:
        return None
    stds = [s["std"] for s in (a, b) if s["std"] is not None]
    spread = max(stds) if stds else None
    diff = a["mean"] - b["mean"]
    return {"difference": diff, "seed_std": spread, "exceeds_seed_std": None if spread is None else abs(diff) > spread}


def judge_collapse(report: dict, settings: SuiteSettings) -> dict:
    """Claim 1: per GRPO cell, mean entropy_final / entropy_initial <= COLLAPSE_RATIO (and how many seeds)."""
    cells = {}
    for cell in ("grpo_on_policy", "grpo_async"):
        ratio = _stats(report, cell, "entropy_final_over_initial")
        cells[cell] = {
            "entropy_initial": _stats(report, cell, "entropy_initial"),
            "entropy_final": _stats(report, cell, "entropy_final"),
            "final_over_initial": ratio,
            "seeds_met": None if ratio is None else sum(v <= COLLAPSE_RATIO for v in ratio["values"]),
            "met": None if ratio is None else ratio["mean"] <= COLLAPSE_RATIO,
        }
    return {"cells": cells, "met": _all_met(cells), "missing": _missing(report, list(cells))}


def judge_control(report: dict, settings: SuiteSettings) -> dict:
    """Claim 2: per EntroPIC cell, both tracking errors (mean over seeds) <= TRACKING_GOAL."""
    cells = {}
    for name in _control_cells(settings):
        train = _stats(report, name, "entropy_tracking_error")
        evaluation = _stats(report, name, "entropy_eval_tracking_error")
        met = None if train is None or evaluation is None else max(train["mean"], evaluation["mean"]) <= TRACKING_GOAL
        cells[name] = {"target": (report.get(name) or {}).get("target_entropy"), "entropy_tracking_error": train,
                       "entropy_eval_tracking_error": evaluation,
                       "entropy_final": _stats(report, name, "entropy_final"), "met": met}
    return {"cells": cells, "met": _all_met(cells), "missing": _missing(report, list(cells))}


def judge_solve_rate(report: dict, settings: SuiteSettings) -> dict:
    """Claim 3: EntroPIC minus GRPO pass@1 and pass@k per regime; met = EntroPIC higher beyond the seed std."""
    comparisons = {}
    for regime in ("on_policy", "async"):
        for field in ("pass_at_1", "pass_at_k"):
            entropic, grpo = _stats(report, f"entropic_{regime}", field), _stats(report, f"grpo_{regime}", field)
            diff = difference(entropic, grpo)
            met = None if diff is None or diff["exceeds_seed_std"] is None else (
                diff["difference"] > 0 and diff["exceeds_seed_std"])
            comparisons[f"{field}_{regime}"] = {"entropic": entropic, "grpo": grpo, **(diff or {}), "met": met}
    k = sorted({k for cell in report.values() for k in cell.get("k", [])})
    return {"k": k, "comparisons": comparisons, "met": _all_met(comparisons),
            "missing": _missing(report, list(_solve_rate_cells(settings)))}


def judge_p_vs_pi(report: dict, settings: SuiteSettings) -> dict:
    """Claim 4: per K, PI's tracking errors vs P's (met = PI lower beyond the seed std), with pass@k."""
    comparisons = {}
    for k in (ASYNC_K, LONG_K):
        pi, p = f"pi-k{k}_async", f"p-k{k}_async"
        figures = {}
        for field in ("entropy_tracking_error", "entropy_eval_tracking_error", "pass_at_k"):
            figures[field] = {"pi": _stats(report, pi, field), "p": _stats(report, p, field),
                              **(difference(_stats(report, pi, field), _stats(report, p, field)) or {})}
        tracking = figures["entropy_tracking_error"]
        met = None if tracking.get("exceeds_seed_std") is None else (
            tracking["difference"] < 0 and tracking["exceeds_seed_std"])
        comparisons[f"k{k}"] = {**figures, "met": met}
    return {"comparisons": comparisons, "met": _all_met(comparisons),
            "missing": _missing(report, [f"{v}-k{k}_async" for k in (ASYNC_K, LONG_K) for v in ("pi", "p")])}


def judge_estimator(report: dict, settings: SuiteSettings) -> dict:
    """Claim 5: at K = 8, eval tracking error of the IW vs the unweighted estimate; met = IW lower beyond seed std."""
    iw, plain = f"iw-k{LONG_K}_async", f"unweighted-k{LONG_K}_async"
    figures = {}
    for field in ("entropy_eval_tracking_error", "entropy_tracking_error"):
        figures[field] = {"importance_weighted": _stats(report, iw, field), "unweighted": _stats(report, plain, field),
                          **(difference(_stats(report, iw, field), _stats(report, plain, field)) or {})}
    scored = figures["entropy_eval_tracking_error"]
    met = None if scored.get("exceeds_seed_std") is None else scored["difference"] < 0 and scored["exceeds_seed_std"]
    return {**figures, "met": met, "missing": _missing(report, [iw, plain])}


def judge_throughput(report: dict, settings: SuiteSettings) -> dict:
    """Claim 6: per algorithm, async vs on-policy samples/s and wall time; met = async faster beyond seed std."""
    comparisons = {}
    for algorithm in ("grpo", "entropic"):
        fast = _stats(report, f"{algorithm}_async", "samples_per_second")
        slow = _stats(report, f"{algorithm}_on_policy", "samples_per_second")
        diff = difference(fast, slow)
        comparisons[algorithm] = {
            "samples_per_second_async": fast, "samples_per_second_on_policy": slow,
            "speedup": fast["mean"] / slow["mean"] if fast and slow and slow["mean"] > 0 else None,
            "seconds_async": _stats(report, f"{algorithm}_async", "seconds"),
            "seconds_on_policy": _stats(report, f"{algorithm}_on_policy", "seconds"),
            **(diff or {}),
            "met": None if diff is None or diff["exceeds_seed_std"] is None else (
                diff["difference"] > 0 and diff["exceeds_seed_std"]),
        }
    return {"comparisons": comparisons, "met": _all_met(comparisons),
            "missing": _missing(report, list(_solve_rate_cells(settings)))}


def _all_met(parts: dict) -> bool | None:
    """False when a part is not met, True when every part is met, else None (a part could not be judged)."""
    verdicts = [part["met"] for part in parts.values()]
    if False in verdicts:
        return False
    return True if None not in verdicts else None


def _control_cells(settings: SuiteSettings) -> dict[str, tuple[RunCell, float]]:
    cells = {}
    for fraction in settings.target_fractions:
        target = settings.target(fraction)
        cells[f"entropic-h{target:g}_on_policy"] = (RunCell(True, 0), target)
        cells[f"entropic-h{target:g}_async"] = (RunCell(True, ASYNC_K), target)
    return cells


def _p_vs_pi_cells(settings: SuiteSettings) -> dict[str, tuple[RunCell, float]]:
    main = settings.main_target
    return {name: (RunCell(True, k, p_only=p_only), main) for k in (ASYNC_K, LONG_K)
            for name, p_only in ((f"pi-k{k}_async", False), (f"p-k{k}_async", True))}


def _estimator_cells(settings: SuiteSettings) -> dict[str, tuple[RunCell, float]]:
    main = settings.main_target
    return {f"iw-k{LONG_K}_async": (RunCell(True, LONG_K), main),
            f"unweighted-k{LONG_K}_async": (RunCell(True, LONG_K, unweighted=True), main)}


CLAIMS = (
    Claim(1, "collapse", "GRPO's entropy collapses",
          f"GRPO on-policy and async K={ASYNC_K}: entropy_final <= {COLLAPSE_RATIO} x entropy_initial",
          lambda s: {"grpo_on_policy": (GRPO_ON, s.main_target), "grpo_async": (GRPO_ASYNC, s.main_target)},
          judge_collapse, ("entropy.png",)),
    Claim(2, "control", "EntroPIC holds the entropy at a target",
          f"EntroPIC on-policy and async K={ASYNC_K}, at each --target-fractions x the warm-start entropy: "
          f"entropy_tracking_error and entropy_eval_tracking_error <= {TRACKING_GOAL} (relative to the target)",
          _control_cells, judge_control, ("entropy.png", "alpha.png")),
    Claim(3, "solve_rate", "Solve rate: EntroPIC vs GRPO",
          "pass@1 and pass@k of EntroPIC vs GRPO, on-policy and async; met = EntroPIC higher by more than "
          "the seed std (the larger of the two cells' sample stds)",
          _solve_rate_cells, judge_solve_rate, ("pass_at_k.png", "entropy.png")),
    Claim(4, "p_vs_pi", "P vs PI control off-policy",
          f"async K={ASYNC_K} and K={LONG_K}, --entropic.ki 0 (P) vs the preset's ki (PI): met = PI's "
          "entropy_tracking_error lower by more than the seed std",
          _p_vs_pi_cells, judge_p_vs_pi, ("entropy.png", "alpha.png")),
    Claim(5, "estimator", "Importance-weighted vs unweighted entropy estimate",
          f"async K={LONG_K}: entropy_eval_tracking_error (against the true entropy on fresh samples) of "
          "--entropic.estimator importance_weighted vs on_policy; met = IW lower by more than the seed std",
          _estimator_cells, judge_estimator, ("entropy.png",)),
    Claim(6, "throughput", "On-policy vs async throughput",
          f"samples/s and wall time of the same number of samples, on-policy vs async K={ASYNC_K} "
          "(the runs of claims 1 and 3); met = async faster by more than the seed std",
          _solve_rate_cells, judge_throughput, ()),
)


# ---------------------------------------------------------------------------------------------
# Running.


def plan(claims: list[Claim], settings: SuiteSettings) -> dict[str, tuple[RunCell, float, list[int]]]:
    """Unique run cells of `claims`: {folder name: (cell, target, [claims it serves])}, in first-use order."""
    cells: dict[str, tuple[RunCell, float, list[int]]] = {}
    for claim in claims:
        for cell, target in claim.cells(settings).values():
            name = cell.name(target)
            cells.setdefault(name, (cell, target, []))[2].append(claim.number)
    return cells


def train_command(cell: RunCell, target: float, seed: int, run_dir: Path, args: argparse.Namespace,
                  extra: list[str]) -> list[str]:
    """The `cli.train` command of one run."""
    return [sys.executable, "-m", args.train_module, "--task", "countdown",
            *cell.flags(target, args.warm_start_entropy), "--seed", str(seed), "--steps", str(args.steps),
            "--output-dir", str(run_dir), "--overwrite", "--no-progress", *extra]


def run_all(cells: dict, args: argparse.Namespace, extra: list[str], record: dict) -> None:
    """Run every cell x seed in turn; each finished or failed run is appended to `record` and saved."""
    jobs = [(name, seed) for name in cells for seed in args.seeds]
    for number, (name, seed) in enumerate(jobs, start=1):
        cell, target, _ = cells[name]
        run_dir = args.output_dir / name / f"seed{seed}"
        log_path = run_dir.with_suffix(".log")
        # A run left by an earlier suite must not stand in for this one if this one fails before writing.
        shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        command = train_command(cell, target, seed, run_dir, args, extra)
        print(f"[paper_suite] run {number}/{len(jobs)}: {name} seed{seed}", file=sys.stderr, flush=True)
        started = time.perf_counter()
        with log_path.open("w", encoding="utf-8") as log:
            log.write(" ".join(command) + "\n")
            log.flush()
            try:
                returncode = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, check=False).returncode
            except KeyboardInterrupt:  # stop the suite, but still judge the runs finished so far
                record["interrupted"] = f"{name} seed{seed}: interrupted; later runs not started"
                _save_record(args.output_dir, record)
                return
        wall = time.perf_counter() - started
        record["runs"].append({"cell": name, "seed": seed, "returncode": returncode, "wall_seconds": wall,
                               "log": str(log_path.relative_to(args.output_dir)), "command": command})
        _save_record(args.output_dir, record)
        if returncode != 0:
            tail = log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-LOG_TAIL_LINES:]
            print(f"[paper_suite] {name} seed{seed} failed (exit code {returncode}), log {log_path}; last lines:\n"
                  + "\n".join(f"    {line}" for line in tail), file=sys.stderr, flush=True)


def _save_record(output_dir: Path, record: dict) -> None:
    (output_dir / "suite.json").write_text(json.dumps(record, indent=2), encoding="utf-8")


# ---------------------------------------------------------------------------------------------
# Reporting.


def judge_all(claims: list[Claim], settings: SuiteSettings, record: dict, output_dir: Path) -> dict:
    """Write each claim's compare report from the finished runs and judge it; return {claim key: result}."""
    finished = {(run["cell"], run["seed"]) for run in record["runs"] if run["returncode"] == 0}
    failed = defaultdict(list)  # run cell -> what went wrong, per seed
    for run in record["runs"]:
        if run["returncode"] != 0:
            failed[run["cell"]].append(f"seed{run['seed']}: exit code {run['returncode']}, log {run['log']}")
    results = {}
    for claim in claims:
        runs, failures = {}, []
        for display, (cell, target) in claim.cells(settings).items():
            name = cell.name(target)
            dirs = [output_dir / name / f"seed{seed}" for seed in record["seeds"] if (name, seed) in finished]
            if dirs:
                runs[display] = dirs
            failures += [f"{display} ({name}) {failure}" for failure in failed[name]]
        report_dir = output_dir / "claims" / f"{claim.number}-{claim.slug}"
        report = write_report(runs, report_dir, None, failures, title=f"Claim {claim.number}: {claim.title}")
        results[f"{claim.number}_{claim.slug}"] = {
            "title": claim.title, "goal": claim.goal, "report": str(report_dir.relative_to(output_dir)),
            "failed_runs": failures, **claim.judge(report, settings)}
    return results


def warm_start_measured(record: dict, output_dir: Path, settings: SuiteSettings) -> dict:
    """GRPO on-policy's entropy at the start: entropy_initial (first 10 steps) and the first eval's entropy_true.

    The targets are fractions of the warm-start entropy given by --warm-start-entropy; this says
    how close that figure was to the runs' own.
    """
    name = GRPO_ON.name(settings.main_target)
    initial, first_eval = [], []
    for run in record["runs"]:
        if run["cell"] != name or run["returncode"] != 0:
            continue
        try:  # the compare report's reading: summary.json, its missing fields computed from the metrics
            summary, _, evals = summarize_run(output_dir / name / f"seed{run['seed']}", None)
        except (OSError, ValueError):
            continue
        if summary.get("entropy_initial") is not None:
            initial.append(summary["entropy_initial"])
        evals = [row for row in evals if row.get("entropy_true") is not None]
        if evals:
            first_eval.append(min(evals, key=lambda row: row["step"])["entropy_true"])
    return {"assumed": settings.warm_start_entropy, "entropy_initial": _mean(initial),
            "first_eval_entropy_true": _mean(first_eval), "runs": len(initial)}


# Settings every run of the suite shares (the countdown preset unless passed after `--`), shown in results.md.
SHARED_SETTINGS = (("run", "actor_learning_rate", "lr"), ("run", "rollout_batch_size", "prompts per step"),
                   ("run", "n_samples_per_prompt", "samples per prompt"), ("run", "generate_max_len", "max new tokens"),
                   ("run", "eval_steps", "eval every"), ("run", "eval_n_samples", "eval samples per prompt"),
                   ("entropic", "kp", "kp"), ("entropic", "ki", "ki (PI cells)"),
                   ("entropic", "target_warmup_steps", "target ramp steps"), ("entropic", "alpha_max", "alpha_max"),
                   ("entropic", "mode", "loss mode"), ("entropic", "high_prob_threshold", "high_prob threshold"))


def shared_settings(record: dict, output_dir: Path, settings: SuiteSettings) -> dict[str, object]:
    """SHARED_SETTINGS as the main EntroPIC on-policy cell's first finished run stored them (config.json)."""
    name = RunCell(entropic=True, staleness=0).name(settings.main_target)
    for run in record["runs"]:
        path = output_dir / name / f"seed{run['seed']}" / "config.json"
        if run["cell"] == name and run["returncode"] == 0 and path.is_file():
            config = json.loads(path.read_text(encoding="utf-8"))
            return {label: config.get(section, {}).get(key, "n/a") for section, key, label in SHARED_SETTINGS}
    return {}


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def results_markdown(summary: dict, claims: list[Claim], published: bool = False) -> str:
    """OUT/results.md: the setup, a summary table, one section per claim with its figures and plots, the runs.

    published: the copy for --publish DIR, whose plots lie under DIR/results/ and whose claim
    reports stay in OUT (not copied: they are big and name every run's log).
    """
    runs = summary["runs"]
    failed = [run for run in runs if run["returncode"] != 0]
    warm = summary["warm_start_entropy"]
    lines = [
        "# EntroPIC paper claims on the countdown task",
        "",
        f"Measured with `{summary['command']}` at commit `{summary['commit']}` "
        f"(python -m openrlhf_entropic.cli.train --task countdown, the countdown preset: see "
        "openrlhf_entropic/runtime/local/config.py). "
        f"Seeds {', '.join(map(str, summary['seeds']))}; {summary['steps']} steps per run"
        + (f"; extra train flags `{' '.join(summary['extra'])}`" if summary["extra"] else "") + ".",
        "",
        (f"This report was rebuilt from those runs at commit `{summary['report_commit']}`. "
         if summary.get("report_commit", summary["commit"]) != summary["commit"] else "")
        + "Settings of every run: " + (", ".join(f"{label} {value}" for label, value in
                                                  summary.get("shared_settings", {}).items()) or "n/a")
        + f"; async cells at K = {ASYNC_K} (claims 4-5 also K = {LONG_K}), P cells with ki 0. "
        "Each EntroPIC target ramps down from the warm-start entropy.",
        "",
        f"Suite wall time {_duration(summary['suite_seconds'])} for {len(runs)} runs ({len(failed)} failed)"
        + (f"; {summary['interrupted']}" if summary.get("interrupted") else "") + ". "
        "Every figure is mean ± sample std over seeds (n = runs with the value); one run shows its value "
        "with (n=1). Field definitions: docs/compare.md.",
        "",
        f"Targets are fractions of the warm-start entropy, taken as {warm['assumed']:g} nats "
        f"(`--warm-start-entropy`; each EntroPIC target ramps from it). Measured on GRPO on-policy: "
        f"entropy_initial {_num(warm['entropy_initial'])} (mean of the first 10 steps), first evaluation's "
        f"true entropy {_num(warm['first_eval_entropy_true'])}.",
        "",
        "## Summary",
        "",
        "| claim | goal | result |",
        "|---|---|---|",
    ]
    for claim in claims:
        result = summary["claims"][f"{claim.number}_{claim.slug}"]
        lines.append(f"| {claim.number}. {claim.title} | {claim.goal} | {_verdict(result)} |")
    for claim in claims:
        result = summary["claims"][f"{claim.number}_{claim.slug}"]
        lines += ["", f"## {claim.number}. {claim.title}", "", f"Goal: {claim.goal}. Result: {_verdict(result)}.", ""]
        lines += SECTIONS[claim.number](result)
        if result["missing"]:
            lines += ["", "Not measured (no finished run): " + ", ".join(result["missing"]) + "."]
        if result["failed_runs"]:
            lines += ["", "Failed runs: " + "; ".join(result["failed_runs"]) + "."]
        report = result["report"]
        if published:
            lines += ["", f"Full table, run config and every plot: `{summary['output_dir']}/{report}/report.md`, "
                      "written by the command."]
        else:
            lines += ["", f"Full table, run config and plots: [{report}/report.md]({report}/report.md)."]
        lines += [f"![{claim.slug} {plot}]({'results/' if published else ''}{report}/{plot})" for plot in claim.plots
                  if (Path(summary["output_dir"]) / report / plot).is_file()]
    lines += ["", "## Runs", "", "| cell | seed | exit code | wall time (process) | log |", "|---|---|---|---|---|"]
    for run in runs:
        lines.append(f"| {run['cell']} | {run['seed']} | {run['returncode']} | {_duration(run['wall_seconds'])} "
                     f"| {run['log']} |")
    return "\n".join(lines) + "\n"


def _collapse_section(result: dict) -> list[str]:
    lines = [f"| cell | entropy_initial | entropy_final | final / initial | seeds <= {COLLAPSE_RATIO} | met |",
             "|---|---|---|---|---|---|"]
    for name, cell in result["cells"].items():
        ratio = cell["final_over_initial"]
        seeds = "n/a" if ratio is None else f"{cell['seeds_met']} of {ratio['n']}"
        lines.append(f"| {name} | {format_stats(cell['entropy_initial'])} | {format_stats(cell['entropy_final'])} | "
                     f"{format_stats(ratio)} | {seeds} | {_yes(cell['met'])} |")
    return lines


def _control_section(result: dict) -> list[str]:
    lines = ["| cell | target | entropy_final | entropy_tracking_error | entropy_eval_tracking_error | met |",
             "|---|---|---|---|---|---|"]
    for name, cell in result["cells"].items():
        target = ", ".join(f"{t:g}" for t in cell["target"] or []) or "n/a"
        lines.append(f"| {name} | {target} | {format_stats(cell['entropy_final'])} | "
                     f"{format_stats(cell['entropy_tracking_error'])} | "
                     f"{format_stats(cell['entropy_eval_tracking_error'])} | {_yes(cell['met'])} |")
    return lines


def _solve_rate_section(result: dict) -> list[str]:
    k = ", ".join(map(str, result["k"])) or "?"
    lines = [f"k = {k}.", "", "| metric, regime | EntroPIC | GRPO | difference | > seed std | met |",
             "|---|---|---|---|---|---|"]
    for key, comparison in result["comparisons"].items():
        lines.append(f"| {key} | {format_stats(comparison['entropic'])} | {format_stats(comparison['grpo'])} | "
                     f"{_signed(comparison.get('difference'))} | {_exceeds(comparison)} | {_yes(comparison['met'])} |")
    return lines


def _p_vs_pi_section(result: dict) -> list[str]:
    lines = ["| K | field | PI (preset ki) | P (ki 0) | PI - P | > seed std |", "|---|---|---|---|---|---|"]
    for key, comparison in result["comparisons"].items():
        for field in ("entropy_tracking_error", "entropy_eval_tracking_error", "pass_at_k"):
            figures = comparison[field]
            lines.append(f"| {key[1:]} | {field} | {format_stats(figures['pi'])} | {format_stats(figures['p'])} | "
                         f"{_signed(figures.get('difference'))} | {_exceeds(figures)} |")
    lines += ["", "Met (PI's entropy_tracking_error lower beyond the seed std): "
              + ", ".join(f"K={key[1:]} {_yes(c['met'])}" for key, c in result["comparisons"].items()) + "."]
    return lines


def _estimator_section(result: dict) -> list[str]:
    lines = ["| field | importance_weighted | unweighted (on_policy) | IW - unweighted | > seed std |",
             "|---|---|---|---|---|"]
    for field in ("entropy_eval_tracking_error", "entropy_tracking_error"):
        figures = result[field]
        lines.append(f"| {field} | {format_stats(figures['importance_weighted'])} | "
                     f"{format_stats(figures['unweighted'])} | {_signed(figures.get('difference'))} | "
                     f"{_exceeds(figures)} |")
    lines += ["", "entropy_tracking_error scores each run's own training-time estimate, which is what the "
              "controller saw; entropy_eval_tracking_error scores the true entropy on fresh samples."]
    return lines


def _throughput_section(result: dict) -> list[str]:
    lines = ["| algorithm | samples/s on-policy | samples/s async | speedup | > seed std | seconds on-policy | "
             "seconds async |", "|---|---|---|---|---|---|---|"]
    for algorithm, c in result["comparisons"].items():
        speedup = "n/a" if c["speedup"] is None else f"{c['speedup']:.3g}x"
        lines.append(f"| {algorithm} | {format_stats(c['samples_per_second_on_policy'])} | "
                     f"{format_stats(c['samples_per_second_async'])} | {speedup} | {_exceeds(c)} | "
                     f"{format_stats(c['seconds_on_policy'])} | {format_stats(c['seconds_async'])} |")
    lines += ["", "Every run trains the same number of samples (same steps and batch), so the seconds compare "
              "the same work; samples/s is the steady state (second half), seconds the whole run from summary.json."]
    return lines


SECTIONS = {1: _collapse_section, 2: _control_section, 3: _solve_rate_section, 4: _p_vs_pi_section,
            5: _estimator_section, 6: _throughput_section}


def _verdict(result: dict) -> str:
    return {True: "met", False: "not met", None: "not judged (missing runs or one seed)"}[result["met"]]


def _yes(value: bool | None) -> str:
    return {True: "yes", False: "no", None: "n/a"}[value]


def _exceeds(figures: dict) -> str:
    exceeds = figures.get("exceeds_seed_std")
    if exceeds is None:
        return "n/a (no seed spread)" if figures.get("difference") is not None else "n/a"
    return f"{'yes' if exceeds else 'no'} (std {figures['seed_std']:.2g})"


def _signed(value: float | None) -> str:
    return "n/a" if value is None else f"{value:+.3g}"


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3g}"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "n/a"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m {secs:02d}s" if hours else f"{minutes}m {secs:02d}s"


def publish(summary: dict, claims: list[Claim], directory: Path) -> None:
    """Write DIR/results.md and copy the plots it shows to DIR/results/ (replacing an older copy)."""
    plots = directory / "results"
    shutil.rmtree(plots, ignore_errors=True)
    for claim in claims:
        report = summary["claims"][f"{claim.number}_{claim.slug}"]["report"]
        for plot in claim.plots:
            source = Path(summary["output_dir"]) / report / plot
            if source.is_file():
                (plots / report).mkdir(parents=True, exist_ok=True)
                shutil.copy(source, plots / report / plot)
    (directory / "results.md").write_text(results_markdown(summary, claims, published=True), encoding="utf-8")
    print(f"[paper_suite] published {directory / 'results.md'}", file=sys.stderr)


# ---------------------------------------------------------------------------------------------
# Command line.


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """The suite's flags, and the flags after `--` that pass through to every training run."""
    extra = []
    if "--" in argv:
        split = argv.index("--")
        argv, extra = argv[:split], argv[split + 1:]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     epilog="Flags after `--` go to every `cli.train` run.")
    parser.add_argument("--output-dir", type=Path, default=Path("runs/paper_suite"),
                        help="Runs, claim reports and results.md go here (default: runs/paper_suite).")
    parser.add_argument("--seeds", type=comma_list(int), default=[0, 1, 2], help="Comma-separated (default 0,1,2).")
    parser.add_argument("--steps", type=int, default=300, help="Training steps per run (default 300).")
    parser.add_argument("--claims", type=comma_list(int), default=[claim.number for claim in CLAIMS],
                        help="Comma-separated claim numbers to run (default: all, 1-6).")
    parser.add_argument("--warm-start-entropy", type=float, default=0.8,
                        help="Entropy (nats) of the countdown warm start; the targets are fractions of it and "
                        "ramp from it (default 0.8, the countdown preset's target_start).")
    parser.add_argument("--target-fractions", type=comma_list(float), default=[0.5, MAIN_FRACTION, 1.0],
                        help="Claim 2's targets as fractions of --warm-start-entropy (default 0.5,0.75,1.0: "
                        "between where GRPO ends after 300 steps and the warm start). "
                        f"Claims 3-6 use {MAIN_FRACTION}.")
    parser.add_argument("--dry-run", action="store_true", help="Print the cells and commands; run nothing.")
    parser.add_argument("--publish", type=Path, metavar="DIR",
                        help="Also write DIR/results.md with the plots it shows under DIR/results/ "
                        "(`--publish docs` makes the repository's docs/results.md).")
    parser.add_argument("--report-only", action="store_true",
                        help="Run nothing; rebuild the claim reports and results.md from OUT/suite.json.")
    parser.add_argument("--train-module", default="openrlhf_entropic.cli.train", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    known = {claim.number for claim in CLAIMS}
    if not args.claims or set(args.claims) - known:
        parser.error(f"--claims: choose from {sorted(known)}, got {args.claims}")
    if not args.seeds:
        parser.error("--seeds needs at least one seed")
    if args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    if not args.warm_start_entropy > 0 or not all(f > 0 for f in args.target_fractions):
        parser.error("--warm-start-entropy and --target-fractions must be > 0")
    clashing = [flag for flag in extra if flag.split("=")[0] in SUITE_FLAGS]
    if clashing:
        parser.error(f"{', '.join(clashing)} after `--`: the suite sets these per cell; use its own flags")
    if args.report_only and (extra or args.dry_run):
        parser.error("--report-only runs nothing: no train flags after `--`, no --dry-run")
    return args, extra


def main(argv: list[str] | None = None) -> int:
    """Run (or plan) the suite; print the JSON summary; 1 if a run failed, else 0."""
    argv = sys.argv[1:] if argv is None else argv
    args, extra = parse_args(argv)
    settings = SuiteSettings(args.warm_start_entropy, tuple(args.target_fractions))
    claims = [claim for claim in CLAIMS if claim.number in args.claims]
    cells = plan(claims, settings)

    if args.dry_run:
        print(f"{len(cells)} cells x {len(args.seeds)} seeds = {len(cells) * len(args.seeds)} runs "
              f"(claims {', '.join(str(c.number) for c in claims)})")
        for name, (cell, target, served) in cells.items():
            print(f"\n{name}  (claims {', '.join(map(str, served))})")
            for seed in args.seeds:
                command = train_command(cell, target, seed, args.output_dir / name / f"seed{seed}", args, extra)
                print("  " + " ".join(command))
        return 0

    record_path = args.output_dir / "suite.json"
    if args.report_only:
        if not record_path.is_file():
            print(f"[paper_suite] {record_path} not found: nothing to report", file=sys.stderr)
            return 1
        record = json.loads(record_path.read_text(encoding="utf-8"))
    else:
        args.output_dir.mkdir(parents=True, exist_ok=True)
        record = {"command": " ".join(["python", "benchmarks/paper_suite.py", *argv]), "commit": git_commit(),
                  "seeds": args.seeds, "steps": args.steps, "extra": extra,
                  "warm_start_entropy": args.warm_start_entropy, "target_fractions": args.target_fractions,
                  "runs": []}
        started = time.perf_counter()
        run_all(cells, args, extra, record)
        record["suite_seconds"] = time.perf_counter() - started
        _save_record(args.output_dir, record)

    settings = SuiteSettings(record["warm_start_entropy"], tuple(record["target_fractions"]))
    summary = {
        "command": record["command"], "commit": record.get("commit") or git_commit(), "seeds": record["seeds"],
        "steps": record["steps"], "extra": record["extra"], "suite_seconds": record.get("suite_seconds"), "output_dir": str(args.output_dir),
        "interrupted": record.get("interrupted"), "runs": record["runs"],
        "warm_start_entropy": warm_start_measured(record, args.output_dir, settings),
        "shared_settings": shared_settings(record, args.output_dir, settings), "report_commit": git_commit(),
        "claims": judge_all(claims, settings, record, args.output_dir),
    }
    (args.output_dir / "results.md").write_text(results_markdown(summary, claims), encoding="utf-8")
    printed = {**summary, "runs": [{key: run[key] for key in ("cell", "seed", "returncode", "wall_seconds")}
                                   for run in summary["runs"]]}
    (args.output_dir / "results.json").write_text(json.dumps(printed, indent=2), encoding="utf-8")
    print(json.dumps(printed, indent=2))
    print(f"[paper_suite] wrote {args.output_dir / 'results.md'}", file=sys.stderr)
    if args.publish:
        publish(summary, claims, args.publish)
    failed = [run for run in record["runs"] if run["returncode"] != 0]
    return 1 if failed or record.get("interrupted") else 0


if __name__ == "__main__":
    sys.exit(main())
