"""The run summary (`summary.json`) and reading a finished run back from its directory.

Both runtimes and the compare report use these, so a field means one thing everywhere; each field's
definition is in docs/compare.md ("Field definitions"), and tests/test_summary.py pins them.
"""

from __future__ import annotations

import json
import logging
import math
import re
import statistics
from collections import defaultdict
from pathlib import Path

from openrlhf_entropic.reporting.metrics import TAGS

logger = logging.getLogger(__name__)

TRAIN_MA_WINDOW = 20
EVAL_MA_WINDOW = 5
ENDPOINT_POINTS = 10
EVAL_KEYS = ("entropy_true", "pass_at_1", "pass_at_k", "k")


def summarize(rows: list[dict], target_entropy: float, eval_rows: list[dict] | None = None) -> dict:
    """Summary fields of a run from its per-step rows (the lines of metrics.jsonl).

    `eval_rows` are the evaluations (rows with `entropy_true`, `pass_at_1`, ...); when None they are
    taken from `rows`, as separate rows marked `"eval": true` or as extra keys on a step's row.
    For a run without EntroPIC, pass the same target it would have used. Definitions: module docstring.
    """
    if not (math.isfinite(target_entropy) and target_entropy > 0):
        raise ValueError(f"summarize: target_entropy must be > 0, got {target_entropy}")
    if eval_rows is None:
        rows, eval_rows = split_eval_rows(rows)
    skipped: dict[str, int] = defaultdict(int)
    rows, eval_rows = _one_row_per_step(rows, skipped), _one_row_per_step(eval_rows, skipped)

    def series(source: list[dict], key: str) -> list[float]:
        values = []
        for row in source:
            if is_finite(row.get(key)):
                values.append(float(row[key]))
            else:
                skipped[key] += 1
        return values

    entropy_key = "entropy_iw" if any(is_finite(row.get("entropy_iw")) for row in rows) else "entropy"
    entropy = series(rows, entropy_key)
    reward = series(rows, "reward_mean")
    speed = series(rows, "samples_per_second")
    staleness_mean = series(rows, "staleness_mean")
    staleness_max = series(rows, "staleness_max")
    true_entropy = series(eval_rows, "entropy_true")
    pass_at_1, pass_at_k = series(eval_rows, "pass_at_1"), series(eval_rows, "pass_at_k")
    k = next((row["k"] for row in reversed(eval_rows) if is_finite(row.get("k"))), None)

    for key, count in sorted(skipped.items()):
        logger.warning("summary: %d rows without a finite %r were left out of its series", count, key)
    return {
        "entropy_initial": _mean(entropy[:ENDPOINT_POINTS]),
        "entropy_final": _mean(entropy[-ENDPOINT_POINTS:]),
        "entropy_tracking_error": tracking_error(entropy, target_entropy, TRAIN_MA_WINDOW),
        "entropy_eval_tracking_error": tracking_error(true_entropy, target_entropy, EVAL_MA_WINDOW),
        "target_entropy": target_entropy,
        "entropy_series": entropy_key,
        "reward_final": _mean(reward[-ENDPOINT_POINTS:]),
        "samples_per_second": _harmonic_mean(speed[len(speed) // 2 :]),
        "staleness_mean": _mean(staleness_mean),
        "staleness_max": max(staleness_max) if staleness_max else None,
        "pass_at_1": pass_at_1[-1] if pass_at_1 else None,
        "pass_at_k": pass_at_k[-1] if pass_at_k else None,
        "k": k,
        "steps": len(rows),
        "evaluations": len(eval_rows),
        "skipped_values": dict(sorted(skipped.items())),
        **step_time_breakdown(rows),
    }


# Per-step times the embedded runtime logs; generate_seconds is cumulative, the others per step.
STEP_TIMES = ("wait_seconds", "forward_seconds", "backward_seconds", "optimizer_seconds", "sync_seconds",
              "train_seconds")


def step_time_breakdown(rows: list[dict]) -> dict[str, float]:
    """Mean seconds per step over the second half, as "time_<key>": where a step's time goes.

    Only keys every row of the second half logs; a run that logs none (e.g. OpenRLHF's) adds nothing.
    """
    half = rows[len(rows) // 2:]
    if not half:
        return {}
    times = {f"time_{key}": _mean([row[key] for row in half]) for key in STEP_TIMES
             if all(is_finite(row.get(key)) for row in half)}
    before = rows[len(rows) // 2 - 1] if len(rows) > 1 else None
    if before is not None and all(is_finite(row.get("generate_seconds")) for row in (before, half[-1])):
        times["time_generate_seconds"] = (half[-1]["generate_seconds"] - before["generate_seconds"]) / len(half)
    return times


def tracking_error(values: list[float], target: float, window: int) -> float | None:
    """Mean over points n//2 .. n-1 of |MA(values) - target| / target, MA = trailing mean of `window` points.

    Points before the window fills average the points so far. None for an empty series.
    """
    if not values:
        return None
    moving = [_mean(values[max(0, i - window + 1) : i + 1]) for i in range(len(values))]
    return _mean([abs(m - target) / target for m in moving[len(moving) // 2 :]])


def is_finite(value) -> bool:
    """A real number (not a bool, None, text, NaN or inf)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _harmonic_mean(values: list[float]) -> float | None:
    return statistics.harmonic_mean(values) if values else None


def split_eval_rows(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """Split metrics rows into (training rows, evaluation rows).

    A row marked `"eval": true` is an evaluation only; a training row that also carries
    `entropy_true` / `pass_at_*` (an evaluation logged on that step's line) is in both.
    """
    train = [row for row in rows if not row.get("eval")]
    evals = [row for row in rows if row.get("eval") or any(key in row for key in EVAL_KEYS)]
    return train, evals


def _one_row_per_step(rows: list[dict], skipped: dict[str, int]) -> list[dict]:
    """Rows in step order, the last one winning for a repeated step (a resumed run re-logs the steps
    after its checkpoint). Rows without a step are counted in `skipped["step"]` and left out."""
    by_step = {}
    for row in rows:
        if not is_finite(row.get("step")):
            skipped["step"] += 1
            continue
        by_step[row["step"]] = row
    return [by_step[step] for step in sorted(by_step)]


# ---------------------------------------------------------------------------------------------
# Reading a run directory back: metrics.jsonl (embedded runtime) or TensorBoard events (both).


def _tensorboard_keys() -> dict[str, list[str]]:
    """Row key -> TensorBoard tags that hold it, the preferred tag first.

    Our runtimes log the names in `TAGS`. The cluster runtime logs through OpenRLHF's
    TensorboardLogger, which prefixes "train/" (log_train) or "eval/" (log_eval) to every key, so
    those spellings count too. Last come OpenRLHF 0.11.2's own names for the same quantity:
    `train/reward` (mean sample reward in ppo_train) and `train/entropy_loss` (the policy entropy
    it computes when --actor.entropy_coef is set, 0 = log only).
    """
    keys = {key: [tag, f"train/{tag}", f"eval/{tag}"] for key, tag in TAGS.items()}
    keys["reward_mean"].append("train/reward")
    keys["entropy"].append("train/entropy_loss")
    return keys


# OpenRLHF's evaluate() logs eval/eval_<datasource>_pass1 and eval/eval_<datasource>_pass<n>.
OPENRLHF_PASS_TAG = re.compile(r"^eval/eval_(?P<source>.+)_pass(?P<k>\d+)$")


def load_run(run_dir: str | Path) -> tuple[list[dict], list[dict], dict | None]:
    """Read a run directory: (training rows, evaluation rows, summary.json or None).

    Reads `metrics.jsonl` (and `summary.json`) when present. Otherwise reads the TensorBoard event
    files in `run_dir` or in the one folder below it that holds them (OpenRLHF writes them to
    `<tensorboard_dir>/<run_name>/`); then the summary is None and the caller runs `summarize`.
    """
    run_dir = Path(run_dir)
    metrics_path = run_dir / "metrics.jsonl"
    if metrics_path.is_file():
        train, evals = split_eval_rows(_read_metrics_jsonl(metrics_path))
        summary_path = run_dir / "summary.json"
        summary = json.loads(summary_path.read_text(encoding="utf-8")) if summary_path.is_file() else None
        return train, evals, summary
    event_dirs = sorted({path.parent for path in run_dir.rglob("events.out.tfevents.*")})
    if not event_dirs:
        raise FileNotFoundError(f"{run_dir}: neither metrics.jsonl nor TensorBoard event files found")
    if len(event_dirs) > 1:
        listed = ", ".join(str(path) for path in event_dirs)
        raise ValueError(f"{run_dir}: several TensorBoard runs below it ({listed}); pass one of them")
    return (*_read_tensorboard(event_dirs[0]), None)


def _read_metrics_jsonl(path: Path) -> list[dict]:
    """Parse metrics.jsonl. A truncated last line (a run killed mid-write) is skipped with a
    warning; a bad line anywhere else is an error naming the line."""
    lines = path.read_text(encoding="utf-8").splitlines()
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            if number == len(lines):
                logger.warning("%s:line %d: skipped 1 truncated last line", path, number)
                continue
            raise ValueError(f"{path}:line {number}: invalid JSON ({error.msg})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}:line {number}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
    return rows


def _read_tensorboard(event_dir: Path) -> tuple[list[dict], list[dict]]:
    """Scalars of one TensorBoard run as (training rows, evaluation rows), one row per step."""
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    accumulator = EventAccumulator(str(event_dir), size_guidance={SCALARS: 0})  # 0 = keep every event
    accumulator.Reload()
    by_step: dict[int, dict[str, float]] = defaultdict(dict)
    for tag in accumulator.Tags()["scalars"]:
        for event in accumulator.Scalars(tag):
            by_step[event.step][tag] = event.value  # a re-logged step (resume) keeps its last value

    tensorboard_keys = _tensorboard_keys()
    train, evals = [], []
    for step in sorted(by_step):
        tags = by_step[step]
        row = {"step": step}
        for key, candidates in tensorboard_keys.items():
            tag = next((tag for tag in candidates if tag in tags), None)
            if tag is not None:
                row[key] = tags[tag]
        seconds, samples = tags.get("train/timing/step_total", 0), tags.get("train/rollout/num_samples")
        if "samples_per_second" not in row and seconds > 0 and samples is not None:
            # OpenRLHF logs the samples of a step and its wall time, not their ratio.
            row["samples_per_second"] = samples / seconds
        pass_by_k: dict[int, list[float]] = defaultdict(list)  # OpenRLHF: one value per datasource
        for tag, value in tags.items():
            if match := OPENRLHF_PASS_TAG.match(tag):
                pass_by_k[int(match["k"])].append(value)
        if 1 in pass_by_k and "pass_at_1" not in row:
            row["pass_at_1"] = _mean(pass_by_k[1])
        if "pass_at_k" not in row and (larger := [k for k in pass_by_k if k > 1]):
            row["k"] = max(larger)
            row["pass_at_k"] = _mean(pass_by_k[row["k"]])
        eval_part = {key: row.pop(key) for key in EVAL_KEYS if key in row}
        if eval_part:
            evals.append({"step": step, "eval": True, **eval_part})
        if len(row) > 1:
            train.append(row)
    return train, evals
