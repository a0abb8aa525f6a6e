"""End-to-end tests of the embedded runtime on a small local Ray cluster (tiny settings)."""

import json
import os
import shutil
import socket
from collections import Counter

import pytest

ray = pytest.importorskip("ray")

from openrlhf_entropic.cli.train import build_task, main, parse_args  # noqa: E402
from openrlhf_entropic.reporting.metrics import RunMetric  # noqa: E402
from openrlhf_entropic.runtime.local.run_dir import RunDirError  # noqa: E402
from openrlhf_entropic.runtime.local.trainer import RAY_SYSTEM_CONFIG, LocalTrainer  # noqa: E402


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    # The settings the trainer gives a Ray cluster it starts itself, so these runs use the same transport.
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", logging_level="WARNING",
             ignore_reinit_error=True, _system_config=dict(RAY_SYSTEM_CONFIG))
    yield str(tmp_path_factory.mktemp("warm_start"))
    ray.shutdown()


def make_trainer(cache, output_dir, *flags):
    argv = ["--output-dir", str(output_dir), "--warm-start-cache", cache, "--warm-start-steps", "30",
            "--rollout-batch-size", "4", "--n-samples-per-prompt", "4", "--train-batch-size", "16",
            "--micro-train-batch-size", "8", "--eval-steps", "2", "--eval-n-samples", "4", "--eval-k", "2",
            "--no-progress", *flags]
    args, entropic = parse_args(argv)
    return LocalTrainer(args, entropic, build_task(args))


def rows_of(output_dir):
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def test_on_policy_run_syncs_weights_and_writes_its_outputs(cache, tmp_path):
    trainer = make_trainer(cache, tmp_path, "--steps", "4", "--entropic.enable")
    trainer.setup()
    trainer.train(2)
    assert ray.get(trainer.generators[0].__ray_call__.remote(lambda g: g.version)) == 2
    summary = trainer.run()

    rows = rows_of(tmp_path)
    assert [row["step"] for row in rows] == [1, 2, 3, 4]
    for row in rows:
        assert row["staleness_max"] == 0 and row["dropped_stale"] == 0
        # fresh samples: the importance-weighted estimate is the plain mean (up to generate's numerics)
        assert abs(row["entropy_iw"] - row["entropy"]) < 1e-4 and row["ess_fraction"] > 0.999
    assert {"entropy_true", "pass_at_1", "pass_at_k"} <= rows[1].keys() and "entropy_true" not in rows[0]
    assert rows[0]["alpha"] != 0.0  # EntroPIC on: the controller acted
    for key in ("entropy_initial", "entropy_final", "entropy_tracking_error", "entropy_eval_tracking_error",
                "reward_final", "pass_at_1", "pass_at_k", "k", "samples_per_second", "staleness_mean",
                "staleness_max", "dropped_stale", "steps", "seconds"):
        assert summary[key] is not None, key
    assert json.loads((tmp_path / "summary.json").read_text())["steps"] == 4
    assert list(tmp_path.glob("events.out.tfevents.*"))


def copy_run_up_to(source, target, step):
    """`target` as the run in `source` looked when checkpoint `step` was its latest (a kill right after it)."""
    (target / "checkpoints").mkdir(parents=True)
    shutil.copytree(source / "checkpoints" / f"step_{step}", target / "checkpoints" / f"step_{step}")
    (target / "checkpoints" / "latest").write_text(f"step_{step}")
    shutil.copy(source / "config.json", target / "config.json")
    # Rows past the checkpoint, as a killed run leaves them: the resume must log those steps once, not twice.
    (target / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows_of(source)[:step + 1]))


@pytest.mark.parametrize("mode", [["--mode", "on_policy"], ["--mode", "async", "--max-staleness", "2"],
                                  ["--mode", "on_policy", "--colocate-all", "--generator", "hf"]])
def test_a_resumed_run_continues_exactly_as_an_uninterrupted_one(cache, tmp_path, mode):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    make_trainer(cache, full, "--steps", "6", "--save-steps", "3", "--entropic.enable", *mode).run()
    reference = rows_of(full)
    # Results enter the buffer in launch order even when evaluations let several jobs finish at once.
    assert all(row["dropped_stale"] == 0 for row in reference)

    copy_run_up_to(full, resumed, 3)
    summary = make_trainer(cache, resumed, "--steps", "6", "--entropic.enable", "--resume", *mode).run()

    continued = rows_of(resumed)
    assert [row["step"] for row in continued] == [1, 2, 3, 4, 5, 6]  # each step once
    for ours, theirs in zip(continued[3:], reference[3:], strict=True):
        assert ours["alpha"] == pytest.approx(theirs["alpha"], abs=1e-5)
        assert ours["i_term"] == pytest.approx(theirs["i_term"], abs=1e-5)
        assert ours["entropy"] == pytest.approx(theirs["entropy"], abs=1e-5)
        assert ours["staleness_mean"] == theirs["staleness_mean"]
    assert summary["seconds"] >= reference[2]["seconds"]  # the time before the kill counts too
    with pytest.raises(RunDirError, match="entropic.kp"):
        make_trainer(cache, resumed, "--steps", "8", "--entropic.enable", "--entropic.kp", "9", "--resume", *mode).setup()


def test_pipelined_steps_give_the_run_that_one_step_at_a_time_gives(cache, tmp_path):
    """train(4) sends step k + 1 before reading step k; train(1) four times never does. The runs must be
    the same, evaluations included: one queued behind step k + 1 instead of before it sees other weights."""
    flags = ["--steps", "4", "--entropic.enable", "--mode", "async", "--max-staleness", "2", "--eval-steps", "1"]
    pipelined = make_trainer(cache, tmp_path / "pipelined", *flags)
    pipelined.setup()
    pipelined.train(4)
    pipelined.close()
    stepwise = make_trainer(cache, tmp_path / "stepwise", *flags)
    stepwise.setup()
    for _ in range(4):
        stepwise.train(1)
    stepwise.close()
    for ours, theirs in zip(rows_of(tmp_path / "pipelined"), rows_of(tmp_path / "stepwise"), strict=True):
        assert "entropy_true" in ours
        for key, value in theirs.items():
            if not key.endswith("seconds") and key != "samples_per_second":
                assert ours[key] == value, (ours["step"], key)


def test_killed_generator_is_restarted_and_its_prompts_requeued(cache, tmp_path):
    trainer = make_trainer(cache, tmp_path, "--steps", "6", "--mode", "async", "--max-staleness", "2",
                           "--num-generators", "2", "--num-learners", "2", "--entropic.enable")
    trainer.setup()
    trainer.train(2)
    # Its jobs in flight, and the next one launched onto it (the generator with the fewest jobs in flight
    # gets the next), must come back through the re-queue.
    ray.kill(trainer.generators[0], no_restart=True)
    rows = trainer.train(4)
    assert trainer.counters[RunMetric.GENERATOR_RESTARTS] == 1 and trainer.counters[RunMetric.REQUEUED_JOBS] >= 1
    assert all(row["staleness_max"] <= 2 for row in rows) and any(row["staleness_max"] > 0 for row in rows)

    job_samples = trainer.config.job_samples
    buffered = ray.get(trainer.buffer.__ray_call__.remote(lambda b: [s.uid for s in b.samples]))
    held = Counter(trainer.consumed_uids) + Counter(buffered)
    pending = [job.uid for job, *_ in trainer.inflight.values()] + [job.uid for job in trainer.requeue]
    dropped = ray.get(trainer.buffer.evicted_count.remote())
    # The driver's copy of the buffer (what its launch rule uses) matches the buffer after the same eviction.
    ray.get(trainer.buffer.evict_stale.remote(trainer.version))
    trainer.versions.evict_stale(trainer.version)
    assert trainer.versions.evicted_count() == ray.get(trainer.buffer.evicted_count.remote())
    assert trainer.versions.size() == ray.get(trainer.buffer.size.remote())
    assert len(trainer.consumed_uids) == 6 * 16
    assert max(held.values()) <= job_samples  # nothing counted twice
    assert sum(held.values()) + job_samples * len(pending) + dropped == trainer.next_uid * job_samples  # none lost
    trainer.close()


@pytest.mark.parametrize("engine, learners", [("vllm", "1"), ("hf", "2")])
def test_colocated_learners_sample_and_train_exactly_as_generator_actors_do(cache, tmp_path, engine, learners):
    """--colocate-all moves generation into the learners: the run must be the same, step for step. Without the
    in-memory sync (vLLM) or the shared module (hf) the second batch would come from the first step's weights."""
    flags = ["--steps", "3", "--entropic.enable", "--generator", engine, "--num-learners", learners,
             "--num-generators", learners]
    make_trainer(cache, tmp_path / "apart", *flags).run()
    colocated = make_trainer(cache, tmp_path / "colocated", *flags, "--colocate-all")
    colocated.setup()
    assert colocated.generators == colocated.learners  # no generator actors
    colocated.run()
    for ours, theirs in zip(rows_of(tmp_path / "colocated"), rows_of(tmp_path / "apart"), strict=True):
        for key in ("reward_mean", "entropy", "alpha", "policy_loss"):
            assert ours[key] == theirs[key], (ours["step"], key)


def test_file_data_with_nan_rewards_and_a_malformed_row(cache, tmp_path):
    from openrlhf_entropic.tasks import synthetic

    train, _ = synthetic.make_prompts()
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"question": r["prompt"], "answer": r["label"]}) + "\n" for r in train[:40]))
    reward = tmp_path / "reward.py"
    reward.write_text(
        "from openrlhf_entropic.tasks.synthetic import reward_func as exact\n"
        "def reward_func(queries, prompts, labels):\n"
        "    scores = exact(queries, prompts, labels)\n"
        "    return [float('nan') if q[len(p):].split()[0] == l.split()[0] else s\n"
        "            for q, p, l, s in zip(queries, prompts, labels, scores)]\n")
    flags = ["--output-dir", str(tmp_path / "run"), "--warm-start-cache", cache, "--warm-start-steps", "30",
             "--rollout-batch-size", "4", "--n-samples-per-prompt", "4", "--train-batch-size", "16",
             "--micro-train-batch-size", "16", "--steps", "2", "--eval-steps", "2", "--eval-n-samples", "2",
             "--eval-k", "1", "--no-progress", "--prompt-data", str(data), "--input-key", "question",
             "--label-key", "answer", "--reward-func", str(reward)]
    summary = main(flags)
    assert summary["dropped_nan"] > 0 and summary["steps"] == 2
    assert all(row["reward_mean"] == row["reward_mean"] for row in rows_of(tmp_path / "run"))  # no NaN trained on

    data.write_text(data.read_text() + '{"question": "a b c d =", "answer": 3}\n')
    with pytest.raises(ValueError, match=r"prompts\.jsonl.*41"):
        main(flags)


def test_a_reward_function_that_only_returns_nan_stops_the_run_with_the_counts(cache, tmp_path):
    reward = tmp_path / "nan_reward.py"
    reward.write_text("def reward_func(queries, prompts, labels):\n    return [float('nan')] * len(queries)\n")
    data = tmp_path / "prompts.jsonl"
    from openrlhf_entropic.tasks import synthetic

    data.write_text("".join(json.dumps({"input": r["prompt"], "label": r["label"]}) + "\n"
                            for r in synthetic.make_prompts()[0][:20]))
    with pytest.raises(Exception, match=r"gave no usable sample: every reward was NaN or inf \(\d+ NaN"):
        make_trainer(cache, tmp_path / "run", "--steps", "2", "--prompt-data", str(data), "--reward-func",
                     str(reward)).run()


def test_ctrl_c_stops_after_the_step_keeps_what_is_finished_and_exits_130(cache, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "openrlhf_entropic.cli.train", "--output-dir", str(run_dir), "--warm-start-cache",
               cache, "--warm-start-steps", "30", "--rollout-batch-size", "4", "--n-samples-per-prompt", "4",
               "--train-batch-size", "16", "--micro-train-batch-size", "16", "--steps", "500", "--save-steps", "2",
               "--no-progress", "--ray-num-cpus", "2"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and not (run_dir / "checkpoints" / "latest").is_file():
        time.sleep(0.5)
    assert (run_dir / "checkpoints" / "latest").is_file(), "the run never saved a checkpoint"
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130
    assert "[train] Ctrl-C: stopping after this step" in stderr  # the handler, not a bare KeyboardInterrupt
    assert "[train] interrupted" in stderr and "Traceback" not in stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["interrupted"] is True and summary["steps"] == len(rows_of(run_dir)) >= 2


def test_a_runs_ray_listens_on_loopback_only_and_dies_with_its_driver_even_on_sigkill(cache, tmp_path):
    import contextlib
    import signal
    import subprocess
    import sys
    import time

    import psutil

    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "openrlhf_entropic.cli.train", "--output-dir", str(run_dir), "--warm-start-cache",
               cache, "--warm-start-steps", "30", "--rollout-batch-size", "4", "--n-samples-per-prompt", "4",
               "--train-batch-size", "16", "--micro-train-batch-size", "16", "--steps", "5000", "--no-progress",
               "--mode", "async", "--max-staleness", "2"]
    driver = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and not (run_dir / "metrics.jsonl").is_file():
            time.sleep(0.5)
        ray_processes = psutil.Process(driver.pid).children(recursive=True)
        assert len(ray_processes) >= 4, "expected the driver's Ray cluster (GCS, raylet, actors) below it"
        # The socket table: every port the driver and its Ray processes listen on is on loopback.
        listening = {}
        for process in [psutil.Process(driver.pid), *ray_processes]:
            with contextlib.suppress(psutil.NoSuchProcess):
                for connection in process.net_connections(kind="inet"):
                    if connection.status == psutil.CONN_LISTEN:
                        listening.setdefault(connection.laddr.ip, []).append(process.name())
        assert "gcs_server" in str(listening) and "raylet" in str(listening), listening
        assert set(listening) <= {"127.0.0.1", "::1", "::ffff:127.0.0.1"}, listening
        driver.send_signal(signal.SIGKILL)
        driver.wait()
        gone, alive = psutil.wait_procs(ray_processes, timeout=30)
        assert not alive, f"left behind after the driver's kill: {[p.name() for p in alive]}"
    finally:  # a failed check must not leave the driver running
        if driver.poll() is None:
            driver.kill()
            driver.wait()


def test_ray_job_submit_runs_the_trainer_on_a_head_started_as_documented(cache, tmp_path):
    """docs/embedded.md's recipe: a loopback head with the job server, one job, and a stop of that head only."""
    import signal
    import subprocess
    import sys
    import tempfile
    import time
    import urllib.request
    from pathlib import Path

    import psutil

    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    env.pop("RAY_ADDRESS", None)
    ports = []
    for _ in range(3):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            ports.append(sock.getsockname()[1])
    gcs_port, dashboard_port, agent_port = ports  # not the defaults: other Ray clusters may hold them
    temp_dir = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # short: Ray's socket paths live under it
    head = subprocess.Popen(
        [str(bin_dir / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(gcs_port),
         "--include-dashboard", "true", "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard_port),
         "--dashboard-agent-listen-port", str(agent_port), "--num-cpus", "2", "--temp-dir", temp_dir],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    dashboard = f"http://127.0.0.1:{dashboard_port}"
    try:
        deadline = time.time() + 120
        while True:  # the job server answers once the dashboard is up
            try:
                urllib.request.urlopen(f"{dashboard}/api/version", timeout=2)
                break
            except OSError:
                assert time.time() < deadline and head.poll() is None, "the Ray head did not start"
                time.sleep(1)
        run_dir = tmp_path / "run"
        submit = [str(bin_dir / "ray"), "job", "submit", "--address", dashboard, "--",
                  "python", "-m", "openrlhf_entropic.cli.train", "--output-dir", str(run_dir), "--warm-start-cache",
                  cache, "--warm-start-steps", "30", "--rollout-batch-size", "4", "--n-samples-per-prompt", "4",
                  "--train-batch-size", "16", "--micro-train-batch-size", "16", "--steps", "2", "--eval-steps", "2",
                  "--eval-n-samples", "4", "--eval-k", "2", "--no-progress"]
        while True:  # the job agent comes up a few seconds after the dashboard
            job = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=600)
            if "No available agent" not in job.stderr or time.time() > deadline:
                break
            time.sleep(2)
        assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
        assert json.loads((run_dir / "summary.json").read_text())["steps"] == 2
        cluster = psutil.Process(head.pid).children(recursive=True)
        assert any(p.name() == "gcs_server" for p in cluster)
    finally:
        head.send_signal(signal.SIGTERM)  # `ray start --block` stops what it started; `ray stop` would stop all
        head.wait(timeout=60)
    gone, alive = psutil.wait_procs(cluster, timeout=30)
    assert not alive, f"left behind after stopping the head: {[p.name() for p in alive]}"


def test_a_learner_starts_although_an_interrupted_deepspeed_build_left_its_lock(tmp_path):
    """A run killed while DeepSpeed JIT-built its shared-memory op left a lock that hung every later learner."""
    import subprocess
    import sys

    lock = tmp_path / "extensions" / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir(parents=True)
    lock.touch()
    script = (
        "import sys\n"
        "from openrlhf_entropic.cli.train import build_task, parse_args\n"
        "from openrlhf_entropic.runtime.local.learner import Learner\n"
        "args, entropic = parse_args(['--output-dir', sys.argv[1], '--warm-start-steps', '0'])\n"
        "Learner(0, 1, f'file://{sys.argv[1]}/store', build_task(args).model_factory, args, entropic, None)\n"
        "print('learner ready')\n"
    )
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path / "extensions")}
    started = subprocess.run([sys.executable, "-c", script, str(tmp_path)], env=env, capture_output=True, text=True,
                             timeout=120)  # ~10 s when nothing hangs
    assert "learner ready" in started.stdout, started.stderr[-3000:]
