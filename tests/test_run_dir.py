"""A run folder holds one run: refusals, overwrite, resume checks, atomic checkpoints under kill -9."""

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from openrlhf_entropic.runtime.local.run_dir import COMPLETE_MARK, RunDir, RunDirError

CONFIG = {"run": {"mode": "async", "seed": 0, "steps": 10, "max_staleness": 4}, "entropic": {"kp": 3.0, "enable": True}}


def save(run_dir, step, keep=3):
    with run_dir.new_checkpoint(step, keep=keep) as folder:
        (folder / "weights.bin").write_bytes(os.urandom(1000))
        (folder / COMPLETE_MARK).write_text(json.dumps({"step": step}))


def started_run(tmp_path, steps=(3, 6)):
    run_dir = RunDir(tmp_path)
    assert run_dir.prepare(CONFIG, resume=False, overwrite=False) is None
    run_dir.metrics.write_text("".join(json.dumps({"step": s}) + "\n" for s in range(1, 9)))
    (tmp_path / "events.out.tfevents.1.host").write_bytes(b"x")
    for step in steps:
        save(run_dir, step)
    return run_dir


def test_a_new_run_refuses_a_folder_that_holds_one_and_overwrite_clears_all_of_it(tmp_path):
    started_run(tmp_path)
    with pytest.raises(RunDirError, match="already holds a run.*--resume.*--overwrite"):
        RunDir(tmp_path).prepare(CONFIG, resume=False, overwrite=False)
    (tmp_path / "notes.txt").write_text("mine")
    assert RunDir(tmp_path).prepare(CONFIG, resume=False, overwrite=True) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "notes.txt"]


def test_resume_continues_from_the_latest_checkpoint_and_truncates_the_rerun_steps(tmp_path):
    started_run(tmp_path)
    other_steps = {**CONFIG, "run": {**CONFIG["run"], "steps": 20}}  # harmless: more steps
    checkpoint = RunDir(tmp_path).prepare(other_steps, resume=True, overwrite=False)
    assert checkpoint.name == "step_6"
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == list(
        range(1, 7))


@pytest.mark.parametrize("section, key, value", [("run", "mode", "on_policy"), ("entropic", "kp", 5.0),
                                                 ("run", "max_staleness", 0)])
def test_resume_refuses_settings_that_change_the_algorithm(tmp_path, section, key, value):
    started_run(tmp_path)
    changed = {**CONFIG, section: {**CONFIG[section], key: value}}
    with pytest.raises(RunDirError, match=f"{section}.{key}"):
        RunDir(tmp_path).prepare(changed, resume=True, overwrite=False)


def test_resume_without_a_run_or_a_checkpoint_is_an_error(tmp_path):
    with pytest.raises(RunDirError, match="holds no run"):
        RunDir(tmp_path / "empty").prepare(CONFIG, resume=True, overwrite=False)
    started_run(tmp_path / "no_ckpt", steps=())
    with pytest.raises(RunDirError, match="no complete checkpoint"):
        RunDir(tmp_path / "no_ckpt").prepare(CONFIG, resume=True, overwrite=False)


def test_a_broken_latest_falls_back_to_the_newest_complete_checkpoint_and_old_ones_are_pruned(tmp_path):
    run_dir = started_run(tmp_path, steps=(1, 2, 3, 4))
    assert sorted(p.name for p in run_dir.checkpoints.glob("step_*")) == ["step_2", "step_3", "step_4"]  # keep 3
    (run_dir.checkpoints / "latest").write_text("")
    assert run_dir.latest_checkpoint().name == "step_4"
    (run_dir.checkpoints / "step_4" / COMPLETE_MARK).unlink()  # as if killed before the last write
    (run_dir.checkpoints / "latest").write_text("step_4")
    assert run_dir.latest_checkpoint().name == "step_3"


SAVER = textwrap.dedent("""
    import json, os, sys
    from openrlhf_entropic.runtime.local.run_dir import COMPLETE_MARK, RunDir
    run_dir = RunDir(sys.argv[1])
    step = int(sys.argv[2])
    while True:  # save forever, a few MB each, until killed
        step += 1
        with run_dir.new_checkpoint(step, keep=2) as folder:
            for part in range(4):
                (folder / f"part{part}.bin").write_bytes(os.urandom(500_000))
            (folder / COMPLETE_MARK).write_text(json.dumps({"step": step}))
""")


def test_kill_9_at_random_moments_during_saves_never_breaks_resume(tmp_path):
    run_dir = started_run(tmp_path, steps=(1,))
    rng = random.Random(0)
    for kill in range(50):
        newest = run_dir.latest_checkpoint()
        process = subprocess.Popen([sys.executable, "-c", SAVER, str(tmp_path), newest.name.split("_")[1]])
        time.sleep(rng.uniform(0.05, 0.4))
        process.send_signal(signal.SIGKILL)
        process.wait()
        checkpoint = RunDir(tmp_path).prepare(CONFIG, resume=True, overwrite=False)
        assert checkpoint is not None, f"kill {kill}: no checkpoint to resume from"
        state = json.loads((checkpoint / COMPLETE_MARK).read_text())
        assert checkpoint.name == f"step_{state['step']}" and len(list(checkpoint.glob("part*.bin"))) in (0, 4)
        assert all((checkpoint / f"part{i}.bin").stat().st_size == 500_000 for i in range(4)) or state["step"] == 1
