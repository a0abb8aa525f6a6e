import json

import pytest

from openrlhf_entropic.cli.train import parse_args


def rejected(capsys, *argv):
    with pytest.raises(SystemExit):
        parse_args(list(argv))
    return capsys.readouterr().err


def test_preset_fills_untyped_flags_and_typed_flags_win():
    args, entropic = parse_args(["--entropic.enable", "--entropic.kp", "3", "--steps", "7"])
    assert args.steps == 7 and args.rollout_batch_size == 16  # typed / preset
    assert entropic.enable and entropic.kp == 3.0 and args.max_staleness == 0
    _, plain = parse_args([])
    assert not plain.enable and plain.target_entropy > 0


def test_max_staleness_and_entropic_max_staleness_are_one_setting():
    short, _ = parse_args(["--mode", "async", "--max-staleness", "3"])
    long, _ = parse_args(["--mode", "async", "--entropic.max_staleness", "3"])
    default, _ = parse_args(["--mode", "async"])
    assert short.max_staleness == long.max_staleness == 3 and default.max_staleness == 4


def test_impossible_flags_are_rejected_with_a_message(capsys):
    assert "needs --mode async" in rejected(capsys, "--max-staleness", "2")
    assert "--max-staleness must be an integer >= 0" in rejected(capsys, "--mode", "async", "--max-staleness", "-1")
    assert "--entropy-chunk-size must be >= 1" in rejected(capsys, "--entropic.entropy_chunk_size", "0")
    assert "target_entropy must be > 0" in rejected(capsys, "--entropic.target_entropy", "0")
    assert "--num-learners 200" in rejected(capsys, "--num-learners", "200")
    assert "--sync-every 1" in rejected(capsys, "--sync-every", "2")
    assert "--prompt-data needs --reward-func" in rejected(capsys, "--prompt-data", "x.jsonl")
    assert "--eval-k" in rejected(capsys, "--eval-k", "9", "--eval-n-samples", "4")
    assert "divisible by --num-generators" in rejected(capsys, "--num-generators", "3")


@pytest.mark.parametrize("argv, message", [
    (["--eps-clip", "-0.2"], "--eps-clip must be in (0, 1)"),
    (["--mode", "async", "--max-staleness", "0"], "--mode async with --max-staleness 0 is on-policy"),
    (["--mode", "async", "--max-staleness", "2", "--entropic.max_staleness", "3"], "are one setting; give it once"),
    (["--save-steps", "0"], "--save-steps must be -1 (never) or >= 1"),
    (["--actor-learning-rate", "-1"], "--actor-learning-rate must be > 0"),
    (["--generate-max-len", "0"], "--generate-max-len must be >= 1"),
    (["--resume", "--overwrite"], "pick one"),
    (["--pretrain", "/no/such/model"], "--pretrain /no/such/model: no such directory"),
    (["--colocate-all", "--mode", "async"], "--colocate-all needs --mode on_policy"),
    (["--colocate-all", "--num-learners", "2"], "--num-generators (1) must equal --num-learners (2)"),
    (["--colocate-all", "--num-learners", "2", "--num-generators", "2"], "--generator vllm needs --num-learners 1"),
    (["--colocate-all", "--generator", "hf", "--generator-dtype", "bfloat16"], "--generator-dtype must be float32"),
])
def test_flags_that_would_fail_later_are_rejected_at_start_up(capsys, argv, message):
    assert message in rejected(capsys, *argv)


def test_file_flags_are_checked_before_anything_starts(capsys, tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text('{"input": "a b c d =", "label": "a b c d"}\n')
    reward = tmp_path / "reward.txt"
    reward.write_text("def reward_func(q, p, l): return [0.0] * len(q)\n")
    assert "must be a Python file (.py)" in rejected(capsys, "--prompt-data", str(data), "--reward-func", str(reward))
    assert "no such file" in rejected(capsys, "--prompt-data", str(tmp_path / "nope.jsonl"), "--reward-func",
                                      str(reward))


def test_prompts_the_embedded_model_cannot_read_or_fit_are_refused_or_dropped(tmp_path):
    from openrlhf_entropic.cli.train import build_task
    from openrlhf_entropic.tasks import synthetic

    reward = tmp_path / "reward.py"
    reward.write_text("def reward_func(q, p, l):\n    return [0.0] * len(q)\n")
    rows = [{"input": r["prompt"], "label": r["label"]} for r in synthetic.make_prompts()[0][:30]]
    rows[7]["input"] = "a b c " + " ".join(["d"] * 40) + " ="  # too long for --prompt-max-len 12
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    flags = ["--prompt-data", str(data), "--reward-func", str(reward), "--warm-start-steps", "0",
             "--warm-start-cache", str(tmp_path / "cache")]
    task = build_task(parse_args([*flags, "--prompt-max-len", "12"])[0])
    assert task.dropped_prompts == 1 and len(task.train_rows) + len(task.eval_rows) == 29

    rows[3]["input"] = "what is two plus two ?"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(ValueError, match="words the embedded model does not know"):
        build_task(parse_args(flags)[0])


def test_non_utf8_data_names_the_file_and_line(tmp_path):
    from openrlhf_entropic.tasks.data import load_prompts

    data = tmp_path / "data.jsonl"
    data.write_bytes(b'{"input": "a", "label": "b"}\n{"input": "\xff", "label": "b"}\n')
    with pytest.raises(ValueError, match=r"data\.jsonl:line 2: not UTF-8"):
        load_prompts(data)
