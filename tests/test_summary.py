"""Run summary fields and reading run directories (metrics.jsonl and TensorBoard)."""

import json

import pytest
from torch.utils.tensorboard import SummaryWriter

from openrlhf_entropic.entropic.config import Metric
from openrlhf_entropic.reporting.metrics import RunMetric
from openrlhf_entropic.reporting.summary import load_run, summarize, tracking_error


def test_tracking_error_by_hand():
    # window 2: MA = [1, 2, 4, 6]; second half = points 2, 3: (|4-2| + |6-2|) / 2 / 2 = 1.5
    assert tracking_error([1.0, 3.0, 5.0, 7.0], 2.0, window=2) == pytest.approx(1.5)
    # Before the window fills the MA averages what exists: MA = [1, 2]; point 1 scores |2-2| = 0
    assert tracking_error([1.0, 3.0], 2.0, window=20) == pytest.approx(0.0)
    # Odd length: points n//2 .. n-1 = 1, 2 of MA [2, 2, 2] against 1 -> 1.0
    assert tracking_error([2.0, 2.0, 2.0], 1.0, window=20) == pytest.approx(1.0)
    assert tracking_error([], 1.0, window=20) is None


def make_rows(steps=40, entropy=lambda s: 0.5, **extra):
    return [
        {
            "step": s,
            "entropy": entropy(s),
            "reward_mean": s / 100,
            "samples_per_second": 10.0 + (s >= steps // 2),
            "staleness_mean": 1.0 + s % 2,
            "staleness_max": s % 5,
            **extra,
        }
        for s in range(steps)
    ]


def test_summary_fields_on_a_known_series():
    rows = make_rows(steps=40, entropy=lambda s: 1.0 if s < 20 else 0.1)
    summary = summarize(rows, target_entropy=0.1)
    assert summary["entropy_initial"] == pytest.approx(1.0)
    assert summary["entropy_final"] == pytest.approx(0.1)
    # Second half = steps 20..39; MA20 at step 20 + j holds (19 - j) points of 1.0 and (j + 1) of 0.1.
    expected = sum(abs((19 - j) * 1.0 + (j + 1) * 0.1) / 20 - 0.1 for j in range(20)) / 20 / 0.1
    assert summary["entropy_tracking_error"] == pytest.approx(expected)
    assert summary["reward_final"] == pytest.approx(sum(range(30, 40)) / 10 / 100)
    assert summary["samples_per_second"] == pytest.approx(11.0)  # second half only
    rows = make_rows(steps=4)
    rows[2]["samples_per_second"], rows[3]["samples_per_second"] = 10.0, 30.0  # 2 batches in 1/10 + 1/30 s
    assert summarize(rows, 0.5)["samples_per_second"] == pytest.approx(2 / (1 / 10 + 1 / 30))
    assert summary["staleness_mean"] == pytest.approx(1.5)
    assert summary["staleness_max"] == 4
    assert summary["steps"] == 40
    assert summary["skipped_values"] == {}
    assert summary["entropy_eval_tracking_error"] is None and summary["evaluations"] == 0


def test_nan_and_missing_values_are_counted_not_averaged():
    rows = make_rows(steps=12)
    rows[3]["entropy"] = float("nan")
    rows[5]["entropy"] = 100.0
    del rows[5]["entropy"]
    rows[7]["reward_mean"] = None
    rows.append({"entropy": 0.5})  # no step: left out
    summary = summarize(rows, target_entropy=0.5)
    assert summary["skipped_values"] == {"entropy": 2, "reward_mean": 1, "step": 1}
    assert summary["entropy_initial"] == pytest.approx(0.5)
    assert summary["entropy_tracking_error"] == pytest.approx(0.0)
    assert summary["reward_final"] == pytest.approx(sum([1, 2, 3, 4, 5, 6, 8, 9, 10, 11]) / 100 / 10)
    assert summary["steps"] == 12


def test_the_controller_estimate_entropy_iw_is_scored_when_logged():
    rows = make_rows(steps=40, entropy=lambda s: 0.9)  # plain mean on stale samples: biased
    assert summarize(rows, 0.5)["entropy_series"] == "entropy"
    for row in rows:
        row["entropy_iw"] = 0.5
    rows[0]["entropy_iw"] = float("nan")
    summary = summarize(rows, 0.5)
    assert summary["entropy_series"] == "entropy_iw"
    assert summary["entropy_tracking_error"] == pytest.approx(0.0)
    assert summary["entropy_initial"] == pytest.approx(0.5)
    assert summary["skipped_values"] == {"entropy_iw": 1}


def test_resumed_run_repeated_steps_keep_the_last_row():
    rows = make_rows(steps=10)
    rows += [{**row, "entropy": 2.0} for row in make_rows(steps=10)[6:]]  # resumed from step 6
    summary = summarize(rows, target_entropy=0.5)
    assert summary["steps"] == 10
    assert summary["entropy_final"] == pytest.approx((6 * 0.5 + 4 * 2.0) / 10)


def test_eval_rows_separate_or_on_the_step_row_give_the_same_summary():
    rows = make_rows(steps=40)
    true_entropy = [0.3 + 0.01 * i for i in range(8)]
    separate = rows + [
        {"step": 5 * i + 4, "eval": True, "entropy_true": h, "pass_at_1": 0.2, "pass_at_k": 0.6, "k": 8}
        for i, h in enumerate(true_entropy)
    ]
    merged = [dict(row) for row in rows]
    for i, h in enumerate(true_entropy):
        merged[5 * i + 4].update(entropy_true=h, pass_at_1=0.2, pass_at_k=0.6, k=8)
    a, b = summarize(separate, 0.25), summarize(merged, 0.25)
    assert a == b
    moving = [sum(true_entropy[max(0, i - 4) : i + 1]) / len(true_entropy[max(0, i - 4) : i + 1]) for i in range(8)]
    expected = sum(abs(m - 0.25) / 0.25 for m in moving[4:]) / 4
    assert a["entropy_eval_tracking_error"] == pytest.approx(expected)
    assert (a["pass_at_1"], a["pass_at_k"], a["k"], a["evaluations"], a["steps"]) == (0.2, 0.6, 8, 8, 40)
    separate[-1]["pass_at_k"] = float("nan")  # the last evaluation's pass@k is lost: the one before stands
    separate[-2]["pass_at_k"] = 0.5
    c = summarize(separate, 0.25)
    assert c["pass_at_k"] == 0.5 and c["skipped_values"] == {"pass_at_k": 1}


def test_bad_target_is_rejected():
    with pytest.raises(ValueError, match="target_entropy must be > 0"):
        summarize(make_rows(), target_entropy=0.0)


def test_load_run_reads_metrics_jsonl_and_summary(tmp_path):
    rows = make_rows(steps=5) + [{"step": 4, "eval": True, "entropy_true": 0.4}]
    lines = [json.dumps(row) for row in rows] + ['{"step": 5, "entro']  # killed mid-write
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "summary.json").write_text(json.dumps({"seconds": 12.5}))
    train, evals, summary = load_run(tmp_path)
    assert [row["step"] for row in train] == [0, 1, 2, 3, 4]
    assert evals == [rows[-1]]
    assert summary == {"seconds": 12.5}

    lines.insert(2, "not json")
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"metrics\.jsonl:line 3: invalid JSON"):
        load_run(tmp_path)


def test_load_run_reads_openrlhf_tensorboard_tags(tmp_path):
    # The cluster runtime: OpenRLHF's TensorboardLogger prefixes train/ and eval/, in <dir>/<run_name>/.
    writer = SummaryWriter(log_dir=str(tmp_path / "tb" / "run_name"))
    for step in range(1, 31):
        writer.add_scalar(f"train/{Metric.ENTROPY}", 0.2 + step / 100, step)
        writer.add_scalar(f"train/{Metric.ALPHA}", 0.1, step)
        writer.add_scalar("train/rollout/reward_mean", step / 30, step)
        writer.add_scalar("train/reward", -1.0, step)  # less preferred than rollout/reward_mean
        writer.add_scalar("train/policy_loss", 0.5, step)
        writer.add_scalar("train/rollout/num_samples", 64.0, step)
        writer.add_scalar("train/timing/step_total", 4.0, step)
        if step % 10 == 0:
            writer.add_scalar("eval/eval_math_pass1", 0.25, step)
            writer.add_scalar("eval/eval_gsm_pass1", 0.75, step)
            writer.add_scalar("eval/eval_math_pass4", 0.5, step)
            writer.add_scalar("eval/eval_gsm_pass4", 1.0, step)
    writer.close()

    train, evals, summary = load_run(tmp_path)
    assert summary is None
    assert len(train) == 30
    first = train[0]
    assert first["step"] == 1
    assert first["entropy"] == pytest.approx(0.21)
    assert first["alpha"] == pytest.approx(0.1)
    assert first["reward_mean"] == pytest.approx(1 / 30)
    assert first["policy_loss"] == pytest.approx(0.5)
    assert first["samples_per_second"] == pytest.approx(16.0)
    assert [row["step"] for row in evals] == [10, 20, 30]
    assert evals[0]["pass_at_1"] == pytest.approx(0.5) and evals[0]["pass_at_k"] == pytest.approx(0.75)
    assert evals[0]["k"] == 4
    result = summarize(train, 0.3, evals)
    assert result["entropy_final"] == pytest.approx(0.2 + sum(range(21, 31)) / 10 / 100)
    assert result["pass_at_k"] == pytest.approx(0.75)
    assert result["skipped_values"]["staleness_mean"] == 30  # not logged by OpenRLHF: counted, None
    assert result["staleness_mean"] is None


def test_load_run_reads_our_metric_tags_and_rejects_ambiguous_dirs(tmp_path):
    writer = SummaryWriter(log_dir=str(tmp_path / "a"))
    for step in range(3):
        writer.add_scalar(Metric.ENTROPY, 0.5, step)
        writer.add_scalar(RunMetric.STALENESS_MEAN, 2.0, step)
        writer.add_scalar(RunMetric.EVAL_ENTROPY_TRUE, 0.45, step)
    writer.close()
    train, evals, _ = load_run(tmp_path / "a")
    assert train[2] == {"step": 2, "entropy": 0.5, "staleness_mean": 2.0}
    assert evals[2] == {"step": 2, "eval": True, "entropy_true": pytest.approx(0.45)}

    SummaryWriter(log_dir=str(tmp_path / "b")).close()
    with pytest.raises(ValueError, match="several TensorBoard runs"):
        load_run(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="neither metrics.jsonl nor TensorBoard"):
        load_run(empty)
