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
