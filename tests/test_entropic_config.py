"""The shared `--entropic.*` flags: parsing, presets, nested namespaces and validation."""

import argparse
import dataclasses
import types

import pytest

from openrlhf_entropic.entropic import EntroPICConfig, add_entropic_args


def parse(argv):
    parser = argparse.ArgumentParser()
    add_entropic_args(parser)
    return parser.parse_args(argv)


def test_every_field_has_a_flag_and_defaults_match_the_dataclass():
    args = parse([])
    for field in dataclasses.fields(EntroPICConfig):
        assert hasattr(args, f"entropic.{field.name}")
    assert EntroPICConfig.from_args(args) == EntroPICConfig()


def test_typed_flags_win_over_preset_values():
    args = parse(["--entropic.enable", "--entropic.kp", "3", "--entropic.mode", "covariance"])
    config = EntroPICConfig.from_args(args, kp=2.0, ki=0.5, mode="all_tokens", target_entropy=0.3)
    assert config.enable is True
    assert config.kp == 3.0 and config.mode == "covariance"  # typed
    assert config.ki == 0.5 and config.target_entropy == 0.3  # preset


def test_boolean_and_optional_values():
    assert EntroPICConfig.from_args(parse(["--entropic.enable", "false"])).enable is False
    assert EntroPICConfig.from_args(parse(["--entropic.enable", "true"])).enable is True
    assert EntroPICConfig.from_args(parse(["--entropic.target_start", "0.5"])).target_start == 0.5
    assert EntroPICConfig.from_args(parse(["--entropic.target_start", "none"])).target_start is None
    with pytest.raises(SystemExit):
        parse(["--entropic.enable", "maybe"])
    with pytest.raises(SystemExit):
        parse(["--entropic.mode", "bogus"])


@pytest.mark.parametrize("namespace", [argparse.Namespace, types.SimpleNamespace])
def test_nested_namespace_as_built_by_openrlhf_hierarchize(namespace):
    nested = argparse.Namespace(entropic=namespace(enable=True, target_entropy=0.2, kp=None))
    config = EntroPICConfig.from_args(nested, kp=4.0)
    assert (config.enable, config.target_entropy, config.kp) == (True, 0.2, 4.0)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--entropic.target_entropy", "0"], "target_entropy must be > 0"),
        (["--entropic.target_entropy", "nan"], "target_entropy must be > 0"),
        (["--entropic.alpha_max", "2"], "alpha_max"),
        (["--entropic.high_prob_threshold", "1.0"], "high_prob_threshold"),
        (["--entropic.min_ess_fraction", "-0.1"], "min_ess_fraction"),
        (["--entropic.iw_log_clip", "0"], "iw_log_clip"),
    ],
)
def test_impossible_values_are_rejected_with_the_flag_name(argv, message):
    with pytest.raises(ValueError, match=message):
        EntroPICConfig.from_args(parse(argv))
