"""The cluster scripts, Docker entrypoint and docs: syntax, and every flag they use exists.

Flags are checked against OpenRLHF 0.11.2's real parser, read from its own `--help` (its parser is
built inside `__main__`, so running the module is the only way to get it without copying it), and
against ours. The scripts are also run, with a recording stand-in for the `ray` command, and the
exact command line each submits is pushed through our CLI and OpenRLHF's `__main__` validation.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import cluster_standins  # noqa: F401  (must precede every openrlhf import)
import pytest

from openrlhf_entropic.cli.train_ppo_ray import build_parser
from openrlhf_entropic.entropic import EntroPICConfig
from openrlhf_entropic.runtime.openrlhf import ClusterConfig

pytest_plugins = ["cluster_launch"]  # the cli_args fixture

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"
SCRIPTS_DIR = ROOT / "examples" / "scripts"
SHELL_FILES = [
    *sorted(SCRIPTS_DIR.glob("*.sh")),
    TESTS / "gpu" / "smoke_cluster.sh",
    ROOT / "dockerfile" / "entrypoint.sh",
]
DOC_FILES = [
    ROOT / "docs" / name
    for name in ("cluster.md", "docker.md", "flags.md", "tuning.md", "on_off_policy.md", "metrics.md")
]
TRAINER_FLAG = re.compile(r"(?<![\w-])--[a-z_]+\.[a-z_][\w.]*")  # dotted: OpenRLHF's and our --entropic.*
MODULE = "openrlhf_entropic.cli.train_ppo_ray"


@pytest.mark.parametrize("path", SHELL_FILES, ids=lambda p: p.name)
def test_no_script_stops_every_ray_cluster_on_the_host(path):
    # `ray stop` kills all Ray processes of the machine, other users' clusters included.
    assert not re.search(r"\bray stop\b", path.read_text()), f"{path.name} runs `ray stop`"


@pytest.mark.parametrize("path", SHELL_FILES, ids=lambda p: p.name)
def test_shell_file_parses(path):
    result = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.fixture(scope="module")
def openrlhf_flags() -> set[str]:
    code = (
        "import cluster_standins, runpy, sys; sys.argv = ['train_ppo_ray', '--help']; "
        "runpy.run_module('openrlhf.cli.train_ppo_ray', run_name='__main__')"
    )
    env = {**os.environ, "PYTHONPATH": str(TESTS)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    flags = set(TRAINER_FLAG.findall(result.stdout))
    assert {"--train.async_enable", "--algo.advantage.is_correction_level", "--ckpt.load_enable"} <= flags
    return flags


def _our_flags() -> set[str]:
    return {option for action in build_parser()._actions for option in action.option_strings}


@pytest.mark.parametrize("path", [*SHELL_FILES, *DOC_FILES], ids=lambda p: p.name)
def test_every_trainer_flag_used_exists(path, openrlhf_flags):
    used = set(TRAINER_FLAG.findall(path.read_text(encoding="utf-8")))
    unknown = used - openrlhf_flags - _our_flags()
    assert not unknown, f"{path.name} uses flags that neither OpenRLHF 0.11.2 nor we define: {sorted(unknown)}"


def test_the_scripts_use_many_flags():
    # The regex above must really find the scripts' flags, or the existence test proves nothing.
    used = set(TRAINER_FLAG.findall((SCRIPTS_DIR / "entropic_common.sh").read_text()))
    assert {"--train.async_queue_size", "--entropic.enable", "--reward.remote_url"} <= used
    assert len(used) > 30


# ----- Running the scripts with a recording `ray` -----


@pytest.fixture
def run_script(tmp_path):
    """Run a script with `ray` replaced by a recorder; return the list of recorded ray argv lists."""
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    calls = tmp_path / "ray_calls.jsonl"
    recorder = fake_bin / "ray"
    recorder.write_text(
        f"#!{sys.executable}\n"
        "import json, os, sys\n"
        "with open(os.environ['RAY_CALLS'], 'a') as file:\n"
        "    file.write(json.dumps(sys.argv[1:]) + '\\n')\n"
        "sys.exit(1 if sys.argv[1:2] == ['status'] else 0)  # no Ray running yet\n"
    )
    recorder.chmod(0o755)

    def run(script, *args, **env):
        environment = {
            **os.environ,
            "PATH": f"{fake_bin}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
            "RAY_CALLS": str(calls),
            "DATASET": "/data/math.jsonl",
            "SAVE_ROOT": str(tmp_path / "runs"),
            **env,
        }
        result = subprocess.run(
            ["bash", str(SCRIPTS_DIR / script), *args], capture_output=True, text=True, env=environment, cwd=ROOT
        )
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
        return [json.loads(line) for line in calls.read_text().splitlines()] if calls.exists() else []

    return run


def _submitted(calls) -> list[list[str]]:
    """The trainer argv of each `ray job submit ... -- python3 -m <our module> ARGV`."""
    argvs = []
    for call in calls:
        if call[:2] == ["job", "submit"]:
            entrypoint = call[call.index("--") + 1 :]
            assert entrypoint[:3] == ["python3", "-m", MODULE]
            argvs.append(entrypoint[3:])
    return argvs


def _ray_help_flags(*command) -> set[str]:
    result = subprocess.run([Path(sys.executable).parent / "ray", *command, "--help"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", result.stdout))


def _check_ray_calls(calls, start_flags, submit_flags):
    for call in calls:
        options = {arg.split("=", 1)[0] for arg in call[: call.index("--") if "--" in call else len(call)]}
        options = {option for option in options if option.startswith("--")}
        if call[:1] == ["start"]:
            assert options <= start_flags, options - start_flags
        elif call[:2] == ["job", "submit"]:
            assert options <= submit_flags, options - submit_flags
            runtime_env = json.loads(
                next(arg for arg in call if arg.startswith("--runtime-env-json=")).split("=", 1)[1]
            )
            assert Path(runtime_env["working_dir"]) == ROOT  # the reward file path resolves inside it


@pytest.fixture(scope="module")
def ray_flags():
    return _ray_help_flags("start"), _ray_help_flags("job", "submit")


@pytest.mark.parametrize(
    ("script", "env", "expected"),
    [
        ("train_entropic_onpolicy.sh", {}, {"enable": True, "estimator": "on_policy", "async": False}),
        ("train_entropic_offpolicy_async.sh", {}, {"enable": True, "estimator": "importance_weighted", "async": True}),
        ("train_grpo_baseline.sh", {}, {"enable": False, "async": False}),
        ("train_grpo_baseline.sh", {"MODE": "off_policy"}, {"enable": False, "async": True}),
    ],
)
def test_single_node_scripts_submit_a_valid_run(script, env, expected, run_script, cli_args, ray_flags):
    calls = run_script(script, **env)
    start = next(call for call in calls if call[:1] == ["start"])
    assert start[start.index("--dashboard-host") + 1] == "127.0.0.1"  # the job API stays on loopback
    _check_ray_calls(calls, *ray_flags)
    (argv,) = _submitted(calls)
    args = cli_args(argv, [])  # OpenRLHF's parser and validation accept the exact submitted command
    config = EntroPICConfig.from_args(args)
    assert config.enable is expected["enable"] and args.train.async_enable is expected["async"]
    if "estimator" in expected:
        assert config.estimator == expected["estimator"]
    if expected["async"]:
        assert args.train.async_queue_size == 4
    assert args.logger.tensorboard_dir and args.ckpt.load_enable


@pytest.mark.parametrize("script", ["train_entropic_onpolicy.sh", "train_grpo_baseline.sh"])
def test_actor_dual_clip_is_the_official_entropic_setting(script, run_script, cli_args):
    """The official EntroPIC run uses dual clip 3.0; the baseline gets the same, so the runs differ in EntroPIC only."""
    (argv,) = _submitted(run_script(script))
    assert cli_args(argv, []).actor.dual_clip == 3.0


def test_async_entropic_script_bounds_staleness_and_keeps_the_loss(run_script, cli_args):
    (argv,) = _submitted(run_script("train_entropic_offpolicy_async.sh", MAX_STALENESS="2"))
    args = cli_args(argv, [])
    assert ClusterConfig.from_args(args).max_staleness == 2
    assert args.algo.advantage.is_correction_level == "token"  # vLLM log-probs requested ...
    assert ClusterConfig.from_args(args).rollout_log_probs_for_estimate_only  # ... for the estimate only


def test_multinode_script_roles(run_script, cli_args, ray_flags):
    head = run_script("train_entropic_multinode.sh", "head", HEAD_IP="10.0.0.1")[-1]
    assert head[:2] == ["start", "--head"] and head[head.index("--dashboard-host") + 1] == "127.0.0.1"
    worker = run_script("train_entropic_multinode.sh", "worker", HEAD_IP="10.0.0.1")[-1]
    assert worker[worker.index("--address") + 1] == "10.0.0.1:6379"
    calls = run_script("train_entropic_multinode.sh", "submit", HEAD_IP="10.0.0.1", NUM_NODES="2")
    _check_ray_calls(calls, *ray_flags)
    (argv,) = _submitted(calls)
    args = cli_args(argv, [])
    assert args.actor.num_nodes == 2 and args.vllm.num_engines == 16 and EntroPICConfig.from_args(args).enable


def test_compare_script_submits_four_runs_and_builds_the_report(run_script, tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    tensorboard_root = tmp_path / "runs" / "tensorboard"
    names = ["grpo_on_policy", "entropic_on_policy", "grpo_off_policy", "entropic_off_policy"]
    for index, name in enumerate(names):  # what OpenRLHF's TensorboardLogger would have written
        writer = SummaryWriter(log_dir=str(tensorboard_root / name))
        for step in range(1, 13):
            writer.add_scalar("train/entropic/entropy", 0.3 / step + 0.01 * index, step)
            writer.add_scalar("train/rollout/reward_mean", 0.05 * step, step)
            writer.add_scalar("train/entropic/alpha", 0.01 * step, step)
            writer.add_scalar("train/rollout/staleness_mean", float(index >= 2), step)
        writer.close()
    calls = run_script("compare_on_off_policy.sh", REPORT_DIR=str(tmp_path / "report"))
    run_names = []
    for argv in _submitted(calls):
        run_names.append(argv[argv.index("--logger.wandb.run_name") + 1])
    assert run_names == names
    assert (tmp_path / "report" / "report.md").is_file()


def test_flags_doc_lists_every_entropic_flag_with_its_real_default():
    import dataclasses

    doc = (ROOT / "docs" / "flags.md").read_text()
    rows = re.findall(r"^\| `--entropic\.(\w+)` \| `([^`]*)` \|", doc, re.M)
    # The core's flags first, in order, then the runtime settings spelled --entropic.* (cluster defaults).
    flagged = [f for cls in (EntroPICConfig, ClusterConfig) for f in dataclasses.fields(cls) if "help" in f.metadata]
    assert [name for name, _ in rows] == [f.name for f in flagged], "docs/flags.md must list each flag once, in order"
    for (name, documented), field in zip(rows, flagged, strict=True):
        assert documented == str(field.default), f"--entropic.{name}: docs say {documented}"


def test_help_works_without_openrlhf_vllm_or_flash_attn():
    # None in sys.modules makes any import of these names fail: --help must not need them.
    code = (
        "import runpy, sys\n"
        "for name in ('openrlhf', 'vllm', 'flash_attn', 'ray'):\n"
        "    sys.modules[name] = None\n"
        "sys.argv = ['train_ppo_ray', '--help']\n"
        f"runpy.run_module('{MODULE}', run_name='__main__')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    for option in _our_flags() - {"-h", "--help"}:
        assert option in result.stdout
    assert "Every other flag is passed unchanged to OpenRLHF 0.11.2's openrlhf.cli.train_ppo_ray" in result.stdout
