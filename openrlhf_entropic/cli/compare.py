"""GRPO vs EntroPIC, on-policy vs async off-policy: run the grid, then write report.md and plots.

    python -m openrlhf_entropic.cli.compare --output-dir runs/compare --seeds 0,1,2 --steps 200
    python -m openrlhf_entropic.cli.compare --output-dir runs/compare --modes high_prob,all_tokens,covariance
    python -m openrlhf_entropic.cli.compare --report-only --output-dir runs/compare
    python -m openrlhf_entropic.cli.compare --report-only --runs grpo=DIR1 entropic=DIR2 --output-dir OUT \\
        --target-entropy 0.1

Every cell x seed runs `python -m openrlhf_entropic.cli.train` as its own process, one after
another, into OUT/<cell>/seed<S>/ (its output, including the progress bar, goes to
OUT/<cell>/seed<S>.log). Flags after `--` pass through to every run. A failed run shows its log
tail; the others go on, and compare exits non-zero at the end. Field definitions: docs/compare.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from openrlhf_entropic.entropic.config import LOSS_MODES
from openrlhf_entropic.reporting.summary import is_finite, load_run, summarize

# Rows of the report table, in this order.
REPORT_FIELDS = (
    "entropy_initial",
    "entropy_final",
    "entropy_final_over_initial",  # < 1: entropy fell (GRPO's collapse); per run, then mean over seeds
    "entropy_tracking_error",
    "entropy_eval_tracking_error",
    "reward_final",
    "pass_at_1",
    "pass_at_k",
    "samples_per_second",
    "staleness_mean",
    "staleness_max",
    "dropped_stale",
    "seconds",
)
# One PNG per metric: (file, row key, y-axis label).
PLOTS = (
    ("entropy.png", "entropy", "training-time token entropy H (nats)"),
    ("alpha.png", "alpha", "EntroPIC alpha"),
    ("reward.png", "reward_mean", "mean reward"),
    ("staleness.png", "staleness_mean", "mean staleness (policy versions)"),
)
LOG_TAIL_LINES = 30


@dataclass(frozen=True)
class Cell:
    """One column of the comparison: an algorithm in a training regime."""

    regime: str  # "on_policy" or "async"
    entropic: bool
    loss_mode: str | None = None  # None = the preset's mode

    @property
    def name(self) -> str:
        if not self.entropic:
            return f"grpo_{self.regime}"
        return f"entropic_{self.regime}" if self.loss_mode is None else f"entropic-{self.loss_mode}_{self.regime}"


def build_grid(loss_modes: list[str] | None) -> list[Cell]:
    """GRPO and EntroPIC (once per loss mode when `loss_modes` is given) in each regime, on-policy first."""
    cells = []
    for regime in ("on_policy", "async"):
        cells.append(Cell(regime, entropic=False))
        cells.extend(Cell(regime, entropic=True, loss_mode=mode) for mode in loss_modes or [None])
    return cells


def train_command(cell: Cell, seed: int, run_dir: Path, args: argparse.Namespace, extra: list[str]) -> list[str]:
    """The `cli.train` command line of one run; on-policy runs always get --max-staleness 0."""
    staleness = 0 if cell.regime == "on_policy" else args.max_staleness
    command = [sys.executable, "-m", args.train_module, "--mode", cell.regime, "--max-staleness", str(staleness)]
    command += ["--entropic.enable", "true" if cell.entropic else "false"]
    if cell.loss_mode is not None:
        command += ["--entropic.mode", cell.loss_mode]
    command += ["--seed", str(seed), "--output-dir", str(run_dir)]
    if args.steps is not None:
        command += ["--steps", str(args.steps)]
    return command + extra


def run_grid(args: argparse.Namespace, extra: list[str]) -> tuple[dict[str, list[Path]], list[str]]:
    """Run every cell x seed; return ({cell name: finished run dirs}, [failure messages])."""
    jobs = [(cell, seed) for cell in build_grid(args.modes) for seed in args.seeds]
    finished: dict[str, list[Path]] = defaultdict(list)
    failures = []
    progress = tqdm(jobs, desc="compare", unit="run")
    for cell, seed in progress:
        progress.set_postfix_str(f"{cell.name} seed{seed}")
        run_dir = args.output_dir / cell.name / f"seed{seed}"
        log_path = run_dir.with_suffix(".log")
        if run_dir.exists():  # a run from an earlier compare: replaced, never mixed into this one
            shutil.rmtree(run_dir)
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        command = train_command(cell, seed, run_dir, args, extra)
        with log_path.open("w", encoding="utf-8") as log:
            log.write(" ".join(command) + "\n")
            log.flush()
            try:
                returncode = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, check=False).returncode
            except KeyboardInterrupt:  # Ctrl-C: stop the grid, but still report the finished runs
                failures.append(f"{cell.name} seed{seed}: interrupted; later runs not started")
                break
        if returncode == 0:
            finished[cell.name].append(run_dir)
            continue
        tail = log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-LOG_TAIL_LINES:]
        failures.append(f"{cell.name} seed{seed}: exit code {returncode}, log {log_path}")
        tqdm.write(
            f"[compare] {failures[-1]}; last lines:\n" + "\n".join(f"    {line}" for line in tail), file=sys.stderr
        )
    return dict(finished), failures


def discover_runs(root: Path) -> dict[str, list[Path]]:
    """Run dirs at any depth under `root`, grouped by cell: a dir holding metrics.jsonl, or else
    TensorBoard event files (not inside such a dir). OUT/<cell>/seed<S> belongs to cell <cell>."""
    metric_dirs = {path.parent for path in root.rglob("metrics.jsonl")}
    event_dirs = {path.parent for path in root.rglob("events.out.tfevents.*")}
    event_dirs = {d for d in event_dirs if not any(m == d or m in d.parents for m in metric_dirs)}
    runs: dict[str, list[Path]] = defaultdict(list)
    for run_dir in sorted(metric_dirs | event_dirs):
        runs[_cell_of(run_dir, root)].append(run_dir)

    def grid_order(name: str) -> tuple:  # a fresh compare's column order (on-policy, GRPO first), then the rest
        regime = {"on_policy": 0, "async": 1}.get(_split_regime(name)[1], 2)
        return (regime, not name.startswith("grpo"), name)

    return {name: runs[name] for name in sorted(runs, key=grid_order)}


def _split_regime(name: str) -> tuple[str, str | None]:
    """Split "entropic_async" into ("entropic", "async"); `_off_policy` (the cluster scripts' word) is async too."""
    for suffix, regime in (("_on_policy", "on_policy"), ("_async", "async"), ("_off_policy", "async")):
        if name.endswith(suffix):
            return name.removesuffix(suffix), regime
    return name, None


def _cell_of(run_dir: Path, root: Path) -> str:
    parts = run_dir.relative_to(root).parts or (run_dir.name,)
    if len(parts) > 1 and re.fullmatch(r"seed\d+", parts[-1]):
        parts = parts[:-1]
    return "/".join(parts)


def parse_runs(specs: list[str]) -> dict[str, list[Path]]:
    """`NAME=DIR` or `DIR` (named after the dir, or its parent for .../<cell>/seed<S>); same NAME = seeds."""
    runs: dict[str, list[Path]] = defaultdict(list)
    for spec in specs:
        name, separator, directory = spec.partition("=")
        path = Path(directory if separator else spec)
        if not separator:
            name = path.parent.name if re.fullmatch(r"seed\d+", path.name) else path.name
        runs[name].append(path)
    return dict(runs)


def summarize_run(run_dir: Path, target_entropy: float | None) -> tuple[dict, list[dict], list[dict]]:
    """(summary, training rows, eval rows) of one run dir.

    The run's own summary.json wins; fields it lacks are computed from its metrics against the
    target the run recorded, else `target_entropy`.
    """
    rows, eval_rows, saved = load_run(run_dir)
    saved = saved or {}
    recorded = saved.get("target_entropy") or next(
        (row["target_entropy"] for row in reversed(rows) if row.get("target_entropy")), None
    )
    target = recorded or target_entropy
    if target is None:
        raise ValueError(f"{run_dir}: no target entropy recorded in the run; pass --target-entropy")
    return {**summarize(rows, target, eval_rows), **saved, "target_entropy": target}, rows, eval_rows


def write_report(runs: dict[str, list[Path]], output_dir: Path, target_entropy: float | None, failures: list[str]):
    """Write report.md, report.json and the PNG plots for `runs` ({cell: run dirs}); return the report dict."""
    cells: dict[str, dict] = {}
    for name, run_dirs in runs.items():
        loaded, read_dirs = [], []
        for run_dir in run_dirs:
            try:
                loaded.append(summarize_run(run_dir, target_entropy))
                read_dirs.append(run_dir)
            except (OSError, ValueError) as error:
                failures.append(f"{name}: cannot read {run_dir}: {error}")
        if not loaded:
            continue
        summaries = [summary for summary, _, _ in loaded]
        skipped = defaultdict(int)
        for summary in summaries:
            initial, final = summary.get("entropy_initial"), summary.get("entropy_final")
            if is_finite(initial) and is_finite(final) and initial > 0:
                summary["entropy_final_over_initial"] = final / initial
            for key, count in summary.get("skipped_values", {}).items():
                skipped[key] += count
        fields = {}
        for field in REPORT_FIELDS:
            values = [s[field] for s in summaries if is_finite(s.get(field))]
            # Sample standard deviation over seeds; 0 for a single seed.
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            fields[field] = {"mean": statistics.fmean(values), "std": std, "values": values} if values else None
        entropy_key = summaries[0].get("entropy_series", "entropy")
        cells[name] = {
            "runs": [os.path.relpath(run_dir, output_dir) for run_dir in read_dirs],  # the report can move with them
            "target_entropy": sorted({s["target_entropy"] for s in summaries}),
            "k": sorted({s["k"] for s in summaries if s.get("k") is not None}),
            "fields": fields,
            "skipped_values": dict(sorted(skipped.items())),
            # The entropy plot shows the series the summary scored (entropy_iw when logged).
            "series": {
                key: _mean_over_seeds([rows for _, rows, _ in loaded], entropy_key if key == "entropy" else key)
                for _, key, _ in PLOTS
            },
            "eval_entropy": _mean_over_seeds([evals for _, _, evals in loaded], "entropy_true"),
        }

    # The async speed-up: samples_per_second of X_async over that of X_on_policy (ratio of the means).
    for name, cell in cells.items():
        algorithm, regime = _split_regime(name)
        base = cells.get(f"{algorithm}_on_policy") if regime == "async" else None
        fast, slow = cell["fields"]["samples_per_second"], base and base["fields"]["samples_per_second"]
        cell["speedup_vs_on_policy"] = fast["mean"] / slow["mean"] if fast and slow and slow["mean"] > 0 else None

    output_dir.mkdir(parents=True, exist_ok=True)
    plot_files = _write_plots(cells, output_dir)
    (output_dir / "report.md").write_text(_report_markdown(cells, plot_files, failures), encoding="utf-8")
    report = {name: {key: value for key, value in cell.items() if key != "series"} for name, cell in cells.items()}
    (output_dir / "report.json").write_text(json.dumps({"cells": report, "failures": failures}, indent=2))
    return report


def _mean_over_seeds(row_lists: list[list[dict]], key: str) -> tuple[list[float], list[float]]:
    """(steps, mean of `key` over the seeds that logged a finite value at that step).

    Within one seed a repeated step (a resumed run) keeps its last value, as in the summary."""
    by_step = defaultdict(list)
    for rows in row_lists:
        last = {row["step"]: float(row[key]) for row in rows if is_finite(row.get(key)) and is_finite(row.get("step"))}
        for step, value in last.items():
            by_step[step].append(value)
    steps = sorted(by_step)
    return steps, [statistics.fmean(by_step[step]) for step in steps]


def _write_plots(cells: dict[str, dict], output_dir: Path) -> list[str]:
    """One PNG per metric in PLOTS, one line per cell; return the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Colour = algorithm, line style = regime, so that a cell's on- and off-policy runs pair up by eye.
    algorithms = list(dict.fromkeys(_split_regime(name)[0] for name in cells))
    written = []
    for file_name, key, label in PLOTS:
        figure, axes = plt.subplots(figsize=(7, 4))
        drew = drew_eval = False
        for name, cell in cells.items():
            algorithm, regime = _split_regime(name)
            color = f"C{algorithms.index(algorithm) % 10}"
            steps, values = cell["series"][key]
            if steps:
                axes.plot(steps, values, color=color, linestyle="--" if regime == "async" else "-", label=name, lw=1.2)
                drew = True
            if key == "entropy" and cell["eval_entropy"][0]:
                # The true entropy from fresh samples: shows how far the training-time estimate is off.
                axes.plot(*cell["eval_entropy"], color=color, linestyle=":", marker="o", markersize=3)
                drew_eval = True
        if drew_eval:
            axes.plot([], [], color="gray", linestyle=":", marker="o", markersize=3, label="eval: true entropy")
        if key == "entropy":
            for target in sorted({t for cell in cells.values() for t in cell["target_entropy"]}):
                axes.axhline(target, color="black", linestyle="-.", linewidth=1.5, label=f"target H* = {target:g}")
        if not drew:
            plt.close(figure)
            continue
        axes.set_xlabel("training step")
        axes.set_ylabel(label)
        axes.grid(alpha=0.3)
        axes.legend(fontsize=7)
        figure.tight_layout()
        figure.savefig(output_dir / file_name, dpi=100)
        plt.close(figure)
        written.append(file_name)
    return written


def _report_markdown(cells: dict[str, dict], plot_files: list[str], failures: list[str]) -> str:
    names = list(cells)
    lines = ["# Compare report", ""]
    if names:
        lines += [
            "Mean ± sample std over seeds; n/a = not logged by any run of the cell. Definitions: docs/compare.md.",
            "",
        ]
        lines += ["| field | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        lines.append("| seeds | " + " | ".join(str(len(cells[n]["runs"])) for n in names) + " |")
        targets = [", ".join(f"{t:g}" for t in cells[n]["target_entropy"]) for n in names]
        lines.append("| target_entropy | " + " | ".join(targets) + " |")
        for field in REPORT_FIELDS:
            row = []
            for name in names:
                stats = cells[name]["fields"][field]
                # Rounding first keeps float dust (1e-16) from printing as a number.
                row.append("n/a" if stats is None else f"{round(stats['mean'], 6):.4g} ± {round(stats['std'], 6):.2g}")
            ks = sorted({k for cell in cells.values() for k in cell["k"]})
            label = f"pass_at_k (k={', '.join(str(k) for k in ks)})" if field == "pass_at_k" and ks else field
            lines.append(f"| {label} | " + " | ".join(row) + " |")
            if field == "samples_per_second":
                speedups = [cells[name]["speedup_vs_on_policy"] for name in names]
                texts = ["" if value is None else f"{value:.3g}x" for value in speedups]
                lines.append("| speedup_vs_on_policy | " + " | ".join(texts) + " |")
    else:
        lines.append("No finished runs.")
    skipped = [
        f"{name} (" + ", ".join(f"{key}: {count}" for key, count in cells[name]["skipped_values"].items()) + ")"
        for name in names
        if cells[name]["skipped_values"]
    ]
    if skipped:
        lines += ["", "Values left out as missing or NaN (rows, summed over seeds): " + "; ".join(skipped) + "."]
    if failures:
        lines += ["", "## Failed runs", ""] + [f"- {failure}" for failure in failures]
    if plot_files:
        lines += ["", "## Plots", ""] + [f"![{Path(f).stem}]({f})" for f in plot_files]
    lines += ["", "## Run directories", ""]
    lines += [f"- {name}: " + ", ".join(cells[name]["runs"]) for name in names]
    return "\n".join(lines) + "\n"


def _comma_list(kind):
    """argparse type for "a,b,c"; its name makes argparse say "invalid comma-separated int value"."""

    def parse(text: str) -> list:
        return [kind(item.strip()) for item in text.split(",") if item.strip()]

    parse.__name__ = f"comma-separated {kind.__name__}"
    return parse


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """Compare's own flags, and the flags after `--` that pass through to every training run."""
    extra = []
    if "--" in argv:
        split = argv.index("--")
        argv, extra = argv[:split], argv[split + 1 :]
    parser = argparse.ArgumentParser(
        prog="python -m openrlhf_entropic.cli.compare",
        description="Run GRPO vs EntroPIC x on-policy vs async off-policy and write report.md + plots. "
        "Flags after `--` go to every `cli.train` run.",
    )
    parser.add_argument(
        "--output-dir", type=Path, default=Path("runs/compare"), help="Runs and report go here (default: runs/compare)."
    )
    parser.add_argument(
        "--seeds",
        type=_comma_list(int),
        default=None,
        help="Comma-separated seeds, e.g. 0,1,2 (default: 0).",
    )
    parser.add_argument("--max-staleness", type=int, default=None,
                        help="K of the async cells (default 4; on-policy cells use 0).")
    parser.add_argument(
        "--modes",
        type=_comma_list(str),
        default=None,
        help=f"Ablation: one EntroPIC cell per loss mode, from {','.join(LOSS_MODES)}; "
        "default: one EntroPIC cell with the preset's mode.",
    )
    parser.add_argument("--steps", type=int, default=None, help="Training steps per run (default: the preset's).")
    parser.add_argument(
        "--target-entropy",
        type=float,
        default=None,
        help="H* for runs that do not record theirs (e.g. OpenRLHF TensorBoard logs).",
    )
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="Run nothing; rebuild the report from run dirs under --output-dir (or --runs).",
    )
    parser.add_argument(
        "--runs",
        nargs="+",
        default=None,
        metavar="[NAME=]DIR",
        help="With --report-only: these run dirs (metrics.jsonl or TensorBoard events); repeat a NAME to group seeds.",
    )
    parser.add_argument("--train-module", default="openrlhf_entropic.cli.train", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.report_only:
        typed = [flag for flag, value in (("--seeds", args.seeds), ("--max-staleness", args.max_staleness),
                                          ("--modes", args.modes), ("--steps", args.steps)) if value is not None]
        if typed:
            parser.error(f"{', '.join(typed)} shape the runs; --report-only runs nothing and reports what exists")
    args.seeds = [0] if args.seeds is None else args.seeds
    args.max_staleness = 4 if args.max_staleness is None else args.max_staleness
    if not args.seeds:
        parser.error("--seeds needs at least one seed")
    if args.max_staleness < 1:
        parser.error(f"--max-staleness of the async cells must be >= 1, got {args.max_staleness}")
    if args.steps is not None and args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    unknown = [mode for mode in args.modes or [] if mode not in LOSS_MODES]
    if unknown:
        parser.error(f"--modes: unknown loss mode(s) {unknown}; choose from {list(LOSS_MODES)}")
    if args.target_entropy is not None and not args.target_entropy > 0:
        parser.error(f"--target-entropy must be > 0, got {args.target_entropy}")
    if args.runs and not args.report_only:
        parser.error("--runs builds a report from existing runs; add --report-only")
    if args.report_only and extra:
        parser.error("flags after `--` go to training runs; --report-only runs nothing")
    return args, extra


def main(argv: list[str] | None = None) -> int:
    args, extra = parse_args(sys.argv[1:] if argv is None else argv)
    failures: list[str] = []
    if args.runs:
        runs = parse_runs(args.runs)
    elif args.report_only:
        runs = discover_runs(args.output_dir) if args.output_dir.is_dir() else {}
    else:
        runs, failures = run_grid(args, extra)
    if args.report_only and not runs:
        print(f"[compare] no run directories found under {args.output_dir}", file=sys.stderr)
        return 1
    report = write_report(runs, args.output_dir, args.target_entropy, failures)
    print(f"[compare] wrote {args.output_dir / 'report.md'} ({len(report)} cells)")
    if failures:
        print(f"[compare] {len(failures)} run(s) failed:\n" + "\n".join(f"  {f}" for f in failures), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
