"""The embedded training loop: generators -> replay buffer -> DeepSpeed learners -> weight sync.

One loop serves on-policy (K = 0) and async off-policy (K > 0); the only difference is when a
generation job may start, which `Staleness.may_launch` decides. What the run writes (metrics.jsonl,
TensorBoard, checkpoints, summary.json) is described in docs/embedded.md and docs/metrics.md.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import signal
import tempfile
import threading
import time
from collections import deque
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from openrlhf_entropic.entropic import EntroPICConfig, Metric
from openrlhf_entropic.reporting.metrics import TAGS, RunMetric, jsonl_key
from openrlhf_entropic.runtime.local.buffer import ReplayBuffer, Sample, Staleness
from openrlhf_entropic.runtime.local.config import RunConfig
from openrlhf_entropic.runtime.local.generator import Generator, Job, Rollout
from openrlhf_entropic.runtime.local.learner import Learner
from openrlhf_entropic.runtime.local.run_dir import COMPLETE_MARK, RunDir
from openrlhf_entropic.tasks import Task

logger = logging.getLogger(__name__)

# Consecutive generation jobs that returned no usable sample (every reward NaN/inf) before the run
# stops: a broken reward function must fail with a message, not leave the trainer waiting forever.
MAX_EMPTY_JOBS = 16

# For a Ray cluster this trainer starts: objects up to 1 MiB travel inside Ray's task messages instead
# of its shared-memory store (Ray's default cut is 100 KiB). A store round trip cost ~2 ms here: with the
# embedded model's weights (336 KiB) stored every step, an async learner spent ~8.5 ms a step outside
# train_step, ~4.7 ms without. Bigger models still use the store. (Ray adds keys to the dict it gets: pass a copy.)
RAY_SYSTEM_CONFIG = {"max_direct_call_object_size": 1 << 20}


# Run by a watcher process: while the driver lives, note its descendants (the Ray cluster it started);
# once it is gone, kill those. Ray's own processes outlive a driver killed with SIGKILL (measured:
# GCS, raylet, agents and actors still up 37 s later), and actor workers rename themselves, so they
# cannot be found by command line afterwards.
_WATCHER = """
import os, sys, time, psutil
driver = psutil.Process(int(sys.argv[1]))
known = []
while driver.is_running() and driver.status() != psutil.STATUS_ZOMBIE:
    try:
        known = driver.children(recursive=True) or known
    except psutil.Error:
        break
    time.sleep(0.5)
for process in known:
    if process.pid == os.getpid():
        continue
    try:
        process.kill()  # psutil checks the creation time: a reused pid is never hit
    except psutil.Error:
        pass
"""


def _stop_ray_when_this_process_dies() -> None:
    """Start the watcher above for the Ray cluster this process just started (and only that one)."""
    import subprocess
    import sys

    subprocess.Popen([sys.executable, "-c", _WATCHER, str(os.getpid())], start_new_session=True,
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _core_plan(config: RunConfig) -> tuple[list, list]:
    """CPU cores for each learner and each generator (None = not pinned).

    On-policy, generation and training take turns, so every actor may use every core. Async, they
    run at once: generators and learners get disjoint cores, so the overlap is real and not two
    thread pools fighting over the same cores. GPU learners and a joined cluster are left unpinned.
    """
    learners, generators = config.num_learners, config.num_generators
    cores = sorted(os.sched_getaffinity(0))
    if config.ray_address or config.learner_num_gpus > 0:
        return [None] * learners, [None] * generators
    if config.mode == "on_policy" or len(cores) < 2:
        return [cores] * learners, [cores] * generators
    split = max(1, len(cores) // 2)
    generator_cores, learner_cores = cores[:split], cores[split:]
    return ([_share(learner_cores, rank, learners) for rank in range(learners)],
            [_share(generator_cores, index, generators) for index in range(generators)])


def _share(cores: list[int], index: int, count: int) -> list[int]:
    """Actor `index` of `count`'s part of `cores` (round-robin; actors share cores when there are fewer cores)."""
    return cores[index::count] if count <= len(cores) else [cores[index % len(cores)]]


class LocalTrainer:
    """Owns the Ray actors and runs the loop. Call `run()`; tests may call `setup()` and `train(steps)`."""

    def __init__(self, run: RunConfig, entropic: EntroPICConfig, task: Task):
        self.config, self.entropic, self.task = run, entropic, task
        self.output_dir = Path(run.output_dir)
        self.run_dir = RunDir(run.output_dir)
        self.staleness = Staleness(run.max_staleness, run.batch_samples, run.job_samples, run.buffer_capacity)
        self.rng = np.random.default_rng(run.seed)
        self.step = self.version = self.synced_version = self.next_uid = 0
        self.counters = {RunMetric.DROPPED_NAN: 0, RunMetric.DROPPED_INF: 0, RunMetric.CLIPPED_REWARDS: 0,
                         RunMetric.GENERATOR_RESTARTS: 0, RunMetric.REQUEUED_JOBS: 0, RunMetric.GENERATE_SECONDS: 0.0}
        self.empty_jobs = 0  # consecutive jobs without a usable sample
        self.step_sync_seconds = 0.0  # generators' weight loads reported during this step
        self.inflight: dict = {}  # report ObjectRef -> (job, generator index, generator handle, samples ObjectRef)
        # The driver's copy of the buffer: the same class and rule, holding each sample's version only, so the
        # launch rule needs no round trip to the buffer actor.
        self.versions = ReplayBuffer(self.staleness)
        self.puts: list = []  # buffer.put results not yet checked (they are checked with the step's results)
        self.requeue: deque[Job] = deque()  # jobs whose generator died, launched again first
        self.consumed_uids: list[int] = []  # job uid of every trained sample, in order (tests check it)
        self.weights_ref = None
        self.started = time.time()  # moved back by the resumed run's earlier seconds

    # ----- actors -------------------------------------------------------------------------------
    def setup(self) -> None:
        """Start (or join) Ray, create the buffer, learner and generator actors, resume if asked."""
        import ray
        from torch.utils.tensorboard import SummaryWriter

        config = self.config
        resume_from = self.run_dir.prepare({"run": dataclasses.asdict(config),
                                            "entropic": dataclasses.asdict(self.entropic)},
                                           resume=config.resume, overwrite=config.overwrite)
        # purge_step: TensorBoard drops the events of steps a resumed run logs again.
        self.writer = SummaryWriter(str(self.output_dir), purge_step=None if resume_from is None else
                                    int(resume_from.name.split("_")[1]) + 1)
        if not ray.is_initialized():
            address = config.ray_address or os.environ.get("RAY_ADDRESS")  # a `ray job submit` job has RAY_ADDRESS
            if address:
                ray.init(address=address, logging_level=logging.WARNING)
            else:
                # Ray swaps a loopback node address for the machine's IP unless its single-machine mode
                # is on; with it, every process of this cluster listens on 127.0.0.1 only (tested).
                os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # for the processes Ray starts
                ray._private.ray_constants.ENABLE_RAY_CLUSTER = False  # for this one, which imported ray already
                ray.init(num_cpus=config.ray_num_cpus, include_dashboard=config.ray_dashboard,
                         _node_ip_address="127.0.0.1", logging_level=logging.WARNING,
                         _system_config=dict(RAY_SYSTEM_CONFIG))
                _stop_ray_when_this_process_dies()
        self.buffer = ray.remote(num_cpus=0)(ReplayBuffer).remote(self.staleness)
        # Learners meet through a file, not torch's TCP store (which listens on every interface).
        self.rendezvous_dir = tempfile.mkdtemp(prefix="entropic_rendezvous_")
        rendezvous = f"file://{self.rendezvous_dir}/store"
        self.learner_cores, self.generator_cores = _core_plan(config)
        learner_cls = ray.remote(num_cpus=0, num_gpus=config.learner_num_gpus)(Learner)
        self.learners = [
            learner_cls.remote(rank, config.num_learners, rendezvous, self.task.model_factory, config, self.entropic,
                               self.learner_cores[rank], self.task.reward_fn if config.colocate_all else None)
            for rank in range(config.num_learners)
        ]
        # --colocate-all: the learners generate too (their `generate` is the Generator's).
        self.generators = list(self.learners) if config.colocate_all else [
            self._new_generator(index) for index in range(config.num_generators)]
        # Wait until every actor is up, so start-up errors surface here and not mid-run.
        ray.get([r.get_weights.remote() for r in self.learners] +
                ([] if config.colocate_all else [g.ready.remote() for g in self.generators]))
        self._sync(self.version)
        if resume_from is not None:
            self.load_checkpoint(resume_from)

    def _new_generator(self, index: int):
        import ray

        generator = ray.remote(num_cpus=0)(Generator).remote(self.task.model_factory, self.task.reward_fn, self.config,
                                                            self.generator_cores[index])
        if self.weights_ref is not None:
            generator.load_weights.remote(self.weights_ref, self.synced_version)
        return generator

    def _sync(self, version: int) -> None:
        """Send the weights the learners hold once their calls so far are done (policy `version`) to every
        generator, applied before its next job. The driver neither unpacks the weights nor waits for them."""
        self.synced_version = version
        if self.config.colocate_all:  # each learner's own generator, in memory
            for learner in self.learners:
                learner.sync_generator.remote(version)
            return
        self.weights_ref = self.learners[0].get_weights.remote()
        for generator in self.generators:
            generator.load_weights.remote(self.weights_ref, version)

    # ----- generation ---------------------------------------------------------------------------
    def _fill(self, pending_train: int) -> None:
        """Launch jobs while `Staleness.may_launch` allows, onto the generator with the fewest jobs in flight."""
        ahead = self.versions.evict_stale(self.version) + len(self.inflight) * self.config.job_samples
        while self.staleness.may_launch(ahead, self.version, pending_train, self.synced_version):
            job = self.requeue.popleft() if self.requeue else self._new_job()
            busy = [sum(1 for _, i, *_ in self.inflight.values() if i == g) for g in range(len(self.generators))]
            index = busy.index(min(busy))
            report, samples = self.generators[index].generate.options(num_returns=2).remote(job)
            self.inflight[report] = (job, index, self.generators[index], samples)
            ahead += self.config.job_samples

    def _new_job(self) -> Job:
        rows, count = self.task.train_rows, self.config.rollout_batch_size // self.config.num_generators
        picks = self.rng.choice(len(rows), size=count, replace=len(rows) < count)
        self.next_uid += 1
        return Job(uid=self.next_uid, rows=[rows[i] for i in picks])

    def _collect(self, block: bool) -> None:
        """Move finished jobs into the buffer (`block`: wait for the oldest); a job whose generator died is
        re-queued and the actor restarted. Samples go from generator to buffer by reference: the driver
        reads only the job's report."""
        import ray
        from ray.exceptions import RayActorError

        if not self.inflight:
            return
        # Results enter the buffer in launch order, which is what the launch rule counted on: a job
        # put behind a later one would be trained later and could exceed K. (ray.wait keeps no order.)
        launched = list(self.inflight)
        if block:
            ray.wait(launched[:1])
        ready, _ = ray.wait(launched, num_returns=len(launched), timeout=0)
        ready = set(ready)
        for ref in launched:
            if ref not in ready:
                break
            job, index, handle, samples = self.inflight.pop(ref)
            try:
                rollout: Rollout = ray.get(ref)
            except RayActorError:
                if self.config.colocate_all:  # the generator was a learner: its weights and optimizer are gone
                    raise
                if self.generators[index] is handle:  # first failed job of this actor: restart it
                    logger.warning("generator %d died; restarting it and re-queuing its jobs", index)
                    self.counters[RunMetric.GENERATOR_RESTARTS] += 1
                    self.generators[index] = self._new_generator(index)
                self.counters[RunMetric.REQUEUED_JOBS] += 1
                self.requeue.append(job)  # launched again first, in launch order
                continue
            self.counters[RunMetric.DROPPED_NAN] += rollout.dropped_nan
            self.counters[RunMetric.DROPPED_INF] += rollout.dropped_inf
            self.counters[RunMetric.CLIPPED_REWARDS] += rollout.clipped_rewards
            self.counters[RunMetric.GENERATE_SECONDS] += rollout.seconds
            self.step_sync_seconds += rollout.sync_seconds
            self.empty_jobs = 0 if rollout.kept else self.empty_jobs + 1
            if self.empty_jobs >= MAX_EMPTY_JOBS:
                raise RuntimeError(
                    f"the last {self.empty_jobs} generation jobs gave no usable sample: every reward was NaN or inf "
                    f"({self.counters[RunMetric.DROPPED_NAN]} NaN and {self.counters[RunMetric.DROPPED_INF]} inf "
                    "rewards so far). Check the reward function.")
            if rollout.kept:
                # Calls to one actor run in the order they are made: this put lands before the next take.
                self.puts.append(self.buffer.put.remote(samples, self.version))
                self.versions.put([SimpleNamespace(version=rollout.version)] * rollout.kept, self.version)

    # ----- training -----------------------------------------------------------------------------
    def train(self, steps: int, on_step=None) -> list[dict]:
        """Run `steps` training steps (stopping at --steps) and return their metrics.jsonl rows; `on_step(row)`
        is called as each is logged.

        Step n + 1 is sent before step n's results are read, so the learners go from step to step without
        waiting on the driver. Every decision (launches, batches, syncs) depends only on versions and counts,
        so it is the one the unpipelined loop would take. A step after which a checkpoint is due, and the last
        one of a call, are read before anything else is sent.
        """
        rows, pending = [], None
        self.finished_at = time.perf_counter()
        last = min(self.step + steps, self.config.steps)
        while self.version < last:
            sent = self._send_step()
            if pending is not None:
                rows.append(self._finish_step(pending, on_step))
            pending = sent
            if self.version == last or (self.config.save_steps > 0 and self.version % self.config.save_steps == 0):
                rows.append(self._finish_step(pending, on_step))
                pending = None
        return rows

    def _send_step(self) -> SimpleNamespace:
        """Wait until a batch is in the buffer, then send step `self.version + 1`: its batch to the learners,
        the weight sync and evaluation due after it, and the generation jobs it allows. Returns its pending refs."""
        config = self.config
        started = time.perf_counter()
        self._fill(pending_train=0)
        while self.versions.evict_stale(self.version) < config.batch_samples:
            if not self.inflight:
                raise RuntimeError(f"cannot fill a batch of {config.batch_samples} samples: nothing in flight "
                                   f"and the buffer capacity ({self.staleness.capacity}) allows no new job")
            self._collect(block=True)
            self._fill(pending_train=0)
        waited = time.perf_counter() - started
        summary, *shards = self.buffer.take_shards.options(num_returns=1 + config.num_learners).remote(
            config.batch_samples, self.version, config.num_learners)
        self.versions.take(config.batch_samples, self.version)
        self._fill(pending_train=1)  # async: generators keep working on the current weights during the step
        results = [learner.train_step.remote(shard) for learner, shard in zip(self.learners, shards, strict=True)]
        number = self.version + 1
        if number % config.sync_every == 0:
            # Queued behind the step: the learner hands its new weights to the generators and the jobs
            # launched next run on them (on-policy: the next batch), with no wait in between.
            self._sync(number)
            self._fill(pending_train=1)
        evaluation = None
        if number % config.eval_steps == 0 or number == config.steps:  # queued before the next step changes the weights
            evaluation = self.learners[0].evaluate.remote(self.task.eval_rows, self.task.correct_fn,
                                                          seed=config.seed * 1_000_003 - number)
        self.version = number
        sent = SimpleNamespace(summary=summary, results=results, puts=self.puts, evaluation=evaluation, waited=waited)
        self.puts = []  # checked with this step's results
        return sent

    def _finish_step(self, sent: SimpleNamespace, on_step) -> dict:
        """Read a sent step's results (one wait), write it to metrics.jsonl (keys after the slash) and
        TensorBoard (full names), checkpoint if due; returns its metrics.jsonl row."""
        import ray

        batch, *results = ray.get([sent.summary, *sent.results, *sent.puts])[:1 + len(sent.results)]
        # The step's time ends with its results: an evaluation queued behind it counts to the next step.
        now, elapsed = time.perf_counter(), time.time() - self.started
        seconds, self.finished_at = now - self.finished_at, now  # from the previous step's results: pipelined
        evaluation = ray.get(sent.evaluation) if sent.evaluation else {}
        if len({result[Metric.ALPHA] for result in results}) != 1:  # the all-reduce must keep ranks identical
            raise RuntimeError(f"learner ranks disagree on alpha: {[r[Metric.ALPHA] for r in results]}")
        self.step += 1
        self.consumed_uids.extend(batch["uid"])  # the buffer's summary of the batch: uid, staleness, reward lists
        self._collect(block=False)
        staleness = batch["staleness"]
        metrics = {
            **results[0],
            RunMetric.WAIT_SECONDS: sent.waited,
            RunMetric.SYNC_SECONDS: self.step_sync_seconds,
            RunMetric.REWARD_MEAN: sum(batch["reward"]) / len(staleness),
            RunMetric.STALENESS_MEAN: sum(staleness) / len(staleness),
            RunMetric.STALENESS_MAX: max(staleness),
            RunMetric.SAMPLES_PER_SECOND: len(staleness) / seconds,
            RunMetric.DROPPED_STALE: self.versions.evicted_count(),
            **self.counters,
            RunMetric.SECONDS: elapsed,
            **evaluation,
        }
        self.step_sync_seconds = 0.0
        row = {"step": self.step, **{jsonl_key(name): value for name, value in metrics.items()}}
        with open(self.output_dir / "metrics.jsonl", "a", encoding="utf-8") as handle:
            handle.write(json.dumps(row) + "\n")
        for name, value in metrics.items():
            if isinstance(value, int | float) and math.isfinite(value):
                self.writer.add_scalar(name, value, self.step)
        if self.config.save_steps > 0 and self.step % self.config.save_steps == 0:
            self.save_checkpoint()
        if on_step is not None:
            on_step(row)
        return row

    # ----- checkpoints --------------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        """Write checkpoints/step_<n>/ atomically and point `latest` at it (contents: docs/embedded.md).

        In-flight generation is collected first, so the replay buffer saved is everything generated
        so far: an async run resumed from here continues exactly as it would have.
        """
        import ray

        while self.inflight:
            self._collect(block=True)
        self.versions.evict_stale(self.version)  # both evict at this version: the check below compares like with like
        ray.get(self.buffer.evict_stale.remote(self.version))
        with self.run_dir.new_checkpoint(self.step, keep=self.config.max_ckpt_num) as directory:
            learner_state = ray.get([learner.save.remote(str(directory)) for learner in self.learners])[0]
            samples, evicted = ray.get(self.buffer.snapshot.remote())
            if (len(samples), evicted) != (self.versions.size(), self.versions.evicted_count()):
                raise RuntimeError(f"the driver's copy of the buffer ({self.versions.size()} held, "
                                   f"{self.versions.evicted_count()} evicted) differs from the buffer "
                                   f"({len(samples)}, {evicted})")
            torch.save({"buffer": [dataclasses.asdict(sample) for sample in samples],
                        "requeue": [dataclasses.asdict(job) for job in self.requeue]}, directory / "rollouts.pt")
            state = {"step": self.step, "version": self.version, "next_uid": self.next_uid,
                     "learner": learner_state, "dropped_stale": evicted, "prompt_rng": self.rng.bit_generator.state,
                     "counters": {jsonl_key(name): value for name, value in self.counters.items()},
                     "seconds": time.time() - self.started}
            (directory / COMPLETE_MARK).write_text(json.dumps(state), encoding="utf-8")
        return self.run_dir.checkpoints / f"step_{self.step}"

    def load_checkpoint(self, directory: Path) -> None:
        """Restore a checkpoint written by `save_checkpoint`: weights, optimizer, controller, buffer, RNGs."""
        import ray

        state = json.loads((directory / COMPLETE_MARK).read_text(encoding="utf-8"))
        ray.get([learner.load.remote(str(directory), state["learner"]) for learner in self.learners])
        self.step, self.version, self.next_uid = state["step"], state["version"], state["next_uid"]
        self.counters.update({TAGS[key]: value for key, value in state["counters"].items()})
        self.rng.bit_generator.state = state["prompt_rng"]
        self.started = time.time() - state["seconds"]
        rollouts = torch.load(directory / "rollouts.pt", weights_only=True)
        samples = [Sample(**s) for s in rollouts["buffer"]]
        ray.get(self.buffer.restore.remote(samples, state["dropped_stale"]))
        self.versions.restore([SimpleNamespace(version=sample.version) for sample in samples], state["dropped_stale"])
        self.requeue = deque(Job(**job) for job in rollouts["requeue"])
        self._sync(self.version)
        logger.info("resumed from %s at step %d", directory, self.step)

    def close(self) -> None:
        """Flush the event file and stop this trainer's actors (the Ray cluster itself stays up)."""
        import ray

        self.writer.close()
        for actor in [self.buffer, *self.learners, *self.generators]:
            ray.kill(actor)
        shutil.rmtree(self.rendezvous_dir, ignore_errors=True)

    # ----- the whole run ------------------------------------------------------------------------
    def run(self) -> dict:
        """Set up (unless done), optionally resume, train to --steps with a progress bar, write summary.json.

        Ctrl-C (on the main thread) stops after the step in flight, a second one at once; either way the
        actors are stopped, summary.json is written with interrupted = true and KeyboardInterrupt is raised.
        """
        from tqdm import tqdm

        config = self.config
        if not hasattr(self, "learners"):
            self.setup()
        interrupted, ctrl_c = False, SimpleNamespace(asked=False, closing=False)

        def on_ctrl_c(signum, frame) -> None:
            # Raised here, a KeyboardInterrupt lands in whatever runs at that moment, and a __del__ or a
            # C callback can drop it (a CI run once trained on to its last step after Ctrl-C). So the first
            # Ctrl-C only asks: the loop stops after the step in flight. A second one stops at once,
            # except once the actors are stopping and the summary is being written (a moment).
            if ctrl_c.closing:
                return
            if ctrl_c.asked:
                raise KeyboardInterrupt
            ctrl_c.asked = True
            os.write(2, b"[train] Ctrl-C: stopping after this step (again: at once)\n")

        on_main_thread = threading.current_thread() is threading.main_thread()  # signal.signal's condition
        previous_handler = signal.signal(signal.SIGINT, on_ctrl_c) if on_main_thread else None
        try:
            try:
                with tqdm(total=config.steps, initial=self.step, desc="train", disable=config.no_progress) as bar:
                    def show(row: dict) -> None:
                        bar.update(1)
                        bar.set_postfix(H=f"{row['entropy']:.3f}", alpha=f"{row['alpha']:+.2f}",
                                        R=f"{row['reward_mean']:.2f}")
                        if ctrl_c.asked:
                            raise KeyboardInterrupt

                    self.train(config.steps - self.step, on_step=show)
            except KeyboardInterrupt:  # keep what is finished: the summary covers the steps logged so far
                interrupted = True
            finally:
                ctrl_c.closing = True
                self.close()
            summary = self.write_summary(interrupted)
        finally:
            if on_main_thread:
                signal.signal(signal.SIGINT, previous_handler or signal.default_int_handler)
        if interrupted:
            raise KeyboardInterrupt
        return summary

    def write_summary(self, interrupted: bool = False) -> dict:
        """summary.json from metrics.jsonl (definitions: docs/compare.md), plus this run's settings."""
        from openrlhf_entropic.reporting.summary import summarize

        config = self.config
        rows = [json.loads(line) for line in self.run_dir.metrics.read_text().splitlines() if line] \
            if self.run_dir.metrics.is_file() else []
        summary = summarize(rows, self.entropic.target_entropy) if rows else {"steps": 0}
        summary.update(
            dropped_stale=rows[-1]["dropped_stale"] if rows else 0,
            **{jsonl_key(name): self.counters[name] for name in (
                RunMetric.DROPPED_NAN, RunMetric.DROPPED_INF, RunMetric.CLIPPED_REWARDS, RunMetric.GENERATOR_RESTARTS)},
            dropped_long_prompts=self.task.dropped_prompts, seconds=time.time() - self.started, mode=config.mode,
            max_staleness=config.max_staleness, entropic_enable=self.entropic.enable,
            entropic_mode=self.entropic.mode, interrupted=interrupted)
        (self.output_dir / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
        return summary
