"""The embedded training loop: generators -> replay buffer -> DeepSpeed learners -> weight sync.

One loop serves on-policy (K = 0) and async off-policy (K > 0). The only difference is the rule
for launching generation: a job is launched only if the batch it will land in can still be
trained within K versions of the weights the generators hold now. With K = 0 that means a job is
launched only after the newest weights were synced, so generators wait for fresh weights; with
K > 0 they run up to K batches ahead while the learners train.

metrics.jsonl: one JSON line per training step, keys = the part after the slash of `Metric`
names (step, entropy, entropy_iw, ess_fraction, alpha, p_term, i_term, target_entropy,
policy_loss, clip_fraction, adjusted_fraction, reward_mean, staleness_mean, staleness_max,
samples_per_second, dropped_stale, nonfinite_skipped) plus dropped_nan, generator_restarts,
requeued_jobs, generate_seconds (cumulative time inside generate), train_seconds (this step's
time inside the learners) and seconds (since start). Every `--eval-steps` steps (and at the
last step) the same line also carries the evaluation: entropy_true, pass_at_1, pass_at_k and k
(extra keys on that step's row, no separate eval rows). A resumed run appends; steps after the checkpoint are
logged again and the later line wins.

Checkpoints (`<output-dir>/checkpoints/step_<n>/`, `latest` names the newest): model weights
(safetensors), each learner rank's optimizer partition and RNG, the controller state, the step,
the prompt sampler and generator RNG states (tensors and plain data only). Drop policy: the
replay buffer's contents and in-flight generations are not saved; a resumed run regenerates
from the saved weights. On-policy this loses nothing (the buffer is empty between steps).
"""

from __future__ import annotations

import json
import logging
import math
import socket
import time
from collections import deque
from pathlib import Path

import numpy as np
import torch

from openrlhf_entropic.entropic import EntroPICConfig
from openrlhf_entropic.entropic.config import Metric
from openrlhf_entropic.runtime.local.buffer import ReplayBuffer
from openrlhf_entropic.runtime.local.generator import Generator
from openrlhf_entropic.runtime.local.learner import Learner

logger = logging.getLogger(__name__)

TAGS = {name.split("/", 1)[1]: name for key, name in vars(Metric).items() if key.isupper()}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LocalTrainer:
    """Owns the Ray actors and runs the loop. `args` is the CLI namespace (see `cli/train.py`).

    `task` holds model_factory (picklable, returns (model, tokenizer)), reward_fn, correct_fn (for
    pass@k), train_rows and eval_rows. Call `run()`; tests may call `setup()` and `train(steps)` to act between steps.
    """

    def __init__(self, args, entropic: EntroPICConfig, task: dict):
        self.args, self.entropic, self.task = args, entropic, task
        self.output_dir = Path(args.output_dir)
        self.max_staleness = entropic.max_staleness or 0
        self.batch_samples = args.rollout_batch_size * args.n_samples_per_prompt
        self.job_prompts = args.rollout_batch_size // args.num_generators
        # One job of slack beyond K + 1 batches: a batch short of samples (NaN rewards dropped) can be topped up.
        job_samples = self.job_prompts * args.n_samples_per_prompt
        self.capacity = args.buffer_capacity or (self.max_staleness + 1) * self.batch_samples + job_samples
        self.sampling = {"n_samples": args.n_samples_per_prompt, "temperature": args.temperature,
                         "top_p": args.top_p, "max_new_tokens": args.generate_max_len, "advantage": args.advantage}
        self.rng = np.random.default_rng(args.seed)
        self.step = self.version = self.synced_version = self.next_uid = 0
        self.counters = {"dropped_nan": 0, "generator_restarts": 0, "requeued_jobs": 0, "generate_seconds": 0.0}
        self.inflight: dict = {}  # ObjectRef -> (job, generator index, generator handle)
        self.requeue: deque[dict] = deque()  # jobs whose generator died, launched again first
        self.consumed_uids: list[int] = []  # job uid of every trained sample, in order (tests check it)
        self.weights_ref = None
        self.started = time.time()
        self.dropped_before_resume = 0  # the buffer actor counts from 0 again after a resume

    # ----- actors -------------------------------------------------------------------------------
    def setup(self) -> None:
        """Start (or join) Ray, create the buffer, learner and generator actors, resume if asked."""
        import ray
        from torch.utils.tensorboard import SummaryWriter

        args = self.args
        self.output_dir.mkdir(parents=True, exist_ok=True)
        if not args.resume:
            (self.output_dir / "metrics.jsonl").unlink(missing_ok=True)
        self.writer = SummaryWriter(str(self.output_dir))
        if not ray.is_initialized():
            if args.ray_address:
                ray.init(address=args.ray_address, logging_level=logging.WARNING)
            else:
                ray.init(num_cpus=args.ray_num_cpus, include_dashboard=args.ray_dashboard,
                         _node_ip_address="127.0.0.1", logging_level=logging.WARNING)
        self.buffer = ray.remote(num_cpus=0)(ReplayBuffer).remote(self.capacity, self.max_staleness)
        settings = {key: getattr(args, key) for key in (
            "temperature", "actor_learning_rate", "micro_train_batch_size", "train_batch_size", "max_epochs",
            "eps_clip", "max_norm")}
        port = _free_port()
        learner_cls = ray.remote(num_cpus=0, num_gpus=args.learner_num_gpus)(Learner)
        self.learners = [
            learner_cls.remote(rank, args.num_learners, port, self.task["model_factory"], settings,
                               vars(self.entropic), args.seed)
            for rank in range(args.num_learners)
        ]
        self.generators = [self._new_generator(index) for index in range(args.num_generators)]
        # Wait until every actor is up, so start-up errors surface here and not mid-run.
        ray.get([g.get_rng_state.remote() for g in self.generators] + [r.get_weights.remote() for r in self.learners])
        self._sync()
        if args.resume and not self.load_checkpoint():
            logger.warning("--resume: no checkpoint in %s, starting from step 0", self.output_dir)

    def _new_generator(self, index: int):
        import ray

        seed = self.args.seed + 1000 * (index + 1) + 7919 * self.counters["generator_restarts"]
        generator = ray.remote(num_cpus=0)(Generator).remote(self.task["model_factory"], self.task["reward_fn"],
                                                            self.sampling, seed)
        if self.weights_ref is not None:
            generator.load_weights.remote(self.weights_ref, self.synced_version)
        return generator

    def _sync(self) -> None:
        """Send the learners' current weights to every generator (applied before their next job)."""
        self.weights_ref = self.learners[0].get_weights.remote()
        self.synced_version = self.version
        for generator in self.generators:
            generator.load_weights.remote(self.weights_ref, self.version)

    # ----- generation ---------------------------------------------------------------------------
    def _fill(self, pending_train: int) -> None:
        """Launch jobs while the capacity allows and the samples would be fresh enough when trained.

        A new job's samples land behind `ahead` samples, so they are trained at version
        version + pending_train + ahead // batch, with weights of version `synced_version`.
        """
        import ray

        ahead = ray.get(self.buffer.drop_stale.remote(self.version))
        ahead += sum(len(job["rows"]) for job, _, _ in self.inflight.values()) * self.args.n_samples_per_prompt
        job_samples = self.job_prompts * self.args.n_samples_per_prompt
        while ahead + job_samples <= self.capacity:
            trained_at = self.version + pending_train + ahead // self.batch_samples
            if trained_at - self.synced_version > self.max_staleness:
                break
            job = self.requeue.popleft() if self.requeue else self._new_job()
            busy = [sum(1 for _, i, _ in self.inflight.values() if i == g) for g in range(len(self.generators))]
            index = busy.index(min(busy))  # the generator with the fewest jobs in flight
            ref = self.generators[index].generate.remote(job)
            self.inflight[ref] = (job, index, self.generators[index])
            ahead += len(job["rows"]) * self.args.n_samples_per_prompt

    def _new_job(self) -> dict:
        rows = self.task["train_rows"]
        picks = self.rng.choice(len(rows), size=self.job_prompts, replace=len(rows) < self.job_prompts)
        self.next_uid += 1
        return {"uid": self.next_uid, "rows": [rows[i] for i in picks]}

    def _collect(self, block: bool) -> None:
        """Move finished jobs into the buffer; a job whose generator died is re-queued, the actor restarted."""
        import ray
        from ray.exceptions import RayActorError

        if not self.inflight:
            return
        ready, _ = ray.wait(list(self.inflight), num_returns=1 if block else len(self.inflight),
                            timeout=None if block else 0)
        for ref in ready:
            job, index, handle = self.inflight.pop(ref)
            try:
                result = ray.get(ref)
            except RayActorError:
                if self.generators[index] is handle:  # first failed job of this actor: restart it
                    logger.warning("generator %d died; restarting it and re-queuing its jobs", index)
                    self.counters["generator_restarts"] += 1
                    self.generators[index] = self._new_generator(index)
                self.counters["requeued_jobs"] += 1
                self.requeue.appendleft(job)
                continue
            self.counters["dropped_nan"] += result["dropped_nan"]
            self.counters["generate_seconds"] += result["seconds"]
            if result["samples"]:
                ray.get(self.buffer.put.remote(result["samples"]))

    # ----- training -----------------------------------------------------------------------------
    def train(self, steps: int) -> list[dict]:
        """Run `steps` training steps (stopping at --steps) and return their metrics rows."""
        import ray

        rows = []
        for _ in range(steps):
            if self.step >= self.args.steps:
                break
            started = time.perf_counter()
            self._fill(pending_train=0)
            while ray.get(self.buffer.drop_stale.remote(self.version)) < self.batch_samples:
                if not self.inflight:
                    raise RuntimeError(f"cannot fill a batch of {self.batch_samples} samples: nothing in flight and "
                                       f"the buffer capacity ({self.capacity}) allows no new job")
                self._collect(block=True)
                self._fill(pending_train=0)
            batch = ray.get(self.buffer.take.remote(self.batch_samples, self.version))
            self._fill(pending_train=1)  # async: generators keep working while the learners train
            shard = self.batch_samples // self.args.num_learners
            results = ray.get([learner.train_step.remote(batch[rank * shard:(rank + 1) * shard])
                               for rank, learner in enumerate(self.learners)])
            if len({result["alpha"] for result in results}) != 1:  # the all-reduce must keep ranks identical
                raise RuntimeError(f"learner ranks disagree on alpha: {[r['alpha'] for r in results]}")
            self.version += 1
            self.step += 1
            self.consumed_uids.extend(sample["uid"] for sample in batch)
            if self.version % self.args.sync_every == 0:
                self._sync()
            self._collect(block=False)
            rows.append(self._log_row(results[0], batch, time.perf_counter() - started))
        return rows

    def _log_row(self, metrics: dict, batch: list[dict], seconds: float) -> dict:
        import ray

        staleness = [sample["staleness"] for sample in batch]
        row = {"step": self.step, **{k: v for k, v in metrics.items() if k != "version"},
               "reward_mean": sum(s["reward"] for s in batch) / len(batch),
               "staleness_mean": sum(staleness) / len(staleness), "staleness_max": max(staleness),
               "samples_per_second": len(batch) / seconds,
               "dropped_stale": ray.get(self.buffer.stats.remote())["dropped_stale"] + self.dropped_before_resume,
               **self.counters, "seconds": time.time() - self.started}
        if self.step % self.args.eval_steps == 0 or self.step == self.args.steps:
            rows = self.task["eval_rows"]
            row.update(ray.get(self.learners[0].evaluate.remote(rows, self.task["correct_fn"], self.args.eval_n_samples,
                                                              self.args.eval_k, self.sampling)), k=self.args.eval_k)
        with open(self.output_dir / "metrics.jsonl", "a", encoding="utf-8") as handle:
            handle.write(json.dumps(row) + "\n")
        for key, value in row.items():
            if key != "step" and isinstance(value, int | float) and math.isfinite(value):
                self.writer.add_scalar(TAGS.get(key, f"local/{key}"), value, self.step)
        if self.args.save_steps > 0 and self.step % self.args.save_steps == 0:
            self.save_checkpoint()
        return row

    # ----- checkpoints --------------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        """Write checkpoints/step_<n>/ and point `latest` at it (see the module docstring)."""
        import ray

        directory = self.output_dir / "checkpoints" / f"step_{self.step}"
        directory.mkdir(parents=True, exist_ok=True)
        learner_state = ray.get([learner.save.remote(str(directory)) for learner in self.learners])[0]
        torch.save({"generator_rng": ray.get([g.get_rng_state.remote() for g in self.generators])},
                   directory / "generators.pt")
        dropped = ray.get(self.buffer.stats.remote())["dropped_stale"] + self.dropped_before_resume
        state = {"step": self.step, "version": self.version, "next_uid": self.next_uid, "learner": learner_state,
                 "counters": self.counters, "dropped_stale": dropped, "prompt_rng": self.rng.bit_generator.state}
        (directory / "trainer_state.json").write_text(json.dumps(state), encoding="utf-8")
        (self.output_dir / "checkpoints" / "latest").write_text(directory.name, encoding="utf-8")
        return directory

    def load_checkpoint(self) -> bool:
        """Restore the latest checkpoint in --output-dir; False when there is none."""
        import ray

        latest = self.output_dir / "checkpoints" / "latest"
        if not latest.is_file():
            return False
        directory = latest.parent / latest.read_text(encoding="utf-8").strip()
        state = json.loads((directory / "trainer_state.json").read_text(encoding="utf-8"))
        ray.get([learner.load.remote(str(directory), state["learner"]) for learner in self.learners])
        self.step, self.version, self.next_uid = state["step"], state["version"], state["next_uid"]
        self.counters.update(state["counters"])
        self.dropped_before_resume = state["dropped_stale"]
        self.rng.bit_generator.state = state["prompt_rng"]
        self._sync()
        generator_rng = torch.load(directory / "generators.pt", weights_only=True)["generator_rng"]
        if len(generator_rng) == len(self.generators):
            ray.get([g.set_rng_state.remote(s) for g, s in zip(self.generators, generator_rng, strict=True)])
        logger.info("resumed from %s at step %d", directory, self.step)
        return True

    def close(self) -> None:
        """Flush the event file and stop this trainer's actors (the Ray cluster itself stays up)."""
        import ray

        self.writer.close()
        for actor in [self.buffer, *self.learners, *self.generators]:
            ray.kill(actor)

    # ----- the whole run ------------------------------------------------------------------------
    def run(self) -> dict:
        """Set up (unless done), optionally resume, train to --steps with a progress bar, write summary.json."""
        from tqdm import tqdm

        from openrlhf_entropic.runtime.summary import summarize

        if not hasattr(self, "learners"):
            self.setup()
        try:
            with tqdm(total=self.args.steps, initial=self.step, desc="train", disable=self.args.no_progress) as bar:
                while self.step < self.args.steps:
                    row = self.train(1)[0]
                    bar.update(1)
                    bar.set_postfix(H=f"{row['entropy']:.3f}", alpha=f"{row['alpha']:+.2f}",
                                    R=f"{row['reward_mean']:.2f}")
        finally:
            self.close()
        rows = [json.loads(line) for line in (self.output_dir / "metrics.jsonl").read_text().splitlines() if line]
        summary = summarize(rows, self.entropic.target_entropy)
        summary.update(dropped_stale=rows[-1]["dropped_stale"], dropped_nan=self.counters["dropped_nan"],
                       generator_restarts=self.counters["generator_restarts"], seconds=time.time() - self.started,
                       mode=self.args.mode, max_staleness=self.max_staleness, entropic_enable=self.entropic.enable,
                       entropic_mode=self.entropic.mode)
        (self.output_dir / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
        return summary
