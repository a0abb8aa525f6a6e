"""benchmarks/paper_suite.py: which runs each claim needs, and how it judges them (no training).

`--dry-run` is checked on the real plan; the judging runs against a fake train module that logs
known series, as in tests/test_compare.py.
"""

import importlib.util
import json
import os
import sys
import textwrap
from pathlib import Path

import pytest

SUITE_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "paper_suite.py"


@pytest.fixture(scope="module")
def suite():
    spec = importlib.util.spec_from_file_location("paper_suite", SUITE_PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["paper_suite"] = module  # dataclasses look their module up while it is being executed
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("paper_suite", None)


def dry_run(suite, capsys, *argv) -> tuple[str, dict[str, list[str]]]:
    """(first line, {cell: [its commands]}) printed by --dry-run."""
    assert suite.main(["--dry-run", "--output-dir", "OUT", *argv]) == 0
    lines = capsys.readouterr().out.splitlines()
    cells: dict[str, list[str]] = {}
    for line in lines[1:]:
        if line and not line.startswith(" "):
            current = cells.setdefault(line.split()[0], [])
        elif line.strip():
            current.append(line.strip())
    return lines[0], cells


def test_dry_run_of_the_full_suite_runs_each_shared_cell_once(suite, capsys):
    head, cells = dry_run(suite, capsys)
    assert head == "12 cells x 3 seeds = 36 runs (claims 1, 2, 3, 4, 5, 6)"
    assert list(cells) == [
        "grpo_on_policy", "grpo_async_k4",
        "entropic_h0.4_on_policy", "entropic_h0.4_async_k4", "entropic_h0.6_on_policy", "entropic_h0.6_async_k4",
        "entropic_h0.8_on_policy", "entropic_h0.8_async_k4",
        "entropic_h0.6_p_async_k4", "entropic_h0.6_async_k8", "entropic_h0.6_p_async_k8",
        "entropic_h0.6_unweighted_async_k8",
    ]  # fmt: skip
    assert all(len(commands) == 3 for commands in cells.values())
    for name, commands in cells.items():
        for seed, command in enumerate(commands):
            words = command.split()
            assert words[1:5] == ["-m", "openrlhf_entropic.cli.train", "--task", "countdown"]
            assert f"--seed {seed} --steps 300 --output-dir OUT/{name}/seed{seed} --overwrite --no-progress" in command
            regime = "--mode on_policy --max-staleness 0" if name.endswith("on_policy") else "--mode async"
            assert regime in command
            assert ("--entropic.ki 0" in command) == ("_p_" in name)
            assert ("--entropic.estimator on_policy" in command) == ("unweighted" in name)
    assert "--max-staleness 8" in cells["entropic_h0.6_p_async_k8"][0]
    assert "--entropic.enable false --entropic.target_entropy 0.6" in cells["grpo_async_k4"][0]
    assert "--entropic.target_entropy 0.8 --entropic.target_start 0.8" in cells["entropic_h0.8_async_k4"][0]


def test_dry_run_of_a_subset_with_other_targets_and_passthrough_flags(suite, capsys):
    head, cells = dry_run(suite, capsys, "--claims", "5", "--seeds", "4", "--steps", "6", "--", "--eval-k", "2")
    assert head == "2 cells x 1 seeds = 2 runs (claims 5)"
    assert list(cells) == ["entropic_h0.6_async_k8", "entropic_h0.6_unweighted_async_k8"]
    assert cells["entropic_h0.6_async_k8"][0].endswith("--seed 4 --steps 6 --output-dir OUT/entropic_h0.6_async_k8/"
                                                       "seed4 --overwrite --no-progress --eval-k 2")
    _, cells = dry_run(suite, capsys, "--claims", "2", "--warm-start-entropy", "1.0")
    assert list(cells) == [f"entropic_h{t}_{regime}" for t in ("0.5", "0.75", "1") for regime in ("on_policy",
                                                                                                   "async_k4")]
    assert "--entropic.target_entropy 0.75 --entropic.target_start 1 " in cells["entropic_h0.75_on_policy"][0]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--", "--mode", "async"], "--mode after `--`: the suite sets these per cell"),
        (["--", "--entropic.ki=0.5"], "the suite sets these per cell"),
        (["--claims", "7"], "--claims: choose from"),
        (["--report-only", "--", "--eval-k", "2"], "--report-only runs nothing"),
    ],
)
def test_flags_that_would_change_a_cell_are_refused(suite, argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        suite.parse_args(argv)
    assert info.value.code == 2 and message in capsys.readouterr().err


FAKE_TRAIN = textwrap.dedent(
    """
    import argparse, json, sys
    from pathlib import Path

    parser = argparse.ArgumentParser()
    for flag in ("--mode", "--entropic.enable", "--output-dir", "--fail"):
        parser.add_argument(flag, default="")
    parser.add_argument("--entropic.target_entropy", dest="target", type=float)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--steps", type=int)
    args, _ = parser.parse_known_args()
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    entropic = getattr(args, "entropic.enable") == "true"
    if args.fail == f"{entropic}_{args.mode}_{args.seed}":
        sys.exit(3)
    (out / "config.json").write_text(json.dumps({"run": {"mode": args.mode, "seed": args.seed},
                                                 "entropic": {"enable": entropic, "target_entropy": args.target,
                                                              "kp": 3.0}}))
    rows = []
    for step in range(1, args.steps + 1):
        # GRPO collapses from 0.8; EntroPIC holds its target. Async is faster; EntroPIC solves more at k.
        entropy = (args.target if entropic else 0.8 * 0.9**step) + 0.01 * args.seed
        row = {"step": step, "entropy": entropy, "alpha": 0.1 * entropic, "reward_mean": 0.5,
               "samples_per_second": (80.0 if args.mode == "async" else 50.0) + args.seed,
               "target_entropy": args.target}
        if step % 5 == 0:
            row.update(entropy_true=entropy, pass_at_1=0.3, pass_at_k=(0.7 if entropic else 0.5) + 0.01 * args.seed,
                       k=16)
        rows.append(row)
    (out / "metrics.jsonl").write_text("".join(json.dumps(row) + "\\n" for row in rows))
    (out / "summary.json").write_text(json.dumps({"seconds": 10.0 if args.mode == "async" else 16.0}))
    """
)


def test_suite_judges_the_claims_from_the_runs_and_reports_a_failed_run(suite, tmp_path, monkeypatch, capsys):
    (tmp_path / "fake_train.py").write_text(FAKE_TRAIN)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    out = tmp_path / "suite"
    argv = ["--output-dir", str(out), "--claims", "1,3,6", "--seeds", "0,1", "--steps", "30",
            "--train-module", "fake_train"]
    assert suite.main([*argv, "--", "--fail", "True_async_1"]) == 1  # a failed run: exit 1 after the report
    printed = json.loads(capsys.readouterr().out)
    claims = printed["claims"]

    collapse = claims["1_collapse"]
    assert collapse["met"] is True and collapse["cells"]["grpo_async"]["seeds_met"] == 2
    initial, final = (sum(0.8 * 0.9**s for s in steps) / 10 for steps in (range(1, 11), range(21, 31)))
    ratios = [(final + 0.01 * seed) / (initial + 0.01 * seed) for seed in (0, 1)]
    assert collapse["cells"]["grpo_on_policy"]["final_over_initial"]["mean"] == pytest.approx(sum(ratios) / 2)

    solve = claims["3_solve_rate"]["comparisons"]
    assert solve["pass_at_k_on_policy"]["difference"] == pytest.approx(0.2)
    assert solve["pass_at_k_on_policy"]["exceeds_seed_std"] is True and solve["pass_at_k_on_policy"]["met"] is True
    # Equal pass@1: no difference beyond the seed spread, so the claim is not met.
    assert solve["pass_at_1_on_policy"]["exceeds_seed_std"] is False and claims["3_solve_rate"]["met"] is False
    assert solve["pass_at_k_async"]["entropic"]["n"] == 1  # seed 1 failed; seed 0 still counts
    assert claims["3_solve_rate"]["failed_runs"] == [
        "entropic_async (entropic_h0.6_async_k4) seed1: exit code 3, log entropic_h0.6_async_k4/seed1.log"]

    throughput = claims["6_throughput"]["comparisons"]["grpo"]
    assert throughput["speedup"] == pytest.approx(80.5 / 50.5) and throughput["met"] is True
    assert throughput["seconds_on_policy"]["mean"] == 16.0

    results = (out / "results.md").read_text()
    assert "Seeds 0, 1; 30 steps per run; extra train flags `--fail True_async_1`" in results
    assert "| 1. GRPO's entropy collapses |" in results and "| grpo_async | " in results
    assert "seed1: exit code 3" in results and "for 8 runs (1 failed)" in results
    assert "entropy_initial" in results and "(n=2)" in results
    assert "![collapse entropy.png](claims/1-collapse/entropy.png)" in results
    assert "Settings of every run: lr n/a, " in results and ", kp 3.0, " in results  # from the runs' config.json
    assert (out / "claims" / "3-solve_rate" / "pass_at_k.png").is_file()
    assert "## Run config" in (out / "claims" / "1-collapse" / "report.md").read_text()
    record = json.loads((out / "suite.json").read_text())
    assert [(run["cell"], run["seed"], run["returncode"]) for run in record["runs"]][-2:] == [
        ("entropic_h0.6_async_k4", 0, 0), ("entropic_h0.6_async_k4", 1, 3)]

    # --report-only rebuilds the same judgement from suite.json without running anything.
    (out / "results.md").unlink()
    assert suite.main(["--output-dir", str(out), "--claims", "1,3,6", "--report-only"]) == 1
    rebuilt = json.loads(capsys.readouterr().out)
    assert rebuilt["claims"] == json.loads(json.dumps(claims)) and (out / "results.md").is_file()
    assert rebuilt["commit"] == record["commit"]  # the commit the runs ran on, recorded at the start

    # --publish DIR: DIR/results.md shows plots copied under DIR/results/, and an older copy goes.
    docs = tmp_path / "docs"
    (docs / "results" / "stale").mkdir(parents=True)
    assert suite.main(["--output-dir", str(out), "--claims", "1,3,6", "--report-only", "--publish", str(docs)]) == 1
    published = (docs / "results.md").read_text()
    assert "![collapse entropy.png](results/claims/1-collapse/entropy.png)" in published
    assert (docs / "results" / "claims" / "1-collapse" / "entropy.png").is_file()
    assert not (docs / "results" / "stale").exists()
    assert published.split("## Summary")[1].split("## 1.")[0] == results.split("## Summary")[1].split("## 1.")[0]
