"""Names of the metrics the runtimes log beside the core's `Metric`, and how a name is written down.

TensorBoard tags are the names as written ("rollout/staleness_mean"); metrics.jsonl keys are the
part after the slash ("staleness_mean"). `TAGS` maps each jsonl key back to its tag.
"""

from __future__ import annotations

from openrlhf_entropic.entropic.config import Metric


class RunMetric:
    STALENESS_MEAN = "rollout/staleness_mean"
    STALENESS_MAX = "rollout/staleness_max"
    DROPPED_STALE = "rollout/dropped_stale"
    REWARD_MEAN = "rollout/reward_mean"
    DROPPED_NAN = "rollout/dropped_nan"
    DROPPED_INF = "rollout/dropped_inf"
    CLIPPED_REWARDS = "rollout/clipped_rewards"
    GENERATOR_RESTARTS = "rollout/generator_restarts"
    REQUEUED_JOBS = "rollout/requeued_jobs"
    SAMPLES_PER_SECOND = "perf/samples_per_second"
    GENERATE_SECONDS = "perf/generate_seconds"
    TRAIN_SECONDS = "perf/train_seconds"
    FORWARD_SECONDS = "perf/forward_seconds"  # learner rank 0, this step: forwards (measuring pass included)
    BACKWARD_SECONDS = "perf/backward_seconds"
    OPTIMIZER_SECONDS = "perf/optimizer_seconds"
    WAIT_SECONDS = "perf/wait_seconds"  # driver, this step: blocked until the buffer held a batch
    SYNC_SECONDS = "perf/sync_seconds"  # generators, this step: loading weights (0 for hf with --colocate-all)
    SECONDS = "perf/seconds"
    EVAL_ENTROPY_TRUE = "eval/entropy_true"
    EVAL_PASS_AT_1 = "eval/pass_at_1"
    EVAL_PASS_AT_K = "eval/pass_at_k"
    EVAL_K = "eval/k"
    EVAL_DROPPED_NAN = "eval/dropped_nan"


def jsonl_key(tag: str) -> str:
    """The metrics.jsonl key of a metric name: "entropic/alpha" -> "alpha"."""
    return tag.split("/", 1)[1]


TAGS = {jsonl_key(tag): tag for kind in (Metric, RunMetric) for name, tag in vars(kind).items() if name.isupper()}
