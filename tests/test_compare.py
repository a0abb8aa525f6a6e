"""The compare CLI: its grid of training commands, failure handling, and the report it builds.

Training runs are replaced by a fake train module (written below) that logs a known series, so
these tests check compare's own logic in seconds; the real `cli.train` is tested on its own.
"""

import json
import os
import sys
import textwrap
from pathlib import Path

import pytest
from matplotlib.image import imread
from torch.utils.tensorboard import SummaryWriter

from openrlhf_entropic.cli.compare import build_grid, main, parse_args, train_command

FAKE_TRAIN = textwrap.dedent(
    """
    import argparse, json, sys
    from pathlib import Path

    parser = argparse.ArgumentParser()
    parser.add_argument("--mode")
    parser.add_argument("--max-staleness", type=int)
    parser.add_argument("--entropic.enable", dest="enable")
    parser.add_argument("--entropic.mode", dest="loss_mode", default="high_prob")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--output-dir")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--fail", default="")
    args = parser.parse_args()
    out = Path(args.output_dir)
    out.mkdir(parents=True)
    (out / "argv.json").write_text(json.dumps(sys.argv[1:]))
    if args.fail == f"{args.enable}_{args.mode}_{args.seed}":
        print("boom: simulated crash", file=sys.stderr)
        sys.exit(3)
    target, entropic = 0.2, args.enable == "true"
    config = {"run": {"mode": args.mode, "max_staleness": args.max_staleness, "steps": args.steps, "seed": args.seed,
                      "task": "countdown", "actor_learning_rate": 0.001},
              "entropic": {"enable": entropic, "mode": args.loss_mode, "target_entropy": target, "target_start": 0.6,
                           "target_warmup_steps": 4, "alpha_max": 0.8}}
    (out / "config.json").write_text(json.dumps(config))
    rows = []
    for step in range(args.steps):
        # EntroPIC holds the target (offset by the seed); GRPO's entropy collapses from 1.0.
        entropy = (target if entropic else 0.9**step) + 0.01 * args.seed
        # The target as applied ramps 0.6 -> 0.2 over 4 steps; GRPO logs the same numbers, unused.
        applied = max(target, 0.6 - 0.1 * step)
        rows.append({"step": step, "entropy": entropy, "alpha": 0.1 if entropic else 0.0, "reward_mean": 0.5,
                     "samples_per_second": 8.0 if args.mode == "async" else 5.0,
                     "staleness_mean": 0.0 if args.mode == "on_policy" else 1.5,
                     "staleness_max": args.max_staleness, "target_entropy": applied})
        if step % 10 == 9:
            rows.append({"step": step, "eval": True, "entropy_true": entropy, "pass_at_1": 0.3, "pass_at_k": 0.6})
    (out / "metrics.jsonl").write_text("".join(json.dumps(row) + "\\n" for row in rows))
    summary = {"pass_at_1": 0.3 + 0.1 * args.seed, "pass_at_k": 0.6, "k": 4, "seconds": 1.5,
               "dropped_stale": 2 if args.mode == "async" else 0}
    (out / "summary.json").write_text(json.dumps(summary))
    """
)


@pytest.fixture
def fake_train(tmp_path, monkeypatch):
    (tmp_path / "fake_train.py").write_text(FAKE_TRAIN)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    return "fake_train"


def table(report: str, after: str = "") -> dict[str, dict[str, str]]:
    """The first table of the report after the line `after` (default: its top) as {field: {cell: text}}."""
    text = report.split(f"\n{after}\n", 1)[1] if after else report
    lines = []
    for line in text.splitlines():
        if line.startswith("|"):
            lines.append(line)
        elif lines:  # the table ended
            break
    lines = [line for line in lines if not line.startswith("|---")]
    names = [cell.strip() for cell in lines[0].strip("|").split("|")][1:]
    parsed = {}
    for line in lines[1:]:
        field, *values = [cell.strip() for cell in line.strip("|").split("|")]
        parsed[field] = dict(zip(names, values, strict=True))
    return parsed


def mean_of(text: str) -> float:
    """The mean of a "mean ± std (n=N)" or "mean (n=1)" entry."""
    return float(text.split(" ")[0])


def test_grid_and_commands():
    assert [cell.name for cell in build_grid(None)] == [
        "grpo_on_policy",
        "entropic_on_policy",
        "grpo_async",
        "entropic_async",
    ]
    ablation = [cell.name for cell in build_grid(["high_prob", "covariance"])]
    assert ablation == [
        "grpo_on_policy",
        "entropic-high_prob_on_policy",
        "entropic-covariance_on_policy",
        "grpo_async",
        "entropic-high_prob_async",
        "entropic-covariance_async",
    ]
    args, extra = parse_args(["--output-dir", "out", "--steps", "7", "--", "--num-learners", "2"])
    on_policy, ablation_async = build_grid(None)[1], build_grid(["covariance"])[3]
    assert train_command(on_policy, 3, Path("out/x/seed3"), args, extra) == [
        sys.executable, "-m", "openrlhf_entropic.cli.train", "--mode", "on_policy", "--max-staleness", "0",
        "--entropic.enable", "true", "--seed", "3", "--output-dir", "out/x/seed3", "--steps", "7",
        "--num-learners", "2",
    ]  # fmt: skip
    args, extra = parse_args(["--max-staleness", "2"])
    assert train_command(ablation_async, 0, Path("d"), args, extra) == [
        sys.executable, "-m", "openrlhf_entropic.cli.train", "--mode", "async", "--max-staleness", "2",
        "--entropic.enable", "true", "--entropic.mode", "covariance", "--seed", "0", "--output-dir", "d",
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--runs", "a=b"], "add --report-only"),
        (["--modes", "high_prob,bogus"], "unknown loss mode"),
        (["--max-staleness", "0"], "must be >= 1"),
        (["--report-only", "--", "--steps", "3"], "runs nothing"),
        (["--report-only", "--steps", "3", "--seeds", "0,1"], "--seeds, --steps shape the runs; --report-only"),
        (["--report-only", "--modes", "high_prob"], "--modes shape the runs"),
        (["--target-entropy", "-1"], "must be > 0"),
        (["--seeds", "0,x"], "invalid comma-separated int value: '0,x'"),
        (["--seeds", ","], "at least one seed"),
    ],
)
def test_impossible_flags_are_rejected(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        parse_args(argv)
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_compare_runs_the_grid_keeps_going_after_a_failure_and_reports(tmp_path, fake_train, capsys):
    out = tmp_path / "out"
    argv = ["--output-dir", str(out), "--seeds", "0,1", "--steps", "30", "--train-module", fake_train]
    code = main([*argv, "--", "--fail", "true_async_1"])
    assert code == 1
    err = capsys.readouterr().err
    assert "entropic_async seed1: exit code 3" in err and "boom: simulated crash" in err

    # Every run got the passthrough flag; on-policy cells run at staleness 0, async ones at 4.
    grpo_async = json.loads((out / "grpo_async" / "seed1" / "argv.json").read_text())
    assert grpo_async[grpo_async.index("--max-staleness") + 1] == "4"
    assert grpo_async[-2:] == ["--fail", "true_async_1"]
    on_policy = json.loads((out / "entropic_on_policy" / "seed0" / "argv.json").read_text())
    assert on_policy[on_policy.index("--max-staleness") + 1] == "0"

    report = (out / "report.md").read_text()
    rows = table(report)
    assert rows["seeds"] == {"grpo_on_policy": "2", "entropic_on_policy": "2", "grpo_async": "2", "entropic_async": "1"}
    # EntroPIC's entropy is 0.20 / 0.21 for seeds 0 / 1: mean 0.205, sample std 0.0071.
    assert rows["entropy_final"]["entropic_on_policy"] == "0.205 ± 0.0071 (n=2)"
    assert rows["entropy_final"]["entropic_async"] == "0.2 (n=1)"  # one seed: no spread, not "± 0"
    grpo_final = sum(0.9**s for s in range(20, 30)) / 10 + 0.005
    assert mean_of(rows["entropy_final"]["grpo_on_policy"]) == pytest.approx(grpo_final, rel=1e-3)
    assert mean_of(rows["entropy_initial"]["grpo_async"]) == pytest.approx(
        sum(0.9**s for s in range(10)) / 10 + 0.005, rel=1e-3
    )
    assert rows["entropy_tracking_error"]["entropic_async"] == "0 (n=1)"
    assert rows["entropy_eval_tracking_error"]["entropic_on_policy"] == "0.025 ± 0.035 (n=2)"  # |0.2x - 0.2| / 0.2
    assert rows["pass_at_1"]["grpo_on_policy"] == "0.35 ± 0.071 (n=2)"  # summary.json wins over the eval rows
    assert rows["pass_at_k (k=4)"]["grpo_async"] == "0.6 ± 0 (n=2)"  # two seeds that agree: a measured 0
    assert rows["samples_per_second"]["grpo_async"] == "8 ± 0 (n=2)"
    assert rows["speedup_vs_on_policy"] == {"grpo_on_policy": "", "entropic_on_policy": "", "grpo_async": "1.6x",
                                            "entropic_async": "1.6x"}  # fmt: skip
    assert rows["entropy_final_over_initial"]["entropic_on_policy"] == "1 ± 0 (n=2)"
    initial, final = sum(0.9**s for s in range(10)) / 10, sum(0.9**s for s in range(20, 30)) / 10
    grpo_ratios = [(final + 0.01 * seed) / (initial + 0.01 * seed) for seed in (0, 1)]
    assert mean_of(rows["entropy_final_over_initial"]["grpo_async"]) == pytest.approx(sum(grpo_ratios) / 2, rel=1e-3)
    assert rows["staleness_max"] == {"grpo_on_policy": "0 ± 0 (n=2)", "entropic_on_policy": "0 ± 0 (n=2)",
                                     "grpo_async": "4 ± 0 (n=2)", "entropic_async": "4 (n=1)"}  # fmt: skip
    assert rows["dropped_stale"]["entropic_async"] == "2 (n=1)"
    assert rows["target_entropy"]["grpo_async"] == "0.2"
    assert "## Failed runs" in report and "entropic_async seed1: exit code 3" in report

    for name in ("entropy", "alpha", "reward", "staleness", "pass_at_k"):
        path = out / f"{name}.png"
        assert path.stat().st_size > 10_000
        pixels = imread(path)
        assert pixels.shape[:2] == (450, 1100) and pixels.std() > 0.01  # lines were drawn, not a blank canvas
        assert f"![{name}]({name}.png)" in report

    saved = json.loads((out / "report.json").read_text())
    assert saved["cells"]["entropic_on_policy"]["fields"]["entropy_final"]["values"] == pytest.approx([0.2, 0.21])

    # --report-only finds the runs again (the failed one left no metrics) and rebuilds the same table.
    for path in [out / "report.md", *out.glob("*.png")]:
        path.unlink()
    assert main(["--output-dir", str(out), "--report-only"]) == 0
    rebuilt = (out / "report.md").read_text()
    assert table(rebuilt) == rows and list(table(rebuilt)["seeds"]) == list(rows["seeds"])  # same columns, same order
    assert "## Failed runs" not in rebuilt and (out / "entropy.png").is_file()


def test_ablation_grid_runs_one_entropic_cell_per_mode(tmp_path, fake_train):
    out = tmp_path / "out"
    argv = ["--output-dir", str(out), "--modes", "all_tokens,covariance", "--steps", "5", "--train-module", fake_train]
    assert main(argv) == 0
    argv_covariance = json.loads((out / "entropic-covariance_async" / "seed0" / "argv.json").read_text())
    assert argv_covariance[argv_covariance.index("--entropic.mode") + 1] == "covariance"
    assert list(table((out / "report.md").read_text())["seeds"]) == [
        "grpo_on_policy",
        "entropic-all_tokens_on_policy",
        "entropic-covariance_on_policy",
        "grpo_async",
        "entropic-all_tokens_async",
        "entropic-covariance_async",
    ]


def write_openrlhf_tensorboard(log_dir: Path, entropy: float, reward: float, step_seconds: float | None = None):
    """What the cluster runtime leaves: OpenRLHF's train/ and eval/ tags, in <tensorboard_dir>/<run_name>/."""
    writer = SummaryWriter(log_dir=str(log_dir / "run_name"))
    for step in range(1, 41):
        writer.add_scalar("train/entropic/entropy", entropy, step)
        writer.add_scalar("train/entropic/alpha", 0.05, step)
        writer.add_scalar("train/rollout/reward_mean", reward, step)
        if step_seconds is not None:
            writer.add_scalar("train/rollout/num_samples", 64.0, step)
            writer.add_scalar("train/timing/step_total", step_seconds, step)
        if step % 20 == 0:
            writer.add_scalar("eval/eval_math_pass1", reward, step)
            writer.add_scalar("eval/eval_math_pass8", 2 * reward, step)
    writer.close()


def test_report_from_cluster_tensorboard_runs(tmp_path):
    write_openrlhf_tensorboard(tmp_path / "grpo_s0", entropy=0.05, reward=0.3)
    write_openrlhf_tensorboard(tmp_path / "grpo_s1", entropy=0.07, reward=0.4)
    write_openrlhf_tensorboard(tmp_path / "entropic", entropy=0.1, reward=0.45)
    out = tmp_path / "report"
    runs = [f"grpo={tmp_path / 'grpo_s0'}", f"grpo={tmp_path / 'grpo_s1'}", f"entropic={tmp_path / 'entropic'}"]
    assert main(["--report-only", "--runs", *runs, "--output-dir", str(out), "--target-entropy", "0.1"]) == 0
    report = (out / "report.md").read_text()
    rows = table(report)
    assert rows["seeds"] == {"grpo": "2", "entropic": "1"}
    # OpenRLHF logs no staleness: the report says so instead of printing a number.
    assert "grpo (entropy_true: 4, samples_per_second: 80, staleness_max: 80, staleness_mean: 80)" in report
    assert rows["entropy_final"] == {"grpo": "0.06 ± 0.014 (n=2)", "entropic": "0.1 (n=1)"}
    assert rows["entropy_tracking_error"] == {"grpo": "0.4 ± 0.14 (n=2)", "entropic": "0 (n=1)"}
    assert rows["reward_final"]["grpo"] == "0.35 ± 0.071 (n=2)"
    assert rows["pass_at_k (k=8)"]["entropic"] == "0.9 (n=1)"
    assert rows["staleness_mean"] == {"grpo": "n/a", "entropic": "n/a"}  # OpenRLHF logs none
    assert (out / "entropy.png").is_file() and (out / "alpha.png").is_file()
    assert not (out / "staleness.png").exists()  # nothing to draw
    # No config.json: the report still says so, and the controller and alpha bounds fall back to the defaults.
    assert "No config.json (e.g. OpenRLHF TensorBoard runs): grpo, entropic" in report
    saved = json.loads((out / "report.json").read_text())["cells"]
    assert saved["entropic"]["controller"] and not saved["grpo"]["controller"]  # told apart by name
    assert saved["entropic"]["alpha_max"] == [1.0] and "±alpha_max (1)" in report


def test_speedup_pairs_the_cluster_scripts_off_policy_names(tmp_path):
    write_openrlhf_tensorboard(tmp_path / "on", entropy=0.1, reward=0.3, step_seconds=4.0)
    write_openrlhf_tensorboard(tmp_path / "off", entropy=0.1, reward=0.3, step_seconds=2.5)
    out = tmp_path / "report"
    runs = [f"entropic_off_policy={tmp_path / 'off'}", f"entropic_on_policy={tmp_path / 'on'}"]
    assert main(["--report-only", "--runs", *runs, "--output-dir", str(out), "--target-entropy", "0.1"]) == 0
    rows = table((out / "report.md").read_text())
    assert rows["samples_per_second"] == {"entropic_off_policy": "25.6 (n=1)", "entropic_on_policy": "16 (n=1)"}
    assert rows["speedup_vs_on_policy"] == {"entropic_off_policy": "1.6x", "entropic_on_policy": ""}


def test_report_only_without_runs_fails_clearly(tmp_path, capsys):
    assert main(["--report-only", "--output-dir", str(tmp_path / "nothing")]) == 1
    assert "no run directories found" in capsys.readouterr().err


def test_discover_runs_at_any_depth(tmp_path):
    from openrlhf_entropic.cli.compare import discover_runs

    for run in ("deep/er/run", "entropic_async/seed0", "entropic_async/seed3", "grpo_on_policy/seed0"):
        (tmp_path / run).mkdir(parents=True)
        (tmp_path / run / "metrics.jsonl").write_text('{"step": 1, "entropy": 0.5}\n')
    SummaryWriter(log_dir=str(tmp_path / "entropic_async" / "seed0" / "tb")).close()  # part of that run
    SummaryWriter(log_dir=str(tmp_path / "cluster" / "run_name")).close()  # a TensorBoard-only run
    runs = discover_runs(tmp_path)
    assert list(runs) == ["grpo_on_policy", "entropic_async", "cluster/run_name", "deep/er/run"]
    assert runs["entropic_async"] == [tmp_path / "entropic_async" / "seed0", tmp_path / "entropic_async" / "seed3"]
    assert runs["cluster/run_name"] == [tmp_path / "cluster" / "run_name"]


def test_ctrl_c_stops_the_grid_and_still_reports_finished_runs(tmp_path, fake_train, monkeypatch):
    import subprocess

    from openrlhf_entropic.cli import compare

    calls, real_run = [], subprocess.run

    def run_then_interrupt(*args, **kwargs):
        calls.append(args[0])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_run(*args, **kwargs)

    monkeypatch.setattr(compare.subprocess, "run", run_then_interrupt)
    out = tmp_path / "out"
    assert main(["--output-dir", str(out), "--steps", "5", "--train-module", fake_train]) == 1
    assert len([call for call in calls if call[0] != "git"]) == 2  # no run started after the interrupt
    report = (out / "report.md").read_text()
    assert list(table(report)["seeds"]) == ["grpo_on_policy"]
    assert "entropic_on_policy seed0: interrupted; later runs not started" in report


def test_format_stats_shows_n_and_never_a_zero_spread_for_one_seed():
    from openrlhf_entropic.cli.compare import field_stats, format_stats

    assert format_stats(field_stats([0.25])) == "0.25 (n=1)"
    assert format_stats(field_stats([0.2, 0.21])) == "0.205 ± 0.0071 (n=2)"
    assert format_stats(field_stats([0.6, 0.6, 0.6])) == "0.6 ± 0 (n=3)"  # three seeds that agree: measured
    assert format_stats(field_stats([])) == "n/a"


def test_series_over_seeds_has_a_spread_only_where_several_seeds_logged_the_step():
    import math

    from openrlhf_entropic.cli.compare import series_over_seeds

    seed0 = [{"step": 1, "x": 1.0}, {"step": 2, "x": 2.0}, {"step": 2, "x": 3.0}]  # a resumed step: the last wins
    seed1 = [{"step": 1, "x": 3.0}, {"step": 2, "x": float("nan")}, {"step": 3, "x": 5.0}]
    series = series_over_seeds([seed0, seed1], "x")
    assert series["steps"] == [1, 2, 3]
    assert series["mean"] == [2.0, 3.0, 5.0]
    assert series["n"] == [2, 1, 1]
    assert series["std"][0] == pytest.approx(math.sqrt(2)) and math.isnan(series["std"][1])


def test_plots_draw_the_target_as_applied_eval_entropy_and_alpha_bounds(tmp_path, fake_train, monkeypatch):
    from matplotlib.axes import Axes

    from openrlhf_entropic.cli import compare

    drawn, hlines = [], []
    real_draw, real_axhline = compare._draw, Axes.axhline

    def spy_draw(axes, series, band=True, **style):
        drawn.append((series, style))
        return real_draw(axes, series, band, **style)

    def spy_axhline(self, y=0, *args, **kwargs):
        hlines.append((self, y, kwargs.get("linestyle")))
        return real_axhline(self, y, *args, **kwargs)

    monkeypatch.setattr(compare, "_draw", spy_draw)
    monkeypatch.setattr(Axes, "axhline", spy_axhline)
    out = tmp_path / "out"
    assert main(["--output-dir", str(out), "--seeds", "0,1", "--steps", "20", "--train-module", fake_train]) == 0

    drawn = [(series, style) for series, style in drawn if series and series["steps"]]  # calls that drew a line
    colors = {style["label"]: style["color"] for _, style in drawn if "label" in style}
    targets = [(series, style) for series, style in drawn if style["linestyle"] == "-."]
    # One target line per EntroPIC cell, in its colour, following the logged ramp 0.6 -> 0.2; none for GRPO.
    assert [style["color"] for _, style in targets] == [colors["entropic_on_policy"], colors["entropic_async"]]
    assert colors["grpo_on_policy"] != colors["entropic_on_policy"]
    for series, _ in targets:
        assert series["steps"] == list(range(20))
        assert series["mean"][:6] == pytest.approx([0.6, 0.5, 0.4, 0.3, 0.2, 0.2])
    # The eval entropy is a line with markers for every cell (evaluations at steps 9 and 19).
    evals = [series for series, style in drawn if style["linestyle"] == ":" and style.get("marker") == "o"]
    assert len(evals) == 4 and all(series["steps"] == [9, 19] for series in evals)
    # Each cell's main line is the mean over both seeds, with a spread to shade.
    entropic_h = next(series for series, style in drawn if style.get("label") == "entropic_on_policy")
    assert entropic_h["n"][0] == 2 and entropic_h["std"][0] == pytest.approx(0.00707, rel=1e-2)
    # alpha.png: the bounds ±alpha_max from config.json (0.8), nothing else drawn flat anywhere.
    assert sorted(y for _, y, _ in hlines) == [-0.8, 0.8]
    assert all("alpha > 0 lowers entropy" in axes.get_ylabel() for axes, _, _ in hlines)  # the sign, on the axis

    report = (out / "report.md").read_text()
    assert "entropy_iw" not in report.split("## Plots")[1].split("![")[0]  # the fake logs the plain mean only
    assert "plain token mean over the training batch" in report
    assert "GRPO cells have no controller, so no target is drawn" in report
    assert "±alpha_max (0.8)" in report
    saved = json.loads((out / "report.json").read_text())
    assert saved["cells"]["entropic_async"]["alpha_max"] == [0.8]
    assert saved["cells"]["grpo_async"]["controller"] is False


def test_report_lists_each_cells_run_config_and_the_commit(tmp_path, fake_train):
    out = tmp_path / "out"
    assert main(["--output-dir", str(out), "--seeds", "0,1", "--steps", "5", "--train-module", fake_train]) == 0
    report = (out / "report.md").read_text()
    config = table(report, after="## Run config")
    assert list(config["mode"]) == ["grpo_on_policy", "entropic_on_policy", "grpo_async", "entropic_async"]
    assert config["K = max_staleness"] == {"grpo_on_policy": "0", "entropic_on_policy": "0", "grpo_async": "4",
                                           "entropic_async": "4"}  # fmt: skip
    assert config["entropic.enable"]["grpo_async"] == "false" and config["entropic.enable"]["entropic_async"] == "true"
    assert config["entropic.target_start"]["entropic_on_policy"] == "0.6"
    assert config["task"]["grpo_on_policy"] == "countdown"
    assert config["n_samples_per_prompt"]["grpo_on_policy"] == "n/a"  # the fake's config lacks it
    assert config["seeds"]["entropic_async"] == "0, 1"
    commit = report.split("Code commit when this report was written: `")[1].split("`")[0]
    assert commit == "unknown" or commit.split()[0].isalnum()

    # A cell whose seeds ran with different settings shows both values instead of passing for one.
    config_path = out / "entropic_async" / "seed1" / "config.json"
    changed = json.loads(config_path.read_text())
    changed["entropic"]["kp"] = 5.0
    config_path.write_text(json.dumps(changed))
    assert main(["--output-dir", str(out), "--report-only"]) == 0
    config = table((out / "report.md").read_text(), after="## Run config")
    assert config["entropic.kp"]["entropic_async"] == "n/a / 5.0"
