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
import math
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

from openrlhf_entropic.entropic.config import LOSS_MODES, EntroPICConfig
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
    # Where a step's time goes (seconds per step, second half; the embedded runtime logs them).
    "time_generate_seconds",
    "time_wait_seconds",
    "time_forward_seconds",
    "time_backward_seconds",
    "time_optimizer_seconds",
    "time_sync_seconds",
)
# One PNG per metric: (file, row key, y-axis label, rows it comes from: "train" or "eval").
PLOTS = (
    ("entropy.png", "entropy", "token entropy (nats)", "train"),
    ("alpha.png", "alpha", "EntroPIC alpha  (alpha > 0 lowers entropy, < 0 raises it)", "train"),
    ("reward.png", "reward_mean", "mean reward of the training batch", "train"),
    ("staleness.png", "staleness_mean", "mean staleness (policy versions)", "train"),
    ("pass_at_k.png", "pass_at_k", "pass@k on fresh samples of the eval prompts", "eval"),
)
# The settings of config.json shown in the report's "Run config" section: (label, section, key).
CONFIG_ROWS = (
    ("task", "run", "task"),
    ("steps", "run", "steps"),
    ("mode", "run", "mode"),
    ("K = max_staleness", "run", "max_staleness"),
    ("actor_learning_rate", "run", "actor_learning_rate"),
    ("n_samples_per_prompt", "run", "n_samples_per_prompt"),
    ("rollout_batch_size", "run", "rollout_batch_size"),
    ("generate_max_len", "run", "generate_max_len"),
    ("entropic.enable", "entropic", "enable"),
    ("entropic.mode", "entropic", "mode"),
    ("entropic.target_entropy", "entropic", "target_entropy"),
    ("entropic.target_start", "entropic", "target_start"),
    ("entropic.target_warmup_steps", "entropic", "target_warmup_steps"),
    ("entropic.kp", "entropic", "kp"),
    ("entropic.ki", "entropic", "ki"),
    ("entropic.alpha_max", "entropic", "alpha_max"),
    ("entropic.estimator", "entropic", "estimator"),
)
# What each entropy line is, for the plot legend and report.md.
ENTROPY_SERIES_TEXT = {
    "entropy_iw": "training-time H the controller sees (entropy_iw: importance-weighted on stale samples, "
    "equal to the plain token mean on fresh ones)",
    "entropy": "training-time H (entropy: the plain token mean over the training batch)",
}
EVAL_ENTROPY_TEXT = "true entropy of the current policy on fresh samples of the eval prompts (eval: entropy_true)"
TARGET_TEXT = "target H* as applied each step (EntroPIC cells; ramps from target_start over target_warmup_steps)"
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


def load_config(run_dir: Path) -> dict | None:
    """The run's config.json ({"run": RunConfig fields, "entropic": EntroPICConfig fields}), or None.

    Runs written before config.json existed, and OpenRLHF TensorBoard runs, have none; an unreadable
    file counts as none too, so that a report is still written from the metrics.
    """
    path = Path(run_dir) / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) else None


def git_commit(directory: Path | None = None) -> str:
    """`git rev-parse --short HEAD` of the repository holding `directory` (default: this package), else "unknown".

    "+ uncommitted changes" is appended when tracked files differ from that commit, because then the
    commit alone does not say which code ran.
    """
    cwd = directory or Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=cwd, capture_output=True, text=True,
                              check=True, timeout=30).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, check=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{head} + uncommitted changes" if dirty else head or "unknown"


def format_stats(stats: dict | None) -> str:
    """One table entry: "mean ± std (n=N)" over seeds, "mean (n=1)" for one value, "n/a" for none.

    One seed has no spread, so it gets no "± 0" that would read as a measured zero spread.
    """
    if stats is None:
        return "n/a"
    # Rounding first keeps float dust (1e-16) from printing as a number.
    mean = f"{round(stats['mean'], 6):.4g}"
    if stats["n"] == 1:
        return f"{mean} (n=1)"
    return f"{mean} ± {round(stats['std'], 6):.2g} (n={stats['n']})"


def field_stats(values: list[float]) -> dict | None:
    """{"mean", "std" (sample std; None for one value), "n", "values"} of one field over seeds; None if empty."""
    if not values:
        return None
    std = statistics.stdev(values) if len(values) > 1 else None
    return {"mean": statistics.fmean(values), "std": std, "n": len(values), "values": values}


def write_report(runs: dict[str, list[Path]], output_dir: Path, target_entropy: float | None, failures: list[str],
                 title: str = "Compare report"):
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
        train_rows, eval_rows = [rows for _, rows, _ in loaded], [evals for _, _, evals in loaded]
        configs = [load_config(run_dir) for run_dir in read_dirs]
        skipped = defaultdict(int)
        for summary in summaries:
            initial, final = summary.get("entropy_initial"), summary.get("entropy_final")
            if is_finite(initial) and is_finite(final) and initial > 0:
                summary["entropy_final_over_initial"] = final / initial
            for key, count in summary.get("skipped_values", {}).items():
                skipped[key] += count
        fields = {field: field_stats([s[field] for s in summaries if is_finite(s.get(field))])
                  for field in REPORT_FIELDS}
        entropy_key = summaries[0].get("entropy_series", "entropy")
        controller = _has_controller(name, configs, summaries)
        series = {}
        for _, key, _, source in PLOTS:
            # The entropy plot shows the series the summary scored (entropy_iw when logged).
            series[key] = series_over_seeds(train_rows if source == "train" else eval_rows,
                                            entropy_key if key == "entropy" else key)
        series["entropy_true"] = series_over_seeds(eval_rows, "entropy_true")
        # GRPO logs a target too, but nothing acts on it: drawing it would suggest a controller.
        series["target_entropy"] = series_over_seeds(train_rows, "target_entropy") if controller else None
        cells[name] = {
            "runs": [os.path.relpath(run_dir, output_dir) for run_dir in read_dirs],  # the report can move with them
            "target_entropy": sorted({s["target_entropy"] for s in summaries}),
            "k": sorted({s["k"] for s in summaries if s.get("k") is not None}),
            "controller": controller,
            "entropy_series": entropy_key,
            "alpha_max": sorted({_entropic_setting(config, "alpha_max") for config in configs}),
            "config": _config_column(configs, read_dirs),
            "fields": fields,
            "skipped_values": dict(sorted(skipped.items())),
            "series": series,
        }

    # The async speed-up: samples_per_second of X_async over that of X_on_policy (ratio of the means).
    for name, cell in cells.items():
        algorithm, regime = _split_regime(name)
        base = cells.get(f"{algorithm}_on_policy") if regime == "async" else None
        fast, slow = cell["fields"]["samples_per_second"], base and base["fields"]["samples_per_second"]
        cell["speedup_vs_on_policy"] = fast["mean"] / slow["mean"] if fast and slow and slow["mean"] > 0 else None

    output_dir.mkdir(parents=True, exist_ok=True)
    plot_files = _write_plots(cells, output_dir)
    commit = git_commit()
    markdown = _report_markdown(cells, plot_files, failures, commit, title)
    (output_dir / "report.md").write_text(markdown, encoding="utf-8")
    report = {name: {key: value for key, value in cell.items() if key != "series"} for name, cell in cells.items()}
    (output_dir / "report.json").write_text(json.dumps({"commit": commit, "cells": report, "failures": failures},
                                                       indent=2))
    return report


def _has_controller(name: str, configs: list[dict | None], summaries: list[dict]) -> bool:
    """Whether the cell's runs had EntroPIC on: config.json, else summary.json, else the cell's name (grpo* = off)."""
    for config in configs:
        if config and isinstance(config.get("entropic"), dict) and "enable" in config["entropic"]:
            return bool(config["entropic"]["enable"])
    for summary in summaries:
        if "entropic_enable" in summary:
            return bool(summary["entropic_enable"])
    return not _split_regime(name)[0].startswith("grpo")


def _entropic_setting(config: dict | None, key: str):
    """An EntroPIC setting from config.json, else the EntroPICConfig default (what a run without config used)."""
    entropic = (config or {}).get("entropic")
    if isinstance(entropic, dict) and key in entropic:
        return entropic[key]
    return getattr(EntroPICConfig(), key)


def _config_column(configs: list[dict | None], run_dirs: list[Path]) -> dict[str, str] | None:
    """The report's "Run config" entries of one cell: CONFIG_ROWS from its first run's config.json, and its seeds.

    A setting that differs between the cell's runs shows every value ("a / b"): such a cell mixes
    settings, and its mean should not pass for one setting's. None when no run has a config.json.
    """
    known = [config for config in configs if config]
    if not known:
        return None
    column = {}
    for label, section, key in CONFIG_ROWS:
        values = []
        for config in known:
            part = config.get(section) if isinstance(config.get(section), dict) else {}
            text = json.dumps(part[key]) if key in part else "n/a"
            values.append(text.strip('"'))
        column[label] = " / ".join(dict.fromkeys(values))
    seeds = []
    for config, run_dir in zip(configs, run_dirs, strict=True):
        seed = ((config or {}).get("run") or {}).get("seed")
        seeds.append(str(seed) if seed is not None else f"? ({run_dir.name})")
    column["seeds"] = ", ".join(seeds)
    return column


def series_over_seeds(row_lists: list[list[dict]], key: str) -> dict[str, list]:
    """{"steps", "mean", "std", "n"} of `key` at each step over the seeds that logged a finite value there.

    `std` is the sample std, NaN where fewer than two seeds logged the step (no spread to draw).
    Within one seed a repeated step (a resumed run) keeps its last value, as in the summary.
    """
    by_step = defaultdict(list)
    for rows in row_lists:
        last = {row["step"]: float(row[key]) for row in rows if is_finite(row.get(key)) and is_finite(row.get("step"))}
        for step, value in last.items():
            by_step[step].append(value)
    steps = sorted(by_step)
    return {
        "steps": steps,
        "mean": [statistics.fmean(by_step[step]) for step in steps],
        "std": [statistics.stdev(by_step[step]) if len(by_step[step]) > 1 else math.nan for step in steps],
        "n": [len(by_step[step]) for step in steps],
    }


def _draw(axes, series: dict | None, band: bool = True, **style) -> bool:
    """Plot a series' mean over seeds, with a shaded ±std band where more than one seed logged the step.

    Returns whether anything was drawn (False for a missing or empty series).
    """
    if not series or not series["steps"]:
        return False
    import numpy as np

    steps, mean, std = (np.asarray(series[key], dtype=float) for key in ("steps", "mean", "std"))
    axes.plot(steps, mean, **{"lw": 1.2, **style})
    if band and np.isfinite(std).any():
        # NaN (one seed) leaves a gap in the band rather than a band of zero width that looks measured.
        axes.fill_between(steps, mean - std, mean + std, color=style.get("color"), alpha=0.15, linewidth=0)
    return True


def _write_plots(cells: dict[str, dict], output_dir: Path) -> list[str]:
    """One PNG per metric in PLOTS, one line per cell (mean over seeds, ±std band); return the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Colour = algorithm, line style = regime, so that a cell's on- and off-policy runs pair up by eye.
    algorithms = list(dict.fromkeys(_split_regime(name)[0] for name in cells))
    styles = {}
    for name in cells:
        algorithm, regime = _split_regime(name)
        color, linestyle = f"C{algorithms.index(algorithm) % 10}", "--" if regime == "async" else "-"
        styles[name] = {"color": color, "linestyle": linestyle}
    ks = sorted({k for cell in cells.values() for k in cell["k"]})
    written = []
    for file_name, key, label, source in PLOTS:
        figure, axes = plt.subplots(figsize=(11, 4.5), layout="constrained")
        # Evaluations are sparse (every --eval-steps): markers show where the measurements are.
        markers = {"marker": "o", "markersize": 3} if source == "eval" else {}
        drew = False
        for name, cell in cells.items():
            drew |= _draw(axes, cell["series"][key], label=name, **styles[name], **markers)
        if not drew:
            plt.close(figure)
            continue
        keys = []  # legend entries that say what each line style means
        if key == "entropy":
            keys += _draw_entropy_layers(axes, cells, styles)
        if key == "alpha":
            keys += _draw_alpha_bounds(axes, cells)
        if any(n > 1 for cell in cells.values() if cell["series"][key] for n in cell["series"][key]["n"]):
            keys.append(plt.Rectangle((0, 0), 1, 1, color="gray", alpha=0.15, label="band: ± std over seeds"))
        axes.set_xlabel("training step")
        axes.set_ylabel(label.replace("pass@k", f"pass@k (k={', '.join(map(str, ks))})") if ks else label)
        axes.grid(alpha=0.3)
        handles, _ = axes.get_legend_handles_labels()
        figure.legend(handles=handles + keys, loc="outside right upper", fontsize=7)
        figure.savefig(output_dir / file_name, dpi=100)
        plt.close(figure)
        written.append(file_name)
    return written


def _draw_entropy_layers(axes, cells: dict[str, dict], styles: dict[str, dict]) -> list:
    """Each cell's eval (true) entropy and its target as applied; return legend keys naming every line style."""
    from matplotlib.lines import Line2D

    for name, cell in cells.items():
        color = styles[name]["color"]
        _draw(axes, cell["series"]["entropy_true"], color=color, linestyle=":", marker="o", markersize=3)
        # Seeds share the target schedule, so its band would be empty: none is drawn.
        if not _draw(axes, cell["series"]["target_entropy"], band=False, color=color, linestyle="-.", lw=1.8,
                     alpha=0.8) and cell["controller"]:
            # A run that does not log its target (OpenRLHF's): the constant H* it was given.
            for value in cell["target_entropy"]:
                axes.axhline(value, color=color, linestyle="-.", lw=1.8, alpha=0.8)
    keys = []
    texts = [ENTROPY_SERIES_TEXT.get(cell["entropy_series"], cell["entropy_series"]) for cell in cells.values()]
    for text in dict.fromkeys(texts):
        keys.append(Line2D([], [], color="gray", label="solid (on-policy) / dashed (async):\n" + _wrap(text)))
    if any(cell["series"]["entropy_true"]["steps"] for cell in cells.values()):
        keys.append(Line2D([], [], color="gray", linestyle=":", marker="o", markersize=3,
                           label="dotted + circles:\n" + _wrap(EVAL_ENTROPY_TEXT)))
    if any(cell["controller"] for cell in cells.values()):
        keys.append(Line2D([], [], color="gray", linestyle="-.", lw=1.8,
                           label="dash-dot:\n" + _wrap(TARGET_TEXT + "; GRPO has none")))
    return keys


def _draw_alpha_bounds(axes, cells: dict[str, dict]) -> list:
    """The ±alpha_max lines of the cells with a controller, and the sign convention; return their legend keys."""
    from matplotlib.lines import Line2D

    keys = []
    # The controller clips alpha to [-alpha_max, alpha_max]; a line pinned there has no authority left.
    for bound in sorted({b for cell in cells.values() if cell["controller"] for b in cell["alpha_max"]}):
        for sign in (1, -1):
            axes.axhline(sign * bound, color="black", linestyle=":", lw=1.2)
        keys.append(Line2D([], [], color="black", linestyle=":", label=f"±alpha_max = ±{bound:g} (bounds)"))
    keys.append(Line2D([], [], linestyle="none", label="alpha > 0 lowers entropy,\nalpha < 0 raises it"))
    return keys


def _wrap(text: str, width: int = 48) -> str:
    """Legend text broken into lines, so the legend beside the plot stays narrow."""
    import textwrap

    return "\n".join(textwrap.wrap(text, width))


def _report_markdown(cells: dict[str, dict], plot_files: list[str], failures: list[str], commit: str,
                     title: str) -> str:
    names = list(cells)
    lines = [f"# {title}", ""]
    if names:
        lines += [
            "Mean ± sample std over seeds (n = runs that have the value); one run shows its value with (n=1). "
            "n/a = not logged by any run of the cell. Definitions: docs/compare.md.",
            "",
        ]
        lines += ["| field | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        lines.append("| seeds | " + " | ".join(str(len(cells[n]["runs"])) for n in names) + " |")
        targets = [", ".join(f"{t:g}" for t in cells[n]["target_entropy"]) for n in names]
        lines.append("| target_entropy | " + " | ".join(targets) + " |")
        ks = sorted({k for cell in cells.values() for k in cell["k"]})
        for field in REPORT_FIELDS:
            row = [format_stats(cells[name]["fields"][field]) for name in names]
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
        lines += ["", "## Plots", "", *_plot_notes(cells, plot_files), ""]
        lines += [f"![{Path(f).stem}]({f})" for f in plot_files]
    lines += ["", "## Run config", "", *_config_markdown(cells, commit)]
    lines += ["", "## Run directories", ""]
    lines += [f"- {name}: " + ", ".join(cells[name]["runs"]) for name in names]
    return "\n".join(lines) + "\n"


def _plot_notes(cells: dict[str, dict], plot_files: list[str]) -> list[str]:
    """What the lines of the plots are, so that a reader does not have to guess from styles."""
    notes = ["One line per cell: the mean over its seeds at each step, with a shaded ± std band where more than "
             "one seed logged the step. Colour = algorithm; solid = on-policy, dashed = async."]
    if "entropy.png" in plot_files:
        series = {cell["entropy_series"] for cell in cells.values()}
        described = "; ".join(ENTROPY_SERIES_TEXT.get(name, name) for name in sorted(series))
        notes.append(f"entropy.png: solid/dashed = {described}. Dotted with circles = the {EVAL_ENTROPY_TEXT}; "
                     "where the two differ, the controller acted on an estimate that was off. "
                     f"Dash-dot = the {TARGET_TEXT}. GRPO cells have no controller, so no target is drawn for them.")
    if "alpha.png" in plot_files:
        bounds = sorted({b for cell in cells.values() if cell["controller"] for b in cell["alpha_max"]})
        notes.append("alpha.png: alpha > 0 lowers entropy (positive samples weigh 1 + alpha, negative ones "
                     "1 - alpha), alpha < 0 raises it; the dotted lines are the bounds ±alpha_max ("
                     + (", ".join(f"{b:g}" for b in bounds) or "none") + ") that the controller clips alpha to.")
    if "pass_at_k.png" in plot_files:
        notes.append("pass_at_k.png: pass@k of each evaluation (fresh samples of the eval prompts).")
    return [f"- {note}" for note in notes]


def _config_markdown(cells: dict[str, dict], commit: str) -> list[str]:
    """The "Run config" section: the settings that matter per cell, from its runs' config.json."""
    lines = [f"Code commit when this report was written: `{commit}`.", ""]
    with_config = [name for name in cells if cells[name]["config"] is not None]
    without = [name for name in cells if cells[name]["config"] is None]
    if with_config:
        lines += ["From each cell's config.json (a setting that differs between its runs shows every value).", ""]
        lines += ["| setting | " + " | ".join(with_config) + " |", "|---|" + "---|" * len(with_config)]
        for label in [label for label, _, _ in CONFIG_ROWS] + ["seeds"]:
            lines.append(f"| {label} | " + " | ".join(cells[name]["config"][label] for name in with_config) + " |")
    if without:
        if with_config:
            lines.append("")
        lines.append("No config.json (e.g. OpenRLHF TensorBoard runs): " + ", ".join(without)
                     + "; their settings are in their own launch commands.")
    return lines


def comma_list(kind):
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
        type=comma_list(int),
        default=None,
        help="Comma-separated seeds, e.g. 0,1,2 (default: 0).",
    )
    parser.add_argument("--max-staleness", type=int, default=None,
                        help="K of the async cells (default 4; on-policy cells use 0).")
    parser.add_argument(
        "--modes",
        type=comma_list(str),
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
